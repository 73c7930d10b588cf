"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023, Sec. 3, Alg. 1).

With task vectors tau_t = theta_t - theta_0 (rows of a [T, D] matrix):

1. **trim** (Sec. 3.1, "reset"): keep the top ``density`` fraction of each tau_t by magnitude,
   zero the rest:  tau^_t = tau_t * 1[|tau_t| >= v_t],  v_t = the k-th largest |tau_t|,
   k = floor(density * D). Entries tied with v_t are all kept.
2. **elect** (Sec. 3.2): gamma = sign(sum_t tau^_t), the sign carrying more total mass.
   Where the sum is exactly 0, gamma takes the sign of sum(gamma) (the "majority" rule of the
   reference code).
3. **disjoint merge** (Sec. 3.3): average only the entries that agree with gamma,
   tau_m^p = sum_{t in A_p} tau^_t^p / |A_p|,  A_p = {t : sign(tau^_t^p) = gamma^p} (zeros never agree).
   ``aggregate="sum"`` (dis-sum, used by FusionBench/AdaMerging with lambda ~ 0.3) and ``"max"``
   (largest agreeing magnitude) are the variants of the code.
4. theta_m = theta_0 + lambda * tau_m  (paper default lambda = 1, density = 0.2).

``scope="global"`` ranks all merged parameters of a task together, as the paper and its code do;
it is computed exactly without building the [T, D] matrix (see ``_select``). ``scope="tensor"``
trims each tensor on its own, as mergekit does, and also resolves zero-sum signs per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from course_lib.merging import _select
from course_lib.merging._base import delta_rows, deltas, prepare, register
from course_lib.merging._select import (
    PerThread,
    chunk_jobs,
    kth_largest_count,
    kth_smallest_rows,
    stream,
)
from course_lib.state import StateDict, check_fraction, check_number, with_passthrough

Aggregate = Literal["mean", "sum", "max"]
Scope = Literal["global", "tensor"]


def trim(tau: Tensor, density: float, threshold: Tensor | None = None) -> Tensor:
    """Step 1. Zero all but the top-``density`` magnitudes of each row of ``tau`` [T, ...].

    ``threshold`` ([T]) overrides the per-row k-th largest magnitude (used by the global scope,
    where the threshold is computed over the whole model).
    """
    flat = tau.reshape(tau.shape[0], -1)
    if threshold is None:
        k = kth_largest_count(flat.shape[1], check_fraction("density", density))
        threshold = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1).values
    keep = flat.abs() >= threshold.reshape(-1, 1)
    return (flat * keep).reshape(tau.shape)


def elect(trimmed: Tensor, zero_sign: float | None = None) -> Tensor:
    """Step 2. Elected sign gamma = sign(sum_t tau^_t) (mass-based, "total" in the paper).

    Positions whose sum is exactly 0 get ``zero_sign``; by default the sign of the sum of the
    elected signs of this tensor (the reference code's "majority" rule).
    """
    gamma = trimmed.sum(dim=0).sign()
    if zero_sign is None:
        zero_sign = float(gamma.sum().sign())
    return torch.where(gamma == 0, torch.full_like(gamma, zero_sign), gamma)


def disjoint_merge(trimmed: Tensor, gamma: Tensor, aggregate: Aggregate = "mean") -> Tensor:
    """Step 3. Combine only the entries whose sign agrees with ``gamma``.

    ``mean``: sum of agreeing entries / their count (0 where none agree);
    ``sum``: their sum; ``max``: the largest agreeing magnitude, with sign gamma.
    """
    agree = (trimmed.sign() == gamma) & (trimmed != 0)
    kept = trimmed * agree
    if aggregate == "mean":
        return kept.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    if aggregate == "sum":
        return kept.sum(dim=0)
    if aggregate == "max":
        return kept.abs().amax(dim=0) * gamma
    raise ValueError(f"aggregate must be 'mean', 'sum' or 'max', got {aggregate!r}")


def global_thresholds(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    density: float,
) -> Tensor:
    """Per-task magnitude threshold v_t over all ``keys`` together (the paper's global trim)."""
    numels = [pretrained[k].numel() for k in keys]
    total = sum(numels)
    rank = total - kth_largest_count(total, density)  # 0-based ascending rank of v_t

    bufs = PerThread(lambda: torch.empty(len(finetuned), _select.CHUNK))  # one per thread

    def magnitudes(key: str, where: Tensor | slice) -> Tensor:
        return delta_rows(pretrained, finetuned, key, where, bufs()).abs_()

    return kth_smallest_rows(keys, numels, magnitudes, [[rank]] * len(finetuned))[:, 0]


@register("ties_merging")
def ties_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float = 0.2,
    scaling: float = 1.0,
    aggregate: Aggregate = "mean",
    scope: Scope = "global",
    *,
    keys: str | None = None,
    exclude: str | None = None,
) -> StateDict:
    """TIES-Merging: ``theta_0 + lambda * disjoint_merge(elect(trim(tau)))``."""
    p = prepare(pretrained, finetuned, keys, exclude)
    density = check_fraction("density", density)
    if aggregate not in ("mean", "sum", "max"):
        raise ValueError(f"aggregate must be 'mean', 'sum' or 'max', got {aggregate!r}")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    scaling = check_number("scaling", scaling)

    thresholds = (
        global_thresholds(pretrained, finetuned, p.merged, density) if scope == "global" else None
    )
    merged = (
        _merge_tensorwise(pretrained, finetuned, p.merged, density, aggregate)
        if scope == "tensor"
        else _merge_global(pretrained, finetuned, p.merged, density, thresholds, aggregate)
    )
    for key in p.merged:
        base = pretrained[key]
        merged[key] = merged[key].mul_(scaling).add_(base.float()).to(base.dtype)  # in place
    return with_passthrough(merged, pretrained)


def _merge_tensorwise(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    density: float,
    aggregate: Aggregate,
) -> dict[str, Tensor]:
    """tau_m per tensor, each tensor trimmed and sign-resolved on its own (mergekit-style)."""
    merged = {}
    for key in keys:
        trimmed = trim(deltas(pretrained, finetuned, key), density)
        merged[key] = disjoint_merge(trimmed, elect(trimmed), aggregate)
    return merged


def _merge_global(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    density: float,
    thresholds: Tensor,
    aggregate: Aggregate,
) -> dict[str, Tensor]:
    """tau_m with model-wide thresholds, streamed in cache-sized chunks on a few threads.

    Where the trimmed sum is exactly 0 the elected sign is the sign of the sum of *all* elected
    signs of the model, known only at the end. Those positions are rare; their trimmed columns
    are kept aside and resolved after the pass.
    """
    works = PerThread(lambda: _Workspace(len(finetuned), _select.CHUNK))  # one per thread
    thr = thresholds.reshape(-1, 1)
    merged = {key: torch.empty(pretrained[key].numel()) for key in keys}

    def merge_chunk(job: tuple[str, slice]) -> None:
        key, where = job
        work = works()
        tau = delta_rows(pretrained, finetuned, key, where, work.tau)
        gamma = work.trim_elect(tau, thr)  # tau is trimmed in place
        work.sign_total += float(gamma.sum())  # an integer: exact whatever the order
        zero = gamma == 0
        if zero.any():
            idx = zero.nonzero().squeeze(1)
            cols = tau[:, idx]
            open_ = (cols != 0).any(dim=0)
            if open_.any():
                work.pending.append((key, idx[open_] + where.start, cols[:, open_].clone()))
        work.disjoint_merge(tau, gamma, aggregate, merged[key][where])

    stream(chunk_jobs(keys, [merged[k].numel() for k in keys]), merge_chunk)
    majority = torch.tensor(sum(w.sign_total for w in works.made)).sign()
    for key, idx, cols in (item for w in works.made for item in w.pending):
        merged[key][idx] = disjoint_merge(cols, majority.expand(cols.shape[1]), aggregate)
    return {key: merged[key].reshape(pretrained[key].shape) for key in keys}


class _Workspace:
    """Pre-allocated buffers for the streaming TIES steps: no allocation per chunk.

    The same three steps as :func:`trim`, :func:`elect` and :func:`disjoint_merge`, written with
    ``out=`` arguments. Allocating fresh [T, chunk] temporaries for every chunk made glibc's heap
    grow by gigabytes over a ViT-B/32-sized merge (freed blocks are not handed back to the OS).
    """

    def __init__(self, rows: int, cols: int):
        self.tau = torch.empty(rows, cols)
        self.val = torch.empty(rows, cols)
        self.mask = torch.empty(rows, cols, dtype=torch.bool)
        self.gamma = torch.empty(cols)
        self.count = torch.empty(cols)
        self.sign_total = 0.0  # sum of the elected signs of the chunks this thread merged
        self.pending: list[tuple[str, Tensor, Tensor]] = []  # zero-sum columns, resolved last

    def trim_elect(self, tau: Tensor, thr: Tensor) -> Tensor:
        """Trim ``tau`` [T, m] in place (|tau| >= thr per row); return the elected sign [m]."""
        m = tau.shape[1]
        keep = torch.ge(torch.abs(tau, out=self.val[:, :m]), thr, out=self.mask[:, :m])
        tau.mul_(keep)
        return torch.sum(tau, dim=0, out=self.gamma[:m]).sign_()

    def disjoint_merge(self, trimmed: Tensor, gamma: Tensor, aggregate: Aggregate, out: Tensor):
        """Write the disjoint aggregate of the entries agreeing with ``gamma`` into ``out``.

        ``trimmed`` is overwritten. Where gamma != 0, sign(tau) == gamma implies tau != 0; where
        gamma == 0 the result is 0 (every entry 0) or is replaced later (pending columns).
        """
        m = trimmed.shape[1]
        agree = torch.eq(torch.sign(trimmed, out=self.val[:, :m]), gamma, out=self.mask[:, :m])
        kept = trimmed.mul_(agree)
        if aggregate == "max":
            torch.amax(kept.abs_(), dim=0, out=out).mul_(gamma)
            return
        torch.sum(kept, dim=0, out=out)
        if aggregate == "mean":
            count = torch.sum(agree, dim=0, dtype=torch.float32, out=self.count[:m])
            out.div_(count.clamp_(min=1))
