"""DARE: drop, rescale, determinism, composition."""

import pytest
import torch
from conftest import random_models
from torch.testing import assert_close

from course_lib.merging import dare, dare_experts, task_arithmetic, ties_merging
from course_lib.merging.dare import drop, rescale


def test_drop_then_rescale_by_hand():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0])
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(4, generator=torch.Generator().manual_seed(0)) >= 0.5
    dropped = drop(tau, 0.5, g)
    assert torch.equal(dropped, tau * keep)
    assert_close(rescale(dropped, 0.5), 2.0 * tau * keep)


def test_rescale_preserves_the_expectation():
    tau = torch.full((200_000,), 0.3)
    g = torch.Generator().manual_seed(1)
    out = rescale(drop(tau, 0.9, g), 0.9)
    assert float((out == 0).float().mean()) == pytest.approx(0.9, abs=0.005)
    assert float(out.mean()) == pytest.approx(0.3, rel=0.03)


def test_drop_rate_zero_is_the_identity():
    pre, fts = random_models()
    experts = dare_experts(pre, fts, drop_rate=0.0)
    for ex, ft in zip(experts, fts, strict=True):
        for k in ft:
            assert_close(ex[k], ft[k])
    assert_close(
        dare(pre, fts, 0.0, scaling=0.4)["enc.weight"], task_arithmetic(pre, fts, 0.4)["enc.weight"]
    )


def test_deterministic_and_seed_dependent():
    pre, fts = random_models()
    a = dare(pre, fts, 0.7, seed=3)
    b = dare(pre, fts, 0.7, seed=3)
    c = dare(pre, fts, 0.7, seed=4)
    assert torch.equal(a["enc.weight"], b["enc.weight"])
    assert not torch.equal(a["enc.weight"], c["enc.weight"])


def test_each_task_and_tensor_draws_its_own_mask():
    """Masks are independent across tasks and keys: the same update is dropped in other places."""
    pre = {"a": torch.zeros(4000), "b": torch.zeros(4000)}
    fts = [{"a": torch.ones(4000), "b": torch.ones(4000)} for _ in range(3)]
    experts = dare_experts(pre, fts, drop_rate=0.3, drop_only=True)
    masks = [ex[k] != 0 for ex in experts for k in ("a", "b")]
    for m in masks:
        assert float(m.float().mean()) == pytest.approx(0.7, abs=0.03)
    for i in range(len(masks)):
        for j in range(i):  # two independent masks agree on 0.7^2 + 0.3^2 = 58% of the places
            assert float((masks[i] == masks[j]).float().mean()) == pytest.approx(0.58, abs=0.03)
    # the merge is task arithmetic of exactly these dropped and rescaled experts
    merged = dare(pre, fts, drop_rate=0.3, scaling=0.5)
    rescaled = dare_experts(pre, fts, drop_rate=0.3)
    assert_close(merged["a"], task_arithmetic(pre, rescaled, 0.5)["a"])


def test_drop_only_ablation_and_composition_with_ties():
    pre, fts = random_models()
    ex = dare_experts(pre, fts, 0.5, seed=0)
    ex_only = dare_experts(pre, fts, 0.5, seed=0, drop_only=True)
    k = "enc.weight"
    assert_close(ex[1][k] - pre[k], 2.0 * (ex_only[1][k] - pre[k]))
    out = dare(pre, fts, 0.5, seed=0, then=ties_merging, density=0.5)
    assert_close(out[k], ties_merging(pre, ex, density=0.5)[k])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.5"])
def test_bad_drop_rate(p):
    pre, fts = random_models()
    with pytest.raises(ValueError, match="drop_rate"):
        dare(pre, fts, p)
