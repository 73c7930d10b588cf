"""Choosing the scaling coefficients lambda on a validation callback.

Task arithmetic, TIES and PCB all end with theta_0 + lambda * (merged task vector); lambda is
picked on held-out validation data (Ilharco et al. 2023, Sec. 3; Yadav et al. 2023, App. C;
Du et al. 2024, Sec. 4 searches one lambda per task with an evolution strategy).

:func:`search_scaling` takes ``evaluate(scaling: list[float]) -> float`` (higher is better;
usually: merge with these lambdas, return mean validation accuracy) and searches either

* ``method="grid"``: one lambda shared by all tasks, tried on a grid; or
* ``method="evolution"``: one lambda per task, a seeded (1+1) evolution strategy: mutate the
  best point with Gaussian noise (clipped to ``bounds``), keep the child if it is better, and
  adapt the step size with the 1/5th success rule (Rechenberg): x exp(1/3) after a success,
  x exp(-1/12) after a failure, which is stable when one mutation in five succeeds. The PCB code
  uses nevergrad's NGOpt for this; a 20-line ES does the job here without another dependency.

Every evaluated point is cached and recorded in the returned history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from course_lib.config import progress_bar
from course_lib.state import check_count, check_number

Evaluate = Callable[[list[float]], float]


@dataclass
class SearchResult:
    best_scaling: list[float]
    best_score: float
    history: list[tuple[list[float], float]] = field(default_factory=list)


def _cached(evaluate: Evaluate, history: list[tuple[list[float], float]]) -> Evaluate:
    cache: dict[tuple[float, ...], float] = {}

    def run(scaling: list[float]) -> float:
        key = tuple(round(s, 10) for s in scaling)
        if key not in cache:
            score = float(evaluate(list(key)))
            if score != score:
                raise ValueError(f"evaluate({list(key)}) returned NaN")
            cache[key] = score
            history.append((list(key), score))
        return cache[key]

    return run


def grid_values(start: float, stop: float, step: float) -> list[float]:
    """Inclusive grid, e.g. grid_values(0, 1, 0.05) -> [0.0, 0.05, ..., 1.0] without float drift.

    It never passes ``stop``: grid_values(0, 1, 0.6) -> [0.0, 0.6]."""
    start, stop, step = (
        check_number(n, v) for n, v in (("start", start), ("stop", stop), ("step", step))
    )
    if step <= 0 or stop < start:
        raise ValueError(f"need step > 0 and stop >= start, got {start}, {stop}, {step}")
    n = math.floor((stop - start) / step + 1e-9)
    return [round(start + i * step, 10) for i in range(n + 1)]


def search_scaling(
    evaluate: Evaluate,
    num_tasks: int,
    method: str = "grid",
    *,
    grid: Sequence[float] | None = None,
    bounds: tuple[float, float] = (0.8, 1.3),
    init: float = 1.0,
    budget: int = 100,
    sigma: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """Maximize ``evaluate`` over per-task scalings; see the module docstring."""
    check_count("num_tasks", num_tasks)
    history: list[tuple[list[float], float]] = []
    run = _cached(evaluate, history)
    if method == "grid":
        values = list(grid) if grid is not None else grid_values(0.0, 1.0, 0.05)
        if not values:
            raise ValueError("grid is empty")
        best = max(values, key=lambda lam: (run([lam] * num_tasks), -lam))
        return SearchResult([best] * num_tasks, run([best] * num_tasks), history)
    if method != "evolution":
        raise ValueError(f"method must be 'grid' or 'evolution', got {method!r}")
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"bounds must satisfy low < high, got {bounds}")
    check_count("budget", budget)
    init, sigma = check_number("init", init), check_number("sigma", sigma)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    gen = torch.Generator().manual_seed(seed)
    parent = [min(max(init, lo), hi)] * num_tasks
    parent_score = run(parent)
    step = sigma
    with progress_bar(total=budget, desc="ES search", progress=progress, leave=False) as bar:
        for _ in range(budget - 1):
            noise = torch.randn(num_tasks, generator=gen) * step
            child = [min(max(p + float(n), lo), hi) for p, n in zip(parent, noise, strict=True)]
            score = run(child)
            if score > parent_score:
                parent, parent_score = child, score
                step *= math.exp(1 / 3)
            else:
                step *= math.exp(-1 / 12)
            bar.update(1)
    return SearchResult(parent, parent_score, history)
