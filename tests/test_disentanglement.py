"""Weight disentanglement (analysis.disentanglement_error / _matrix) on hand-made linear models.

A linear classifier f(x; W) = argmax(W x) whose tasks read disjoint input features is weight
disentangled by construction when each task vector only touches its own task's features: the
error must be 0 everywhere. A task vector that also touches the other task's features must give
an error above 0, equal to the formula evaluated by hand.
"""

import itertools

import pytest
import torch

from course_lib.analysis import disentanglement_error, disentanglement_matrix
from course_lib.state import TaskVector

CLASSES, FEATURES, N = 3, 6, 200
COLUMNS = {"a": slice(0, 2), "b": slice(2, 4), "c": slice(4, 6)}  # the features each task reads


def inputs(task: str) -> torch.Tensor:
    x = torch.zeros(N, FEATURES)
    g = torch.Generator().manual_seed(sorted(COLUMNS).index(task))
    x[:, COLUMNS[task]] = torch.randn(N, 2, generator=g)
    return x


X = {t: inputs(t) for t in COLUMNS}
THETA0 = {"w": torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(9))}


def predict(state, task):
    return (X[task] @ state["w"].T).argmax(dim=1)


def vector(*tasks: str, seed: int = 0, scale: float = 2.0) -> TaskVector:
    """A task vector that changes the weights of the features of ``tasks`` only."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(CLASSES, FEATURES)
    for t in tasks:
        w[:, COLUMNS[t]] = scale * torch.randn(CLASSES, 2, generator=g)
    return TaskVector({"w": w})


ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]


def by_hand(vectors, a1, a2):
    (ta, va), (tb, vb) = vectors.items()
    both = {"w": THETA0["w"] + a1 * va["w"] + a2 * vb["w"]}
    only_a = {"w": THETA0["w"] + a1 * va["w"]}
    only_b = {"w": THETA0["w"] + a2 * vb["w"]}
    return float(
        (predict(both, ta) != predict(only_a, ta)).double().mean()
        + (predict(both, tb) != predict(only_b, tb)).double().mean()
    )


def test_vectors_on_disjoint_features_are_disentangled_everywhere():
    vectors = {"a": vector("a", seed=1), "b": vector("b", seed=2)}
    moved = predict(vectors["a"].apply_to(THETA0), "a") != predict(THETA0, "a")
    assert moved.any(), "the test is void unless tau_a changes task a's predictions"
    xi = disentanglement_error(predict, THETA0, vectors, ALPHAS)
    assert xi.shape == (len(ALPHAS), len(ALPHAS))
    assert torch.equal(xi, torch.zeros_like(xi))


def test_a_vector_touching_the_other_task_is_entangled_as_the_formula_says():
    vectors = {"a": vector("a", "b", seed=3), "b": vector("b", seed=4)}
    xi = disentanglement_error(predict, THETA0, vectors, ALPHAS)
    zero = ALPHAS.index(0.0)
    assert xi[zero, zero] == 0  # theta_0 against theta_0
    assert xi.max() > 0.1
    for i, a1 in enumerate(ALPHAS):
        for j, a2 in enumerate(ALPHAS):
            assert xi[i, j].item() == pytest.approx(by_hand(vectors, a1, a2)), (a1, a2)
    # tau_b never reaches task a's features: along a1 = 0 only task b's term can be non-zero,
    # and it is, since tau_a moves task b's predictions whenever it is added.
    assert xi[zero].max() == 0 and xi[:, zero].max() > 0


def test_the_matrix_holds_every_pair_at_one_coefficient():
    vectors = {"a": vector("a", seed=5), "b": vector("b", "c", seed=6), "c": vector("c", seed=7)}
    m = disentanglement_matrix(predict, THETA0, vectors, 1.0)
    names = list(vectors)
    assert m.shape == (3, 3) and torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.zeros(3))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                pair = {a: vectors[a], b: vectors[b]}
                assert m[i, j] == disentanglement_error(predict, THETA0, pair, [1.0])[0, 0]
    assert m[0, 1] == 0 and m[1, 2] > 0  # a and b disjoint; b's vector reaches c's features


def test_bad_input_is_refused_with_a_clear_error():
    a, b = vector("a"), vector("b")
    with pytest.raises(ValueError, match="exactly two task vectors, got 1"):
        disentanglement_error(predict, THETA0, {"a": a}, ALPHAS)
    with pytest.raises(
        ValueError, match="compare the 'a' and 'b' task vectors: key 'w' is only in the left"
    ):
        disentanglement_error(predict, THETA0, {"a": a, "b": TaskVector({"v": b["w"]})}, ALPHAS)
    with pytest.raises(ValueError, match="alphas is empty"):
        disentanglement_error(predict, THETA0, {"a": a, "b": b}, [])
    with pytest.raises(ValueError, match=r"alphas\[1\]"):
        disentanglement_error(predict, THETA0, {"a": a, "b": b}, [0.5, float("nan")])
    with pytest.raises(ValueError, match="at least two"):
        disentanglement_matrix(predict, THETA0, {"a": a}, 1.0)

    calls = itertools.count()

    def ragged(state, task):  # a predictor that does not see the same inputs every time
        return predict(state, task)[: N - next(calls) % 3]

    with pytest.raises(ValueError, match=r"one shape and be non-empty: \(198,\) vs \(200,\)"):
        disentanglement_error(ragged, THETA0, {"a": a, "b": b}, [1.0])
