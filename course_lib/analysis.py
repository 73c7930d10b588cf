"""Measuring interference between task vectors (the evidence behind TIES and PCB).

Notebook 02 asks *why* adding task vectors goes wrong. The TIES paper (Yadav et al., NeurIPS
2023, Sec. 3 and Fig. 2-3) names two causes, and each function here measures one of them:

* **redundancy**: a few large entries carry most of a task vector's change
  (:func:`mass_curve`: the share of ||tau||^2 held by the top fraction of entries);
* **sign conflicts**: at many positions some tasks push up and others push down
  (:func:`sign_conflicts`: the fraction of positions where the non-zero entries disagree);
* and, as a global summary, the cosine similarity of every pair of task vectors
  (:func:`cosine_matrix`, Ilharco et al., ICLR 2023, Fig. 5: nearly orthogonal vectors).

Those three look at the weights. The last two functions look at what the weights *do*:
:func:`disentanglement_error` and :func:`disentanglement_matrix` measure whether adding one
task's vector changes the predictions on another task's inputs (weight disentanglement,
Ortiz-Jimenez et al., NeurIPS 2023, Sec. 3).

Everything works per tensor, so it never builds the [T x D] matrix of a large model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from course_lib import config
from course_lib.merging._base import deltas
from course_lib.merging._select import kth_largest_count
from course_lib.merging.ties import trim
from course_lib.state import TaskVector, check_number, same_keys

# predict(state, task) -> the labels a model with weights ``state`` predicts on the inputs of
# ``task`` (always the same inputs, in the same order): see :func:`zoo_predictor`.
Predict = Callable[[Mapping[str, Tensor], str], Tensor]


def cosine_matrix(vectors: Sequence[TaskVector]) -> Tensor:
    """``[T, T]`` cosine similarities: <tau_i, tau_j> / (||tau_i|| ||tau_j||)."""
    if not vectors:
        raise ValueError("cosine_matrix needs at least one task vector")
    keys = list(vectors[0].keys())
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for k in keys:  # one tensor at a time: <a, b> = sum over tensors
        rows = torch.stack([v[k].reshape(-1).double() for v in vectors])
        gram += rows @ rows.T
    norms = gram.diagonal().sqrt().clamp(min=1e-30)
    return (gram / norms[:, None] / norms[None, :]).float()


def mass_curve(vector: TaskVector, fractions: Sequence[float]) -> list[float]:
    """Share of ``||tau||^2`` carried by the top ``f`` fraction of entries (by magnitude), per f.

    The top ``f`` of n entries are ``max(1, floor(f * n))`` of them, the count TIES's trim keeps
    (:func:`course_lib.merging._select.kth_largest_count`)."""
    flat = vector.flatten().abs().float()
    sq = flat.square().sort(descending=True).values
    cum = sq.cumsum(0)
    total = float(cum[-1]) or 1.0
    out = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must lie in (0, 1], got {f}")
        k = kth_largest_count(sq.numel(), f)
        out.append(float(cum[k - 1]) / total)
    return out


def layer_of(key: str) -> str:
    """A readable group name for a parameter key: ``layer 3``, ``embeddings`` or ``head``."""
    m = re.search(r"layers?\.(\d+)\.", key)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in key or "pre_layrnorm" in key:
        return "embeddings"
    return "head"


def sign_conflicts(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float | None = None,
    group=layer_of,
) -> dict[str, float]:
    """Fraction of positions, per group of tensors, where the tasks' signs disagree.

    A position is *in conflict* when at least one task vector is positive there and another is
    negative. With ``density`` each tensor is first trimmed to its top-``density`` entries per
    task (TIES step 1, per tensor), which shows how much of the conflict is small noise.
    """
    conflicts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        tau = deltas(pretrained, finetuned, key).reshape(len(finetuned), -1)
        if density is not None:
            tau = trim(tau, density)
        clash = (tau > 0).any(dim=0) & (tau < 0).any(dim=0)
        g = group(key)
        conflicts[g] = conflicts.get(g, 0) + int(clash.sum())
        sizes[g] = sizes.get(g, 0) + clash.numel()
    return {g: conflicts[g] / sizes[g] for g in conflicts}


def disentanglement_error(
    predict: Predict,
    pretrained: Mapping[str, Tensor],
    vectors: Mapping[str, TaskVector],
    alphas: Sequence[float],
    *,
    progress: bool = True,
) -> Tensor:
    """The disentanglement error xi(a1, a2) of two task vectors on a grid of coefficients.

    Ortiz-Jimenez et al. (NeurIPS 2023, Sec. 3) call a model *weight disentangled* with respect
    to tau_1 and tau_2 when adding both edits each task's inputs as the task's own vector alone
    does. Its failure is measured by

        xi(a1, a2) = sum_{t=1,2} P_{x ~ D_t}[ f(x; theta_0 + a_t tau_t)
                                             != f(x; theta_0 + a1 tau_1 + a2 tau_2) ]

    with f the predicted class: 0 where adding the other task's vector changes no prediction,
    at most 2. ``vectors`` maps the two task names to their task vectors (its order gives the
    rows and the columns); the result is ``[len(alphas), len(alphas)]``, row i for
    a1 = alphas[i], column j for a2 = alphas[j]. xi(0, 0) is 0 by definition; on the axes it
    measures how much one vector alone moves the other task's predictions away from theta_0's.
    """
    (a, tau_a), (b, tau_b) = _two_tasks(vectors)
    alphas = _coefficients(alphas)
    alone = {
        t: [predict(_edit(pretrained, [(x, tau)]), t) for x in alphas]
        for t, tau in ((a, tau_a), (b, tau_b))
    }
    xi = torch.zeros(len(alphas), len(alphas), dtype=torch.float64)
    grid = [(i, j) for i in range(len(alphas)) for j in range(len(alphas))]
    for i, j in config.progress_bar(grid, desc="disentanglement", progress=progress):
        both = _edit(pretrained, [(alphas[i], tau_a), (alphas[j], tau_b)])
        xi[i, j] = _disagreement(predict(both, a), alone[a][i]) + _disagreement(
            predict(both, b), alone[b][j]
        )
    return xi


def disentanglement_matrix(
    predict: Predict,
    pretrained: Mapping[str, Tensor],
    vectors: Mapping[str, TaskVector],
    alpha: float,
    *,
    progress: bool = True,
) -> Tensor:
    """``[T, T]``: xi(alpha, alpha) of :func:`disentanglement_error` for every pair of tasks.

    Symmetric, 0 on the diagonal; entry (i, j) is the share of task i's inputs whose prediction
    by theta_0 + alpha tau_i changes when alpha tau_j is added, plus the same with i and j
    swapped. Each single-task model is evaluated once, each pair's sum once on both tasks."""
    names = list(vectors)
    if len(names) < 2:
        raise ValueError(f"disentanglement_matrix needs at least two task vectors, got {names}")
    alpha = _coefficients([alpha])[0]
    alone = {t: predict(_edit(pretrained, [(alpha, vectors[t])]), t) for t in names}
    xi = torch.zeros(len(names), len(names), dtype=torch.float64)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    for i, j in config.progress_bar(pairs, desc="disentanglement", progress=progress):
        a, b = names[i], names[j]
        both = _edit(pretrained, [(alpha, vectors[a]), (alpha, vectors[b])])
        err = _disagreement(predict(both, a), alone[a]) + _disagreement(predict(both, b), alone[b])
        xi[i, j] = xi[j, i] = err
    return xi


def zoo_predictor(zoo, split: str = "val", limit: int | None = None) -> Predict:
    """``predict(state, task)`` for a vision zoo: the classes that the encoder with ``state``
    and ``task``'s frozen zero-shot head predict on the first ``limit`` examples of ``split``
    (:meth:`course_lib.models.zoo.Zoo.predict`, remembered in the evaluation cache)."""

    def predict(state: Mapping[str, Tensor], task: str) -> Tensor:
        return zoo.predict(state, task, split, limit=limit)

    return predict


def _two_tasks(vectors: Mapping[str, TaskVector]) -> list[tuple[str, TaskVector]]:
    if len(vectors) != 2:
        raise ValueError(
            f"disentanglement_error takes exactly two task vectors, got {len(vectors)}: "
            f"{list(vectors)} (use disentanglement_matrix for more)"
        )
    (a, tau_a), (b, tau_b) = vectors.items()
    same_keys(tau_a, tau_b, f"compare the {a!r} and {b!r}")  # keys and shapes, before any work
    return [(a, tau_a), (b, tau_b)]


def _coefficients(alphas: Sequence[float]) -> list[float]:
    values = [check_number(f"alphas[{i}]", x) for i, x in enumerate(alphas)]
    if not values:
        raise ValueError("alphas is empty: give at least one coefficient")
    return values


def _edit(pretrained: Mapping[str, Tensor], terms: Sequence[tuple[float, TaskVector]]):
    """theta_0 + sum of alpha * tau over ``terms``, as a new state dict."""
    scaled = [alpha * tau for alpha, tau in terms if alpha != 0]
    if not scaled:
        return dict(pretrained)
    return sum(scaled[1:], start=scaled[0]).apply_to(pretrained, scaling=1.0)


def _disagreement(pred: Tensor, reference: Tensor) -> float:
    """The share of inputs on which two predictions differ."""
    if pred.shape != reference.shape or pred.numel() == 0:
        raise ValueError(
            f"predictions to compare must have one shape and be non-empty: "
            f"{tuple(pred.shape)} vs {tuple(reference.shape)}"
        )
    return float((pred != reference).double().mean())
