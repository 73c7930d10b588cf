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

# values(key, idx) -> Tensor[T, m]: the values of one tensor at flat positions ``idx``
# (all positions when idx is None). Row t belongs to task t.
ValuesFn = Callable[[str, Tensor | None], Tensor]

DIRECT_LIMIT = 1 << 22  # below this many values per row, just concatenate and kthvalue


def _direct(keys: Sequence[str], values: ValuesFn, ranks: Tensor) -> Tensor:
    full = torch.cat([values(k, None) for k in keys], dim=1).sort(dim=1).values
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
        samples.append(values(key, torch.randint(0, n, (m,), generator=gen)))
    sample = torch.cat(samples, dim=1).sort(dim=1).values  # [T, S]
    s = sample.shape[1]
    p = ranks_t.double() / total
    delta = 5.0 * torch.sqrt(p * (1 - p) / s) + 2.0 / s
    lo_i = torch.floor((p - delta) * s).long()
    hi_i = torch.ceil((p + delta) * s).long()
    inf = torch.tensor(float("inf"))
    lo = torch.where(lo_i < 0, -inf, sample.gather(1, lo_i.clamp(0, s - 1)))
    hi = torch.where(hi_i >= s, inf, sample.gather(1, hi_i.clamp(0, s - 1)))
    result = _refine(keys, values, ranks_t, lo, hi)
    bad = torch.isnan(result)
    if bad.any():  # unlucky sample (rare): count again with an open bracket for those ranks only
        lo2 = torch.where(bad, -inf, inf)
        hi2 = torch.where(bad, inf, -inf)
        result = torch.where(bad, _refine(keys, values, ranks_t, lo2, hi2), result)
    return result


def _refine(keys: Sequence[str], values: ValuesFn, ranks: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    rows, per_row = ranks.shape
    below = torch.zeros(rows, per_row, dtype=torch.long)
    cands: list[list[list[Tensor]]] = [[[] for _ in range(per_row)] for _ in range(rows)]
    lo_c, hi_c = lo.float(), hi.float()
    for key in keys:
        x = values(key, None)  # [T, n]
        for j in range(per_row):
            below[:, j] += (x < lo_c[:, j : j + 1]).sum(dim=1)
            inside = (x >= lo_c[:, j : j + 1]) & (x <= hi_c[:, j : j + 1])
            for t in range(rows):
                cands[t][j].append(x[t][inside[t]])
    out = torch.full((rows, per_row), float("nan"))
    for t in range(rows):
        for j in range(per_row):
            c = torch.cat(cands[t][j])
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
