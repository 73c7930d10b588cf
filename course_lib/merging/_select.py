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

The streaming passes run on :func:`workers` threads that take chunks from one queue
(:func:`stream`). Every result is independent of which thread did which chunk (counts of values
are integers, the candidates form a set, the rest are disjoint writes), so the output is the
same bits for any number of workers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import torch
from torch import Tensor

from course_lib.config import torch_threads

# values(key, where) -> Tensor[T, m]: the values of one tensor at flat positions ``where``, an
# index tensor or a ``slice`` of the flattened tensor. Row t belongs to task t. The result may be
# a reused buffer of the calling thread, overwritten by its next call: callers copy what they keep.
ValuesFn = Callable[[str, Tensor | slice], Tensor]
# visit(key, where, reach): for each streamed chunk x = values(key, where), reach[c] is the largest
# x[t, c] - lo[t] over the rows t, lo being the lower ends of the first rank's brackets (see
# kth_smallest_rows).
VisitFn = Callable[[str, slice, Tensor], None]

DIRECT_LIMIT = 1 << 22  # below this many values per row, just concatenate and kthvalue
CHUNK = 1 << 16  # columns per streaming step: [8, CHUNK] floats = 2 MB, so that the few blocks a
# chunk goes through stay in the L3 cache. PCB on 8 ViT-B/32-sized models, 2 cores, alternating
# processes: 10.3-13.2 s at 1 << 16, 10.1-15.1 s at 1 << 17; 1 << 18 was slower in one process.


# More threads than this mostly add buffers: the passes are bound by memory and by Python.
MAX_WORKERS = 4


def workers() -> int:
    """How many threads stream a model: one per PyTorch thread, at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


J = TypeVar("J")
V = TypeVar("V")


class PerThread(Generic[V]):
    """Calling it returns the calling thread's own ``make()``, made on the thread's first call.

    Each streaming worker needs its own buffers (a chunk's values, the counter's scratch);
    ``made`` lists every instance, so that per-thread partial results can be combined.
    """

    def __init__(self, make: Callable[[], V]):
        self.make, self.local, self.made = make, threading.local(), []

    def __call__(self) -> V:
        value = getattr(self.local, "value", None)
        if value is None:
            value = self.local.value = self.make()
            self.made.append(value)
        return value


def stream(jobs: Iterable[J], step: Callable[[J], None], num_workers: int | None = None) -> None:
    """Call ``step(job)`` for every job, on ``num_workers`` threads (default :func:`workers`).

    The threads take jobs from one shared iterator, so a thread that drew small tensors takes
    more of them. Each runs PyTorch single-threaded: a [T, chunk] operation is too short to
    split well over threads, and the Python between operations then runs while the other
    thread computes (PCB on the ViT-B/32 benchmark, 2 cores: about 6% faster than one chunk at
    a time on two PyTorch threads). ``step`` must be safe to call from several threads at once
    (see :class:`PerThread`); the first exception stops every thread and is raised here.
    """
    n = workers() if num_workers is None else num_workers
    jobs = iter(jobs)
    if n <= 1:
        for job in jobs:
            step(job)
        return
    lock, failed = threading.Lock(), threading.Event()

    def run() -> None:
        while not failed.is_set():
            with lock:
                job = next(jobs, _DONE)
            if job is _DONE:
                return
            try:
                step(job)
            except BaseException:
                failed.set()
                raise

    with torch_threads(1), ThreadPoolExecutor(n, thread_name_prefix="course_lib-stream") as pool:
        for future in [pool.submit(run) for _ in range(n)]:
            future.result()


_DONE = object()


def chunks(numel: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of at most ``size`` (default :data:`CHUNK`) positions covering ``numel``."""
    size = CHUNK if size is None else size
    return [slice(s, min(numel, s + size)) for s in range(0, numel, size)]


def chunk_jobs(keys: Sequence[str], numels: Sequence[int]) -> list[tuple[str, slice]]:
    """Every (key, chunk) of a model, in order: the jobs of one streaming pass (:func:`stream`)."""
    return [(key, where) for key, n in zip(keys, numels, strict=True) for where in chunks(n)]


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
    scratch: Callable[[], tuple[Tensor, Tensor]] | None = None,
    num_workers: int | None = None,
) -> Tensor:
    """Return ``out[t, j]``: the value of 0-based ascending rank ``ranks[t][j]`` in row t.

    ``keys``/``numels`` list the tensors the rows are spread over (D = sum(numels) values per
    row). Memory: the sample plus the in-bracket candidates (a fraction of a percent of D),
    never [T, D]. Rows of at most ``direct_limit`` values (default :data:`DIRECT_LIMIT`) are
    simply concatenated and sorted. A rank of D - 1 in every row (the row maximum) is a plain
    running maximum.

    The streaming pass runs on ``num_workers`` threads (:func:`stream`), so ``values`` and
    ``visit`` must be safe to call from several threads at once: ``values`` may return a buffer
    it reuses, but one per thread (:class:`PerThread`).

    ``visit(key, where, reach)``, if given, sees every chunk of the streaming pass as
    ``reach`` [chunk], the largest ``x[t] - lo[t]`` over the rows, ``lo`` being the lower ends of
    the brackets of ``ranks[:][0]``: a position can hold a value at or above that rank's result
    in some row only where ``reach >= 0``. It is not called on the direct path (small rows).
    ``scratch()``, if given, returns two [T, >= CHUNK] float32 buffers of the calling thread
    that the counting may overwrite (it allocates its own otherwise); ``values`` must not
    return a view of them.
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
    pass_ = _Pass(keys, numels, values, ranks_t, visit, scratch, num_workers)
    result = pass_.refine(lo, hi)
    bad = torch.isnan(result)
    if bad.any():  # unlucky sample (rare): count again with an open bracket for those ranks only
        lo2 = torch.where(bad, -inf, inf)
        hi2 = torch.where(bad, inf, -inf)
        result = torch.where(bad, pass_.refine(lo2, hi2), result)
    return result


class _Tally:
    """One thread's share of a counting pass: counts below ``lo``, candidates, row maxima."""

    def __init__(self, rows: int, per_row: int, scratch: tuple[Tensor, Tensor] | None):
        self.counter = _Counter(rows, scratch)
        self.row_max = torch.full((rows,), -float("inf"))
        self.below = torch.zeros(rows, per_row, dtype=torch.float64)
        self.kept: list[list[Tensor]] = [[] for _ in range(per_row)]  # in-bracket values
        self.counts: list[list[Tensor]] = [[] for _ in range(per_row)]  # how many per row


class _Pass:
    """The streaming step of :func:`kth_smallest_rows`: count below ``lo``, keep [lo, hi]."""

    def __init__(
        self,
        keys: Sequence[str],
        numels: Sequence[int],
        values: ValuesFn,
        ranks: Tensor,
        visit: VisitFn | None,
        scratch: Callable[[], tuple[Tensor, Tensor]] | None,
        num_workers: int | None,
    ):
        self.values, self.ranks, self.visit, self.scratch = values, ranks, visit, scratch
        self.num_workers = num_workers
        self.jobs = chunk_jobs(keys, numels)
        self.is_max = [bool((ranks[:, j] == sum(numels) - 1).all()) for j in range(ranks.shape[1])]

    def refine(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Rank-th value per row, NaN where the rank does not fall inside [lo, hi]."""
        rows, per_row = self.ranks.shape
        tally = PerThread(
            lambda: _Tally(rows, per_row, self.scratch() if self.scratch is not None else None)
        )
        stream(self.jobs, lambda job: self._chunk(job, lo, hi, tally()), self.num_workers)
        out = torch.full((rows, per_row), float("nan"))
        below = sum(t.below for t in tally.made)  # integer counts: exact in any order
        for j in range(per_row):
            if self.is_max[j]:
                out[:, j] = torch.stack([t.row_max for t in tally.made]).amax(dim=0)
                continue
            vals = torch.cat([v for t in tally.made for v in t.kept[j]])  # row-major pieces
            counts = torch.stack([c for t in tally.made for c in t.counts[j]])  # [pieces, T]
            row_of = (
                torch.arange(rows).repeat(counts.shape[0]).repeat_interleave(counts.reshape(-1))
            )
            for t in range(rows):
                c = vals[row_of == t]
                r = int(self.ranks[t, j] - int(below[t, j]))
                if 0 <= r < c.numel():
                    out[t, j] = c.kthvalue(r + 1).values
        return out

    def _chunk(self, job: tuple[str, slice], lo: Tensor, hi: Tensor, tally: _Tally) -> None:
        key, where = job
        x = self.values(key, where)  # [T, chunk]
        reach = None
        if self.visit is not None:
            if self.is_max[0]:  # no counting for rank 0: compute its reach here
                self.visit(key, where, torch.sub(x, lo[:, :1]).amax(dim=0))
            else:
                reach = tally.counter.reach(x.shape[1])
        for j in range(len(self.is_max)):
            if self.is_max[j]:
                torch.maximum(tally.row_max, x.amax(dim=1), out=tally.row_max)
                continue
            lo_j, hi_j = lo[:, j : j + 1], hi[:, j : j + 1]
            n_below, cols, inside = tally.counter.split(x, lo_j, hi_j, reach if j == 0 else None)
            if j == 0 and reach is not None:
                self.visit(key, where, reach)
            tally.below[:, j] += n_below
            tally.kept[j].append(cols[inside])  # row-major: row t's values, then row t+1's
            tally.counts[j].append(inside.sum(dim=1))


class _Counter:
    """Per chunk: how many values of each row lie below ``lo``, and those inside [lo, hi].

    Written with float arithmetic only: on CPU, PyTorch's comparisons (bool outputs) and bool
    reductions are ~2-10x slower than float ops of the same size. With d = x - lo (its sign is
    exact: x - lo rounds to 0 only when x == lo), the row sum of sign(d) is (count above lo) -
    (count below lo); the values equal to lo lie inside [lo, hi], so they are among the gathered
    candidates and counted there. The in-bracket values are rare: the columns that hold one are
    found from the column maximum of min(x - lo, hi - x), and only those columns are compared
    exactly.
    """

    def __init__(self, rows: int, scratch: tuple[Tensor, Tensor] | None = None):
        self.rows, self.cols = rows, 0
        if scratch is not None:
            self.d, self.e = scratch
            self.cols = min(self.d.shape[1], self.e.shape[1])
        self.row = torch.empty(self.cols)

    def _ensure(self, m: int) -> None:
        if m > self.cols:
            self.cols = max(m, CHUNK)
            self.d, self.e = torch.empty(self.rows, self.cols), torch.empty(self.rows, self.cols)
            self.row = torch.empty(self.cols)

    def reach(self, m: int) -> Tensor:
        """A [m] buffer for :meth:`split`'s ``reach``."""
        self._ensure(m)
        return self.row[:m]

    def split(
        self, x: Tensor, lo: Tensor, hi: Tensor, reach: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return (count of x < lo per row [T], the candidate columns of x [T, k], and the mask
        [T, k] of their entries inside [lo, hi]). ``reach``, if given: set to max_t (x_t - lo_t)."""
        m = x.shape[1]
        self._ensure(m)
        d, e = self.d[:, :m], self.e[:, :m]
        torch.sub(x, lo, out=d)
        if reach is not None:
            torch.amax(d, dim=0, out=reach)
        exact = torch.float32 if m <= 1 << 24 else torch.float64  # integer sums stay exact
        signs = torch.sign(d, out=e).sum(dim=1, dtype=exact).double()
        torch.minimum(d, torch.sub(hi, x, out=e), out=d)  # >= 0 exactly inside [lo, hi]
        cols = (d.amax(dim=0) >= 0).nonzero().squeeze(1)
        sub = gather_columns(x, cols)
        at_lo = (sub == lo).sum(dim=1).double()
        return (m - at_lo - signs) / 2, sub, (sub >= lo) & (sub <= hi)


def kth_largest_count(numel: int, fraction: float) -> int:
    """How many entries a keep-fraction keeps: ``max(1, floor(fraction * numel))``.

    The TIES reference code keeps ``floor(fraction * D) + 1`` entries (it thresholds at the
    ``D - floor(fraction*D)``-th smallest value and keeps ``>=``); we keep exactly
    ``floor(fraction * D)`` (plus ties), and at least one.
    """
    return max(1, math.floor(fraction * numel + 1e-9))
