"""TaskVector arithmetic, key filters, tied weights and the basic methods."""

import pytest
import torch
from conftest import random_models
from torch.testing import assert_close

from course_lib.merging import METHODS, task_arithmetic, weight_average
from course_lib.state import TaskVector, plan, task_vector, task_vectors


def test_task_vector_is_the_difference(models):
    pre, fts = models
    tv = task_vector(pre, fts[0])
    for k in pre:
        assert_close(tv[k], fts[0][k] - pre[k])
    assert tv.numel() == sum(v.numel() for v in pre.values())


def test_arithmetic_operators(models):
    pre, fts = models
    a, b, c = task_vectors(pre, fts)
    k = "enc.weight"
    assert_close((a + b)[k], a[k] + b[k])
    assert_close((a - b)[k], a[k] - b[k])
    assert_close((-a)[k], -a[k])
    assert_close((0.5 * a)[k], 0.5 * a[k])
    assert_close((a * 0.5)[k], 0.5 * a[k])
    assert_close(sum([a, b, c])[k], a[k] + b[k] + c[k])


def test_apply_to_adds_the_scaled_vector_and_keeps_other_keys(models):
    pre, fts = models
    pre = {**pre, "position_ids": torch.arange(5)}
    tv = TaskVector({"enc.weight": fts[0]["enc.weight"] - pre["enc.weight"]})
    out = tv.apply_to(pre, scaling=0.5)
    assert_close(out["enc.weight"], pre["enc.weight"] + 0.5 * tv["enc.weight"])
    assert torch.equal(out["enc.bias"], pre["enc.bias"])
    assert torch.equal(out["position_ids"], pre["position_ids"])
    assert out["enc.bias"] is not pre["enc.bias"]  # a copy, never the input


def test_negation_moves_away_from_the_expert(models):
    pre, fts = models
    tv = task_vector(pre, fts[0])
    forgot = (-tv).apply_to(pre, scaling=1.0)
    assert_close(forgot["enc.weight"], 2 * pre["enc.weight"] - fts[0]["enc.weight"])


def test_vectors_with_different_keys_do_not_add(models):
    pre, fts = models
    a = task_vector(pre, fts[0])
    b = task_vector(pre, fts[1], exclude=r"bias")
    with pytest.raises(ValueError, match="enc.bias"):
        _ = a + b


def test_cosine_and_norm(models):
    pre, fts = models
    a = task_vector(pre, fts[0])
    assert a.cosine(a) == pytest.approx(1.0)
    assert (-a).cosine(a) == pytest.approx(-1.0)
    assert a.norm() == pytest.approx(float(a.flatten().norm()), rel=1e-5)


def test_filters_skip_heads_and_integer_buffers(models):
    pre, fts = models
    pre = {**pre, "position_ids": torch.arange(5)}
    fts = [{**ft, "position_ids": torch.arange(5)} for ft in fts]
    p = plan(pre, exclude=r"^out\.")
    assert p.merged == ("enc.weight", "enc.bias")
    assert set(p.passthrough) == {"out.weight", "position_ids"}
    p = plan(pre, keys=r"weight$")
    assert p.merged == ("enc.weight", "out.weight")
    out = task_arithmetic(pre, fts, scaling=1.0, exclude=r"^out\.")
    assert torch.equal(out["out.weight"], pre["out.weight"])  # head untouched
    assert not torch.equal(out["enc.weight"], pre["enc.weight"])


def test_half_precision_task_vector_is_float32_and_gives_the_expert_back():
    # in bfloat16, -0.00390625 - 256 rounds to -256: theta_0 + tau would come back as 0
    pre = {"w": torch.tensor([256.0, 3.0, 0.2], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([-0.00390625, 1.0, -0.2001953125], dtype=torch.bfloat16)}
    tv = task_vector(pre, ft)
    assert tv["w"].dtype == torch.float32
    back = tv.apply_to(pre, scaling=1.0)["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, ft["w"])
    assert torch.equal(back, task_arithmetic(pre, [ft], scaling=1.0)["w"])


def test_tied_weights_are_merged_once_and_stay_tied():
    emb = torch.randn(5, 3)
    pre = {"embed.weight": emb, "lm_head.weight": emb}  # same storage, as in a tied state dict
    fts = []
    for s in (1.0, 2.0):
        w = emb + s
        fts.append({"embed.weight": w, "lm_head.weight": w})
    p = plan(pre)
    assert p.merged == ("embed.weight",) and p.aliases == {"lm_head.weight": "embed.weight"}
    out = task_arithmetic(pre, fts, scaling=0.5)
    assert out["lm_head.weight"] is out["embed.weight"]
    assert_close(out["embed.weight"], emb + 1.5)
    # DARE merges bf16 checkpoints in float32 (to_float32 / cast_like): the tie survives both
    pre16 = {k: v.to(torch.bfloat16) for k, v in pre.items()}
    pre16["lm_head.weight"] = pre16["embed.weight"]
    fts16 = []
    for ft in fts:
        w = ft["embed.weight"].to(torch.bfloat16)
        fts16.append({"embed.weight": w, "lm_head.weight": w})
    out = METHODS["dare"](pre16, fts16, drop_rate=0.5)
    assert (
        out["lm_head.weight"] is out["embed.weight"] and out["embed.weight"].dtype == torch.bfloat16
    )


def test_task_arithmetic_formula(models):
    pre, fts = models
    out = task_arithmetic(pre, fts, scaling=[0.1, 0.2, 0.3])
    k = "enc.weight"
    expected = pre[k] + sum(
        s * (ft[k] - pre[k]) for s, ft in zip([0.1, 0.2, 0.3], fts, strict=True)
    )
    assert_close(out[k], expected)


def test_weighted_average_normalizes_the_weights(models):
    _, fts = models
    out = weight_average(fts, weights=[1.0, 1.0, 2.0])
    k = "enc.bias"
    assert_close(out[k], (fts[0][k] + fts[1][k] + 2 * fts[2][k]) / 4)


def test_methods_do_not_mutate_inputs(models):
    pre, fts = models
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    for name, fn in METHODS.items():
        fn(fts) if name == "weight_average" else fn(pre, fts)
    for old, new in zip(before, [pre, *fts], strict=True):
        for k in old:
            assert torch.equal(old[k], new[k]), k


def test_half_precision_is_merged_in_float32_and_returned_in_its_dtype():
    pre, fts = random_models(seed=1)
    pre16 = {k: v.to(torch.bfloat16) for k, v in pre.items()}
    fts16 = [{k: v.to(torch.bfloat16) for k, v in ft.items()} for ft in fts]
    up = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731 - exact for bf16
    for name, fn in METHODS.items():
        out = fn(fts16) if name == "weight_average" else fn(pre16, fts16)
        assert all(v.dtype == torch.bfloat16 for v in out.values()), name
        # the same numbers as merging the float32 values, rounded once at the end
        ref = (
            fn([up(f) for f in fts16])
            if name == "weight_average"
            else fn(up(pre16), [up(f) for f in fts16])
        )
        for k in out:
            assert torch.equal(out[k], ref[k].to(torch.bfloat16)), (name, k)


def test_registry_names():
    assert set(METHODS) == {
        "weight_average",
        "task_arithmetic",
        "ties_merging",
        "dare",
        "pcb_merging",
    }
