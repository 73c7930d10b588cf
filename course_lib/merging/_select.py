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
# visit(key, where, x, lo): sees each streamed chunk x = values(key, where) and the brackets' lower
# ends lo [T, ranks per row] (see kth_smallest_rows).
VisitFn = Callable[[str, slice, Tensor, Tensor], None]

DIRECT_LIMIT = 1 << 22  # below this many values per row, just concatenate and kthvalue
CHUNK = 1 << 18  # columns per streaming step: [8, CHUNK] floats = 8 MB, in the L3 cache (measured
# faster and leaner than 1 << 16 and 1 << 20 for 8 ViT-B/32-sized models on 2 cores)


def chunks(numel: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of at most ``size`` (default :data:`CHUNK`) positions covering ``numel``."""
    size = CHUNK if size is None else size
    return [slice(s, min(numel, s + size)) for s in range(0, numel, size)]


def gather_columns(x: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """``x[:, idx]`` for a [T, m] matrix, written into ``out`` ([T, >= len(idx)]) when given.

    One 1-D ``index_select`` per row: on CPU that is ~9x faster than PyTorch's gather of columns
    along dim 1 (measured on [8, 2^18] float32 blocks keeping 55% of the columns: 1.0 vs 9.0 ms).
    """
    k = idx.numel()
    out = torch.empty(x.shape[0], k, dtype=x.dtype) if out is None else out[:, :k]
    for t in range(x.shape[0]):
        torch.index_select(x[t], 0, idx, out=out[t])
    return out


def _direct(keys: Sequence[str], values: ValuesFn, ranks: Tensor) -> Tensor:
    full = torch.cat([values(k, slice(None)).clone() for k in keys], dim=1).sort(dim=1).values
    return full.gather(1, ranks)


def kth_smallest_rows(
    keys: Sequence[str],
    numels: Sequence[int],
    values: ValuesFn,
    ranks: Sequence[Sequence[int]],
    *,
    sample_size: int = 1 << 18,
    seed: int = 0,
    direct_limit: int | None = None,
    visit: VisitFn | None = None,
) -> Tensor:
    """Return ``out[t, j]``: the value of 0-based ascending rank ``ranks[t][j]`` in row t.

    ``keys``/``numels`` list the tensors the rows are spread over (D = sum(numels) values per
    row). Memory: the sample plus the in-bracket candidates (a fraction of a percent of D),
    never [T, D]. Rows of at most ``direct_limit`` values (default :data:`DIRECT_LIMIT`) are
    simply concatenated and sorted. A rank of D - 1 in every row (the row maximum) is a plain
    running maximum.

    ``visit(key, where, x, lo)``, if given, sees every chunk ``x`` of the streaming pass with the
    brackets' lower ends ``lo`` [T, len(ranks[0])]: every value at or above its rank's result is
    at or above ``lo``. It is not called on the direct path (small rows).
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
    result = _refine(keys, numels, values, ranks_t, lo, hi, visit)
    bad = torch.isnan(result)
    if bad.any():  # unlucky sample (rare): count again with an open bracket for those ranks only
        lo2 = torch.where(bad, -inf, inf)
        hi2 = torch.where(bad, inf, -inf)
        again = _refine(keys, numels, values, ranks_t, lo2, hi2, visit)
        result = torch.where(bad, again, result)
    return result


def _refine(
    keys: Sequence[str],
    numels: Sequence[int],
    values: ValuesFn,
    ranks: Tensor,
    lo: Tensor,
    hi: Tensor,
    visit: VisitFn | None = None,
) -> Tensor:
    """Count values below ``lo`` and keep those in [lo, hi], one cache-sized chunk at a time."""
    rows, per_row = ranks.shape
    is_max = [bool((ranks[:, j] == sum(numels) - 1).all()) for j in range(per_row)]
    row_max = torch.full((rows,), -float("inf"))
    below = torch.zeros(rows, per_row, dtype=torch.float64)
    kept: list[list[Tensor]] = [[] for _ in range(per_row)]  # in-bracket values, row-major
    counts: list[list[Tensor]] = [[] for _ in range(per_row)]  # how many of them per row
    work = _Counter(rows)
    for key, n in zip(keys, numels, strict=True):
        for where in chunks(n):
            x = values(key, where)  # [T, chunk]
            if visit is not None:
                visit(key, where, x, lo)
            for j in range(per_row):
                if is_max[j]:
                    torch.maximum(row_max, x.amax(dim=1), out=row_max)
                    continue
                n_below, cols, inside = work.split(x, lo[:, j : j + 1], hi[:, j : j + 1])
                below[:, j] += n_below
                kept[j].append(cols[inside])  # row-major: row t's values, then row t+1's
                counts[j].append(inside.sum(dim=1))
    out = torch.full((rows, per_row), float("nan"))
    for j in range(per_row):
        if is_max[j]:
            out[:, j] = row_max
            continue
        vals = torch.cat(kept[j])
        row_of = torch.repeat_interleave(
            torch.arange(rows).repeat(len(counts[j])), torch.stack(counts[j]).reshape(-1)
        )
        for t in range(rows):
            c = vals[row_of == t]
            r = int(ranks[t, j] - int(below[t, j]))
            if 0 <= r < c.numel():
                out[t, j] = c.kthvalue(r + 1).values
    return out


class _Counter:
    """Per chunk: how many values of each row lie below ``lo``, and those inside [lo, hi].

    Written with float arithmetic only: on CPU, PyTorch's comparisons (bool outputs) and bool
    reductions are ~2-10x slower than float ops of the same size. With d = x - lo (its sign is
    exact), min(sign d, 0) is -1 exactly where x < lo and 0 elsewhere: its row sum is minus the
    count, exact in float32 for a chunk. The in-bracket values are rare: the columns that hold
    one are found from the column maximum of min(x - lo, hi - x), and only those columns are
    compared exactly.
    """

    def __init__(self, rows: int):
        self.rows, self.cols = rows, 0

    def split(self, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (count of x < lo per row [T], the candidate columns of x [T, k], and the mask
        [T, k] of their entries inside [lo, hi])."""
        m = x.shape[1]
        if m > self.cols:
            self.cols = max(m, CHUNK)
            self.d, self.e = torch.empty(self.rows, self.cols), torch.empty(self.rows, self.cols)
        d, e = self.d[:, :m], self.e[:, :m]
        torch.sub(x, lo, out=d)
        below = torch.sign(d, out=e).clamp_(max=0)  # -1 where x < lo, else 0
        exact = torch.float32 if m <= 1 << 24 else torch.float64  # integer sums stay exact
        n_below = below.sum(dim=1, dtype=exact).double().neg_()
        torch.minimum(d, torch.sub(hi, x, out=e), out=d)  # >= 0 exactly inside [lo, hi]
        cols = (d.amax(dim=0) >= 0).nonzero().squeeze(1)
        sub = gather_columns(x, cols)
        return n_below, sub, (sub >= lo) & (sub <= hi)


def kth_largest_count(numel: int, fraction: float) -> int:
    """How many entries a keep-fraction keeps: ``max(1, floor(fraction * numel))``.

    The TIES reference code keeps ``floor(fraction * D) + 1`` entries (it thresholds at the
    ``D - floor(fraction*D)``-th smallest value and keeps ``>=``); we keep exactly
    ``floor(fraction * D)`` (plus ties), and at least one.
    """
    return max(1, math.floor(fraction * numel + 1e-9))
