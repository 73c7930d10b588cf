"""LoRA experts for the LLM track, and their task vectors.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Sec. 4.1)
freezes a weight W [out, in] and learns two small factors, A [r, in] and B [out, r]:

    W' = W + (alpha / r) * B @ A          (B starts at zero, so W' = W before training)

The task vector of a LoRA expert is therefore the dense, rank-r update of every adapted matrix,

    tau[key] = (alpha / r) * B @ A        (:meth:`LoraExpert.delta`)

and every merging method of the course works on ``theta_0 + tau`` exactly as on a fully
fine-tuned model. Merging in this Delta-W space is what the reference recommends. The
Twin-Merging code merges the factors instead (A* = 0.3 * sum A_t and B* = 0.3 * sum B_t, then
uses B* @ A*): :func:`factor_merge` implements that option so that the notebook can show that
B* A* is *not* the merge of the B_t A_t (cross terms B_s A_t appear).

CPU budget: only the last ``top_layers`` decoder layers are adapted. The frozen layers below
them compute the same hidden states at every step, so we run them once per training example
and train on the top layers alone (forward *and* backward); the loss is computed on the answer
tokens only, so the 49k-word output layer runs on a handful of positions per example. The
checkpoint with the best validation accuracy is kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from course_lib.config import progress_bar
from course_lib.data.text import TextExample, TextTask
from course_lib.files import save_tensors
from course_lib.models.zoo import Manifest
from course_lib.state import check_number

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """How every LoRA expert is trained (one spec for all tasks; part of the cache key)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    top_layers: int = 10  # adapt the last N decoder layers only
    lr: float = 2e-3
    steps: int = 40
    batch_size: int = 16
    eval_every: int = 10  # validation accuracy every N steps; the best checkpoint is kept
    val_limit: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "top_layers", "steps", "batch_size", "eval_every", "val_limit"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LoraSpec.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"LoraSpec.lr must be > 0, got {self.lr!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoraExpert:
    """The factors of one task's LoRA: ``{weight key: (A [r, in], B [out, r])}``."""

    task: str
    factors: dict[str, tuple[Tensor, Tensor]]
    scale: float
    history: dict = field(default_factory=dict)

    def delta(self) -> dict[str, Tensor]:
        """tau[key] = scale * B @ A: the dense update of every adapted weight."""
        return {k: self.scale * (b @ a) for k, (a, b) in self.factors.items()}

    def state(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """theta_0 + tau on the adapted keys: the expert as a state dict for the mergers."""
        out = {}
        for key, d in self.delta().items():
            if key not in base:
                raise ValueError(f"LoRA key {key!r} is not a weight of the base model")
            if base[key].shape != d.shape:
                raise ValueError(
                    f"LoRA update for {key!r} has shape {tuple(d.shape)}, "
                    f"the base weight {tuple(base[key].shape)}"
                )
            out[key] = base[key].float() + d
        return out


def layer_index(key: str) -> int | None:
    """The decoder layer of a weight key (``model.layers.<i>.…`` -> i), None outside the layers."""
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def adapted_keys(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """The weight keys LoRA adapts under ``spec`` (the keys every LLM merge touches)."""
    n_layers = model.config.num_hidden_layers
    first = n_layers - min(spec.top_layers, n_layers)
    keys = []
    for name, _ in model.named_parameters():
        layer = layer_index(name)
        if (
            name.endswith(".weight")
            and layer is not None
            and layer >= first
            and name.split(".")[-2] in spec.targets
        ):
            keys.append(name)
    if not keys:
        raise ValueError(f"no weight of the model matches the LoRA targets {spec.targets}")
    return keys


def base_state(model: torch.nn.Module, keys: Sequence[str]) -> dict[str, Tensor]:
    """A float32 copy of the base model's weights at ``keys``: the ``pretrained`` of the merges."""
    params = dict(model.named_parameters())
    return {k: params[k].detach().float().cpu().clone() for k in keys}


# ----------------------------------------------------------------------------- training


def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn in ``tok``'s chat template (``<|im_end|>`` for
    SmolLM2 and Qwen2.5): LoRA experts learn to end their answers with it, decoding stops at it.

    It is read from the template, not taken from ``tok.eos_token``, which depends on how the
    tokenizer was made: transformers 5.17, converting SmolLM2's GGUF file, names
    ``<|im_start|>`` the end-of-sequence token (5.23 names ``<|im_end|>``), and decoding that
    waits for it runs past the answer ("16\n", "table urban fieldfield"). When the template
    closes a turn with plain text rather than a special token, ``tok.eos_token_id`` is used.
    """
    marker = "ANSWERMARKER"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    text = tok.apply_chat_template(messages, tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    added = tok.added_tokens_decoder.get(ids[0]) if ids else None
    if ids and ((added is not None and added.special) or ids[0] in tok.all_special_ids):
        return int(ids[0])
    if tok.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no end-of-sequence token and its chat template ends "
            "an assistant turn without a special token: nothing to stop decoding at"
        )
    return int(tok.eos_token_id)


def encode_for_training(tok, task: TextTask, examples: Sequence[TextExample]):
    """Left-padded ``(input_ids, labels, attention_mask)``: prompt (chat template) + answer +
    end-of-turn; labels are -100 everywhere except the answer and its end-of-turn token."""
    end = end_of_turn_id(tok)
    rows = []
    for ex in examples:
        prompt = tok.apply_chat_template(
            task.messages(ex), tokenize=False, add_generation_prompt=True
        )
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(ex.answer, add_special_tokens=False)["input_ids"] + [end]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, width - len(x) :] = torch.tensor(x)
        labels[i, width - len(y) :] = torch.tensor(y)
        mask[i, width - len(x) :] = 1
    return ids, labels, mask


def answer_loss(
    causal_lm, ids: Tensor, labels: Tensor, mask: Tensor, inputs_embeds: Tensor | None = None
) -> Tensor:
    """Cross-entropy of the answer tokens; the output layer runs only where a label is set.

    With ``inputs_embeds`` (hidden states cached below the adapted layers, see
    :func:`frozen_prefix`), the decoder runs from there instead of from the token ids.
    """
    if inputs_embeds is None:
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        hidden = causal_lm.model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, target[keep])


@torch.no_grad()
def cache_frozen_prefix(causal_lm, ids: Tensor, mask: Tensor, first: int) -> Tensor:
    """Hidden states entering decoder layer ``first`` for every training sequence.

    The layers below the first adapted one are frozen and see the same inputs at every step:
    run them once, then train on the top layers only (:func:`top_layers_only`)."""
    out = []
    for start in range(0, len(ids), 32):
        h = causal_lm.model(
            input_ids=ids[start : start + 32],
            attention_mask=mask[start : start + 32],
            output_hidden_states=True,
        ).hidden_states
        out.append(h[first])  # hidden_states[i] is the input of layer i
    return torch.cat(out)


@contextlib.contextmanager
def top_layers_only(causal_lm, first: int):
    """Temporarily keep decoder layers ``first..`` only (their inputs come from the cache)."""
    layers = causal_lm.model.layers
    causal_lm.model.layers = torch.nn.ModuleList(list(layers)[first:])
    try:
        yield causal_lm
    finally:
        causal_lm.model.layers = layers


def _factors(peft_model) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            a = module.lora_A["default"].weight.detach().float().cpu().clone()
            b = module.lora_B["default"].weight.detach().float().cpu().clone()
            out[key] = (a, b)
    return out


def train_lora(
    model,
    tok,
    task: TextTask,
    spec: LoraSpec = LoraSpec(),
    *,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    progress: bool = True,
) -> LoraExpert:
    """Fine-tune a LoRA on ``task``'s train split (AdamW, constant lr) on a copy of ``model``.

    ``evaluate(model) -> accuracy`` is called every ``spec.eval_every`` steps (the validation
    split); the factors of the best call are returned. ``model`` itself is not modified.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        layers_to_transform=list(range(n_layers - min(spec.top_layers, n_layers), n_layers)),
        lora_dropout=0.0,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; not ours to fix
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        pm = get_peft_model(copy.deepcopy(model), cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=spec.lr)
    ids, labels, mask = encode_for_training(tok, task, task.examples("train"))
    ids, labels, mask = (t.to(model.device) for t in (ids, labels, mask))
    gen = torch.Generator().manual_seed(spec.seed)
    causal_lm = pm.get_base_model()
    first = n_layers - min(spec.top_layers, n_layers)
    prefix = cache_frozen_prefix(causal_lm, ids, mask, first)
    hist = {"loss": [], "val_step": [], "val_accuracy": [], "best_step": 0}
    best, best_acc = _factors(pm), -1.0
    t0 = time.perf_counter()
    bar = progress_bar(range(1, spec.steps + 1), desc=f"LoRA {task.name}", progress=progress)
    for step in bar:
        pm.train()
        idx = torch.randint(0, len(ids), (spec.batch_size,), generator=gen)
        with top_layers_only(causal_lm, first):
            loss = answer_loss(causal_lm, ids[idx], labels[idx], mask[idx], prefix[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["loss"].append(round(loss.item(), 4))
        if evaluate is not None and (step % spec.eval_every == 0 or step == spec.steps):
            pm.eval()
            acc = float(evaluate(pm))
            hist["val_step"].append(step)
            hist["val_accuracy"].append(acc)
            if acc > best_acc:
                best_acc, best, hist["best_step"] = acc, _factors(pm), step
    if evaluate is None:
        best, hist["best_step"] = _factors(pm), spec.steps
    hist["seconds"] = round(time.perf_counter() - t0, 1)
    return LoraExpert(task.name, best, spec.scale, hist)


# ----------------------------------------------------------------------------- cache


def save_expert(expert: LoraExpert, path: Path) -> None:
    tensors = {}
    for key, (a, b) in expert.factors.items():
        tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"] = a, b
    save_tensors(path, tensors)


def load_expert(path: Path, task: str, scale: float, history: dict | None = None) -> LoraExpert:
    # clone: safetensors may map the file into memory, and the factors must not change with it
    flat = {k: v.clone() for k, v in load_file(str(path)).items()}
    keys = sorted({k.rsplit(".", 1)[0] for k in flat})
    factors = {k: (flat[f"{k}.lora_A"], flat[f"{k}.lora_B"]) for k in keys}
    return LoraExpert(task, factors, scale, history or {})


def build_experts(
    model,
    tok,
    tasks: Mapping[str, TextTask],
    root: Path,
    spec: LoraSpec = LoraSpec(),
    *,
    base_id: str,
    evaluate: Callable[[torch.nn.Module, TextTask], float] | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, LoraExpert]:
    """Train (or load from ``root``) one LoRA expert per task.

    The cache key is the spec, ``base_id`` (what identifies the base weights) and the train and
    validation prompts; files are written atomically and checked by sha256, so a changed spec
    retrains and an interrupted build resumes with the missing tasks.
    """
    data = {
        t: [task.system]
        + [e.prompt + "=" + e.answer for s in ("train", "val") for e in task.examples(s)]
        for t, task in tasks.items()
    }
    data_hash = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    cfg = {"spec": asdict(spec), "base": base_id, "data": data_hash}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    man = Manifest(root, digest, cfg)  # a changed configuration empties root
    root.mkdir(parents=True, exist_ok=True)
    experts = {}
    for name, task in tasks.items():
        fname = f"{name}.safetensors"
        if not man.valid(fname):
            ev = (lambda m, task=task: evaluate(m, task)) if evaluate else None
            expert = train_lora(model, tok, task, spec, evaluate=ev, progress=progress)
            save_expert(expert, root / fname)
            man.record(fname, history=expert.history)
            log(
                f"LoRA expert {name}: {expert.history['seconds']:.0f} s, best val step "
                f"{expert.history['best_step']}"
            )
        info = man.data["info"].get(fname, {}).get("history", {})
        experts[name] = load_expert(root / fname, name, spec.scale, info)
    return experts


# ----------------------------------------------------------------------------- factor merging


def factor_merge(experts: Sequence[LoraExpert], scaling: float = 0.3) -> dict[str, Tensor]:
    """The Twin-Merging code's option: merge the factors, A* = s sum A_t, B* = s sum B_t, and
    return the update scale * B* @ A*. Not equal to s sum_t scale * B_t @ A_t (cross terms)."""
    if not experts:
        raise ValueError("factor_merge needs at least one expert")
    scaling = check_number("scaling", scaling)
    keys = list(experts[0].factors)
    first = experts[0]
    for e in experts[1:]:
        if list(e.factors) != keys:
            raise ValueError(f"expert {e.task!r} adapts other keys than {first.task!r}")
        if e.scale != first.scale:  # one scale multiplies B* A*: a differing one would be lost
            raise ValueError(
                f"expert {e.task!r} has LoRA scale {e.scale} but {first.task!r} has {first.scale}; "
                "factor merging needs one alpha / r for all experts"
            )
        for k in keys:
            shapes = [tuple(f.shape) for f in (*e.factors[k], *first.factors[k])]
            if shapes[:2] != shapes[2:]:
                raise ValueError(
                    f"key {k!r}: expert {e.task!r} has factors A {list(shapes[0])}, "
                    f"B {list(shapes[1])} but {first.task!r} has A {list(shapes[2])}, "
                    f"B {list(shapes[3])}"
                )
    out = {}
    for k in keys:
        a = scaling * sum(e.factors[k][0] for e in experts)
        b = scaling * sum(e.factors[k][1] for e in experts)
        out[k] = experts[0].scale * (b @ a)
    return out
