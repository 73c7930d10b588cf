"""Exercise checkers: run a learner's function on small cases and explain what is wrong.

Each ``check_*`` calls the learner's function on hand-made inputs, compares with the reference
implementation of ``course_lib`` and, when the answer is wrong, recognizes the usual mistakes
(keeping the smallest entries, an off-by-one k, a head-count vote instead of the mass vote,
dividing by T instead of by the number of agreeing tasks, ...) to say *which* one it is. A
correct answer prints a one-line confirmation and returns True; a wrong one raises
``AssertionError`` with the explanation. A stub that still raises ``NotImplementedError`` is
not caught: the notebook shows that the exercise is open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from course_lib.merging.pcb import inter_balance, intra_balance
from course_lib.merging.ties import disjoint_merge, elect, trim


class ExerciseError(AssertionError):
    """A wrong answer to an exercise; the message says what to fix."""


def _close(a, b, tol: float = 1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _tensor(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ExerciseError(f"{what} should return a torch.Tensor, got {type(x).__name__}")
    return x


def _scalar(x, what: str) -> float:
    """The learner's single-number answer as a float, or a clear error (None, a dict, a tensor
    of many values)."""
    if isinstance(x, Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        shape = f" of shape {list(x.shape)}" if isinstance(x, Tensor) else ""
        raise ExerciseError(f"{what} should return one number, got a {type(x).__name__}{shape}")
    return float(x)


def _untouched(before: Tensor, after: Tensor, what: str) -> None:
    """The input the learner's function received must hold its original values afterwards."""
    if not torch.equal(before, after):
        raise ExerciseError(
            f"{what} changed its input in place: work on a copy (e.g. tau.abs(), not tau.abs_(); "
            "x = x * m, not x *= m or x[...] = 0)"
        )


def _ok(message: str) -> bool:
    print(f"\N{CHECK MARK} {message}")
    return True


def _diagnose(got, expected, mistakes: Mapping[str, object], what: str) -> None:
    """Raise with the first matching known mistake, else with a generic message."""
    if _close(got, expected):
        return
    for message, wrong in mistakes.items():
        if _close(got, wrong):
            raise ExerciseError(f"{what}: {message}")
    raise ExerciseError(f"{what}: expected\n{expected}\nbut got\n{got}")


# ----------------------------------------------------------------------------- notebook 00-01
def check_normalized_accuracy(fn: Callable[[dict, dict], dict]) -> bool:
    """``fn(acc, expert_acc)`` -> ``{task: 100 * acc / expert_acc}``."""
    acc, exp = {"a": 45.0, "b": 90.0}, {"a": 90.0, "b": 100.0}
    got = fn(acc, exp)
    if not isinstance(got, Mapping) or set(got) != {"a", "b"}:
        raise ExerciseError("return a dict with one entry per task, e.g. {'a': 50.0, 'b': 90.0}")
    if _close([got["a"], got["b"]], [0.5, 0.9]):
        raise ExerciseError("normalized accuracy is reported in percent: multiply by 100")
    if _close([got["a"], got["b"]], [200.0, 111.111]):
        raise ExerciseError("divide the merged accuracy by the expert's, not the other way round")
    _diagnose([got["a"], got["b"]], [50.0, 90.0], {}, "normalized accuracy")
    other = fn({"c": 33.0}, {"c": 90.0})  # not a whole percentage: no rounding, no //
    if not isinstance(other, Mapping) or not _close(_scalar(other.get("c"), "the entry"), 36.6667):
        raise ExerciseError(
            f"for acc 33 and expert 90 expected 36.667 (100 * 33 / 90, not rounded), got {other}"
        )
    # pair the tasks by name, not by position; a merge may beat its expert (no cap at 100)
    swapped = fn({"a": 99.0, "b": 45.0}, {"b": 50.0, "a": 90.0})
    if not isinstance(swapped, Mapping) or not _close(
        [_scalar(swapped.get("a"), "the entry"), _scalar(swapped.get("b"), "the entry")],
        [110.0, 90.0],
    ):
        raise ExerciseError(
            "for acc {'a': 99, 'b': 45} and expert {'b': 50, 'a': 90} expected {'a': 110.0, "
            f"'b': 90.0}}: look the expert up by task name (the dicts' orders differ), and do "
            f"not cap at 100 (a merge can beat its expert); got {swapped}"
        )
    return _ok("normalized accuracy = 100 * merged / expert, per task")


def check_cross_task(fn: Callable[..., float], zoo) -> bool:
    """``fn(zoo, source, target, limit)`` -> accuracy of expert ``source`` on task ``target``."""
    source, target = zoo.task_names[0], zoo.task_names[-1]
    got = _scalar(fn(zoo, source, target, limit=100), "cross_task")
    expected = zoo.evaluate(zoo.experts[source], "test", [target], limit=100)[target]
    own = zoo.evaluate(zoo.experts[target], "test", [target], limit=100)[target]
    zero = zoo.evaluate(zoo.pretrained, "test", [target], limit=100)[target]
    _diagnose(
        got,
        expected,
        {
            f"evaluate the {source} expert (source), not the {target} expert": own,
            "evaluate the expert's weights (zoo.experts[source]), not the pretrained ones": zero,
            "report a percentage, as zoo.evaluate does": expected / 100,
        },
        "cross-task accuracy",
    )
    return _ok(f"the {source} expert scores {expected:.1f}% on {target}")


def check_task_vector(fn: Callable[[dict, dict], dict]) -> bool:
    """``fn(pretrained, finetuned)`` -> ``{key: finetuned[key] - pretrained[key]}`` (floats only)."""
    pre = {
        "w": torch.tensor([1.0, 2.0, 3.0]),
        "h": torch.tensor([1.0, 0.5], dtype=torch.float16),
        "step": torch.tensor([7]),
        "count": torch.tensor([3], dtype=torch.int32),
        "seen": torch.tensor([200], dtype=torch.uint8),
    }
    ft = {
        "w": torch.tensor([1.5, 1.0, 3.0]),
        "h": torch.tensor([2.0, 0.5], dtype=torch.float16),
        "step": torch.tensor([9]),
        "count": torch.tensor([4], dtype=torch.int32),
        "seen": torch.tensor([100], dtype=torch.uint8),
    }
    keys = set(pre)
    got = fn(pre, ft)
    if not isinstance(got, Mapping):
        raise ExerciseError(f"return a dict of tensors, got {type(got).__name__}")
    if set(pre) != keys or set(ft) != keys:
        raise ExerciseError("do not delete keys from the inputs: build a new dict")
    if {"step", "count", "seen"} & set(got):
        raise ExerciseError(
            "integer buffers (here 'step' int64, 'count' int32, 'seen' uint8) are not weights: "
            "skip them; tensor.is_floating_point() tells, a list of integer dtypes misses some"
        )
    if "w" not in got or "h" not in got:
        raise ExerciseError(
            "the task vector needs an entry for every floating-point tensor, float16 "
            f"included ('w' and 'h' here); got {sorted(got)}"
        )
    w = _tensor(got["w"], "the task vector's 'w'")
    _diagnose(
        w,
        [0.5, -1.0, 0.0],
        {"the task vector is finetuned - pretrained, not pretrained - finetuned": [-0.5, 1.0, 0.0]},
        "task vector",
    )
    if not _close(_tensor(got["h"], "the task vector's 'h'").float(), [1.0, 0.0]):
        raise ExerciseError(f"'h' should be [1.0, 0.0] (finetuned - pretrained), got {got['h']}")
    if pre["w"].tolist() != [1.0, 2.0, 3.0] or ft["w"].tolist() != [1.5, 1.0, 3.0]:
        raise ExerciseError("do not modify the inputs in place (use a - b, not a.sub_(b))")
    return _ok("tau = theta_ft - theta_0, float tensors only, inputs untouched")


def check_cosine(fn: Callable[[dict, dict], float]) -> bool:
    """``fn(tau_a, tau_b)`` -> cosine similarity over *all* tensors together."""
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 2.0])}
    b = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.0, 0.0])}
    got = _scalar(fn(a, b), "my_cosine")
    per_tensor_mean = (1 / 2**0.5 + 0.0) / 2
    _diagnose(
        got,
        1 / (5**0.5 * 2**0.5),
        {
            "compute one cosine over the concatenation of all tensors, not a mean of "
            "per-tensor cosines": per_tensor_mean,
            "divide the dot product by both norms": 1.0,
        },
        "cosine similarity",
    )
    reordered = _scalar(fn(a, {"y": b["y"], "x": b["x"]}), "my_cosine")
    if not _close(reordered, got):
        raise ExerciseError(
            "the same task vectors with b's keys in another order gave another cosine: pair the "
            f"tensors by key (for k in a: ... b[k]), not by position ({got:.4f} vs {reordered:.4f})"
        )
    opposed = _scalar(
        fn({"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([-1.0, 1.0])}), "my_cosine"
    )
    if not _close(opposed, -(0.5**0.5)):
        raise ExerciseError(
            f"for [1, 0] and [-1, 1] expected -0.7071 (a cosine keeps its sign), got {opposed:.4f}"
        )
    return _ok("cosine over the whole flattened task vector")


# ----------------------------------------------------------------------------- notebook 02
def check_conflict_rate(fn: Callable[[Tensor], float]) -> bool:
    """``fn(tau [T, n])`` -> fraction of columns holding both a positive and a negative entry."""
    tau = torch.tensor(
        [[1.0, -1.0, 0.0, 2.0, 0.0], [2.0, 1.0, -1.0, -3.0, 0.0], [0.5, 0.0, 0.0, 1.0, 0.0]]
    )
    given = tau.clone()
    got = _scalar(fn(given), "conflict_rate")
    _untouched(tau, given, "conflict_rate")
    _diagnose(
        got,
        2 / 5,
        {
            "zeros have no sign: a column with -1 and 0 is not a conflict": 3 / 5,
            "return a fraction in [0, 1] (conflicting columns / all columns)": 2.0,
            "count columns, not entries": 4 / 15,
        },
        "sign-conflict rate",
    )
    # every pair of tasks counts, not only pairs with task 0: column 1's conflict is task 1 vs 2
    more = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
    got = _scalar(fn(more.clone()), "conflict_rate")
    if not _close(got, 2 / 3):
        raise ExerciseError(
            f"for {more.tolist()} expected 2/3: a conflict between any two tasks counts, "
            f"not only those with task 0 (got {got:.4f})"
        )
    # ... and tasks that are not neighbours: column 0 is +1, 0, -1 (a zero between them)
    apart = torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 1.0]])
    got = _scalar(fn(apart.clone()), "conflict_rate")
    if not _close(got, 1 / 2):
        raise ExerciseError(
            f"for {apart.tolist()} expected 1/2: tasks 0 and 2 conflict in column 0 although "
            f"task 1 between them is 0; compare every pair of tasks, not neighbours (got {got:.4f})"
        )
    # ... and a zero is not a negative: column 0 is +1, 0, +2
    zeros = torch.tensor([[1.0, 1.0], [0.0, -1.0], [2.0, 1.0]])
    got = _scalar(fn(zeros.clone()), "conflict_rate")
    if not _close(got, 1 / 2):
        raise ExerciseError(
            f"for {zeros.tolist()} expected 1/2: column 0 holds +1, 0, +2, no negative entry, so "
            f"no conflict (a zero has no sign; test tau < 0, not 'not positive'); got {got:.4f}"
        )
    return _ok("a conflict is a column with at least one positive and one negative entry")


def check_top_mass_share(fn: Callable[[Tensor, float], float]) -> bool:
    """``fn(tau, fraction)`` -> share of sum(tau^2) held by the top ``fraction`` of |entries|."""
    tau = torch.tensor([3.0, -4.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    given = tau.clone()
    got = _scalar(fn(given, 0.2), "top_mass_share")
    _untouched(tau, given, "top_mass_share")
    _diagnose(
        got,
        25 / 26,
        {
            "rank by magnitude |tau|, not by signed value": 10 / 26,
            "the share is of the squared norm sum(tau^2), not of sum(|tau|)": 7 / 8,
            "the top 20% of 10 entries is 2 entries": 16 / 26,
        },
        "top-mass share",
    )
    rounded = _scalar(fn(tau.clone(), 0.27), "top_mass_share")  # int(0.27 * 10) = 2 entries
    if not _close(rounded, 25 / 26):
        raise ExerciseError(
            f"with fraction 0.27 keep int(0.27 * 10) = 2 entries (share 25/26 = 0.9615), "
            f"got {rounded:.4f}: round down, and count entries rather than use a quantile"
        )
    tied = torch.tensor([2.0, -2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    share = _scalar(fn(tied.clone(), 0.1), "top_mass_share")  # k = 1 of two equal magnitudes
    if not _close(share, 4 / 9):
        raise ExerciseError(
            f"for {tied.tolist()} and fraction 0.1 keep exactly 1 entry (share 4/9 = 0.4444), "
            f"got {share:.4f}: a threshold |tau| >= the k-th value keeps every tied entry; "
            "take the k largest (torch.topk)"
        )
    return _ok(f"the top 20% of entries hold {100 * got:.0f}% of ||tau||^2 here")


def check_tangent_model(fn: Callable[[Callable, Tensor, Tensor, Tensor], Tensor]) -> bool:
    """``fn(f, theta0, theta, x)`` -> ``f(x, theta0) + J (theta - theta0)``, J = df/dtheta at
    theta0, for a function ``f(x, w)`` of one weight tensor (Ortiz-Jimenez et al. 2023, Sec. 5)."""
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]], dtype=torch.float64)
    w0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    w = torch.tensor([0.5, 0.4], dtype=torch.float64)

    def f(x: Tensor, w: Tensor) -> Tensor:
        return torch.tanh(x @ w)

    def slope(at: Tensor) -> Tensor:  # d tanh(x . w) / dw = (1 - tanh^2(x . w)) x, per row
        return 1 - torch.tanh(x @ at) ** 2

    given0, given = w0.clone(), w.clone()
    got = _tensor(fn(f, given0, given, x.clone()), "tangent_model")
    _untouched(w0, given0, "tangent_model")
    _untouched(w, given, "tangent_model")
    change = slope(w0) * (x @ (w - w0))
    _diagnose(
        got,
        f(x, w0) + change,
        {
            "that is the network at theta, f(x, theta): expand it around theta0 instead": f(x, w),
            "add the starting point f(x, theta0): J (theta - theta0) is only the change": change,
            "the Jacobian is taken at theta0, not at theta": f(x, w0) + slope(w) * (x @ (w - w0)),
            "step from theta0 to theta: the direction is theta - theta0": f(x, w0) - change,
        },
        "tangent model",
    )
    return _ok("f(x, theta0) + J (theta - theta0): linear in theta, exact at theta0")


# ----------------------------------------------------------------------------- notebook 03
_TAU = torch.tensor(
    [
        [0.9, -0.1, 0.3, -0.7, 0.05, 0.2],
        [-0.8, 0.4, 0.25, -0.6, 0.0, -0.3],
        [0.2, 0.5, -0.35, 0.1, -0.9, 0.15],
    ]
)


def check_trim(fn: Callable[[Tensor, float], Tensor]) -> bool:
    """``fn(tau [T, n], density)`` keeps the top-k |entries| of each row, k = floor(density*n)."""
    given = _TAU.clone()
    got = _tensor(fn(given, 0.5), "trim")
    _untouched(_TAU, given, "trim")
    if got.shape != _TAU.shape:
        raise ExerciseError(f"trim must keep the shape {tuple(_TAU.shape)}, got {tuple(got.shape)}")
    expected = trim(_TAU, 0.5)
    mags = _TAU.abs()
    bottom = _TAU * (mags <= mags.kthvalue(3, dim=1, keepdim=True).values)
    signed = _TAU * (_TAU >= _TAU.kthvalue(4, dim=1, keepdim=True).values)  # noqa: SIM300
    one_more = _TAU * (mags >= mags.kthvalue(3, dim=1, keepdim=True).values)
    one_less = _TAU * (mags >= mags.kthvalue(5, dim=1, keepdim=True).values)
    flat = mags.reshape(-1)
    whole = _TAU * (mags >= flat.kthvalue(flat.numel() - 9 + 1).values)
    _diagnose(
        got,
        expected,
        {
            "you kept the smallest entries: keep the largest magnitudes": bottom,
            "rank by magnitude |tau|, not by the signed value": signed,
            "off by one: keep exactly k = floor(density * n) = 3 entries per row (you kept 4)": one_more,
            "off by one: keep exactly k = floor(density * n) = 3 entries per row (you kept 2)": one_less,
            "trim each task vector (row) on its own, not all rows together": whole,
            "return the trimmed values, not a 0/1 mask": (expected != 0).float(),
        },
        "trim",
    )
    # density 0.5 keeps 3 of 6 however it is read; 0.4 tells floor from ceil and kept from
    # dropped, 0.6 floor from round (and from a quantile threshold with >=)
    for density, k in ((0.4, 2), (0.6, 3)):
        other = _tensor(fn(_TAU.clone(), density), "trim")
        if not torch.equal(other, trim(_TAU, density)):
            raise ExerciseError(
                f"with density {density} keep k = floor({density} * 6) = {k} entries per row "
                "(density is the fraction kept, rounded down); got "
                f"{int((other != 0).sum(1).max())} kept in a row"
            )
    # a quantile threshold with > keeps floor(d * n) at n = 6 for these densities, not at n = 10
    ten = torch.tensor([[0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, -0.05]])
    other = _tensor(fn(ten.clone(), 0.25), "trim")
    if not torch.equal(other, trim(ten, 0.25)):
        raise ExerciseError(
            f"for a row of 10 entries and density 0.25 keep k = floor(2.5) = 2 entries, got "
            f"{int((other != 0).sum())}: count k entries (torch.topk), a quantile threshold "
            "does not give k"
        )
    return _ok("trim keeps the top-k magnitudes of each task vector")


def check_elect(fn: Callable[[Tensor], Tensor]) -> bool:
    """``fn(trimmed [T, n])`` -> elected sign per column: sign of the column sum (mass vote)."""
    trimmed = trim(_TAU, 0.5)
    given = trimmed.clone()
    got = _tensor(fn(given), "elect")
    _untouched(trimmed, given, "elect")
    if got.shape != (trimmed.shape[1],):
        raise ExerciseError(
            f"return one sign per column: shape [{trimmed.shape[1]}], got {list(got.shape)}"
        )
    decided = trimmed.sum(0) != 0  # where the sum is 0 (an all-zero column) any sign is fine
    count_vote = ((trimmed > 0).sum(0) - (trimmed < 0).sum(0)).sign().float()
    _diagnose(
        got[decided],
        trimmed.sum(0).sign()[decided],
        {
            "the vote is by mass, sign(sum_t tau_t), not by counting positive/negative tasks": count_vote[
                decided
            ],
            "return the sign (+1/-1), not the summed values": trimmed.sum(0)[decided],
        },
        "elect",
    )
    close_call = torch.tensor([[0.5], [-0.3], [-0.3]])  # one large entry, outvoted by mass
    if _close(_tensor(fn(close_call.clone()), "elect"), [1.0]):
        raise ExerciseError(
            "for the column [0.5, -0.3, -0.3] the sum is -0.1, so the sign is -1: every task's "
            "mass votes, not only the largest entry"
        )
    outvoted = torch.tensor([[0.1], [0.1], [-0.5]])  # two small positives, one large negative
    if not _close(_tensor(fn(outvoted.clone()), "elect"), [-1.0]):
        raise ExerciseError(
            "for the column [0.1, 0.1, -0.5] the sum is -0.3, so the sign is -1: the vote is by "
            "mass, sign(sum_t tau_t), not by the number of positive and negative tasks"
        )
    return _ok("the elected sign is the sign of the summed mass")


def check_disjoint_mean(fn: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """``fn(trimmed, gamma)`` -> mean over the tasks whose sign agrees with gamma (0 if none)."""
    trimmed = trim(_TAU, 0.5)
    gamma = elect(trimmed, zero_sign=1.0)
    given = trimmed.clone()
    got = _tensor(fn(given, gamma.clone()), "disjoint_merge")
    _untouched(trimmed, given, "disjoint_merge")
    expected = disjoint_merge(trimmed, gamma, "mean")
    agree = (trimmed.sign() == gamma) & (trimmed != 0)
    _diagnose(
        got,
        expected,
        {
            "divide by the number of agreeing tasks, not by T (that is a plain average "
            "of the agreeing values)": (trimmed * agree).sum(0) / trimmed.shape[0],
            "average the agreeing entries only; you averaged all non-zero entries": trimmed.sum(0)
            / (trimmed != 0).sum(0).clamp(min=1),
            "divide by the number of agreeing entries, not by all non-zero ones": (
                trimmed * agree
            ).sum(0)
            / (trimmed != 0).sum(0).clamp(min=1),
            "that is the disjoint sum: divide by the number of agreeing tasks": (
                trimmed * agree
            ).sum(0),
        },
        "disjoint mean",
    )
    tie = torch.tensor([[0.5], [-0.5]])  # the masses cancel: the given gamma decides
    got = _tensor(fn(tie.clone(), torch.tensor([1.0])), "disjoint_merge")
    if not _close(got, [0.5]):
        raise ExerciseError(
            "for the column [0.5, -0.5] with gamma = [+1] expected [0.5]: use the gamma you are "
            f"given (elect's, with its tie rule), do not recompute it; got {got.tolist()}"
        )
    return _ok("disjoint mean = mean of the entries that agree with the elected sign")


# ----------------------------------------------------------------------------- notebook 04
_M = torch.tensor([[0.0, 0.5, 1.0, 0.25], [1.0, 0.2, 0.0, 0.75], [0.5, 0.5, 0.5, 0.1]])
_U = _M * torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, -1.0], [-1.0, 1.0, 1.0, 1.0]])


def check_intra_balance(fn: Callable[[Tensor], Tensor]) -> bool:
    """``fn(m [T, n])`` -> exp(T * m^2) (PCB's intra-balancing in the official code)."""
    given = _M.clone()
    got = _tensor(fn(given), "intra_balance")
    _untouched(_M, given, "intra_balance")
    t = _M.shape[0]
    _diagnose(
        got,
        intra_balance(_M),
        {
            "the exponent is N * m^2 with N the number of tasks (3 here), not m^2": torch.exp(
                _M**2
            ),
            "square m inside the exponent: exp(N * m^2), not exp(N * m)": torch.exp(t * _M),
            "exponentiate: exp(N * m^2), not N * m^2": t * _M**2,
        },
        "intra-balancing",
    )
    return _ok("intra-balancing = exp(N m^2)")


def check_inter_balance(fn: Callable[[Tensor], Tensor]) -> bool:
    """``fn(u [T, n])`` -> sum_j tanh(u_i * u_j) for every task i (the j = i term included)."""
    given = _U.clone()
    got = _tensor(fn(given), "inter_balance")
    _untouched(_U, given, "inter_balance")
    expected = inter_balance(_U, _U.abs(), "pairwise")
    without_self = expected - torch.tanh(_U * _U)
    _diagnose(
        got,
        expected,
        {
            "the sum over j includes j = i (the task agrees with itself)": without_self,
            "apply tanh to each product u_i * u_j before summing": torch.tanh(
                _U * _U.sum(0, keepdim=True)
            ),
            "use tanh of the products, not the raw products": _U * _U.sum(0, keepdim=True),
        },
        "inter-balancing",
    )
    return _ok("inter-balancing = sum_j tanh(u_i u_j)")


# ----------------------------------------------------------------------------- notebook 05
def check_merge_with_weights(fn: Callable[[dict, list, Tensor], dict]) -> bool:
    """``fn(shared, vectors, w [T])`` -> ``{k: shared[k] + sum_t w[t] * vectors[t][k]}``."""
    shared = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    vectors = [
        {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])},
        {"w": torch.tensor([0.0, -1.0]), "b": torch.tensor([4.0])},
    ]
    w = torch.tensor([0.75, 0.25])
    before = {k: v.clone() for k, v in shared.items()}
    given = [{k: v.clone() for k, v in vec.items()} for vec in vectors]
    got = fn(shared, given, w)
    for k, v in before.items():
        _untouched(v, shared[k], "merge_with_weights (the shared expert)")
    for vec, original in zip(given, vectors, strict=True):
        for k, v in original.items():
            _untouched(v, vec[k], "merge_with_weights (a twin vector)")
    if not isinstance(got, Mapping) or set(got) != {"w", "b"}:
        raise ExerciseError("return a state dict with the same keys as `shared`")
    flat = torch.cat([_tensor(got["w"], "merged 'w'"), _tensor(got["b"], "merged 'b'")])
    _diagnose(
        flat,
        [1.75, 0.75, 2.5],
        {
            "add the weighted twin vectors to the shared expert": [0.75, -0.25, 2.5],
            "weight task t's vector by w[t] (you swapped the weights)": [1.25, 0.25, 3.5],
            "use the weights as given (they already sum to 1), do not average again": [
                1.375,
                0.875,
                1.25,
            ],
        },
        "merge_with_weights",
    )
    # a group's mean weights need not sum to 1 (and a learner must not renormalize them)
    unnormalized = fn(dict(before), [dict(v) for v in vectors], torch.tensor([0.5, 1.0]))
    got = torch.cat(
        [_tensor(unnormalized["w"], "merged 'w'"), _tensor(unnormalized["b"], "merged 'b'")]
    )
    if not _close(got, [1.5, 0.0, 5.0]):
        raise ExerciseError(
            f"with w = [0.5, 1.0] expected [1.5, 0.0] and [5.0] (the weights as given, not "
            f"renormalized to sum to 1), got {got.tolist()}"
        )
    return _ok("merged = shared + sum_t w_t v_t")


def check_low_rank(fn: Callable[[Tensor, int], tuple[Tensor, Tensor]]) -> bool:
    """``fn(matrix, rank)`` -> factors (A [m, r], B [r, n]) with A @ B the best rank-r approx."""
    g = torch.Generator().manual_seed(0)
    mat = torch.randn(6, 5, generator=g)
    out = fn(mat.clone(), 2)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ExerciseError("return the two factors (A, B) so that A @ B approximates the matrix")
    a, b = _tensor(out[0], "factor A"), _tensor(out[1], "factor B")
    if a.shape != (6, 2) or b.shape != (2, 5):
        raise ExerciseError(
            f"for a 6x5 matrix and rank 2, A is 6x2 and B is 2x5; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    smallest = (u[:, -2:] * s[-2:]) @ vh[-2:]
    _diagnose(
        a @ b,
        best,
        {
            "keep the *largest* singular values (torch.linalg.svd sorts them in descending order)": smallest,
            "scale by the singular values: A = U_r * S_r (or put S_r into B)": u[:, :2] @ vh[:2],
        },
        "low-rank approximation",
    )
    return _ok("A @ B is the best rank-r approximation (Eckart-Young)")


# ----------------------------------------------------------------------------- 06 LLM track


def check_lora_delta(fn: Callable[[Tensor, Tensor, float, int], Tensor]) -> bool:
    """``fn(A [r, in], B [out, r], alpha, r)`` -> the LoRA update (alpha / r) * B @ A."""
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # r = 2, in = 3
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0], [1.0, -1.0]])  # out = 4
    want = 4.0 * (b @ a)
    given_a, given_b = a.clone(), b.clone()
    try:
        got = _tensor(fn(given_a, given_b, 8.0, 2), "lora_delta")
    except NotImplementedError:  # a RuntimeError too: the exercise is still open
        raise
    except RuntimeError as err:  # a shape mismatch inside the learner's matmul
        raise ExerciseError(
            f"the product failed ({err}); A is [r, in] = [2, 3] and B is [out, r] = [4, 2]: "
            "which order gives [out, in]?"
        ) from err
    _untouched(a, given_a, "lora_delta (A)")
    _untouched(b, given_b, "lora_delta (B)")
    if tuple(got.shape) != (4, 3):
        raise ExerciseError(
            f"the update must have the weight's shape [out, in] = [4, 3], got {tuple(got.shape)}"
        )
    _diagnose(
        got.flatten(),
        want.flatten().tolist(),
        {
            "scale by alpha / r (= 4 here); you did not scale": (b @ a).flatten().tolist(),
            "scale by alpha / r, not by alpha": (8.0 * (b @ a)).flatten().tolist(),
            "scale by alpha / r, not by r / alpha": (0.25 * (b @ a)).flatten().tolist(),
        },
        "lora_delta",
    )
    odd = _tensor(fn(a.clone(), b.clone(), 3.0, 2), "lora_delta")  # alpha / r = 1.5
    if not _close(odd, 1.5 * (b @ a)):
        raise ExerciseError(
            "with alpha = 3 and r = 2 the scale is 3 / 2 = 1.5: use true division, not alpha // r"
        )
    return _ok("Delta W = (alpha / r) * B @ A, shape [out, in]")


def check_route_groups(fn: Callable[[Tensor], list]) -> bool:
    """``fn(weights [N, T])`` -> ``[(indices, mean weights), ...]``: inputs grouped by the task
    with the largest weight, in task order, empty groups left out."""
    w = torch.tensor(
        [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05]]
    )
    got = fn(w)
    if not isinstance(got, (list, tuple)) or not all(
        isinstance(g, (list, tuple)) and len(g) == 2 for g in got
    ):
        raise ExerciseError("return a list of (indices, mean weights) pairs, one per group")
    if any(len(g[0]) == 0 for g in got):
        raise ExerciseError("task 1 gets no input here: leave empty groups out")
    if len(got) != 2:
        raise ExerciseError(
            f"expected 2 groups (the largest weight is task 0's or task 2's), got {len(got)}"
        )
    idx = [sorted(int(i) for i in g[0]) for g in got]
    if idx == [[1, 3], [0, 2, 4]]:
        raise ExerciseError("list the groups in task order (task 0 first)")
    if idx != [[0, 2, 4], [1, 3]]:
        raise ExerciseError(
            f"group inputs by the task with the largest weight (argmax over tasks): the groups "
            f"are inputs [0, 2, 4] (task 0) and [1, 3] (task 2), got {idx}"
        )
    for (_, mean_w), want in zip(got, ([0, 2, 4], [1, 3]), strict=True):
        m = _tensor(torch.as_tensor(mean_w), "the group's weights")
        if m.shape != (3,):
            raise ExerciseError(
                f"each group needs one weight per task ([T] = [3]), got shape {tuple(m.shape)}"
            )
        if _close(m, torch.nn.functional.one_hot(w[want].argmax(-1)[0], 3).float()):
            raise ExerciseError(
                "keep the router's soft weights: average them over the group (not one-hot)"
            )
        if not _close(m, w[want].mean(0)):
            raise ExerciseError(
                f"the group of inputs {want} should merge with the mean of their weights, "
                f"{w[want].mean(0).tolist()}; got {m.tolist()}"
            )
    # input 0 goes to task 2 here: the groups follow the tasks, not the inputs' order
    late = torch.tensor([[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    order = [sorted(int(i) for i in g[0]) for g in fn(late)]
    if order != [[1], [0]]:
        raise ExerciseError(
            f"for weights {late.tolist()} expected the groups [[1], [0]] (task 0's first, then "
            f"task 2's), got {order}: list groups in task order, not in order of appearance"
        )
    return _ok("one merged model per routed task, built from the group's mean weights")


# ----------------------------------------------------------------------------- notebook 07
def check_pareto_front(fn: Callable[[dict], list]) -> bool:
    """``fn({method: (stored, score)})`` -> the methods no other method dominates."""
    from course_lib.leaderboard import pareto_front

    cases = [
        {"avg": (1.0, 40.0), "ta": (1.0, 45.0), "twin": (2.5, 85.0), "experts": (8.0, 100.0)},
        {"a": (1.0, 50.0), "b": (1.0, 50.0), "c": (2.0, 50.0), "d": (0.5, 10.0)},
    ]
    for points in cases:
        got, expected = fn(dict(points)), pareto_front(points)
        if not isinstance(got, list | tuple):
            raise ExerciseError(f"return a list of method names, got {type(got).__name__}")
        if list(got) == expected:
            continue
        if set(got) == set(expected):
            raise ExerciseError(
                f"right methods, wrong order: return them in the order of `points` ({expected})"
            )
        if "avg" in got:
            raise ExerciseError(
                "'avg' stores as much as 'ta' and scores less: it is dominated, drop it"
            )
        if set(got) < set(expected) and {"a", "b"} <= set(expected) and not {"a", "b"} <= set(got):
            raise ExerciseError(
                "two methods with the same cost and the same score do not dominate each other: "
                "domination needs one of the two to be strictly better"
            )
        raise ExerciseError(f"for {points} expected {sorted(expected)}, got {sorted(got)}")
    return _ok("the Pareto front keeps exactly the methods nothing beats on cost and score")


def check_best_under_budget(fn: Callable[[list, str, float], object]) -> bool:
    """``fn(rows, track, max_stored)`` -> the best merge within the storage budget, or None."""
    from course_lib.leaderboard import best_under_budget

    def row(track, method, kind, norm, stored):
        return {"track": track, "method": method, "kind": kind, "normalized (%)": norm,
                "stored (models)": stored}  # fmt: skip

    rows = [
        row("vision", "zero-shot", "reference", 45.0, 1.0),  # a bound that beats the merges
        row("vision", "experts", "reference", 100.0, 8.0),
        row("vision", "task arithmetic", "one merged model", 42.0, 1.0),
        row("vision", "PCB-Merging", "one merged model", 44.0, 1.0),
        row("vision", "Twin-Merging", "router + merge per input", 86.0, 2.8),
        row("llm", "LoRA experts", "reference", 100.0, 1.02),
        row("llm", "TIES-Merging", "one merged model", 56.0, 1.0),
        row("llm", "Twin-Merging", "router + merge per group", 99.0, 1.1),
    ]
    cases = [("vision", 1.0), ("vision", 3.0), ("vision", 100.0), ("vision", 0.5)]
    cases += [("llm", 1.05), ("llm", 0.9), ("llm", 2.0)]
    for track, budget in cases:
        expected = best_under_budget(rows, track, budget)
        given = [dict(r) for r in rows]
        got = fn(given, track, budget)
        if given != rows:
            raise ExerciseError("do not change the rows you are given: filter into a new list")
        if got == expected:
            continue
        if got in ("experts", "LoRA experts", "zero-shot"):
            raise ExerciseError(
                f"{got!r} is a reference (kind 'reference'), not a merge: leave references out"
            )
        if got == "Twin-Merging" and track == "vision" and budget == 1.0:
            raise ExerciseError("Twin-Merging stores 2.8 models: it does not fit a budget of 1")
        if expected is None:
            raise ExerciseError(f"nothing fits a budget of {budget}: return None, got {got!r}")
        raise ExerciseError(f"track {track!r}, budget {budget}: expected {expected!r}, got {got!r}")
    return _ok("you pick the best merge that fits the storage budget")
