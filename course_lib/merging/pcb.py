"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024, Sec. 3).

PCB scores every parameter of every task by how much it matters to its own task
(*intra-balancing*) and how well it agrees with the other tasks (*inter-balancing*), drops the
low scores and takes a score-weighted mean of what is left. The paper writes

    beta_intra,i = Softmax(N * Norm(tau_i * tau_i))
    beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))
    beta_i = beta_intra,i * beta_inter,i,  drop all but the top ``ratio`` of each beta_i,
    tau_m = sum_i beta^_i tau_i / sum_i beta^_i,   theta_m = theta_0 + lambda * tau_m.

We follow the official code path (reference ``algorithms.md`` section 2.5, variant C), which
differs from the paper's equations in ways that matter for the numbers:

* **clip**: a_i = |tau_i| clipped to its own [q, 1-q] quantiles (q = ``clip_quantile``, 1%),
  tau_c,i = sign(tau_i) * a_i; the clipped vectors are the ones merged;
* **Norm** is per-task min-max of a_i: m_i = (a_i - min)/(max - min) (we add an epsilon, the
  code has none and returns NaN for a constant task vector);
* **intra_balance**: exp(N * m_i^2) (exp replaces a softmax over ~10^8 entries, whose
  denominator would cancel in the min-max that follows anyway);
* **inter_balance** (``inter="pairwise"``, variant C, default): sum_j tanh(u_i * u_j) with
  u = sign(tau) * m. ``inter="sum"`` is variant A, tanh(tau_i * sum_j tau_j) on raw values, a
  soft sign election (used by the NLP code);
* **drop and rescale weights**: w_i = (max(beta_i, v_i) - v_i) / (max beta_i - v_i) with v_i the
  row's (1 - ratio) quantile: dropped entries get weight 0, kept ones (0, 1];
* **merge**: tau_m = sum_i lambda_i w_i tau_c,i / max(sum_i w_i, 1e-12) (lambda inside the mean,
  so per-task lambdas can be searched; PCB uses lambda ~ 1-1.3, as TIES with dis-mean).

Every row statistic is over the whole model of a task, as in the code, and is computed exactly
without building the [T, D] matrix (``_select``): three streaming passes over the tensors, each
spread over a few threads (the result is the same bits for any number of threads). The
streaming kernel (``_Balancer``) evaluates the pairwise sum through power sums of an odd
polynomial that matches tanh on [-1, 1] to 2.2e-8 (:func:`tanh_odd_polynomial`): O(T) work per
position instead of O(T^2). Against float64 its float32 pair sums are off by ~1e-6 for 8 tasks:
less than the float32 sigmoid form (2e-6), a little more than float32 tanh (7e-7); tested.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from course_lib.merging import _select
from course_lib.merging._base import delta_rows, prepare, register
from course_lib.merging._select import (
    PerThread,
    chunk_jobs,
    gather_columns,
    kth_smallest_rows,
    stream,
)
from course_lib.state import (
    StateDict,
    check_fraction,
    check_number,
    check_scaling,
    with_passthrough,
)

Inter = Literal["pairwise", "sum"]
EPS = 1e-12


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def clip_bounds_ranks(numel: int, clip_quantile: float) -> tuple[int, int]:
    """0-based ascending ranks of the lower and upper clip values (as the reference code)."""
    lo = int(numel * clip_quantile)
    hi = max(lo, int(numel * (1.0 - clip_quantile)) - 1)
    return lo, hi


def drop_rank(numel: int, ratio: float) -> int:
    """0-based ascending rank of the drop threshold v: everything below it gets weight 0."""
    return min(numel - 1, int(numel * (1.0 - ratio)))


def normalized_magnitude(tau: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Clip |tau| per row to [lo, hi]; return (min-max normalized magnitude m, clipped tau_c)."""
    a = torch.minimum(torch.maximum(tau.abs(), _col(lo, tau)), _col(hi, tau))
    m = (a - _col(lo, tau)) / _col((hi - lo).clamp(min=EPS), tau)
    return m, tau.sign() * a


def intra_balance(m: Tensor) -> Tensor:
    """Intra-balancing, exp(N * m^2): large own-task magnitudes dominate, sharply for many tasks."""
    return torch.exp(m * m * m.shape[0])


TANH_DEGREE = 13


@functools.cache
def tanh_odd_polynomial(degree: int = TANH_DEGREE) -> tuple[float, ...]:
    """Coefficients c_0..c_K of an odd polynomial sum_k c_k x^(2k+1) that follows tanh on [-1, 1].

    Least squares on 4096 Chebyshev nodes in float64 (close to the minimax polynomial). For the
    default degree 13 (K = 6) the largest error on [-1, 1] is 2.2e-8, below float32's spacing
    of 6e-8 near 1, so the approximation adds less than one float32 rounding (tested). The kernel
    uses it to turn the pairwise inter-balancing into power sums (``_Balancer._pairwise``).
    """
    if degree < 1 or degree % 2 == 0:
        raise ValueError(f"degree must be a positive odd integer, got {degree!r}")
    n = 4096
    x = torch.cos(torch.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    powers = x.unsqueeze(1) ** torch.arange(1, degree + 1, 2, dtype=torch.float64)
    coef = torch.linalg.lstsq(powers, torch.tanh(x).unsqueeze(1)).solution.squeeze(1)
    return tuple(float(v) for v in coef)


def inter_balance(tau: Tensor, m: Tensor, inter: Inter = "pairwise") -> Tensor:
    """Inter-balancing: how much each entry agrees with the other tasks at the same position.

    ``pairwise``: sum_j tanh(u_i u_j), u = sign(tau) m (variant C);
    ``sum``: tanh(tau_i * sum_j tau_j) (variant A; negative where tau_i opposes the consensus).

    The pairwise sum is the expensive part of PCB (T(T+1)/2 transcendental evaluations per
    position). We use tanh(x) = 2 sigmoid(2x) - 1 (the same function; PyTorch's CPU sigmoid is
    ~3x faster than its tanh) and the symmetry tanh(u_i u_j) = tanh(u_j u_i). The streaming
    kernel that merges real models avoids the T^2 pairs altogether (``_Balancer._pairwise``).
    """
    if inter == "sum":
        return torch.tanh(tau * tau.sum(dim=0, keepdim=True))
    if inter != "pairwise":
        raise ValueError(f"inter must be 'pairwise' or 'sum', got {inter!r}")
    u = tau.sign() * m
    two_u = 2.0 * u
    total = torch.zeros_like(u)  # total[i] = sum_j sigmoid(2 u_i u_j)
    for i in range(u.shape[0]):
        s = torch.sigmoid_(u[i] * two_u[i:])  # pairs (i, j >= i)
        total[i] += s.sum(dim=0)
        total[i + 1 :] += s[1:]
    return total.mul_(2.0).sub_(u.shape[0])


def balance(
    tau: Tensor, lo: Tensor, hi: Tensor, inter: Inter = "pairwise"
) -> tuple[Tensor, Tensor]:
    """The PCB score beta = intra * inter of a stacked [T, ...] tensor, and the clipped tau_c."""
    m, tau_c = normalized_magnitude(tau, lo, hi)
    return intra_balance(m) * inter_balance(tau, m, inter), tau_c


def drop_weights(beta: Tensor, threshold: Tensor, beta_max: Tensor) -> Tensor:
    """Drop and rescale: (max(beta, v) - v) / (beta_max - v); 0 below the threshold v."""
    v = _col(threshold, beta)
    return (torch.maximum(beta, v) - v) / _col((beta_max - threshold).clamp(min=EPS), beta)


def rescale_merge(tau_c: Tensor, w: Tensor, scaling: Sequence[float]) -> Tensor:
    """tau_m = sum_i lambda_i w_i tau_c,i / max(sum_i w_i, eps)."""
    lam = torch.tensor(scaling, dtype=tau_c.dtype)
    return (_col(lam, tau_c) * w * tau_c).sum(dim=0) / w.sum(dim=0).clamp(min=EPS)


@register("pcb_merging")
def pcb_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    ratio: float = 0.1,
    scaling: float | Sequence[float] = 1.0,
    clip_quantile: float = 0.01,
    inter: Inter = "pairwise",
    *,
    keys: str | None = None,
    exclude: str | None = None,
) -> StateDict:
    """PCB-Merging (official-code variant C): ``theta_0 + sum_i lambda_i w_i tau_c,i / sum_i w_i``."""
    p = prepare(pretrained, finetuned, keys, exclude)
    ratio = check_fraction("ratio", ratio)
    lam = check_scaling(scaling, len(finetuned))
    if not 0.0 <= check_number("clip_quantile", clip_quantile) < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile!r}")
    if inter not in ("pairwise", "sum"):
        raise ValueError(f"inter must be 'pairwise' or 'sum', got {inter!r}")
    keys_ = p.merged
    numels = [pretrained[k].numel() for k in keys_]
    total, num = sum(numels), len(finetuned)

    def tau_at(lane: _Lane, key: str, where: Tensor | slice) -> Tensor:
        return delta_rows(pretrained, finetuned, key, where, lane.tau)

    # Every pass streams the model on several threads (_select.stream); each thread works in
    # its own _Lane of buffers.
    # Pass 1: the clip bounds of |tau| per task.
    clip_lanes = PerThread(lambda: _Lane(num, inter))
    lo_r, hi_r = clip_bounds_ranks(total, clip_quantile)
    bounds = kth_smallest_rows(
        keys_,
        numels,
        lambda k, w: tau_at(clip_lanes(), k, w).abs_(),
        [[lo_r, hi_r]] * num,
        scratch=lambda: clip_lanes().work.scratch(),
    )
    lanes = PerThread(lambda: _Lane(num, inter, bounds[:, 0], bounds[:, 1]))

    # Pass 2: drop threshold and maximum of beta per task. On the way, note which positions can
    # hold a kept entry in some task (beta above the threshold's lower bracket): pass 3 only
    # needs to recompute beta there, every other position merges to 0.
    streamed = total > _select.DIRECT_LIMIT  # else no chunk is visited and nothing is marked
    live = {k: torch.zeros(n, dtype=torch.bool) for k, n in zip(keys_, numels, strict=True)}

    def note_live(key: str, where: slice, reach: Tensor) -> None:
        live[key][where] |= reach >= 0  # threads write disjoint slices

    stats = kth_smallest_rows(
        keys_,
        numels,
        lambda k, w: lanes().work.beta(tau_at(lanes(), k, w)),
        [[drop_rank(total, ratio), total - 1]] * num,
        visit=note_live,
        scratch=lambda: lanes().work.scratch(),
    )

    # Pass 3: weights and the weighted mean (at the live positions; all of them for small models).
    tau_m = {k: torch.zeros(n) for k, n in zip(keys_, numels, strict=True)}

    def merge_chunk(job: tuple[str, slice]) -> None:
        key, where = job
        lane = lanes()
        if not streamed:
            lane.work.merge(
                tau_at(lane, key, where), stats[:, 0], stats[:, 1], lam, out=tau_m[key][where]
            )
            return
        idx = live[key][where].nonzero().squeeze(1)
        if idx.numel():
            tau = gather_columns(tau_at(lane, key, where), idx, out=lane.cols)
            merged_at = lane.row[: idx.numel()]
            lane.work.merge(tau, stats[:, 0], stats[:, 1], lam, out=merged_at)
            tau_m[key][where][idx] = merged_at

    stream(chunk_jobs(keys_, numels), merge_chunk)
    merged: dict[str, Tensor] = {}
    for key in keys_:
        base = pretrained[key]
        merged[key] = tau_m.pop(key).reshape(base.shape).add_(base.float()).to(base.dtype)
    return with_passthrough(merged, pretrained)


class _Lane:
    """One streaming thread's buffers: a [T, CHUNK] block of task vectors, the PCB kernel,
    and the gathered live columns of pass 3."""

    def __init__(self, rows: int, inter: Inter, lo: Tensor | None = None, hi: Tensor | None = None):
        self.tau = torch.empty(rows, _select.CHUNK)
        self.work = _Balancer(rows, inter)
        if lo is not None and hi is not None:
            self.work.set_bounds(lo, hi)
            self.cols, self.row = torch.empty(rows, _select.CHUNK), torch.empty(_select.CHUNK)


class _Balancer:
    """The PCB steps on one [T, chunk] block, written into three pre-allocated buffers.

    Computes exactly :func:`balance`, :func:`drop_weights` and :func:`rescale_merge`, but in
    place wherever it can: streaming a ViT-B/32-sized model allocates nothing per chunk (fresh
    temporaries per chunk made glibc's heap grow by gigabytes), and the few buffers a block
    goes through stay in the CPU's cache (on this machine an operation that writes into one of
    ten [8, 2^18] buffers in turn took 3-6x longer than one that writes in place).
    """

    def __init__(self, rows: int, inter: Inter):
        self.rows, self.inter, self.cols = rows, inter, 0
        self.coef = tanh_odd_polynomial()
        self.coef_col = torch.tensor(self.coef).reshape(-1, 1)

    def set_bounds(self, lo: Tensor, hi: Tensor) -> None:
        self.lo = lo.reshape(-1, 1).contiguous()
        self.span = (hi.reshape(-1, 1) - self.lo).clamp(min=EPS)
        self.bounds = list(zip(lo.tolist(), hi.tolist(), strict=True))  # per-row Python floats

    def _buffers(self, m: int) -> None:
        if m > self.cols:
            self.cols = max(m, _select.CHUNK)
            self.u, self.sq, self.acc = (torch.empty(self.rows, self.cols) for _ in range(3))
            self.row = torch.empty(self.cols)
            self.sums = torch.empty(len(self.coef), self.cols)

    def scratch(self) -> tuple[Tensor, Tensor]:
        """Two [T, >= chunk] buffers that are free once :meth:`beta` has returned."""
        self._buffers(_select.CHUNK)
        return self.u, self.acc

    def beta(self, tau: Tensor, clip_tau: bool = False) -> Tensor:
        """beta = exp(T m^2) * inter of ``tau`` [T, m] (a view of a buffer, overwritten: with the
        clipped tau_c = sign(tau) * a when ``clip_tau``, else used as scratch)."""
        t, m = tau.shape
        self._buffers(m)
        u = torch.abs(tau, out=self.u[:, :m])
        for row, (lo, hi) in zip(u, self.bounds, strict=True):  # a = |tau| clipped to [lo, hi];
            row.clamp_(min=lo, max=hi)  # a scalar clamp per row is much faster than a broadcast
        if self.inter == "sum":  # tanh(tau_i * sum_j tau_j), on the unclipped tau
            inter = torch.sum(tau, dim=0, out=self.row[:m])
            torch.mul(tau, inter, out=self.acc[:, :m]).tanh_()
        if clip_tau:
            tau.sign_().mul_(u)
        u.sub_(self.lo).div_(self.span)  # m = (a - lo) / (hi - lo)
        if self.inter == "sum":
            square = torch.mul(u, u, out=self.sq[:, :m])
        else:  # u = sign(tau) m (tau_c has tau's sign); where tau = 0, m = 0 and u = 0 too
            square = self._pairwise(u.copysign_(tau))
        return square.mul_(t).exp_().mul_(self.acc[:, :m])

    def _pairwise(self, u: Tensor) -> Tensor:
        """acc_i = sum_j tanh(u_i u_j) through power sums: O(T K) products, not T^2 tanh.

        Writes the pair sums into ``self.acc`` and returns u^2 (= m^2, which the
        intra-balancing needs next) in ``self.sq``.

        With tanh(x) ~ p(x) = sum_k c_k x^(2k+1) on [-1, 1] (:func:`tanh_odd_polynomial`; here
        |u| <= 1, so every product u_i u_j lies in [-1, 1]) the sum over pairs separates:

            sum_j p(u_i u_j) = u_i * sum_k c_k (u_i^2)^k S_k,    S_k = sum_j u_j^(2k+1),

        K + 1 power sums over the tasks, then one Horner evaluation in u_i^2 per task. For 8
        tasks that replaces 36 sigmoids and 64 additions per position by ~25 multiply-adds per
        task (measured 1.4x faster on [8, 2^18] blocks, 2.3x for 20 tasks).
        """
        t, m = u.shape
        c = self.coef
        u2 = torch.mul(u, u, out=self.sq[:, :m])
        sums = self.sums[:, :m]  # sums[k] = c_k S_k
        torch.sum(u, dim=0, out=sums[0])
        power = torch.mul(u, u2, out=self.acc[:, :m])
        for k in range(1, len(c)):
            if k > 1:
                power.mul_(u2)
            torch.sum(power, dim=0, out=sums[k])
        sums.mul_(self.coef_col)
        total = torch.addcmul(sums[-2], u2, sums[-1], out=power)  # the powers are summed: reuse
        for k in range(len(c) - 3, -1, -1):
            torch.addcmul(sums[k], total, u2, out=total)
        total.mul_(u)
        return u2

    def merge(
        self, tau: Tensor, threshold: Tensor, beta_max: Tensor, lam: Sequence[float], out: Tensor
    ) -> None:
        """out = sum_i lambda_i w_i tau_c,i / max(sum_i w_i, eps) with the drop-and-rescale w."""
        m = tau.shape[1]
        w = self.beta(tau, clip_tau=True)  # tau is now tau_c
        v = threshold.reshape(-1, 1)
        w = torch.maximum(w, v, out=w).sub_(v).div_((beta_max.reshape(-1, 1) - v).clamp(min=EPS))
        lam_col = torch.tensor(lam, dtype=tau.dtype).reshape(-1, 1)
        torch.sum(tau.mul_(w).mul_(lam_col), dim=0, out=out)
        out.div_(torch.sum(w, dim=0, out=self.row[:m]).clamp_(min=EPS))
