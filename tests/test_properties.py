"""Invariants of the reference (algorithms.md section 1), checked on random inputs with hypothesis."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from course_lib.merging import (
    dare,
    merge_with_weights,
    shared_expert,
    task_arithmetic,
    ties_merging,
    twin_vectors,
    weight_average,
)

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def model_sets(draw, same_sign=False):
    """pretrained + T fine-tuned state dicts with 1-3 tensors of random shapes."""
    seed = draw(st.integers(0, 2**31 - 1))
    num_tasks = draw(st.integers(1, 5))
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3
        )
    )
    g = torch.Generator().manual_seed(seed)
    pre = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    if same_sign:  # no sign conflicts and no zeros: every task moves each entry the same way
        direction = {
            k: torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
            for k, v in pre.items()
        }
        fts = [
            {k: v + direction[k] * (0.1 + torch.rand(v.shape, generator=g)) for k, v in pre.items()}
            for _ in range(num_tasks)
        ]
    else:
        fts = [
            {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()}
            for _ in range(num_tasks)
        ]
    return pre, fts


def _close(a, b):
    for k in a:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@SETTINGS
@given(model_sets())
def test_task_arithmetic_with_one_over_t_is_the_average(models):
    pre, fts = models
    _close(task_arithmetic(pre, fts, scaling=1.0 / len(fts)), weight_average(fts))


@SETTINGS
@given(model_sets(same_sign=True), st.sampled_from(["global", "tensor"]))
def test_ties_keep_everything_without_conflicts_is_the_average(models, scope):
    pre, fts = models
    _close(
        ties_merging(pre, fts, density=1.0, scaling=1.0, aggregate="mean", scope=scope),
        weight_average(fts),
    )


@SETTINGS
@given(model_sets(), st.integers(0, 1000))
def test_dare_with_p_zero_is_its_merger(models, seed):
    pre, fts = models
    _close(
        dare(pre, fts, drop_rate=0.0, seed=seed, scaling=0.4),
        task_arithmetic(pre, fts, scaling=0.4),
    )


@SETTINGS
@given(model_sets(), st.data())
def test_twin_one_hot_is_the_expert_and_uniform_is_the_average(models, data):
    pre, fts = models
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    t = data.draw(st.integers(0, len(fts) - 1))
    one_hot = [1.0 if i == t else 0.0 for i in range(len(fts))]
    _close(merge_with_weights(sh, vs, one_hot), fts[t])
    _close(merge_with_weights(sh, vs, [1.0 / len(fts)] * len(fts)), weight_average(fts))


@SETTINGS
@given(model_sets(), st.floats(0.05, 1.0))
def test_ties_trim_keeps_at_least_k_entries_per_task(models, density):
    pre, fts = models
    out = ties_merging(pre, fts[:1], density=density, scaling=1.0)
    d = sum(v.numel() for v in pre.values())
    kept = sum(int((out[k] != pre[k]).sum()) for k in pre)
    assert kept >= max(1, int(density * d + 1e-9)) - 0  # ties may add more, never fewer
