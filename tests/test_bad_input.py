"""Bad input gets a ValueError that names the key and the problem, never a silent wrong merge."""

import pytest
import torch
from conftest import random_models

from course_lib.merging import METHODS, pcb_merging, task_arithmetic, ties_merging, weight_average
from course_lib.state import task_vector, task_vectors


def call(name, pre, fts, **kw):
    fn = METHODS[name]
    return fn(fts, **kw) if name == "weight_average" else fn(pre, fts, **kw)


@pytest.mark.parametrize("name", list(METHODS))
def test_empty_list(name):
    pre, _ = random_models()
    with pytest.raises(ValueError, match="empty"):
        call(name, pre, [])


@pytest.mark.parametrize("name", list(METHODS))
def test_missing_and_extra_keys(name):
    pre, fts = random_models()
    del fts[1]["enc.bias"]
    with pytest.raises(ValueError, match=r"'enc.bias'.*missing from finetuned\[1\]"):
        call(name, pre, fts)
    pre, fts = random_models()
    fts[2]["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"'extra.weight' is in finetuned\[2\]"):
        call(name, pre, fts)


@pytest.mark.parametrize("name", list(METHODS))
def test_shape_mismatch(name):
    pre, fts = random_models()
    fts[1]["enc.weight"] = torch.zeros(8, 7)
    with pytest.raises(
        ValueError, match=r"'enc.weight': shape \(8, 7\) in finetuned\[1\] but \(8, 6\)"
    ):
        call(name, pre, fts)


@pytest.mark.parametrize("name", list(METHODS))
def test_dtype_mismatch(name):
    pre, fts = random_models()
    fts[1]["out.weight"] = fts[1]["out.weight"].double()
    with pytest.raises(ValueError, match=r"'out.weight': dtype torch.float64 in finetuned\[1\]"):
        call(name, pre, fts)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf(name, bad):
    pre, fts = random_models()
    fts[2]["enc.bias"][3] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"'enc.bias' in finetuned\[2\] contains {kind}"):
        call(name, pre, fts)


def test_nan_in_pretrained():
    pre, fts = random_models()
    pre["enc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'enc.weight' in pretrained contains NaN"):
        task_arithmetic(pre, fts)


def test_non_tensor_value():
    pre, fts = random_models()
    fts[0]["enc.bias"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"'enc.bias' in finetuned\[0\] is a list"):
        task_arithmetic(pre, fts)


def test_single_state_dict_instead_of_a_list():
    pre, fts = random_models()
    with pytest.raises(ValueError, match="list of state dicts"):
        task_arithmetic(pre, fts[0])


@pytest.mark.parametrize("density", [0.0, -0.2, 1.5, float("nan"), "0.2"])
def test_density_out_of_range(density):
    pre, fts = random_models()
    with pytest.raises(ValueError, match="density"):
        ties_merging(pre, fts, density=density)


@pytest.mark.parametrize("ratio", [0.0, 1.01, -1.0])
def test_ratio_out_of_range(ratio):
    pre, fts = random_models()
    with pytest.raises(ValueError, match="ratio"):
        pcb_merging(pre, fts, ratio=ratio)


@pytest.mark.parametrize("fn", [task_arithmetic, pcb_merging])
def test_per_task_scaling_of_the_wrong_length(fn):
    pre, fts = random_models(num_tasks=3)
    with pytest.raises(ValueError, match="scaling has 2 values but there are 3"):
        fn(pre, fts, scaling=[0.3, 0.3])


def test_unknown_options():
    pre, fts = random_models()
    with pytest.raises(ValueError, match="aggregate"):
        ties_merging(pre, fts, aggregate="median")
    with pytest.raises(ValueError, match="scope"):
        ties_merging(pre, fts, scope="layer")
    with pytest.raises(ValueError, match="clip_quantile"):
        pcb_merging(pre, fts, clip_quantile=0.5)


def test_filter_that_selects_nothing():
    pre, fts = random_models()
    with pytest.raises(ValueError, match="no tensor selected"):
        task_arithmetic(pre, fts, keys=r"^does_not_exist$")


def test_bad_average_weights():
    _, fts = random_models()
    with pytest.raises(ValueError, match="weights has 2 values"):
        weight_average(fts, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        weight_average(fts, weights=[1.0, -1.0, 1.0])


# ---------------------------------------------------------------- found by a review (2026-11-24)


def tied(emb_ft, head_ft):
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    return {"emb": emb, "head": emb}, {"emb": emb_ft(emb), "head": head_ft(emb)}


@pytest.mark.parametrize("name", ["task_arithmetic", "ties_merging", "pcb_merging", "dare"])
def test_a_tied_key_whose_finetuned_copies_differ_is_refused(name):
    pre, ft = tied(lambda e: e + 1, lambda e: e + 5)  # the head moved on its own
    with pytest.raises(ValueError, match=r"'head' is tied to 'emb'.*finetuned\[0\]"):
        call(name, pre, [ft, ft])
    from course_lib.merging import task_vector

    with pytest.raises(ValueError, match="'head' is tied to 'emb'"):
        task_vector(pre, ft)


def test_task_vector_keeps_tied_keys_tied_when_applied():
    from course_lib.merging import task_vector

    pre, ft = tied(lambda e: e + 1, lambda e: e + 1)  # equal copies: a legitimate tie
    out = task_vector(pre, ft).apply_to(pre, 0.5)
    assert out["head"] is out["emb"]
    assert torch.allclose(out["head"], pre["emb"] + 0.5)
    assert list(out) == ["emb", "head"]


def test_dare_keeps_ties_and_never_shares_the_callers_tensors():
    from course_lib.merging import dare_experts

    pre, fts = random_models()
    fts = [{**ft, "step": torch.tensor(3)} for ft in fts]  # an integer buffer passes through
    pre["step"] = torch.tensor(3)
    out = dare_experts(pre, fts, drop_rate=0.5, seed=0)
    assert list(out[0]) == list(fts[0])
    assert out[0]["step"] is not fts[0]["step"] and torch.equal(out[0]["step"], fts[0]["step"])
    pre, ft = tied(lambda e: e + 1, lambda e: e + 1)
    ft["head"] = ft["emb"]
    (ex,) = dare_experts(pre, [ft], drop_rate=0.5, seed=0)
    assert ex["head"] is ex["emb"]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), True, "0.3", None])
def test_non_finite_or_non_number_scaling(bad):
    from course_lib.merging import task_vector

    pre, fts = random_models()
    with pytest.raises(ValueError, match="scaling"):
        ties_merging(pre, fts, scaling=bad)
    with pytest.raises(ValueError, match="scaling"):
        task_arithmetic(pre, fts, scaling=bad)
    with pytest.raises(ValueError, match="scaling"):
        task_vector(pre, fts[0]).apply_to(pre, bad)
    with pytest.raises(ValueError, match="scaling"):
        task_arithmetic(pre, fts, scaling=[0.3, bad, 0.3])


def test_task_vector_times_nan_and_integer_tensors():
    from course_lib.merging import TaskVector, task_vector

    pre, fts = random_models()
    with pytest.raises(ValueError, match="nan"):
        task_vector(pre, fts[0]) * float("nan")
    with pytest.raises(ValueError, match=r"'w'.*dtype torch.int64"):
        TaskVector({"w": torch.full((2,), 0.6)}).apply_to({"w": torch.ones(2, dtype=torch.long)})


def test_weights_must_be_numbers_one_per_model():
    _, fts = random_models()
    for bad in (0.5, [True, False, True], "abc"):
        with pytest.raises(ValueError, match="weights"):
            weight_average(fts, bad)
    # tensors and NumPy numbers are numbers
    out = weight_average(fts, torch.tensor([1.0, 1.0, 2.0]))
    assert torch.allclose(out["enc.bias"], weight_average(fts, [1, 1, 2])["enc.bias"])


def test_twin_inputs_are_checked():
    from course_lib.merging import (
        Router,
        compress,
        merge_with_weights,
        shared_expert,
        train_router,
        twin_vectors,
    )

    pre, fts = random_models()
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    nan = {k: v.clone() for k, v in vs[1].items()}
    nan["enc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'enc.weight' in twin vector 1 contains NaN"):
        merge_with_weights(sh, [vs[0], nan, vs[2]], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="empty"):
        merge_with_weights(sh, [], [])
    small = {k: torch.zeros(2, 2) if k == "enc.weight" else v for k, v in vs[0].items()}
    with pytest.raises(ValueError, match=r"'enc.weight': shape \[2, 2\] in twin vector 0"):
        merge_with_weights(sh, [small], [1.0])
    with pytest.raises(ValueError, match="booleans"):
        merge_with_weights(sh, vs, [True, False, False])
    # compress: integer tensors would lose their SVD factors to rounding; NaN names the key
    with pytest.raises(ValueError, match=r"'w' in vectors\[0\] has dtype torch.int64"):
        compress([{"w": torch.arange(20).reshape(5, 4)}])
    with pytest.raises(ValueError, match=r"'enc.weight' in vectors\[0\] contains NaN"):
        compress([nan])
    with pytest.raises(ValueError, match="rank_ratio"):
        compress(vs, rank_ratio="0.5")
    # the router: nothing trained silently
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    for kw, msg in [({"batch_size": 1}, "batch_size"), ({"epochs": 0}, "epochs")]:
        with pytest.raises(ValueError, match=msg):
            train_router(Router(4, 3), x, y, progress=False, **kw)
    for xb, yb, msg in [
        (x, y.float(), "integer task ids"),
        (x, y + 1, r"task ids in \[0, 3\)"),
        (x[:, :3], y, "3 columns, the router takes 4"),
        (x.masked_fill(x > 1, float("nan")), y, "NaN"),
    ]:
        with pytest.raises(ValueError, match=msg):
            train_router(Router(4, 3), xb, yb, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        Router(4, 3).weights(x, temperature=float("nan"))


def test_factor_merge_needs_one_scale_and_matching_factors():
    from course_lib.models.lora import LoraExpert, factor_merge

    a, b = torch.randn(2, 3), torch.randn(4, 2)
    e1 = LoraExpert("a", {"q": (a, b)}, scale=1.0)
    with pytest.raises(ValueError, match="LoRA scale 8.0"):
        factor_merge([e1, LoraExpert("b", {"q": (a, b)}, scale=8.0)])
    with pytest.raises(ValueError, match=r"'q': expert 'c' has factors A \[3, 3\]"):
        factor_merge([e1, LoraExpert("c", {"q": (torch.randn(3, 3), torch.randn(4, 3))}, 1.0)])
    with pytest.raises(ValueError, match="scaling"):
        factor_merge([e1], scaling=float("nan"))


def test_mergekit_config_refuses_what_mergekit_would_misread():
    from course_lib.export import mergekit_config

    with pytest.raises(ValueError, match="list of checkpoint names"):
        mergekit_config("task_arithmetic", "base", "org/model")  # a string, not a list
    with pytest.raises(ValueError, match="scaling"):
        mergekit_config("task_arithmetic", "base", ["m"], scaling=float("nan"))
    with pytest.raises(ValueError, match="density"):
        mergekit_config("ties", "base", ["m"], density=True)
    with pytest.raises(ValueError, match="base_model"):
        mergekit_config("ties", "", ["m"])
    with pytest.raises(ValueError, match=r"models\[1\]"):
        mergekit_config("ties", "base", ["m", None])
    with pytest.raises(ValueError, match="dtype"):
        mergekit_config("ties", "base", ["m"], dtype="fp99")
    with pytest.raises(ValueError, match="density of 0"):  # would round to 'density: 0.0'
        mergekit_config("dare", "base", ["m"], drop_rate=0.9999996)
    kept = mergekit_config("dare", "base", ["m"], drop_rate=0.999999)["models"][0]["parameters"]
    assert kept["density"] == 1e-06


def test_arguments_that_used_to_fail_with_a_raw_error():
    from course_lib.merging import dare, search_scaling
    from course_lib.merging.search import grid_values

    pre, fts = random_models()
    with pytest.raises(ValueError, match="list or tuple of state dicts, got generator"):
        task_arithmetic(pre, (ft for ft in fts))
    with pytest.raises(ValueError, match="seed must be an integer"):
        dare(pre, fts, drop_rate=0.5, seed=1.5)
    with pytest.raises(ValueError, match="clip_quantile"):
        pcb_merging(pre, fts, clip_quantile="x")
    with pytest.raises(ValueError, match="step > 0"):
        grid_values(0, 1, 0)
    with pytest.raises(ValueError, match="num_tasks"):
        search_scaling(lambda lams: 0.0, num_tasks=1.5)
    with pytest.raises(ValueError, match="budget"):
        search_scaling(lambda lams: 0.0, 2, method="evolution", budget=2.5)
    with pytest.raises(ValueError, match="sigma"):
        search_scaling(lambda lams: 0.0, 2, method="evolution", sigma=float("nan"))


def test_normalized_accuracy_against_an_expert_at_zero():
    from course_lib.eval import normalized

    assert normalized({"a": 40.0}, {"a": 80.0}) == {"a": 50.0}
    with pytest.raises(ValueError, match="expert of 'b' scores 0%"):
        normalized({"a": 40.0, "b": 0.0}, {"a": 80.0, "b": 0.0})


def test_counts_and_scalings_share_one_check_each():
    import numpy as np

    from course_lib.state import check_count, check_scaling

    assert check_count("n", np.int64(3)) == 3
    for bad in (True, 2.0, 0, "2", None):
        with pytest.raises(ValueError, match=r"n must be an integer >= 1"):
            check_count("n", bad)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 2"):
        check_count("batch_size", 1, minimum=2)
    # one number, from any numeric type, is broadcast; it must be finite and not a bool
    assert check_scaling(np.float32(0.5), 3) == [0.5] * 3
    assert check_scaling(torch.tensor(0.25), 2) == [0.25, 0.25]
    with pytest.raises(ValueError, match="scaling is inf"):
        check_scaling(float("inf"), 2)
    with pytest.raises(ValueError, match=r"scaling\[1\] is nan"):
        check_scaling([0.1, float("nan")], 2)
    with pytest.raises(ValueError, match="scaling must be a finite number, got True"):
        check_scaling(True, 2)


def test_merge_with_weights_scans_only_vectors_not_made_by_compress(monkeypatch):
    from course_lib.merging import compress, merge_with_weights, shared_expert, twin_vectors
    from course_lib.merging import twin as twin_module
    from course_lib.merging.twin import CompressedVector, LowRank

    pre, fts = random_models()
    sh = shared_expert(pre, fts)
    made = compress(twin_vectors(sh, fts), rank_ratio=0.5)
    assert all(v.checked for v in made)
    scans = []
    real = twin_module.check_finite
    monkeypatch.setattr(twin_module, "check_finite", lambda *a: scans.append(a[0]) or real(*a))
    merge_with_weights(sh, made, [0.2, 0.3, 0.5])
    assert scans == []  # compress checked them once, when it made them
    # a compressed vector built by hand is scanned on every call: NaN in a factor names the key
    key = next(k for k, p in made[0].parts.items() if isinstance(p, LowRank))
    bad_left = made[0].parts[key].left.clone()
    bad_left[0, 0] = float("nan")
    by_hand = CompressedVector({**made[0].parts, key: LowRank(bad_left, made[0].parts[key].right)})
    with pytest.raises(ValueError, match=rf"{key!r} in twin vector 0 contains NaN"):
        merge_with_weights(sh, [by_hand, made[1], made[2]], [0.2, 0.3, 0.5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_in_any_float_dtype(dtype, bad):
    from course_lib.state import check_finite

    t = torch.randn(1000).to(dtype)
    check_finite("w", t, "model 0")  # finite: passes
    check_finite("w", torch.empty(0, dtype=dtype), "model 0")  # empty: nothing to check
    t[-1] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"'w' in model 0 contains {kind}"):
        check_finite("w", t, "model 0")
    with pytest.raises(ValueError, match=kind):
        check_finite("w", torch.tensor(bad, dtype=dtype), "model 0")  # a 0-d tensor


# ---------------------------------------------- found by an adversarial review: each used to pass
def _tied_models():
    """A model whose head is tied to its embedding (one tensor, two keys), and one expert."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(4, 3, generator=g)
    pre = {"embed.weight": embed, "mid.weight": torch.randn(3, 3, generator=g)}
    pre["head.weight"] = embed  # tied
    ft_embed = embed + 0.1
    ft = {"embed.weight": ft_embed, "mid.weight": pre["mid.weight"] + 0.1, "head.weight": ft_embed}
    return pre, ft


@pytest.mark.parametrize("select", [{"exclude": "head"}, {"keys": "embed|mid"}])
def test_a_tied_key_left_out_of_the_merge_stays_tied(select):
    """Excluding one of two tied keys (what check_tied's message suggests) must not hand back
    a stale untied copy: loaded into the tied model, it would overwrite the merged weights."""
    pre, ft = _tied_models()
    for merged in (
        task_arithmetic(pre, [ft], 0.5, **select),
        ties_merging(pre, [ft], density=1.0, scaling=1.0, **select),
        weight_average([ft, ft], **select),
        task_vector(pre, ft, **select).apply_to(pre, 0.5),
    ):
        assert merged["head.weight"] is merged["embed.weight"]
    torch.testing.assert_close(merged["embed.weight"], pre["embed.weight"] + 0.05)


def test_task_vectors_refuse_a_generator():
    pre, fts = random_models()
    with pytest.raises(ValueError, match="list or tuple of state dicts, got generator"):
        task_vectors(pre, (ft for ft in fts))


@pytest.mark.parametrize("scaling", [{0: 0.3, 1: 0.3, 2: 0.3}, {0.3, 0.4, 0.5}])
def test_scaling_as_a_dict_or_a_set_is_refused(scaling):
    pre, fts = random_models()
    with pytest.raises(ValueError, match="a list with one number per task"):
        task_arithmetic(pre, fts, scaling)


def test_weights_that_overflow_are_refused():
    _, fts = random_models(num_tasks=2)
    with pytest.raises(ValueError, match="sum to inf"):
        weight_average(fts, [1e308, 1e308])


def test_empty_tensors_are_never_tied():
    pre = {"w": torch.ones(2), "a": torch.empty(0), "b": torch.empty(0, dtype=torch.float16)}
    ft = {k: v + 1 if k == "w" else v.clone() for k, v in pre.items()}
    merged = task_arithmetic(pre, [ft], 1.0)
    assert merged["b"].dtype == torch.float16 and merged["a"].dtype == torch.float32


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_merging", "pcb_merging", "dare"])
def test_pretrained_none_is_named(method):
    from course_lib.merging import METHODS

    _, fts = random_models()
    with pytest.raises(ValueError, match="pretrained is None"):
        METHODS[method](None, fts)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_merging", "pcb_merging"])
def test_parameters_that_require_grad_merge_to_plain_tensors(method):
    from course_lib.merging import METHODS

    pre, fts = random_models()
    grad = lambda sd: {k: v.clone().requires_grad_() for k, v in sd.items()}  # noqa: E731
    merged = METHODS[method](grad(pre), [grad(ft) for ft in fts])
    expected = METHODS[method](pre, fts)
    for k, v in merged.items():
        assert not v.requires_grad, k
        torch.testing.assert_close(v, expected[k])


def test_every_twin_vector_has_the_shared_experts_shapes():
    from course_lib.merging import merge_with_weights, shared_expert, twin_vectors

    pre, fts = random_models()
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    row = {k: v[0] if k == "enc.weight" else v for k, v in vs[1].items()}  # [6] broadcasts
    with pytest.raises(ValueError, match=r"'enc.weight': shape \[6\] in twin vector 1"):
        merge_with_weights(sh, [vs[0], row, vs[2]], [0.2, 0.3, 0.5])


def test_stored_twin_vectors_are_checked_when_read():
    from course_lib.merging import compress, shared_expert, twin_vectors
    from course_lib.merging.twin import compressed_from_tensors, compressed_tensors

    pre, fts = random_models()
    sh = shared_expert(pre, fts)
    flat = compressed_tensors(compress(twin_vectors(sh, fts), rank_ratio=0.5))
    assert len(compressed_from_tensors(flat)) == 3
    left = next(k for k in flat if k.endswith(":left"))
    nan = {k: v.clone() for k, v in flat.items()}
    nan[left][0, 0] = float("nan")
    with pytest.raises(ValueError, match="stored twin vector .* contains NaN"):
        compressed_from_tensors(nan)
    bad = dict(flat)
    bad[left] = flat[left][:, :1]  # [m, 1] @ [2, n]
    with pytest.raises(ValueError, match="do not multiply"):
        compressed_from_tensors(bad)


def test_models_on_two_devices_are_named():
    pre, fts = random_models()
    moved = {k: v.to("meta") if k == "enc.bias" else v for k, v in fts[1].items()}
    with pytest.raises(ValueError, match=r"'enc.bias': device meta in finetuned\[1\] but cpu"):
        task_arithmetic(pre, [fts[0], moved, fts[2]])


def test_a_merge_that_overflows_its_dtype_is_refused():
    """Inputs are checked finite; a half-precision result can still overflow to Inf."""
    pre = {"w": torch.full((2,), 60000.0, dtype=torch.float16)}
    ft = {"w": torch.full((2,), 65000.0, dtype=torch.float16)}
    with pytest.raises(ValueError, match="'w' in the merged model .*overflows.* contains Inf"):
        task_arithmetic(pre, [ft], 2.0)  # 60000 + 2 * 5000 = 70000 > float16's 65504
    with pytest.raises(ValueError, match="overflows"):
        task_vector(pre, ft).apply_to(pre, 2.0)
    assert task_arithmetic(pre, [ft], 1.0)["w"].dtype == torch.float16
