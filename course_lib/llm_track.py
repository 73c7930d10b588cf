"""The LLM track: SmolLM2 + four LoRA experts, merged with the same methods as the vision track.

:func:`load_llm_zoo` gives an :class:`LLMZoo` with the same shape as the vision ``Zoo``:
``pretrained`` (the base weights at the LoRA-adapted keys), ``experts`` (theta_0 + B A per task),
``finetuned()`` and ``evaluate(state, split)``. So every merge of ``course_lib.merging`` and the
lambda search of ``course_lib.experiments`` run unchanged on the LLM; only the evaluation differs
(batched greedy decoding, exact match).

Twin-Merging on the LLM (Lu et al. 2024, Sec. 3.3): the router reads the base model's mean-pooled
last hidden state of the prompt (deterministic, unlike the reference code, which samples 16 tokens
first; see the reference notes §2.6). Inputs are merged for one at a time (``mode="input"``) or
grouped by the task the router picks, one merged model per group (``mode="group"``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from course_lib import config, evalcache
from course_lib.config import progress_bar
from course_lib.data.text import TextExample, TextTask, exact_match, load_text_tasks
from course_lib.merging import compress, merge_with_weights, shared_expert, train_router
from course_lib.merging import twin_vectors as make_twin_vectors
from course_lib.merging.twin import (
    CompressedVector,
    Router,
    compressed_from_tensors,
    compressed_tensors,
)
from course_lib.models import llm
from course_lib.models.lora import (
    LoraExpert,
    LoraSpec,
    adapted_keys,
    base_state,
    build_experts,
    layer_index,
)
from course_lib.state import check_count

StateDict = dict[str, Tensor]

# lambda grids for the LLM track (chosen on VAL_LIMIT validation questions per task)
LAMBDAS_TA = (0.2, 0.3, 0.5)
LAMBDAS_TIES = (0.5, 0.75, 1.0)
VAL_LIMIT = 16


@dataclass
class LLMZoo:
    """The base LLM, its tokenizer, the tasks and the LoRA experts as state dicts."""

    profile: str
    model: torch.nn.Module
    tok: object
    tasks: dict[str, TextTask]
    spec: LoraSpec
    loras: dict[str, LoraExpert]
    pretrained: StateDict
    experts: dict[str, StateDict]
    info: dict = field(default_factory=dict)
    world: str = ""  # the base model, LoRA recipe and task sizes (``llm.world``)
    frozen: llm.FrozenLayers | None = field(init=False, repr=False)
    merged: bool = field(default=False, init=False, repr=False)  # a state is written in the model

    def __post_init__(self):
        # the merges change the adapted layers only: below the lowest one, every merged model
        # is the base model, and generation reuses that part of the prompt work
        layers = {k: layer_index(k) for k in self.pretrained}
        outside = [k for k, i in layers.items() if i is None]
        if outside:
            raise ValueError(f"{outside[0]!r} is not a decoder-layer weight (LoRA adapts layers)")
        first = min(layers.values())
        self.frozen = llm.FrozenLayers(self.model, first) if first > 0 else None

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def finetuned(self) -> list[StateDict]:
        return [self.experts[t] for t in self.tasks]

    @contextlib.contextmanager
    def using(self, state: Mapping[str, Tensor] | None) -> Iterator[torch.nn.Module]:
        """The base model with ``state`` written into its adapted weights (restored after)."""
        params = dict(self.model.named_parameters())
        unknown = [k for k in (state or {}) if k not in self.pretrained]
        if unknown:
            raise ValueError(f"key {unknown[0]!r} is not one of the LLM's adapted weights")
        try:
            with torch.no_grad():
                for k, v in (state or {}).items():
                    if v.shape != params[k].shape:
                        raise ValueError(
                            f"{k!r}: shape {tuple(v.shape)}, model has {tuple(params[k].shape)}"
                        )
                    params[k].copy_(v)
            self.merged = bool(state)
            yield self.model
        finally:
            self.merged = False
            with torch.no_grad():
                for k in state or {}:
                    params[k].copy_(self.pretrained[k])

    def answers(
        self, state: Mapping[str, Tensor] | None, task: str, split: str = "test", limit=None
    ) -> list[str]:
        if limit is not None:  # examples[:-1] would silently drop the last example
            check_count("limit", limit)
        t = self.tasks[task]
        with self.using(state) as m:
            return llm.generate(
                m,
                self.tok,
                llm.chat_prompts(self.tok, t, t.examples(split)[:limit]),
                max_new_tokens=llm.max_new_tokens_for(self.tok, t),
                frozen=self.frozen,
            )

    def evaluate(
        self,
        state: Mapping[str, Tensor] | None = None,
        split: str = "test",
        tasks: Sequence[str] | None = None,
        *,
        limit: int | None = None,
    ) -> dict[str, float]:
        """Exact-match accuracy (%) of one merged state on each task (remembered in the cache,
        :mod:`course_lib.evalcache`: the same weights are evaluated once)."""
        memo = evalcache.Memo(self.world, state or self.pretrained, split, limit)

        def compute(task: str) -> float:
            answers = [e.answer for e in self.tasks[task].examples(split)[:limit]]
            return exact_match(self.answers(state, task, split, limit), answers)

        return {t: memo(t, functools.partial(compute, t)) for t in tasks or self.task_names}


def _base_id(profile: str, model) -> str:
    if profile == "mini":
        manifest = llm.cache_root() / "manifest.json"
        return "mini:" + json.loads(manifest.read_text())["config_hash"]
    return f"full:{model.config._name_or_path}"


def load_llm_zoo(
    profile: str | None = None,
    spec: LoraSpec | None = None,
    *,
    sizes: dict[str, int] | None = None,
    progress: bool = True,
    log=print,
) -> LLMZoo:
    """Base model + tasks + one LoRA expert per task (trained once, then read from the cache)."""
    profile = profile or config.profile()
    spec = spec or LoraSpec()
    config.seed_everything()
    t0 = time.perf_counter()
    model, tok = llm.load_llm(profile)
    tasks = load_text_tasks(sizes)
    root = (
        llm.cache_root() / "experts"
        if profile == "mini"
        else config.CACHE_DIR / "llm" / "full" / model.config._name_or_path.replace("/", "--")
    )
    loras = build_experts(
        model,
        tok,
        tasks,
        root,
        spec,
        base_id=_base_id(profile, model),
        evaluate=lambda m, t: llm.task_accuracy(m, tok, t, "val", spec.val_limit),
        progress=progress,
        log=log,
    )
    keys = adapted_keys(model, spec)
    base = base_state(model, keys)
    experts = {t: e.state(base) for t, e in loras.items()}
    info = {"seconds": round(time.perf_counter() - t0, 1), "adapted_params": _numel(base)}
    world = llm.world(spec, sizes)
    return LLMZoo(profile, model, tok, tasks, spec, loras, base, experts, info, world)


def _numel(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in state.values())


# ----------------------------------------------------------------------------- router features


@torch.no_grad()
def pooled_features(zoo: LLMZoo, task: str, split: str, limit: int | None = None) -> Tensor:
    """Mean of the base model's last hidden states over the prompt tokens, [N, hidden]."""
    t = zoo.tasks[task]
    return _pooled(zoo, llm.chat_prompts(zoo.tok, t, t.examples(split)[:limit]))


def _pooled(zoo: LLMZoo, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """The base model's mean-pooled last hidden states of ``prompts``, [N, hidden] (remembered
    in the cache, :mod:`course_lib.evalcache`: the same prompts are run once)."""
    if zoo.merged:
        raise ValueError("router features come from the base model: call outside zoo.using(...)")
    text = hashlib.sha256("\0".join(prompts).encode()).hexdigest()
    # the base model's adapted weights stand for the base: they tell the mini profile's
    # dequantized SmolLM2 from the hub's, or one hub revision from the next
    base = evalcache.state_digest(zoo.pretrained) if evalcache.active(zoo.world) else ""
    parts = ["pooled last hidden state", base, batch_size, len(prompts), text]
    compute = functools.partial(_pooled_batches, zoo, prompts, batch_size)
    return evalcache.remember(zoo.world, parts, compute, kind="tensor")


@torch.no_grad()
def _pooled_batches(zoo: LLMZoo, prompts: Sequence[str], batch_size: int) -> Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = zoo.tok(
            prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(zoo.model.device)
        h = zoo.model.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


def router_data(zoo: LLMZoo, split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    feats, labels = [], []
    for i, t in enumerate(zoo.task_names):
        f = pooled_features(zoo, t, split, limit)
        feats.append(f)
        labels.append(torch.full((len(f),), i))
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------- Twin-Merging


@dataclass
class LLMTwin:
    """Shared expert, compressed twin vectors and the trained router."""

    shared: StateDict
    compressed: list[CompressedVector]
    router: Router
    router_val_accuracy: float  # (%) how often the routed task is the true one, val prompts
    compression: float  # stored parameters of the twin vectors / dense parameters


def build_twin(
    zoo: LLMZoo,
    *,
    rank_ratio: float = 0.1,
    shared_scaling: float = 0.3,
    epochs: int = 30,
    router_limit: int | None = 64,
    progress: bool = True,
) -> LLMTwin:
    """Twin-Merging's offline part: theta*, v_t = theta_t - theta*, SVD compression, router
    trained on ``router_limit`` train prompts per task (pooled features; epoch chosen on val)."""
    config.seed_everything()
    shared = shared_expert(zoo.pretrained, zoo.finetuned(), scaling=shared_scaling)
    vectors = make_twin_vectors(shared, zoo.finetuned())
    compressed = _compress(zoo, vectors, rank_ratio)
    x, y = router_data(zoo, "train", router_limit)
    vx, vy = router_data(zoo, "val")
    router = Router(x.shape[1], len(zoo.task_names))
    hist = train_router(router, x, y, (vx, vy), epochs=epochs, select="loss", progress=progress)
    acc = 100.0 * hist.val_accuracy[hist.best_epoch]
    ratio = sum(c.stored_params for c in compressed) / sum(c.dense_params for c in compressed)
    return LLMTwin(shared, compressed, router, acc, ratio)


def _compress(zoo: LLMZoo, vectors: Sequence[StateDict], rank_ratio: float):
    """``compress(vectors, rank_ratio=...)``, remembered in the cache (the SVDs of SmolLM2's 70
    adapted matrices per task take ~12 s on two cores; the same vectors are compressed once)."""
    if not evalcache.active(zoo.world):
        return compress(vectors, rank_ratio=rank_ratio)
    parts = ["svd compress", rank_ratio, *map(evalcache.state_digest, vectors)]

    def flat() -> dict[str, Tensor]:
        return compressed_tensors(compress(vectors, rank_ratio=rank_ratio))

    return compressed_from_tensors(evalcache.remember(zoo.world, parts, flat, kind="tensors"))


@dataclass
class StreamItem:
    task: str
    example: TextExample


def mixed_stream(zoo: LLMZoo, split: str = "test", limit: int | None = None, seed: int = 0):
    """Every task's questions of ``split``, shuffled into one stream (what a deployed model sees)."""
    items = [StreamItem(t, e) for t in zoo.task_names for e in zoo.tasks[t].examples(split)[:limit]]
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order.tolist()]


def _score(stream: Sequence[StreamItem], preds: Sequence[str], tasks: Sequence[str]):
    out = {}
    for t in tasks:
        idx = [i for i, s in enumerate(stream) if s.task == t]
        if not idx:  # a short stream may miss a task
            continue
        out[t] = exact_match([preds[i] for i in idx], [stream[i].example.answer for i in idx])
    return out


@torch.no_grad()
def stream_features(zoo: LLMZoo, stream: Sequence[StreamItem]) -> Tensor:
    """Pooled features of each stream item (by task, then put back in stream order)."""
    feats = torch.empty(len(stream), zoo.model.config.hidden_size)
    for t in zoo.task_names:
        idx = [i for i, s in enumerate(stream) if s.task == t]
        if not idx:
            continue
        prompts = llm.chat_prompts(zoo.tok, zoo.tasks[t], [stream[i].example for i in idx])
        feats[idx] = _pooled(zoo, prompts)
    return feats


def _generate_items(zoo: LLMZoo, state, items: Sequence[StreamItem]) -> list[str]:
    """Greedy answers for ``items`` under one state (prompted per task, in item order; remembered
    in the cache: the same weights answer the same prompts once)."""
    weights = evalcache.state_digest(state or zoo.pretrained) if evalcache.active(zoo.world) else ""
    preds: list[str | None] = [None] * len(items)
    with zoo.using(state) as m:
        for t in zoo.task_names:
            idx = [i for i, s in enumerate(items) if s.task == t]
            if not idx:
                continue
            prompts = llm.chat_prompts(zoo.tok, zoo.tasks[t], [items[i].example for i in idx])
            new_tokens = llm.max_new_tokens_for(zoo.tok, zoo.tasks[t])
            text = hashlib.sha256("\0".join(prompts).encode()).hexdigest()
            generate = functools.partial(
                llm.generate, m, zoo.tok, prompts, max_new_tokens=new_tokens, frozen=zoo.frozen
            )
            parts = ["greedy answers", weights, new_tokens, len(prompts), text]
            out = evalcache.remember(zoo.world, parts, generate, kind="answers")
            for i, p in zip(idx, out, strict=True):
                preds[i] = p
    return preds  # type: ignore[return-value]


@dataclass
class TwinRun:
    accuracy: dict[str, float]  # exact match (%) per true task
    router_accuracy: float  # (%) inputs whose largest weight is their own task
    confidence: float  # mean over inputs of the largest router weight
    merges: int  # merged models built (one per input, or one per group)


def twin_stream(
    zoo: LLMZoo,
    twin: LLMTwin,
    stream: Sequence[StreamItem],
    *,
    mode: str = "group",
    temperature: float = 1.0,
    progress: bool = True,
) -> TwinRun:
    """Twin-Merging on a mixed stream: route every input (w = softmax(logits / temperature)),
    then merge once per input (``mode="input"``) or once per group of inputs routed to the same
    task (``"group"``, with the group's mean weights)."""
    if mode not in ("group", "input"):
        raise ValueError(f"mode must be 'group' or 'input', got {mode!r}")
    weights = twin.router.weights(stream_features(zoo, stream), temperature)
    if mode == "input":
        groups = [[i] for i in range(len(stream))]
    else:
        chosen = weights.argmax(-1)
        groups = [torch.nonzero(chosen == t).flatten().tolist() for t in range(weights.shape[1])]
        groups = [g for g in groups if g]
    preds: list[str] = [""] * len(stream)
    for g in progress_bar(groups, desc=f"Twin ({mode})", progress=progress, leave=False):
        state = merge_with_weights(twin.shared, twin.compressed, weights[g])
        for i, p in zip(g, _generate_items(zoo, state, [stream[i] for i in g]), strict=True):
            preds[i] = p
    truth = torch.tensor([zoo.task_names.index(s.task) for s in stream])
    routed = 100.0 * float((weights.argmax(-1) == truth).float().mean())
    confidence = float(weights.max(-1).values.mean())
    return TwinRun(_score(stream, preds, zoo.task_names), routed, confidence, len(groups))


def static_stream(zoo: LLMZoo, state, stream: Sequence[StreamItem]) -> dict[str, float]:
    """A static merge on the same stream (one model for every input)."""
    return _score(stream, _generate_items(zoo, state, stream), zoo.task_names)


# ----------------------------------------------------------------------------- all methods


@dataclass
class LLMResults:
    """Test exact match per method and task, the experts', the lambdas chosen on val, Twin."""

    absolute: dict[str, dict[str, float]]
    experts: dict[str, float]
    chosen: dict[str, float]
    twin: LLMTwin | None = None
    twin_run: TwinRun | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)  # test questions per task


def run_llm_all(zoo: LLMZoo, *, progress: bool = True) -> LLMResults:
    """Base, experts, task arithmetic, DARE + TA, TIES, PCB (lambda on val) and Twin-Merging
    (group-wise, on the shuffled stream of all test questions): what notebook 06 builds."""
    from course_lib.experiments import stopwatch, tune_scaling
    from course_lib.merging import dare, pcb_merging, task_arithmetic, ties_merging

    pre, fts = zoo.pretrained, zoo.finetuned()
    seconds: dict[str, float] = {}
    rows: dict[str, dict[str, float]] = {}
    with stopwatch(seconds, "base model"):
        rows["base model"] = zoo.evaluate(None)
    with stopwatch(seconds, "LoRA experts"):
        experts = {t: zoo.evaluate(zoo.experts[t], "test", [t])[t] for t in zoo.task_names}
        rows["LoRA experts"] = experts
    ta = {"task arithmetic": (lambda s: task_arithmetic(pre, fts, scaling=s), LAMBDAS_TA)}
    ties = {
        "TIES-Merging": (lambda s: ties_merging(pre, fts, density=0.2, scaling=s), LAMBDAS_TIES),
        "PCB-Merging": (lambda s: pcb_merging(pre, fts, ratio=0.1, scaling=s), LAMBDAS_TIES),
    }
    chosen = {}
    for name, (merge, grid) in progress_bar(
        [*ta.items(), *ties.items()], desc="merges", progress=progress
    ):
        with stopwatch(seconds, name):
            tuned = tune_scaling(zoo, merge, grid, limit=VAL_LIMIT, progress=False)
            rows[name], chosen[name] = zoo.evaluate(tuned.state), tuned.scaling
        if name == "task arithmetic":  # DARE pre-processes TA: same lambda
            with stopwatch(seconds, "DARE (p=0.9) + TA"):
                state = dare(pre, fts, drop_rate=0.9, seed=0, scaling=tuned.scaling)
                rows["DARE (p=0.9) + TA"] = zoo.evaluate(state)
    with stopwatch(seconds, "Twin-Merging"):
        twin = build_twin(zoo, progress=False)
        run = twin_stream(zoo, twin, mixed_stream(zoo, "test"), progress=False)
        rows["Twin-Merging"] = run.accuracy
    order = ["base model", "task arithmetic", "DARE (p=0.9) + TA", "TIES-Merging", "PCB-Merging"]
    order += ["Twin-Merging", "LoRA experts"]
    questions = {t: len(zoo.tasks[t].examples("test")) for t in zoo.task_names}
    return LLMResults({k: rows[k] for k in order}, experts, chosen, twin, run, seconds, questions)


def llm_results_markdown(res: LLMResults) -> str:
    from course_lib.eval import markdown, results_table

    tasks = list(res.experts)
    norm_rows = {k: v for k, v in res.absolute.items() if k != "base model"}
    lines = [
        "### LLM track: exact match (%) on the test questions"
        + (
            f" ({', '.join(f'{t} {n}' for t, n in res.questions.items())})" if res.questions else ""
        ),
        "",
        markdown(results_table(res.absolute, tasks)),
        "",
        "### Normalized (% of each task's LoRA expert)",
        "",
        markdown(results_table(norm_rows, tasks, normalize_by=res.experts)),
        "",
        f"λ chosen on {VAL_LIMIT} validation questions per task: "
        + ", ".join(f"{k} λ={v:g}" for k, v in res.chosen.items())
        + "; DARE uses task arithmetic's λ.",
    ]
    if res.twin is not None and res.twin_run is not None:
        lines.append(
            f"Twin-Merging: router accuracy {res.twin_run.router_accuracy:.1f}% on the test prompts, "
            f"twin vectors stored at {100 * res.twin.compression:.1f}% of their dense size, "
            "one merged model per routed task (group-wise)."
        )
    return "\n".join(lines)
