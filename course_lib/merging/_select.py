"""Exact k-th largest value of each row of a [T, D] matrix that is never built.

TIES (global trim) and PCB (row quantiles) need, for every task t, an order statistic over *all*
merged parameters of that task. The official code flattens every model into a [T, D] float
matrix and calls ``kthvalue``; for 8 ViT-B/32 encoders that is 8 x 87.5M floats plus a sort
buffer (+13 GB measured). Here the values are produced one tensor at a time by a callback and
the order statistic is found exactly in two cheap steps:

1. *bracket*: evaluate the values at a fixed random sample of positions and read, for each row,
   an interval [lo, hi] that contains the wanted quantile with overwhelming probability;
2. *count and refine*: one streaming pass counts the values below ``lo`` and keeps only the
   few values inside [lo, hi]; the answer is an exact ``kthvalue`` among those candidates.

If the sample was unlucky (the rank falls outside the bracket) the row is recomputed with a
wider interval, so the result is always exact; only the speed depends on luck.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# values(key, where) -> Tensor[T, m]: the values of one tensor at flat positions ``where``, an
# index tensor or a ``slice`` of the flattened tensor. Row t belongs to task t. The result may be
# a reused buffer, overwritten by the next call: callers copy what they keep.
ValuesFn = Callable[[str, Tensor | slice], Tensor]

DIRECT_LIMIT = 1 << 22  # below this many values per row, just concatenate and kthvalue
CHUNK = 1 << 18  # columns per streaming step: [8, CHUNK] floats = 8 MB, in the L3 cache (measured
# faster and leaner than 1 << 16 and 1 << 20 for 8 ViT-B/32-sized models on 2 cores)


def chunks(numel: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of at most ``size`` (default :data:`CHUNK`) positions covering ``numel``."""
    size = CHUNK if size is None else size
    return [slice(s, min(numel, s + size)) for s in range(0, numel, size)]


def _direct(keys: Sequence[str], values: ValuesFn, ranks: Tensor) -> Tensor:
    full = torch.cat([values(k, slice(None)).clone() for k in keys], dim=1).sort(dim=1).values
    return full.gather(1, ranks)


def kth_smallest_rows(
    keys: Sequence[str],
    numels: Sequence[int],
    values: ValuesFn,
    ranks: Sequence[Sequence[int]],
    *,
    sample_size: int = 1 << 20,
    seed: int = 0,
    direct_limit: int | None = None,
) -> Tensor:
    """Return ``out[t, j]``: the value of 0-based ascending rank ``ranks[t][j]`` in row t.

    ``keys``/``numels`` list the tensors the rows are spread over (D = sum(numels) values per
    row). Memory: the sample plus the in-bracket candidates (a fraction of a percent of D),
    never [T, D]. Rows of at most ``direct_limit`` values (default :data:`DIRECT_LIMIT`) are
    simply concatenated and sorted.
    """
    total = int(sum(numels))
    ranks_t = torch.tensor([[int(r) for r in row] for row in ranks], dtype=torch.long)
    if (ranks_t < 0).any() or (ranks_t >= total).any():
        raise ValueError(f"ranks must lie in [0, {total}), got {ranks_t.tolist()}")
    if total <= (DIRECT_LIMIT if direct_limit is None else direct_limit):
        return _direct(keys, values, ranks_t)

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for key, n in zip(keys, numels, strict=True):
        m = max(1, round(sample_size * n / total))
        samples.append(values(key, torch.randint(0, n, (m,), generator=gen)).clone())
    sample = torch.cat(samples, dim=1).sort(dim=1).values  # [T, S]
    s = sample.shape[1]
    p = ranks_t.double() / total
    delta = 5.0 * torch.sqrt(p * (1 - p) / s) + 2.0 / s
    lo_i = torch.floor((p - delta) * s).long()
    hi_i = torch.ceil((p + delta) * s).long()
    inf = torch.tensor(float("inf"))
    lo = torch.where(lo_i < 0, -inf, sample.gather(1, lo_i.clamp(0, s - 1)))
    hi = torch.where(hi_i >= s, inf, sample.gather(1, hi_i.clamp(0, s - 1)))
    result = _refine(keys, numels, values, ranks_t, lo, hi)
    bad = torch.isnan(result)
    if bad.any():  # unlucky sample (rare): count again with an open bracket for those ranks only
        lo2 = torch.where(bad, -inf, inf)
        hi2 = torch.where(bad, inf, -inf)
        result = torch.where(bad, _refine(keys, numels, values, ranks_t, lo2, hi2), result)
    return result


def _refine(
    keys: Sequence[str],
    numels: Sequence[int],
    values: ValuesFn,
    ranks: Tensor,
    lo: Tensor,
    hi: Tensor,
) -> Tensor:
    """Count values below ``lo`` and keep those in [lo, hi], one cache-sized chunk at a time."""
    rows, per_row = ranks.shape
    below = torch.zeros(rows, per_row, dtype=torch.long)
    kept: list[list[Tensor]] = [[] for _ in range(per_row)]  # in-bracket values, row-major
    counts: list[list[Tensor]] = [[] for _ in range(per_row)]  # how many of them per row
    for key, n in zip(keys, numels, strict=True):
        for where in chunks(n):
            x = values(key, where)  # [T, chunk]
            for j in range(per_row):
                lo_j, hi_j = lo[:, j : j + 1], hi[:, j : j + 1]
                below[:, j] += (x < lo_j).sum(dim=1)
                inside = (x >= lo_j) & (x <= hi_j)
                kept[j].append(x[inside])
                counts[j].append(inside.sum(dim=1))
    out = torch.full((rows, per_row), float("nan"))
    for j in range(per_row):
        vals = torch.cat(kept[j])
        row_of = torch.repeat_interleave(
            torch.arange(rows).repeat(len(counts[j])), torch.stack(counts[j]).reshape(-1)
        )
        for t in range(rows):
            c = vals[row_of == t]
            r = int(ranks[t, j] - below[t, j])
            if 0 <= r < c.numel():
                out[t, j] = c.kthvalue(r + 1).values
    return out


def kth_largest_count(numel: int, fraction: float) -> int:
    """How many entries a keep-fraction keeps: ``max(1, floor(fraction * numel))``.

    The TIES reference code keeps ``floor(fraction * D) + 1`` entries (it thresholds at the
    ``D - floor(fraction*D)``-th smallest value and keeps ``>=``); we keep exactly
    ``floor(fraction * D)`` (plus ties), and at least one.
    """
    return max(1, math.floor(fraction * numel + 1e-9))
