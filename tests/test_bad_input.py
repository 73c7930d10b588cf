"""Bad input gets a ValueError that names the key and the problem, never a silent wrong merge."""

import pytest
import torch
from conftest import random_models

from course_lib.merging import METHODS, pcb_merging, task_arithmetic, ties_merging, weight_average


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
