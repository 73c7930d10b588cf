"""Twin-Merging: a shared expert plus compressed, input-routed exclusive knowledge
(Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise", NeurIPS 2024, Sec. 3).

1. **shared_expert** (Sec. 3.2): theta* = any static merge of the experts; the paper's code uses
   task arithmetic, theta* = theta_0 + lambda * sum_t tau_t with lambda = 0.29 (RoBERTa) or 0.3
   (Qwen LoRA experts); the course uses 0.3.
2. **twin_vectors**: the exclusive knowledge of each expert, v_t = theta_t - theta*.
3. **compress** (Sec. 3.2, "SVD"): keep the top k = ceil(rank_ratio * min(m, n)) singular
   triplets of every 2-D v_t[key]; 1-D tensors (LayerNorm, biases) stay dense. The stored cost
   is k(m + n) per matrix, reported honestly by :attr:`CompressedVector.stored_params`
   ("90% sparsity" in the paper is 10% of the *rank*, which is more than 10% of the parameters).
4. **router** (Sec. 3.3): an MLP on pooled features of the input -> task logits;
   w = softmax(logits / temperature).
5. **merge_with_weights**: theta(x) = theta* + sum_t w_t v^_t, per input, or once per group of
   inputs with the mean of their router weights (the paper's group-wise variant).

Checks: one-hot weights with uncompressed twin vectors give back expert t; uniform weights give
theta* + mean_t(theta_t - theta*) = the weight average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from course_lib.config import progress_bar
from course_lib.merging._base import prepare
from course_lib.merging.task_arithmetic import task_arithmetic
from course_lib.state import (
    StateDict,
    TaskVector,
    check_count,
    check_finite,
    check_number,
    with_passthrough,
)

# -- 1. shared expert ----------------------------------------------------------------------


def shared_expert(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    merge: Callable[..., StateDict] = task_arithmetic,
    **merge_kwargs,
) -> StateDict:
    """theta* = merge(theta_0, experts); default task arithmetic with lambda = 0.3."""
    if merge is task_arithmetic:
        merge_kwargs.setdefault("scaling", 0.3)
    return merge(pretrained, finetuned, **merge_kwargs)


# -- 2. twin vectors -----------------------------------------------------------------------


def twin_vectors(
    shared: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    *,
    keys: str | None = None,
    exclude: str | None = None,
) -> list[TaskVector]:
    """v_t = theta_t - theta* for every merged key (a TaskVector relative to the shared expert)."""
    p = prepare(shared, finetuned, keys, exclude)
    return [
        TaskVector({k: ft[k].float() - shared[k].float() for k in p.merged}) for ft in finetuned
    ]


# -- 3. compression ------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """A matrix stored as ``left @ right`` (left = U_k S_k [m, k], right = V_k^T [k, n])."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        return self.left @ self.right

    @property
    def stored_params(self) -> int:
        return self.left.numel() + self.right.numel()


@dataclass(frozen=True)
class CompressedVector:
    """A twin vector with 2-D tensors stored as :class:`LowRank` factors, others dense.

    ``checked``: :func:`compress` checked the tensors it was made from (finite floats), so
    :func:`merge_with_weights`, called once per input or group, does not scan them again.
    """

    parts: dict[str, LowRank | Tensor]
    checked: bool = field(default=False, compare=False)

    def __getitem__(self, key: str) -> Tensor:
        part = self.parts[key]
        return part.dense() if isinstance(part, LowRank) else part

    def keys(self):
        return self.parts.keys()

    @property
    def stored_params(self) -> int:
        return sum(
            p.stored_params if isinstance(p, LowRank) else p.numel() for p in self.parts.values()
        )

    @property
    def dense_params(self) -> int:
        return sum(
            p.left.shape[0] * p.right.shape[1] if isinstance(p, LowRank) else p.numel()
            for p in self.parts.values()
        )

    @property
    def compression(self) -> float:
        """Stored parameters / dense parameters (e.g. 0.2 means 5x smaller)."""
        return self.stored_params / self.dense_params


def svd_rank(shape: Sequence[int], rank_ratio: float) -> int:
    """k = ceil(rank_ratio * min(m, n)), at least 1.

    The reference code truncates instead, k = int(rank_ratio * min(m, n)) (76 rather than 77 for
    a 768-wide matrix at 0.1); we round up so that a small matrix keeps at least the fraction
    asked for (int(0.1 * 8) would keep nothing)."""
    return max(1, math.ceil(rank_ratio * min(shape) - 1e-9))


def low_rank(matrix: Tensor, rank: int) -> LowRank:
    """Best rank-k approximation (Eckart-Young) from a truncated SVD, U_k S_k and V_k^T.

    The SVD runs in float32 (2-3x faster than float64 on a CPU); if LAPACK reports that it did
    not converge (Twin-Merging issue #8 saw this with real checkpoints) it is retried in float64.
    """
    try:
        u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(rank, s.numel())
    return LowRank((u[:, :k] * s[:k]).to(matrix.dtype), vh[:k].to(matrix.dtype).contiguous())


def compress(
    vectors: Sequence[Mapping[str, Tensor]],
    method: str = "svd",
    rank_ratio: float = 0.1,
) -> list[CompressedVector]:
    """Truncated-SVD compression of each 2-D tensor of each vector; 1-D tensors stay dense.

    Factors are stored only when they are smaller than the dense matrix (k(m+n) < mn).
    """
    if method != "svd":
        raise ValueError(f"compress method must be 'svd', got {method!r}")
    if not 0.0 < check_number("rank_ratio", rank_ratio) <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio!r}")
    out = []
    for i, vec in enumerate(
        progress_bar(vectors, desc="SVD compress", progress=len(vectors) >= 4, leave=False)
    ):
        if not isinstance(vec, Mapping):
            raise ValueError(f"vectors[{i}] must be a dict of tensors, got {type(vec).__name__}")
        parts: dict[str, LowRank | Tensor] = {}
        for key in vec:
            t = vec[key]
            _check_vector_tensor(t, key, f"vectors[{i}]")
            if t.dim() == 2:
                k = svd_rank(t.shape, rank_ratio)
                if k * (t.shape[0] + t.shape[1]) < t.numel():
                    parts[key] = low_rank(t, k)
                    continue
            parts[key] = t.clone()
        out.append(CompressedVector(parts, checked=True))
    return out


def compressed_tensors(compressed: Sequence[CompressedVector]) -> dict[str, Tensor]:
    """Compressed vectors as one flat dict of tensors, ready for ``safetensors``: the vector's
    index, the key's position and name, and the part (``left``, ``right`` or ``dense``) name each
    tensor, ``"0:3:layers.0.mlp.weight:left"``. :func:`compressed_from_tensors` inverts it."""
    flat = {}
    for i, vec in enumerate(compressed):
        for j, (key, part) in enumerate(vec.parts.items()):
            if isinstance(part, LowRank):
                flat[f"{i}:{j}:{key}:left"] = part.left.contiguous()
                flat[f"{i}:{j}:{key}:right"] = part.right.contiguous()
            else:
                flat[f"{i}:{j}:{key}:dense"] = part.contiguous()
    return flat


def compressed_from_tensors(flat: Mapping[str, Tensor]) -> list[CompressedVector]:
    """The compressed vectors that :func:`compressed_tensors` flattened, in their order."""
    vectors: dict[int, dict[int, tuple[str, LowRank | Tensor]]] = {}
    for name, t in flat.items():
        i, j, rest = name.split(":", 2)
        key, what = rest.rsplit(":", 1)
        if what == "dense":
            part: LowRank | Tensor = t
        elif what == "left":
            if f"{i}:{j}:{key}:right" not in flat:
                raise ValueError(f"{name!r} has no right factor {i}:{j}:{key}:right")
            part = LowRank(t, flat[f"{i}:{j}:{key}:right"])
        elif what == "right":
            continue
        else:
            raise ValueError(f"{name!r}: the part must be left, right or dense, not {what!r}")
        vectors.setdefault(int(i), {})[int(j)] = (key, part)
    out = []
    for i, parts in sorted(vectors.items()):
        vector = CompressedVector(dict(parts[j] for j in sorted(parts)), checked=True)
        for key, part in vector.parts.items():  # read from a file: checked once, here
            for t in (part.left, part.right) if isinstance(part, LowRank) else (part,):
                _check_vector_tensor(t, key, f"stored twin vector {i}")
            _shape_of(vector, key)
        out.append(vector)
    return out


def _check_vector_tensor(t: object, key: str, where: str, finite: bool = True) -> None:
    """A twin vector's tensor must be a floating-point tensor (an integer one would round its
    SVD factors, or its weighted sum, to nothing) and, when ``finite``, hold no NaN or Inf."""
    if not isinstance(t, Tensor):
        raise ValueError(f"key {key!r} in {where} is a {type(t).__name__}, not a Tensor")
    if not t.is_floating_point():
        raise ValueError(f"key {key!r} in {where} has dtype {t.dtype}; twin vectors are float")
    if finite:
        check_finite(key, t, where)


# -- 5. merging with router weights --------------------------------------------------------


def merge_with_weights(
    shared: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor] | CompressedVector],
    weights: Tensor | Sequence[float],
) -> StateDict:
    """theta = theta* + sum_t w_t v_t.

    ``weights`` is [T] for one input, or [B, T] for a group of inputs: the group shares one
    merged model built from the mean of its weights (the paper's group-wise variant).
    """
    if not vectors:
        raise ValueError("vectors is empty: need one twin vector per task")
    raw = torch.as_tensor(weights)
    if raw.dtype == torch.bool:
        raise ValueError("weights must be numbers, got booleans")
    w = raw.to(torch.float32)
    if w.dim() == 2:
        w = w.mean(dim=0)
    if w.dim() != 1 or w.numel() != len(vectors):
        raise ValueError(
            f"weights must have shape [T] or [B, T] with T = {len(vectors)} twin vectors, "
            f"got {tuple(torch.as_tensor(weights).shape)}"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    keys = list(vectors[0].keys())
    for i, v in enumerate(vectors):
        if set(v.keys()) != set(keys):
            odd = sorted(set(v.keys()) ^ set(keys))[0]
            raise ValueError(f"key {odd!r} is in only one of twin vectors 0 and {i}")
        # the stored tensors (a compressed vector's factors), not dense copies
        stored = v.parts if isinstance(v, CompressedVector) else v
        scan = not (isinstance(v, CompressedVector) and v.checked)
        for key, part in stored.items():
            for t in (part.left, part.right) if isinstance(part, LowRank) else (part,):
                _check_vector_tensor(t, key, f"twin vector {i}", finite=scan)
    missing = [k for k in keys if k not in shared]
    if missing:
        raise ValueError(f"key {missing[0]!r} of the twin vectors is not in the shared expert")
    for key in keys:
        for i, v in enumerate(vectors):  # every vector: a [3] one would broadcast into [2, 3]
            shape = _shape_of(v, key)
            if tuple(shared[key].shape) != shape:
                raise ValueError(
                    f"key {key!r}: shape {list(shape)} in twin vector {i} but "
                    f"{list(shared[key].shape)} in the shared expert"
                )
    merged = {}
    for key in keys:
        acc = shared[key].float().clone()
        for wt, v in zip(w.tolist(), vectors, strict=True):
            if wt != 0.0:
                acc.add_(v[key].float(), alpha=wt)
        merged[key] = acc.to(shared[key].dtype)
    return with_passthrough(merged, shared)  # a key tied to a merged one stays tied to it


def _shape_of(vector: Mapping[str, Tensor] | CompressedVector, key: str) -> tuple[int, ...]:
    """The dense shape of ``vector[key]`` without building it (low-rank factors checked)."""
    if isinstance(vector, CompressedVector):
        part = vector.parts[key]
        if isinstance(part, LowRank) and (
            part.left.dim() != 2
            or part.right.dim() != 2
            or part.left.shape[1] != part.right.shape[0]
        ):
            raise ValueError(
                f"key {key!r}: low-rank factors of shapes {list(part.left.shape)} and "
                f"{list(part.right.shape)} do not multiply"
            )
        return (
            (part.left.shape[0], part.right.shape[1])
            if isinstance(part, LowRank)
            else tuple(part.shape)
        )
    return tuple(vector[key].shape)


# -- 4. router -----------------------------------------------------------------------------


class Router(nn.Module):
    """MLP from pooled input features to task logits (Twin-Merging Sec. 3.3).

    Linear -> BatchNorm -> LeakyReLU -> Dropout, twice, then Linear to T logits; the hidden
    size defaults to twice the feature size, as in the reference code. The initial weights come
    from ``seed`` alone, not from whatever drew on torch's global random state before: the same
    features then train the same router in a notebook, in ``python -m course_lib course`` and in
    the leaderboard (the global state is left as it was).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        hidden: int | None = None,
        dropout: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        hidden = hidden or 2 * in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_tasks),
            )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)

    @torch.no_grad()
    def weights(self, features: Tensor, temperature: float = 1.0) -> Tensor:
        """Merging weights w = softmax(logits / temperature), [B, T]."""
        if not check_number("temperature", temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        w = torch.softmax(self(features) / temperature, dim=-1)
        self.train(was_training)
        return w


def _check_router_data(router: Router, features: Tensor, labels: Tensor, what: str) -> None:
    """Features [N, d] finite floats with the router's d; labels [N] integer task ids."""
    d, num_tasks = router.net[0].in_features, router.net[-1].out_features
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: features must be [N, d] and labels [N]; got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if features.shape[1] != d:
        raise ValueError(f"{what}: features have {features.shape[1]} columns, the router takes {d}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{what}: features contain NaN or Inf values")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer task ids, got dtype {labels.dtype}")
    if labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < num_tasks):
        raise ValueError(
            f"{what}: labels must be task ids in [0, {num_tasks}), got "
            f"{int(labels.min())}..{int(labels.max())}"
        )


@dataclass
class RouterHistory:
    train_loss: list[float]
    val_accuracy: list[float]
    best_epoch: int


def train_router(
    router: Router,
    features: Tensor,
    labels: Tensor,
    val: tuple[Tensor, Tensor] | None = None,
    *,
    epochs: int = 50,
    lr: float = 5e-4,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    select: str = "accuracy",
    progress: bool = True,
) -> RouterHistory:
    """Train with cross-entropy on task ids (AdamW); keep the epoch with the best val accuracy
    (``select="accuracy"``, the first such epoch) or the lowest val cross-entropy (``"loss"``:
    when the tasks are easy to tell apart, accuracy reaches 100% while the weights are still
    unsure, and the loss keeps improving their confidence).

    Select on a validation split, never on the data you report (the reference code selects on
    its test set).
    """
    if select not in ("accuracy", "loss"):
        raise ValueError(f"select must be 'accuracy' or 'loss', got {select!r}")
    check_count("epochs", epochs)
    check_count("batch_size", batch_size, minimum=2)  # BatchNorm needs two inputs per batch
    _check_router_data(router, features, labels, "features/labels")
    if val is not None:
        if len(val) != 2:
            raise ValueError("val must be a (features, labels) pair")
        _check_router_data(router, val[0], val[1], "val")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    labels = labels.long()
    hist = RouterHistory([], [], -1)
    best_score, best_state = None, None
    for epoch in progress_bar(range(epochs), desc="router", progress=progress, leave=False):
        router.train()
        order = torch.randperm(features.shape[0], generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(router(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        hist.train_loss.append(total / len(order))
        vx, vy = val if val is not None else (features, labels)
        w = router.weights(vx)
        acc = float((w.argmax(-1) == vy.long()).float().mean())
        hist.val_accuracy.append(acc)
        nll = float(nn.functional.nll_loss(w.clamp_min(1e-12).log(), vy.long()))
        score = acc if select == "accuracy" else -nll
        if best_score is None or score > best_score:
            best_score, hist.best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in router.state_dict().items()}
    if best_state is not None:
        router.load_state_dict(best_state)
    router.eval()
    return hist


__all__ = [
    "CompressedVector",
    "LowRank",
    "Router",
    "RouterHistory",
    "compress",
    "low_rank",
    "merge_with_weights",
    "shared_expert",
    "svd_rank",
    "train_router",
    "twin_vectors",
]
