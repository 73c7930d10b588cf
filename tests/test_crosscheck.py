"""Cross-check ``course_lib.merging.ties_merging`` against two independent TIES implementations.

* **fusion-bench** (``fusion_bench/method/ties_merging/ties_merging_utils.py``, a port of the
  official TIES/AdaMerging code): global trim over the flattened model, ``merge_func`` in
  ``"mean" | "sum" | "max"``. Compared with our ``scope="global"``. We call its own
  ``state_dict_to_vector`` / ``ties_merging`` / ``vector_to_state_dict`` on flattened task
  vectors, exactly as its ``TiesMergingAlgorithm.run`` does (minus the model pool).
* **mergekit** (``merge_methods.merge_state_dicts`` with the registered ``"ties"`` method, i.e.
  its real per-tensor merge path: ``sparsify.magnitude`` + ``get_mask(method="sum")``).
  Compared with our ``scope="tensor"``.

Convention differences, and how each is handled here:

1. fusion-bench keeps ``int(D * K) + 1`` entries per task: ``topk_values_mask`` takes the
   ``(D - int(D*K))``-th smallest magnitude as threshold and keeps ``>=``. We keep
   ``max(1, floor(density * D))``. Handled by giving ours ``density' = (int(D*K) + 1) / D``,
   so both keep the same count (checked explicitly on fusion-bench's mask). Both keep every
   entry tied with the threshold.
2. Zero-sum elected signs: fusion-bench and ours (global scope) both use the "majority" rule,
   the sign of the sum of all elected signs over the whole flattened model, so they agree
   even on quantized data with exact cancellations (tested). Caveat: if that sign sum is
   itself exactly 0, fusion-bench leaves gamma = 0 there and ``torch.where(gamma > 0, v > 0,
   v < 0)`` then keeps the *negative* entries, while ours keeps nothing; the quantized test
   asserts its data avoids that degenerate case.
3. fusion-bench ``"max"`` = largest agreeing magnitude times the elected sign, the same as
   ours, so ``max`` is compared too.
4. mergekit trims per tensor (ours: ``scope="tensor"``) and keeps exactly
   ``k = max(1, int(density * n))`` entries via ``argsort`` (no tie extension; random floats
   make magnitude ties irrelevant). ``int()`` truncates float round-off (0.29 * 100 ->
   28.999... -> 28) where we floor with a 1e-9 guard (-> 29). Handled by passing mergekit a
   per-tensor density ``(k + 0.5) / n`` with our k, so both keep exactly k (``PerGroupValues``).
5. mergekit elects on weight-scaled deltas and divides by the sum of agreeing weights: all
   weights are 1 here, so this is the plain disjoint mean (``normalize=True``) or the
   disjoint sum (``normalize=False``); ``lambda`` is our ``scaling``. It has no ``max``.
6. mergekit elects ``+`` where the trimmed sum is exactly 0 (``sum >= 0``); ours takes the sign
   of the sum of the tensor's elected signs. Random floats never cancel exactly, so the main
   comparison is unaffected; ``test_mergekit_zero_sum_sign_convention`` pins the difference.

All data is float32; tolerances are rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import require
from torch.testing import assert_close

from course_lib.merging import ties_merging
from course_lib.merging._select import kth_largest_count

pytestmark = pytest.mark.crosscheck

RTOL, ATOL = 1e-5, 1e-6
SHAPES = {"enc.weight": (16, 12), "enc.bias": (16,), "head.weight": (7, 5)}
# 10x10 = 100 entries: density 0.29 / 0.57 / 0.58 hit the int() vs floor round-off difference.
SHAPES_100 = {**SHAPES, "proj.weight": (10, 10)}


def make_models(seed, num_tasks, shapes=SHAPES, quantized=False):
    """Random float32 pretrained + fine-tuned state dicts.

    ``quantized`` draws everything on a dyadic grid, so task vectors are exact small
    multiples of 1/4: many magnitude ties and exactly cancelling sums.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        if quantized:
            return torch.randint(-4, 5, shape, generator=g).float() / 4
        return torch.randn(shape, generator=g)

    pre = {k: draw(s) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * draw(v.shape) for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


def test_require_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """The cross-checks below cannot pass in CI by skipping: a missing extra fails there."""
    monkeypatch.setenv("COURSE_REQUIRE_EXTRAS", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_for_the_course"):
        require("no_such_module_for_the_course")
    monkeypatch.delenv("COURSE_REQUIRE_EXTRAS")
    with pytest.raises(pytest.skip.Exception):
        require("no_such_module_for_the_course")
    assert require("math") is math


# --------------------------------------------------------------------------------------------
# fusion-bench
# --------------------------------------------------------------------------------------------


def fusion_bench_utils():
    """``fusion_bench.method.ties_merging.ties_merging_utils``, loaded on its own.

    Importing it the normal way runs the package ``__init__``, which pulls in the whole
    algorithm stack (lightning, transformers, model pools: ~5 s). The utils file itself only
    needs torch and ``fusion_bench.utils.type``, so load that file directly when we can.
    """
    package = require("fusion_bench")
    name = "_crosscheck_fusion_bench_ties_utils"
    path = Path(package.__file__).parent / "method" / "ties_merging" / "ties_merging_utils.py"
    if not path.is_file():  # layout changed: fall back to the ordinary import
        return require("fusion_bench.method.ties_merging.ties_merging_utils")
    file_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fb():
    return fusion_bench_utils()


def fusion_bench_ties(fb, pre, fts, K, scaling, merge_func):
    """fusion-bench's TiesMergingAlgorithm.run, on state dicts instead of a model pool."""
    flat_pre = fb.state_dict_to_vector(pre)
    flat_tv = torch.vstack([fb.state_dict_to_vector(ft) for ft in fts]) - flat_pre
    merged_tv = fb.ties_merging(flat_tv, reset_thresh=K, merge_func=merge_func)
    return dict(fb.vector_to_state_dict(flat_pre + scaling * merged_tv, pre))


def density_matching_fusion_bench(D, K):
    """Our density that keeps what fusion-bench keeps: int(D*K) + 1 entries."""
    kept = int(D * K) + 1
    density = kept / D
    assert kth_largest_count(D, density) == kept
    return density


def fb_kept_counts(fb, pre, fts, K):
    flat_pre = fb.state_dict_to_vector(pre)
    flat_tv = torch.vstack([fb.state_dict_to_vector(ft) for ft in fts]) - flat_pre
    _, _, mask = fb.topk_values_mask(flat_tv, K=K, return_mask=True)
    return mask.sum(dim=1).tolist(), flat_tv


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize(
    ("seed", "num_tasks", "K", "shapes"),
    [
        (0, 3, 0.2, SHAPES),
        (1, 4, 0.1, SHAPES),
        (2, 5, 0.5, SHAPES),
        (3, 4, 0.29, SHAPES_100),
        (4, 3, 0.05, SHAPES_100),
    ],
)
def test_ties_global_matches_fusion_bench(fb, aggregate, seed, num_tasks, K, shapes):
    pre, fts = make_models(seed, num_tasks, shapes)
    D = sum(t.numel() for t in pre.values())
    density = density_matching_fusion_bench(D, K)
    # fusion-bench really keeps int(D*K) + 1 entries per task (random floats: no ties).
    counts, _ = fb_kept_counts(fb, pre, fts, K)
    assert counts == [int(D * K) + 1] * num_tasks

    expected = fusion_bench_ties(fb, pre, fts, K, scaling=0.7, merge_func=aggregate)
    ours = ties_merging(pre, fts, density=density, scaling=0.7, aggregate=aggregate)
    assert ours.keys() == expected.keys()
    for key in pre:
        assert_close(ours[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{aggregate}: {key}")


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize(("seed", "num_tasks", "K"), [(10, 4, 0.3), (11, 5, 0.2), (12, 3, 0.6)])
def test_ties_global_matches_fusion_bench_with_ties_and_cancellations(
    fb, aggregate, seed, num_tasks, K
):
    """Quantized deltas: magnitude ties at the threshold (both keep them all) and exactly zero
    trimmed sums (both resolve them with the model-wide majority sign)."""
    pre, fts = make_models(seed, num_tasks, quantized=True)
    D = sum(t.numel() for t in pre.values())
    density = density_matching_fusion_bench(D, K)

    _, flat_tv = fb_kept_counts(fb, pre, fts, K)
    trimmed, *_ = fb.topk_values_mask(flat_tv.clone(), K=K)
    gamma = trimmed.sum(dim=0).sign()
    cancelled = (gamma == 0) & (trimmed != 0).any(dim=0)
    assert cancelled.any(), "data should exercise the zero-sum (majority) rule"
    assert gamma.sum() != 0, "degenerate majority 0: fusion-bench keeps negatives there"

    expected = fusion_bench_ties(fb, pre, fts, K, scaling=1.0, merge_func=aggregate)
    ours = ties_merging(pre, fts, density=density, scaling=1.0, aggregate=aggregate)
    for key in pre:
        assert_close(ours[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{aggregate}: {key}")


def test_fusion_bench_keeps_one_more_than_ours(fb):
    """The +1 convention is real: with the same density the kept counts differ by one."""
    pre, fts = make_models(0, 3)
    D = sum(t.numel() for t in pre.values())
    counts, _ = fb_kept_counts(fb, pre, fts, 0.2)
    assert counts == [kth_largest_count(D, 0.2) + 1] * 3
    same_density = ties_merging(pre, fts, density=0.2)
    expected = fusion_bench_ties(fb, pre, fts, 0.2, scaling=1.0, merge_func="mean")
    assert any(not torch.allclose(same_density[k], expected[k]) for k in pre)


# --------------------------------------------------------------------------------------------
# mergekit
# --------------------------------------------------------------------------------------------


def mergekit_api():
    require("mergekit")
    return require("mergekit.merge_methods")


def density_matching_mergekit(n, density):
    """A mergekit density that keeps exactly our k = max(1, floor(density * n)) entries."""
    k = kth_largest_count(n, density)
    mk_density = (k + 0.5) / n  # int() truncation lands on k, far from any round-off
    assert max(1, int(mk_density * n)) == k
    return mk_density


def mergekit_ties(pre, fts, density, scaling, normalize):
    mm = mergekit_api()
    models = {"base": pre, **{f"ft{i}": ft for i, ft in enumerate(fts)}}
    names = list(pre)
    per_tensor = mm.PerGroupValues(
        [density_matching_mergekit(pre[k].numel(), density) for k in names]
    )
    params = {"density": per_tensor, "weight": 1.0, "lambda": scaling, "normalize": normalize}
    return mm.merge_state_dicts(models, "ties", parameters=params, base="base")


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize(
    ("seed", "num_tasks", "density", "shapes"),
    [
        (0, 3, 0.2, SHAPES),
        (1, 4, 0.5, SHAPES),
        (2, 5, 0.1, SHAPES),
        (3, 3, 0.29, SHAPES_100),  # mergekit int(0.29*100) = 28, ours 29: mapped density
        (4, 4, 0.58, SHAPES_100),
        (5, 3, 0.01, SHAPES),  # k = max(1, ...) = 1 on the small tensors
    ],
)
def test_ties_tensor_matches_mergekit(aggregate, seed, num_tasks, density, shapes):
    pre, fts = make_models(seed, num_tasks, shapes)
    expected = mergekit_ties(pre, fts, density, scaling=0.7, normalize=aggregate == "mean")
    ours = ties_merging(pre, fts, density=density, scaling=0.7, aggregate=aggregate, scope="tensor")
    assert ours.keys() == expected.keys()
    for key in pre:
        assert expected[key].dtype == torch.float32
        assert_close(ours[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{aggregate}: {key}")


def test_mergekit_magnitude_count_convention():
    """mergekit keeps int(density * n): 28 of 100 at density 0.29, where we keep 29."""
    require("mergekit")
    from mergekit.sparsify import magnitude

    x = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    assert int((magnitude(x, 0.29) != 0).sum()) == int(0.29 * 100) == 28
    assert kth_largest_count(100, 0.29) == math.floor(0.29 * 100 + 1e-9) == 29
    assert int((magnitude(x, density_matching_mergekit(100, 0.29)) != 0).sum()) == 29


def test_mergekit_zero_sum_sign_convention():
    """Exact cancellation: mergekit elects +, ours the tensor's majority elected sign."""
    pre = {"w": torch.zeros(4)}
    # Position 0 cancels exactly (+1, -1); positions 1-3 elect -, so our majority is -.
    fts = [
        {"w": torch.tensor([1.0, -1.0, -2.0, -1.0])},
        {"w": torch.tensor([-1.0, -1.0, -1.0, -3.0])},
    ]
    ours = ties_merging(pre, fts, density=1.0, scope="tensor")["w"]
    theirs = mergekit_ties(pre, fts, density=1.0, scaling=1.0, normalize=True)["w"]
    assert_close(ours[1:], theirs[1:])
    assert ours[0].item() == -1.0  # only the negative entry agrees with the majority sign
    assert theirs[0].item() == 1.0  # only the positive entry agrees with "sum >= 0"
