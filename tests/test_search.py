"""search_scaling: grid and evolution strategy on synthetic objectives."""

import pytest

from course_lib.merging import grid_values, search_scaling


def test_grid_values_are_exact():
    assert grid_values(0.0, 1.0, 0.05)[:3] == [0.0, 0.05, 0.1]
    assert grid_values(0.0, 1.0, 0.05)[-1] == 1.0
    assert len(grid_values(0.8, 2.5, 0.1)) == 18
    assert len(grid_values(0.0, 0.3, 0.1)) == 4  # 0.3 / 0.1 is 2.9999999999999996 in floats


def test_grid_values_never_pass_stop():
    assert grid_values(0.0, 1.0, 0.6) == [0.0, 0.6]
    assert grid_values(0.8, 2.5, 0.3)[-1] == 2.3


def test_grid_finds_the_best_shared_lambda():
    res = search_scaling(lambda s: -((s[0] - 0.35) ** 2), num_tasks=3)
    assert res.best_scaling == [0.35, 0.35, 0.35]
    assert len(res.history) == 21


def test_grid_breaks_ties_towards_the_smaller_lambda():
    res = search_scaling(lambda s: 1.0, num_tasks=2, grid=[0.5, 0.2, 0.9])
    assert res.best_scaling == [0.2, 0.2]


def test_evolution_finds_per_task_optimum_within_bounds_and_budget():
    target = [0.9, 1.2, 1.0, 0.85]
    calls = []

    def evaluate(s):
        calls.append(s)
        assert all(0.8 <= x <= 1.3 for x in s)
        return -sum((a - b) ** 2 for a, b in zip(s, target, strict=True))

    res = search_scaling(evaluate, 4, "evolution", budget=100, seed=0)
    assert len(res.history) <= 100
    assert max(abs(a - b) for a, b in zip(res.best_scaling, target, strict=True)) < 0.05
    again = search_scaling(evaluate, 4, "evolution", budget=100, seed=0)
    assert again.best_scaling == res.best_scaling  # deterministic


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        search_scaling(lambda s: 0.0, 2, "random")
    with pytest.raises(ValueError, match="bounds"):
        search_scaling(lambda s: 0.0, 2, "evolution", bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="NaN"):
        search_scaling(lambda s: float("nan"), 2)
