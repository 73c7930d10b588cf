"""The course's vision experiments: every method on the zoo, with hyper-parameters from val.

One function per row of the results table, so that notebooks, ``make course`` and the tests
all compute the same numbers the same way:

* :func:`expert_accuracies` - each expert on its own task (the "individual" upper bound);
* :func:`tune_scaling` - pick lambda on the validation split (mean accuracy over tasks);
* :func:`twin_merging` - shared expert + compressed twin vectors + a router trained on
  validation inputs, merged *per input* (:func:`per_input_logits`);
* :func:`negation` - forgetting one task by subtracting its task vector;
* :func:`run_all` - the whole table.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from course_lib import config, evalcache
from course_lib.config import progress_bar
from course_lib.eval import EVAL_BATCH_SIZE
from course_lib.merging import (
    Router,
    compress,
    pcb_merging,
    shared_expert,
    task_arithmetic,
    ties_merging,
    train_router,
    twin_vectors,
    weight_average,
)
from course_lib.merging.twin import compressed_tensors
from course_lib.models import hub
from course_lib.models.zoo import Zoo
from course_lib.state import TaskVector, task_vector

StateDict = dict[str, Tensor]
LAMBDAS_TA = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
LAMBDAS_TIES = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
VAL_LIMIT = 500  # validation examples per task used for every hyper-parameter choice


def expert_accuracies(zoo: Zoo, split: str = "test") -> dict[str, float]:
    """Accuracy of each expert on its own task."""
    return {t: zoo.evaluate(zoo.experts[t], split, [t])[t] for t in zoo.task_names}


def mean(accs: Mapping[str, float]) -> float:
    return sum(accs.values()) / len(accs)


@dataclass
class Tuned:
    """A merged state with the lambda chosen on val and the whole val curve."""

    state: StateDict
    scaling: float
    val_curve: dict[float, float] = field(default_factory=dict)


def tune_scaling(
    zoo: Zoo,
    merge: Callable[[float], StateDict],
    lambdas: Sequence[float],
    *,
    desc: str = "lambda",
    limit: int = VAL_LIMIT,
    progress: bool = True,
) -> Tuned:
    """Evaluate ``merge(lambda)`` on val for each lambda; keep the best mean accuracy."""
    curve, best = {}, None
    for lam in progress_bar(lambdas, desc=desc, progress=progress, leave=False):
        state = merge(lam)
        curve[lam] = mean(zoo.evaluate(state, "val", limit=limit))
        if best is None or curve[lam] > curve[best.scaling]:
            best = Tuned(state, lam)
    best.val_curve = curve
    return best


# ----------------------------------------------------------------------------- Twin-Merging


@torch.no_grad()
def features(
    zoo: Zoo,
    state: Mapping[str, Tensor],
    task: str,
    split: str,
    limit: int | None = None,
    *,
    pooled: bool = True,
) -> Tensor:
    """The router's input for one split under ``state``: the normalized image embedding and,
    with ``pooled``, the hidden states of every layer (embeddings included) averaged over the
    tokens, ``[N, (layers + 1) * width + embed_dim]``.

    What tells the tasks apart (stroke style, background, colour statistics) is spread over the
    layers; the final embedding alone is made for matching captions. Notebook 05 measures how
    much better the router does with the pooled features (``pooled=False``: the embedding only)."""
    enc = zoo.encoder(state).to(config.device())
    batches = zoo.tasks[task].batches(split, EVAL_BATCH_SIZE, limit=limit)
    return torch.cat([router_input(enc, x, pooled=pooled) for x, _ in batches])


def router_input(enc: torch.nn.Module, pixels: Tensor, *, pooled: bool = True) -> Tensor:
    """:func:`features` of one batch of images under the image encoder ``enc`` (on the CPU)."""
    o = enc(pixel_values=pixels.to(config.device()), output_hidden_states=pooled)
    parts = [h.mean(dim=1) for h in o.hidden_states] if pooled else []
    return torch.cat([*parts, F.normalize(o.image_embeds, dim=-1)], dim=-1).cpu()


def router_accuracy(
    zoo: Zoo, router: Router, split: str = "test", limit: int | None = None, *, pooled: bool = True
) -> float:
    """% of the inputs of ``split`` (every task) whose largest router weight is their own task."""
    hits = total = 0
    for i, t in enumerate(zoo.task_names):
        picked = router.weights(features(zoo, zoo.pretrained, t, split, limit, pooled=pooled))
        hits, total = hits + int((picked.argmax(-1) == i).sum()), total + len(picked)
    return 100.0 * hits / total


def stacked_vectors(shared: Mapping[str, Tensor], vectors) -> dict[str, Tensor]:
    """Dense twin vectors stacked per key: ``{key: [T, *shape]}`` (keys of the vectors only)."""
    return {k: torch.stack([v[k].float() for v in vectors]) for k in vectors[0].keys()}  # noqa: SIM118


def vmappable_encoder(zoo: Zoo) -> torch.nn.Module:
    """An image encoder with plain ("eager") attention, which ``torch.func.vmap`` can batch."""
    cfg = copy.deepcopy(zoo.encoder_config)
    cfg._attn_implementation = "eager"
    return hub.build_image_encoder(cfg, zoo.pretrained)


def per_input_embeddings(
    enc: torch.nn.Module,
    shared: Mapping[str, Tensor],
    stacked: Mapping[str, Tensor],
    weights: Tensor,
    pixels: Tensor,
) -> Tensor:
    """Normalized embeddings where input b runs through its *own* model theta* + sum_t w[b, t] v_t.

    ``torch.func.vmap`` over ``functional_call`` evaluates a batch of B differently-merged
    encoders at once (B copies of the weights: fine for the mini encoder; use group-wise
    merging for ViT-B/32). ``enc`` comes from :func:`vmappable_encoder`.
    """
    base = {k: v.float() for k, v in shared.items()}

    def one(w: Tensor, x: Tensor) -> Tensor:
        params = dict(base)
        for k, v in stacked.items():
            params[k] = base[k] + torch.tensordot(w, v, dims=1)
        emb = functional_call(enc, params, (), {"pixel_values": x[None]}).image_embeds[0]
        return F.normalize(emb, dim=-1)

    return vmap(one)(weights, pixels)


def per_input_logits(enc, shared, stacked, weights, pixels, head: Tensor, logit_scale: float):
    """Logits of :func:`per_input_embeddings` against one task's head ``[C, E]``."""
    return logit_scale * per_input_embeddings(enc, shared, stacked, weights, pixels) @ head.T


@dataclass
class TwinResult:
    accuracy: dict[str, float]
    router_accuracy: float  # on the evaluated inputs: does the router pick the right task?
    compression: float  # stored / dense parameters of the twin vectors
    rank_ratio: float
    confusion: Tensor  # [T, T] counts: true task x argmax router task
    stored_params: int = 0  # parameters of the compressed twin vectors
    router_params: int = 0


def train_task_router(
    zoo: Zoo, *, epochs: int = 60, progress: bool = True, pooled: bool = True
) -> Router:
    """A router from theta_0's features of an input (:func:`features`) to its task, trained on
    *validation* inputs.

    Its hidden layers are twice the embedding size wide (128 on the mini zoo), not twice the
    input size as in the reference code: on a 145k-parameter encoder that router would hold
    0.9M parameters, six encoders' worth, and route no better."""
    feats = [features(zoo, zoo.pretrained, t, "val", pooled=pooled) for t in zoo.task_names]
    x = torch.cat(feats)
    y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(feats)])
    router = Router(x.shape[1], len(feats), hidden=2 * zoo.encoder_config.projection_dim)
    train_router(router, x, y, epochs=epochs, seed=config.DEFAULT_SEED, progress=progress)
    return router


def compression_of(compressed) -> float:
    """Stored / dense parameters over a list of compressed twin vectors."""
    return sum(c.stored_params for c in compressed) / sum(c.dense_params for c in compressed)


def twin_accuracy(
    zoo: Zoo,
    shared: Mapping[str, Tensor],
    compressed,
    router: Router,
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    rank_ratio: float = float("nan"),
    progress: bool = True,
    pooled: bool = True,
) -> TwinResult:
    """Each input of each task merged with the router's weights for *that* input (the router
    reads :func:`features` of theta_0, ``pooled`` as it was trained).

    Each task's counts are remembered in the cache (:mod:`course_lib.evalcache`), keyed by the
    shared expert, the compressed vectors, the router's weights, the task's head and the split."""
    names = zoo.task_names
    stacked = stacked_vectors(shared, compressed)
    enc = vmappable_encoder(zoo)
    digests = []
    if evalcache.active(zoo.world):
        parts = (shared, compressed_tensors(compressed), router.state_dict())
        digests = [split, limit, batch_size, pooled, *map(evalcache.state_digest, parts)]
    accs, confusion, hits, total = {}, torch.zeros(len(names), len(names)), 0, 0
    for i, t in enumerate(
        progress_bar(names, desc="twin per-input", progress=progress, leave=False)
    ):
        count = functools.partial(
            _twin_counts, zoo, t, enc, shared, stacked, router, split, limit, batch_size, pooled
        )
        head = zoo.task_salt(t) if digests else ""
        c = evalcache.remember(zoo.world, ["twin per-input", *digests, t, head], count, "tensor")
        accs[t] = 100.0 * int(c[0]) / int(c[1])
        confusion[i] += c[2:].float()
        hits, total = hits + int(c[2 + i]), total + int(c[1])
    return TwinResult(accs, 100.0 * hits / total, compression_of(compressed), rank_ratio, confusion)


@torch.no_grad()
def _twin_counts(
    zoo: Zoo,
    task: str,
    enc: torch.nn.Module,
    shared: Mapping[str, Tensor],
    stacked: Mapping[str, Tensor],
    router: Router,
    split: str,
    limit: int | None,
    batch_size: int,
    pooled: bool,
) -> Tensor:
    """One task's inputs, each merged with its own router weights: [right, inputs, routed to
    each task]."""
    w_all = router.weights(features(zoo, zoo.pretrained, task, split, limit, pooled=pooled))
    correct, start = 0, 0
    for px, lab in zoo.tasks[task].batches(split, batch_size, limit=limit):
        w = w_all[start : start + len(lab)]
        start += len(lab)
        logits = per_input_logits(enc, shared, stacked, w, px, zoo.heads[task], zoo.logit_scale)
        correct += int((logits.argmax(-1) == lab).sum())
    routed = torch.bincount(w_all.argmax(-1), minlength=len(zoo.task_names))
    return torch.tensor([correct, start, *routed.tolist()])


def twin_merging(
    zoo: Zoo,
    *,
    rank_ratio: float = 0.1,
    shared_scaling: float = 0.3,
    split: str = "test",
    router_epochs: int = 60,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> TwinResult:
    """Twin-Merging (Lu et al., 2024): shared expert, SVD twin vectors, per-input router weights."""
    shared = shared_expert(zoo.pretrained, zoo.finetuned(), scaling=shared_scaling)
    compressed = compress(twin_vectors(shared, zoo.finetuned()), rank_ratio=rank_ratio)
    router = train_task_router(zoo, epochs=router_epochs, progress=progress)
    result = twin_accuracy(
        zoo, shared, compressed, router, split=split, limit=limit, batch_size=batch_size,
        rank_ratio=rank_ratio, progress=progress,
    )  # fmt: skip
    result.stored_params = sum(c.stored_params for c in compressed)
    result.router_params = sum(p.numel() for p in router.parameters())
    return result


def mixed_stream(
    zoo: Zoo,
    shared: Mapping[str, Tensor],
    compressed,
    router: Router,
    *,
    per_task: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    pooled: bool = True,
) -> dict[str, float]:
    """Accuracy on one shuffled stream mixing ``per_task`` test inputs of every task.

    No input comes with its task: the router sees only theta_0's features of the image
    (:func:`features`, ``pooled`` as the router was trained) and
    weighs the twin vectors for that input; the prediction is then read with the head of the
    input's own label space (as when a deployed model serves many datasets).
    """
    names = zoo.task_names
    pixels, labels, tasks = [], [], []
    for i, t in enumerate(names):
        x, y = next(zoo.tasks[t].batches("test", per_task, limit=per_task))
        pixels.append(x)
        labels.append(y)
        tasks.append(torch.full((len(y),), i))
    sizes = [len(y) for y in labels]  # per_task, or all of a smaller test split
    order = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))
    pixels, labels, tasks = (torch.cat(v)[order] for v in (pixels, labels, tasks))
    stacked = stacked_vectors(shared, compressed)
    enc, dev = vmappable_encoder(zoo), config.device()
    base_enc = zoo.encoder(zoo.pretrained).to(dev)
    correct = torch.zeros(len(names))
    for s in range(0, len(labels), batch_size):
        x = pixels[s : s + batch_size]
        with torch.no_grad():
            w = router.weights(router_input(base_enc, x, pooled=pooled))
            emb = per_input_embeddings(enc, shared, stacked, w, x)
        for j in range(len(x)):
            t = int(tasks[s + j])
            pred = int((emb[j] @ zoo.heads[names[t]].T).argmax())
            correct[t] += pred == int(labels[s + j])
    return {t: 100.0 * float(correct[i]) / sizes[i] for i, t in enumerate(names)}


# ----------------------------------------------------------------------------- negation


@dataclass
class NegationResult:
    task: str
    scaling: float
    zeroshot: dict[str, float]
    negated: dict[str, float]
    within_tolerance: bool = True  # False: no lambda passed the control rule on val
    tolerance: float = 5.0  # the control rule's points


def negation(
    zoo: Zoo,
    task: str,
    lambdas: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
    tolerance: float = 5.0,
) -> NegationResult:
    """theta_0 - lambda tau_task: the largest lambda whose *other* tasks stay within
    ``tolerance`` points of zero-shot on val. A simpler rule of the kind the paper uses (Sec. 3:
    the lambda that lowers the target most while a control task keeps >= 95% of theta_0's
    accuracy); here every other task is a control, with an absolute tolerance.

    If no lambda passes, the smallest is used and ``within_tolerance`` is False (say so)."""
    tau: TaskVector = task_vector(zoo.pretrained, zoo.experts[task])
    others = [t for t in zoo.task_names if t != task]
    zs_val = zoo.evaluate(zoo.pretrained, "val", others, limit=VAL_LIMIT)
    passed = []
    for lam in lambdas:
        accs = zoo.evaluate((-tau).apply_to(zoo.pretrained, lam), "val", others, limit=VAL_LIMIT)
        if all(zs_val[t] - accs[t] <= tolerance for t in others):
            passed.append(lam)
    chosen = max(passed) if passed else min(lambdas)
    state = (-tau).apply_to(zoo.pretrained, chosen)
    return NegationResult(
        task, chosen, zoo.evaluate(zoo.pretrained), zoo.evaluate(state), bool(passed), tolerance
    )


# ----------------------------------------------------------------------------- the whole table


@dataclass
class Results:
    """Absolute test accuracies per method, plus what was chosen on val and how long it took."""

    absolute: dict[str, dict[str, float]]
    experts: dict[str, float]
    chosen: dict[str, float]
    twin: TwinResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # build + test evaluation, per row


@contextlib.contextmanager
def stopwatch(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the ``with`` block as ``seconds[name]`` (rounded to 0.1 s).

    Evaluations served from the cache count as the time they took when they ran
    (:func:`course_lib.evalcache.seconds_saved`), so a method's cost does not depend on what an
    earlier run left in the cache."""
    t0, saved = time.perf_counter(), evalcache.seconds_saved()
    yield
    seconds[name] = round(time.perf_counter() - t0 + evalcache.seconds_saved() - saved, 1)


def run_all(zoo: Zoo, *, progress: bool = True, twin_rank_ratio: float = 0.1) -> Results:
    """Zero-shot, experts, averaging, TA, TIES, PCB (lambda from val) and Twin-Merging.

    ``seconds[method]`` is the wall time of that row: merging, the lambda search on val (tuned
    methods), the router's training (Twin) and the test evaluation.
    """
    pre, fts = zoo.pretrained, zoo.finetuned()
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    chosen: dict[str, float] = {}
    with stopwatch(seconds, "zero-shot"):
        rows["zero-shot"] = zoo.evaluate(pre)
    with stopwatch(seconds, "experts"):
        rows["experts"] = expert_accuracies(zoo)
    with stopwatch(seconds, "weight averaging"):
        rows["weight averaging"] = zoo.evaluate(weight_average(fts))
    searches = {
        "task arithmetic": (lambda s: task_arithmetic(pre, fts, s), LAMBDAS_TA, "TA"),
        "TIES-Merging": (lambda s: ties_merging(pre, fts, 0.2, s), LAMBDAS_TIES, "TIES"),
        "PCB-Merging": (lambda s: pcb_merging(pre, fts, 0.1, s), LAMBDAS_TIES, "PCB"),
    }
    for name, (merge, grid, desc) in searches.items():
        with stopwatch(seconds, name):
            tuned = tune_scaling(zoo, merge, grid, desc=desc, progress=progress)
            rows[name], chosen[name] = zoo.evaluate(tuned.state), tuned.scaling
    with stopwatch(seconds, "Twin-Merging"):
        twin = twin_merging(zoo, rank_ratio=twin_rank_ratio, progress=progress)
        rows["Twin-Merging"] = twin.accuracy
    return Results(rows, rows["experts"], chosen, twin, seconds)
