"""TIES-Merging: hand-computed steps, the global/zero-sign rules, and agreement with a flat
[T, D] implementation of the official code."""

import pytest
import torch
from conftest import random_models
from reference_flat import pcb_flat, ties_flat
from torch.testing import assert_close

from course_lib.merging import _select, pcb_merging, ties_merging
from course_lib.merging.ties import disjoint_merge, elect, trim

# Three tasks, five parameters (rows are task vectors).
TAU = torch.tensor(
    [
        [0.5, -1.0, 0.2, 0.0, 3.0],
        [-0.4, 2.0, 0.1, -0.6, -1.0],
        [0.3, -0.5, -0.9, 0.7, 2.0],
    ]
)
# Keep the top floor(0.6 * 5) = 3 magnitudes of each row.
TRIMMED = torch.tensor(
    [
        [0.5, -1.0, 0.0, 0.0, 3.0],
        [0.0, 2.0, 0.0, -0.6, -1.0],
        [0.0, 0.0, -0.9, 0.7, 2.0],
    ]
)


def test_trim_keeps_top_k_per_row():
    assert torch.equal(trim(TAU, density=0.6), TRIMMED)


def test_trim_keeps_ties_at_the_threshold():
    tau = torch.tensor([[1.0, -1.0, 1.0, 0.5]])
    # k = floor(0.25 * 4) = 1, but three entries tie at magnitude 1: all are kept.
    assert torch.equal(trim(tau, density=0.25), torch.tensor([[1.0, -1.0, 1.0, 0.0]]))


def test_elect_is_the_sign_of_the_mass():
    # Column sums of TRIMMED: [0.5, 1.0, -0.9, 0.1, 4.0]
    assert torch.equal(elect(TRIMMED), torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0]))


def test_elect_zero_sum_takes_the_majority_sign():
    trimmed = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1.0, -3.0], [0.0, 1.0, -1.0]])
    # sums [0, 4, -5]: signs [0, +, -] sum to 0 -> zero_sign 0 would be ambiguous, so force it.
    assert torch.equal(elect(trimmed, zero_sign=-1.0), torch.tensor([-1.0, 1.0, -1.0]))
    trimmed = torch.tensor([[1.0, 2.0, 2.0], [-1.0, 1.0, 1.0]])  # sums [0, 3, 3] -> majority +
    assert torch.equal(elect(trimmed), torch.tensor([1.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        ("mean", [0.5, 2.0, -0.9, 0.7, 2.5]),
        ("sum", [0.5, 2.0, -0.9, 0.7, 5.0]),
        ("max", [0.5, 2.0, -0.9, 0.7, 3.0]),
    ],
)
def test_disjoint_merge_hand_computed(aggregate, expected):
    gamma = torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0])
    assert_close(disjoint_merge(TRIMMED, gamma, aggregate), torch.tensor(expected))


def test_ties_merging_end_to_end_on_the_hand_example():
    pre = {"w": torch.zeros(5)}
    fts = [{"w": row.clone()} for row in TAU]
    out = ties_merging(pre, fts, density=0.6, scaling=2.0, scope="tensor")
    assert_close(out["w"], 2.0 * torch.tensor([0.5, 2.0, -0.9, 0.7, 2.5]))


@pytest.mark.parametrize("chunk", [1, 2, 1 << 16])
def test_global_scope_ranks_the_whole_model_and_resolves_zero_sums_globally(chunk, monkeypatch):
    monkeypatch.setattr(_select, "CHUNK", chunk)  # the zero-sum rule must not depend on chunking
    pre = {"a": torch.zeros(1), "b": torch.zeros(3)}
    fts = [
        {"a": torch.tensor([1.0]), "b": torch.tensor([-2.0, -3.0, -1.0])},
        {"a": torch.tensor([-1.0]), "b": torch.tensor([-1.0, -2.0, -4.0])},
    ]
    # "a" sums to exactly 0. Globally most elected signs are negative -> task 2's -1 wins.
    out = ties_merging(pre, fts, density=1.0, scope="global")
    assert_close(out["a"], torch.tensor([-1.0]))
    assert_close(out["b"], torch.tensor([-1.5, -2.5, -2.5]))
    # Per tensor, "a" has no majority (sign sum 0): nothing agrees, the merge is 0 there.
    assert_close(ties_merging(pre, fts, density=1.0, scope="tensor")["a"], torch.tensor([0.0]))


def test_global_trim_differs_from_per_tensor_trim():
    pre = {"big": torch.zeros(4), "small": torch.zeros(4)}
    fts = [{"big": torch.tensor([4.0, 3.0, 2.0, 1.0]), "small": torch.tensor([0.4, 0.3, 0.2, 0.1])}]
    glob = ties_merging(pre, fts, density=0.5, scope="global")
    tens = ties_merging(pre, fts, density=0.5, scope="tensor")
    assert torch.equal(glob["small"], torch.zeros(4))  # all of the top half is in "big"
    assert torch.equal(tens["small"], torch.tensor([0.4, 0.3, 0.0, 0.0]))
    assert torch.equal(glob["big"], torch.tensor([4.0, 3.0, 2.0, 1.0]))


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize("streaming", [False, True])
def test_ties_global_equals_flat_reference(aggregate, streaming, monkeypatch):
    if streaming:  # force the sample-and-refine path and many chunks on these small models
        monkeypatch.setattr(_select, "DIRECT_LIMIT", 0)
        monkeypatch.setattr(_select, "CHUNK", 7)
    pre, fts = random_models(num_tasks=4, seed=3)
    ours = ties_merging(pre, fts, density=0.3, scaling=0.7, aggregate=aggregate)
    ref = ties_flat(pre, fts, density=0.3, scaling=0.7, aggregate=aggregate)
    for k in pre:
        assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("streaming", [False, True])
def test_pcb_equals_flat_reference(streaming, monkeypatch):
    if streaming:
        monkeypatch.setattr(_select, "DIRECT_LIMIT", 0)
        monkeypatch.setattr(_select, "CHUNK", 7)
    pre, fts = random_models(num_tasks=4, seed=5)
    scaling = [0.9, 1.1, 1.2, 1.0]
    ours = pcb_merging(pre, fts, ratio=0.2, scaling=scaling, clip_quantile=0.05)
    ref = pcb_flat(pre, fts, ratio=0.2, scaling=scaling, clip_quantile=0.05)
    for k in pre:
        assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_streamed_merges_are_the_same_bits_for_any_number_of_workers(method, monkeypatch):
    monkeypatch.setattr(_select, "DIRECT_LIMIT", 0)
    monkeypatch.setattr(_select, "CHUNK", 5)  # 300 chunks: the threads interleave
    pre, fts = random_models(num_tasks=4, seed=6, shapes={"a": (40, 30), "b": (300,)})
    # Task 1 undoes task 0 on "a": with density 1 and tasks 2-3 equal there, whole columns of
    # "a" sum to exactly 0 and take the sign elected over the model, known only at the end.
    fts[1]["a"] = 2 * pre["a"] - fts[0]["a"]
    fts[3]["a"] = 2 * pre["a"] - fts[2]["a"]

    def merge():
        if method == "ties":
            return ties_merging(pre, fts, density=1.0)
        return pcb_merging(pre, fts, ratio=0.2, clip_quantile=0.05)

    outs = []
    for n in (1, 2, 4):
        monkeypatch.setattr(_select, "workers", lambda n=n: n)
        outs.append(merge())
    for out in outs[1:]:
        assert all(torch.equal(out[k], outs[0][k]) for k in pre)
