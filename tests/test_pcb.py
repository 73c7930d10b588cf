"""PCB-Merging steps on a tiny example, computed by hand with math.exp / math.tanh."""

import math

import pytest
import torch
from torch.testing import assert_close

from course_lib.merging import pcb_merging
from course_lib.merging.pcb import (
    balance,
    clip_bounds_ranks,
    drop_rank,
    drop_weights,
    inter_balance,
    intra_balance,
    normalized_magnitude,
    rescale_merge,
)

# Two tasks, four parameters.
TAU = torch.tensor([[0.2, -0.4, 0.0, 0.1], [0.4, 0.2, -0.2, 0.0]])


def test_normalized_magnitude_without_clipping():
    lo, hi = torch.tensor([0.0, 0.0]), torch.tensor([0.4, 0.4])
    m, tau_c = normalized_magnitude(TAU, lo, hi)
    assert_close(m, torch.tensor([[0.5, 1.0, 0.0, 0.25], [1.0, 0.5, 0.5, 0.0]]))
    assert_close(tau_c, TAU)


def test_normalized_magnitude_clips_outliers():
    lo, hi = torch.tensor([0.1, 0.1]), torch.tensor([0.2, 0.2])
    m, tau_c = normalized_magnitude(TAU, lo, hi)
    assert_close(tau_c, torch.tensor([[0.2, -0.2, 0.0, 0.1], [0.2, 0.2, -0.2, 0.0]]))
    # |tau| clipped to [0.1, 0.2], then (a - 0.1) / 0.1; sign(0) = 0 keeps tau_c at 0.
    assert_close(m, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))


def test_intra_balance_is_exp_of_n_m_squared():
    m = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    assert_close(
        intra_balance(m), torch.tensor([[math.exp(0.5), math.exp(2.0)], [1.0, math.exp(0.125)]])
    )


def test_inter_balance_pairwise_and_sum():
    m = torch.tensor([[0.5, 1.0], [1.0, 0.5]])
    tau = torch.tensor([[0.2, -0.4], [0.4, 0.2]])
    u = [[0.5, -1.0], [1.0, 0.5]]
    expected = [
        [math.tanh(u[0][p] * u[0][p]) + math.tanh(u[0][p] * u[1][p]) for p in range(2)],
        [math.tanh(u[1][p] * u[0][p]) + math.tanh(u[1][p] * u[1][p]) for p in range(2)],
    ]
    assert_close(inter_balance(tau, m, "pairwise"), torch.tensor(expected))
    s = [0.6, -0.2]
    expected_sum = [[math.tanh(tau[i, p].item() * s[p]) for p in range(2)] for i in range(2)]
    assert_close(inter_balance(tau, m, "sum"), torch.tensor(expected_sum))
    with pytest.raises(ValueError, match="inter"):
        inter_balance(tau, m, "softmax")


def test_drop_weights_zero_below_threshold_and_one_at_max():
    beta = torch.tensor([[1.0, 3.0, 2.0, 5.0]])
    w = drop_weights(beta, torch.tensor([2.0]), torch.tensor([5.0]))
    assert_close(w, torch.tensor([[0.0, 1 / 3, 0.0, 1.0]]))


def test_rescale_merge_is_a_weighted_mean_with_lambda_inside():
    tau_c = torch.tensor([[1.0, 2.0, 3.0], [3.0, -2.0, 1.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    got = rescale_merge(tau_c, w, [1.0, 2.0])
    assert_close(got, torch.tensor([(1.0 + 6.0) / 2.0, (2.0 * 0.5 * -2.0) / 0.5, 0.0]))


def test_ranks_follow_the_reference_code():
    assert clip_bounds_ranks(1000, 0.01) == (10, 989)
    assert clip_bounds_ranks(10, 0.0) == (0, 9)
    assert drop_rank(1000, 0.1) == 900
    assert drop_rank(10, 1.0) == 0


def test_pcb_end_to_end_matches_the_steps():
    pre = {"w": torch.zeros(4)}
    fts = [{"w": row.clone()} for row in TAU]
    out = pcb_merging(pre, fts, ratio=0.5, scaling=1.0, clip_quantile=0.0)
    lo, hi = torch.zeros(2), TAU.abs().max(dim=1).values
    beta, tau_c = balance(TAU, lo, hi)
    srt = beta.sort(dim=1).values
    w = drop_weights(beta, srt[:, 2], srt[:, 3])
    assert_close(out["w"], rescale_merge(tau_c, w, [1.0, 1.0]))
    # By hand: with ratio 0.5 the threshold is each task's score of rank 2 (of 0..3); a score at
    # or below it gets weight 0, so only each task's top score survives, with weight 1: task 0's
    # at column 1 (-0.4), task 1's at column 0 (0.4). Nothing survives in columns 2 and 3.
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert_close(out["w"], torch.tensor([0.4, -0.4, 0.0, 0.0]))


def test_pcb_never_lets_a_lone_dissenter_flip_the_sign():
    # Tasks 0 and 1 are positive everywhere; task 2 opposes them at every odd position.
    g = torch.Generator().manual_seed(0)
    tau = 0.5 + torch.rand(3, 40, generator=g)
    tau[2, 1::2] *= -1
    out = pcb_merging(
        {"w": torch.zeros(40)}, [{"w": r.clone()} for r in tau], ratio=0.5, clip_quantile=0.0
    )
    conflicts = out["w"][1::2]
    assert (conflicts >= 0).all()  # the dissenting entries get weight 0 (inter-balancing)
    # ... while a plain average is dragged towards 0 at every conflict.
    assert (conflicts.max() > tau.mean(0)[1::2].max()).item()


@pytest.mark.parametrize("inter", ["pairwise", "sum"])
@pytest.mark.parametrize("tasks", [2, 5])
def test_streaming_kernel_computes_the_readable_steps(inter, tasks):
    """The float32 streaming kernel against the readable steps evaluated in float64."""
    from course_lib.merging.pcb import _Balancer

    g = torch.Generator().manual_seed(1)
    tau = torch.randn(tasks, 300, generator=g)
    lo, hi = torch.full((tasks,), 0.1), torch.full((tasks,), 1.5)
    beta, tau_c = balance(tau.double(), lo.double(), hi.double(), inter)
    work = _Balancer(tasks, inter)
    work.set_bounds(lo, hi)
    assert_close(work.beta(tau.clone()).double(), beta, rtol=1e-5, atol=1e-6)
    thr, bmax = beta.quantile(0.7, dim=1), beta.amax(dim=1)
    lam = [1.0, 0.5, 2.0, 1.0, 1.0][:tasks]
    expected = rescale_merge(tau_c, drop_weights(beta, thr, bmax), lam)
    got = torch.empty(300)
    work.merge(tau.clone(), thr.float(), bmax.float(), lam, out=got)
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_tanh_polynomial_is_as_close_as_float32_can_tell():
    from course_lib.merging.pcb import tanh_odd_polynomial

    x = torch.linspace(-1.0, 1.0, 200_001, dtype=torch.float64)
    p = sum(c * x ** (2 * k + 1) for k, c in enumerate(tanh_odd_polynomial()))
    assert (p - torch.tanh(x)).abs().max() < 3e-8  # float32's spacing near 1 is 6e-8
    assert len(tanh_odd_polynomial(5)) == 3
    with pytest.raises(ValueError, match="odd"):
        tanh_odd_polynomial(4)


@pytest.mark.parametrize("tasks", [1, 2, 5, 8, 20])
def test_pairwise_power_sums_equal_the_sum_over_pairs(tasks):
    """_Balancer._pairwise (power sums, float32) against sum_j tanh(u_i u_j) in float64."""
    from course_lib.merging.pcb import _Balancer

    g = torch.Generator().manual_seed(tasks)
    u = torch.rand(tasks, 5000, generator=g) * 2 - 1
    u[:, :4] = torch.tensor([1.0, -1.0, 0.0, 1e-20])  # the ends of [-1, 1], zero, a tiny value
    work = _Balancer(tasks, "pairwise")
    work._buffers(u.shape[1])
    work._pairwise(u)
    exact = torch.tanh(u.double().unsqueeze(1) * u.double().unsqueeze(0)).sum(dim=1)
    error = (work.acc[:, : u.shape[1]].double() - exact).abs().max()
    assert error <= 2.5e-7 * tasks  # about one float32 rounding per pair (measured 1.5e-7)


@pytest.mark.parametrize("inter", ["pairwise", "sum"])
def test_pcb_streams_like_the_direct_path(monkeypatch, inter):
    from course_lib.merging import _select

    g = torch.Generator().manual_seed(2)
    pre = {"a": torch.randn(40, 30, generator=g), "b": torch.randn(77, generator=g)}
    fts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)
    ]
    direct = pcb_merging(pre, fts, ratio=0.3, inter=inter)
    monkeypatch.setattr(_select, "DIRECT_LIMIT", 0)
    monkeypatch.setattr(_select, "CHUNK", 11)
    streamed = pcb_merging(pre, fts, ratio=0.3, inter=inter)
    for k in pre:
        assert_close(streamed[k], direct[k], rtol=1e-5, atol=1e-6)
