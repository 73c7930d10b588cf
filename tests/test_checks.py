"""The exercise checkers accept the reference answer and name the typical mistakes."""

import math

import pytest
import torch

from course_lib import checks
from course_lib.merging.pcb import inter_balance, intra_balance
from course_lib.merging.ties import disjoint_merge, elect, trim


def wrong(check, fn, match):
    with pytest.raises(checks.ExerciseError, match=match):
        check(fn)


def test_normalized_accuracy():
    assert checks.check_normalized_accuracy(lambda a, e: {t: 100 * a[t] / e[t] for t in a})
    wrong(checks.check_normalized_accuracy, lambda a, e: {t: a[t] / e[t] for t in a}, "percent")
    wrong(
        checks.check_normalized_accuracy,
        lambda a, e: {t: 100 * e[t] / a[t] for t in a},
        "not the other way",
    )
    wrong(checks.check_normalized_accuracy, lambda a, e: [1, 2], "one entry per task")


def test_task_vector():
    ok = lambda p, f: {k: f[k] - p[k] for k in p if p[k].is_floating_point()}  # noqa: E731
    assert checks.check_task_vector(ok)
    wrong(checks.check_task_vector, lambda p, f: {k: f[k] - p[k] for k in p}, "integer buffers")
    wrong(
        checks.check_task_vector,
        lambda p, f: {k: p[k] - f[k] for k in p if p[k].is_floating_point()},
        "not pretrained - finetuned",
    )

    def in_place(p, f):
        return {k: f[k].sub_(p[k]) for k in p if p[k].is_floating_point()}

    wrong(checks.check_task_vector, in_place, "in place")
    with pytest.raises(NotImplementedError):  # an open exercise is not caught
        checks.check_task_vector(lambda p, f: (_ for _ in ()).throw(NotImplementedError()))


def test_cosine():
    def ok(a, b):
        x = torch.cat([a[k].flatten() for k in a])
        y = torch.cat([b[k].flatten() for k in a])  # paired by key
        return float(x @ y / (x.norm() * y.norm()))

    def own_order(a, b):  # each dict concatenated in its own key order
        x = torch.cat([a[k].flatten() for k in a])
        y = torch.cat([b[k].flatten() for k in b])
        return float(x @ y / (x.norm() * y.norm()))

    def per_tensor(a, b):
        return sum(float(torch.nn.functional.cosine_similarity(a[k], b[k], 0)) for k in a) / len(a)

    assert checks.check_cosine(ok)
    wrong(checks.check_cosine, per_tensor, "concatenation")
    wrong(checks.check_cosine, own_order, "pair the tensors by key")


def test_conflict_rate():
    def ok(t):
        return float(((t > 0).any(0) & (t < 0).any(0)).float().mean())

    def zeros_count(t):
        return float(((t >= 0).any(0) & (t < 0).any(0)).float().mean())

    assert checks.check_conflict_rate(ok)
    wrong(checks.check_conflict_rate, zeros_count, "zeros have no sign")
    wrong(checks.check_conflict_rate, lambda t: 100 * ok(t), "expected")


def test_top_mass_share():
    def ok(t, f):
        sq = t.square().sort(descending=True).values
        return float(sq[: int(f * t.numel())].sum() / sq.sum())

    def signed(t, f):
        v = t.sort(descending=True).values
        return float(v[: int(f * t.numel())].square().sum() / t.square().sum())

    assert checks.check_top_mass_share(ok)
    wrong(checks.check_top_mass_share, signed, "magnitude")


def test_tangent_model():
    from torch.func import jvp

    def ok(f, theta0, theta, x):
        out, change = jvp(lambda w: f(x, w), (theta0,), (theta - theta0,))
        return out + change

    def at_theta(f, theta0, theta, x):  # the Jacobian taken at the fine-tuned weights
        out, change = jvp(lambda w: f(x, w), (theta,), (theta - theta0,))
        return f(x, theta0) + change

    def in_place(f, theta0, theta, x):
        step = theta.sub_(theta0)
        out, change = jvp(lambda w: f(x, w), (theta0,), (step,))
        return out + change

    assert checks.check_tangent_model(ok)
    wrong(checks.check_tangent_model, lambda f, t0, t, x: f(x, t), "the network at theta")
    wrong(checks.check_tangent_model, lambda f, t0, t, x: ok(f, t0, t, x) - f(x, t0), "add the")
    wrong(checks.check_tangent_model, at_theta, "taken at theta0")
    wrong(checks.check_tangent_model, lambda f, t0, t, x: ok(f, t, t0, x) - 0, "expected")
    wrong(checks.check_tangent_model, lambda f, t0, t, x: 2 * f(x, t0) - ok(f, t0, t, x),
          "direction is theta - theta0")  # fmt: skip
    wrong(checks.check_tangent_model, in_place, "in place")
    wrong(checks.check_tangent_model, lambda f, t0, t, x: jvp(lambda w: f(x, w), (t0,), (t - t0,)),
          "should return a torch.Tensor, got tuple")  # fmt: skip


def test_trim_and_its_mistakes():
    assert checks.check_trim(trim)

    def bottom(t, d):
        k = int(d * t.shape[1])
        return t * (t.abs() <= t.abs().kthvalue(k, dim=1, keepdim=True).values)

    def plus_one(t, d):
        k = int(d * t.shape[1]) + 1
        return t * (t.abs() >= t.abs().kthvalue(t.shape[1] - k + 1, dim=1, keepdim=True).values)

    wrong(checks.check_trim, bottom, "smallest")
    wrong(checks.check_trim, plus_one, "off by one")
    wrong(checks.check_trim, lambda t, d: (trim(t, d) != 0).float(), "mask")

    def keep_ceil(t, d):  # and "drop floor(d n)": at density 0.5 both keep 3 of 6
        k = math.ceil(d * t.shape[1])
        return t * (t.abs() >= t.abs().kthvalue(t.shape[1] - k + 1, dim=1, keepdim=True).values)

    wrong(checks.check_trim, keep_ceil, "density 0.4")
    wrong(checks.check_trim, lambda t, d: trim(t, 1 - d), "fraction kept")


def test_elect_and_count_vote():
    assert checks.check_elect(lambda t: elect(t, zero_sign=0.0))
    wrong(checks.check_elect, lambda t: ((t > 0).sum(0) - (t < 0).sum(0)).sign().float(), "by mass")


def test_disjoint_mean_and_its_mistakes():
    assert checks.check_disjoint_mean(lambda t, g: disjoint_merge(t, g, "mean"))
    wrong(checks.check_disjoint_mean, lambda t, g: disjoint_merge(t, g, "sum"), "disjoint sum")

    def over_t(t, g):
        agree = (t.sign() == g) & (t != 0)
        return (t * agree).sum(0) / t.shape[0]

    wrong(checks.check_disjoint_mean, over_t, "not by T")


def test_pcb_balances():
    assert checks.check_intra_balance(intra_balance)
    wrong(checks.check_intra_balance, lambda m: torch.exp(m**2), "number of tasks")
    ok = lambda u: torch.stack([torch.tanh(u[i] * u).sum(0) for i in range(u.shape[0])])  # noqa: E731
    assert checks.check_inter_balance(ok)
    wrong(
        checks.check_inter_balance,
        lambda u: ok(u) - torch.tanh(u * u),
        "includes j = i",
    )
    # the reference helper itself agrees with the hand formula
    u = torch.tensor([[0.5, -1.0], [1.0, 0.5]])
    assert torch.allclose(inter_balance(u, u.abs()), ok(u), atol=1e-6)


def test_merge_with_weights_and_low_rank():
    def ok(shared, vectors, w):
        return {k: shared[k] + sum(w[t] * v[k] for t, v in enumerate(vectors)) for k in shared}

    assert checks.check_merge_with_weights(ok)
    wrong(
        checks.check_merge_with_weights,
        lambda s, vs, w: {k: sum(w[t] * v[k] for t, v in enumerate(vs)) for k in s},
        "add the weighted twin vectors",
    )

    def svd(mat, r):
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r]

    def unscaled(mat, r):
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :r], vh[:r]

    assert checks.check_low_rank(svd)
    wrong(checks.check_low_rank, unscaled, "singular values")


def test_lora_delta_checker():
    assert checks.check_lora_delta(lambda a, b, alpha, r: (alpha / r) * b @ a)
    for wrong, says in [
        (lambda a, b, alpha, r: b @ a, "did not scale"),
        (lambda a, b, alpha, r: alpha * b @ a, "not by alpha"),
        (lambda a, b, alpha, r: (r / alpha) * b @ a, "not by r / alpha"),
        (lambda a, b, alpha, r: (alpha / r) * a @ b, "which order"),
        (lambda a, b, alpha, r: (alpha / r) * (b @ a).T, r"shape \[out, in\]"),
    ]:
        with pytest.raises(checks.ExerciseError, match=says):
            checks.check_lora_delta(wrong)

    def stub(a, b, alpha, r):
        raise NotImplementedError("write your answer here")

    with pytest.raises(NotImplementedError):  # an open exercise is not reported as a wrong answer
        checks.check_lora_delta(stub)


def test_route_groups_checker():
    def reference(w):
        chosen = w.argmax(-1)
        groups = [torch.nonzero(chosen == t).flatten().tolist() for t in range(w.shape[1])]
        return [(g, w[g].mean(0)) for g in groups if g]

    assert checks.check_route_groups(reference)

    def with_empty(w):
        chosen = w.argmax(-1)
        return [
            (torch.nonzero(chosen == t).flatten().tolist(), w[chosen == t].mean(0))
            for t in range(3)
        ]

    def argmin(w):
        chosen = w.argmin(-1)
        groups = [torch.nonzero(chosen == t).flatten().tolist() for t in range(3)]
        return [(g, w[g].mean(0)) for g in groups if g]

    def one_hot(w):
        return [
            (g, torch.nn.functional.one_hot(w[g].argmax(-1)[0], 3).float()) for g, _ in reference(w)
        ]

    def first_weights(w):
        return [(g, w[g[0]]) for g, _ in reference(w)]

    for wrong, says in [
        (with_empty, "leave empty groups out"),
        (argmin, "largest weight"),
        (one_hot, "soft weights"),
        (first_weights, "mean of their weights"),
        (lambda w: reference(w)[::-1], "task order"),
        (lambda w: w, "list of"),
    ]:
        with pytest.raises(checks.ExerciseError, match=says):
            checks.check_route_groups(wrong)


def test_pareto_front():
    from course_lib.leaderboard import pareto_front

    assert checks.check_pareto_front(pareto_front)
    wrong(checks.check_pareto_front, lambda p: list(p), "dominated")
    strict = lambda p: [  # noqa: E731 - "dominated" by an equal point: the strictness mistake
        m
        for m, (c, s) in p.items()
        if not any(c2 <= c and s2 >= s for o, (c2, s2) in p.items() if o != m)
    ]
    wrong(checks.check_pareto_front, strict, "strictly better")
    wrong(checks.check_pareto_front, lambda p: "ta", "list of method names")


def test_best_under_budget():
    from course_lib.leaderboard import best_under_budget

    assert checks.check_best_under_budget(best_under_budget)

    def no_filter(rows, track, budget):
        fits = [r for r in rows if r["track"] == track and r["stored (models)"] <= budget]
        return max(fits, key=lambda r: r["normalized (%)"])["method"] if fits else None

    wrong(checks.check_best_under_budget, no_filter, "is a reference")

    def no_budget(rows, track, budget):
        fits = [r for r in rows if r["track"] == track and r["kind"] != "reference"]
        return max(fits, key=lambda r: r["normalized (%)"])["method"]

    wrong(checks.check_best_under_budget, no_budget, "does not fit a budget of 1")


# Wrong answers a review found accepted (each passed the checkers of the previous commit).


def test_rounding_and_counting_mistakes_are_caught():
    wrong(
        checks.check_normalized_accuracy,
        lambda a, e: {t: 100 * a[t] // e[t] for t in a},
        "36.667",
    )
    wrong(
        checks.check_normalized_accuracy,
        lambda a, e: {t: round(100 * a[t] / e[t]) for t in a},
        "not rounded",
    )

    def trim_round(tau, d):
        k = round(d * tau.shape[1])
        thr = tau.abs().topk(k, dim=1).values[:, -1:]
        return tau * (tau.abs() >= thr)

    wrong(checks.check_trim, trim_round, r"density 0.6 keep k = floor\(0.6 \* 6\) = 3")

    def trim_quantile(tau, d):
        thr = torch.quantile(tau.abs(), 1 - d, dim=1, keepdim=True)
        return tau * (tau.abs() >= thr)

    wrong(checks.check_trim, trim_quantile, "density 0.6")
    for k_of in (math.ceil, round):

        def share(tau, f, k_of=k_of):
            top = tau.abs().topk(k_of(f * tau.numel())).values
            return float((top**2).sum() / (tau**2).sum())

        wrong(checks.check_top_mass_share, share, "fraction 0.27")
    wrong(
        checks.check_conflict_rate,
        lambda t: float((t[0] * t[1:] < 0).any(0).float().mean()),
        "not only those with task 0",
    )
    wrong(
        checks.check_conflict_rate,
        lambda t: float((t[0] * t[1] < 0).float().mean()),
        "2/3",
    )
    wrong(  # neighbours only: misses +1, 0, -1
        checks.check_conflict_rate,
        lambda t: float((t[:-1] * t[1:] < 0).any(0).float().mean()),
        "not neighbours",
    )
    largest = lambda t: t.gather(0, t.abs().argmax(0, keepdim=True)).squeeze(0).sign()  # noqa: E731
    wrong(checks.check_elect, largest, "not only the largest entry")
    wrong(checks.check_cosine, lambda a, b: abs(_cos(a, b)), "keeps its sign")
    wrong(checks.check_lora_delta, lambda a, b, alpha, r: (alpha // r) * b @ a, "true division")


def _cos(a, b):
    x = torch.cat([a[k].flatten() for k in a])
    y = torch.cat([b[k].flatten() for k in a])
    return float(x @ y / (x.norm() * y.norm()))


def test_inputs_changed_in_place_are_caught():
    def share_in_place(tau, f):
        sq = tau.square_()
        return float(sq.topk(int(f * tau.numel())).values.sum() / sq.sum())

    wrong(checks.check_top_mass_share, share_in_place, "changed its input in place")

    def trim_in_place(tau, d):
        keep = trim(tau, d) != 0
        tau[~keep] = 0
        return tau

    wrong(checks.check_trim, trim_in_place, "changed its input in place")

    def disjoint_in_place(t, g):
        t[t.sign() != g] = 0
        return t.sum(0) / (t != 0).sum(0).clamp(min=1)

    wrong(checks.check_disjoint_mean, disjoint_in_place, "changed its input in place")
    wrong(
        checks.check_intra_balance,
        lambda m: m.mul_(m).mul_(m.shape[0]).exp_(),
        "changed its input in place",
    )

    def merge_in_place(shared, vectors, w):
        out = dict(shared)
        for t, v in enumerate(vectors):
            for k in out:
                out[k] += w[t] * v[k]
        return out

    wrong(checks.check_merge_with_weights, merge_in_place, "changed its input in place")

    def lora_in_place(a, b, alpha, r):
        b *= alpha / r
        return b @ a

    wrong(checks.check_lora_delta, lora_in_place, "changed its input in place")


def test_task_vector_dtypes_and_kept_keys():
    wrong(
        checks.check_task_vector,
        lambda p, f: {k: f[k] - p[k] for k in p if p[k].dtype == torch.float32},
        "float16",
    )
    wrong(
        checks.check_task_vector,
        lambda p, f: {k: f[k] - p[k] for k in p if p[k].dtype != torch.int64},
        "'step' int64, 'count' int32",
    )
    integer_list = lambda p, f: {  # noqa: E731 - uint8 is not in the list: it wraps around
        k: f[k] - p[k] for k in p if p[k].dtype not in (torch.int64, torch.int32)
    }
    wrong(checks.check_task_vector, integer_list, "a list of integer dtypes misses some")

    def deletes(p, f):
        for d in (p, f):
            for k in [k for k in d if not d[k].is_floating_point()]:
                del d[k]
        return {k: f[k] - p[k] for k in p}

    wrong(checks.check_task_vector, deletes, "do not delete keys")


def test_merge_weights_are_used_as_given_and_answers_in_the_asked_form():
    wrong(
        checks.check_merge_with_weights,
        lambda s, vs, w: {
            k: s[k] + sum((w / w.sum())[t] * v[k] for t, v in enumerate(vs)) for k in s
        },
        "not renormalized",
    )
    u = lambda m, r: torch.linalg.svd(m, full_matrices=False)  # noqa: E731
    as_list = lambda m, r: [u(m, r)[0][:, :r] * u(m, r)[1][:r], u(m, r)[2][:r]]  # noqa: E731
    assert checks.check_low_rank(as_list)  # a list of two factors is a fine answer
    wrong(checks.check_cosine, lambda a, b: None, "should return one number, got a NoneType")
    wrong(
        checks.check_conflict_rate,
        lambda t: ((t > 0).any(0) & (t < 0).any(0)).float(),
        r"one number, got a Tensor of shape \[5\]",
    )


def test_leaderboard_exercises_check_order_track_and_references():
    from course_lib.leaderboard import pareto_front

    wrong(checks.check_pareto_front, lambda p: sorted(pareto_front(p)), "wrong order")

    def any_track(rows, track, budget):
        fits = [r for r in rows if r["kind"] != "reference" and r["stored (models)"] <= budget]
        return max(fits, key=lambda r: r["normalized (%)"])["method"] if fits else None

    wrong(checks.check_best_under_budget, any_track, "expected 'PCB-Merging'")

    def by_name(rows, track, budget):
        fits = [
            r
            for r in rows
            if r["track"] == track and r["method"] != "experts" and r["stored (models)"] <= budget
        ]
        return max(fits, key=lambda r: r["normalized (%)"])["method"] if fits else None

    wrong(checks.check_best_under_budget, by_name, "'zero-shot' is a reference")


def test_plausible_wrong_answers_that_used_to_pass_are_caught():
    """Each of these was accepted by an earlier version of its checker (an adversarial review)."""
    not_positive = lambda t: float(((t > 0).any(0) & ~(t > 0).all(0)).float().mean())  # noqa: E731
    wrong(checks.check_conflict_rate, not_positive, "a zero has no sign")

    def count_then_mass(t):
        count = ((t > 0).sum(0) - (t < 0).sum(0)).sign().float()
        return torch.where(count != 0, count, t.sum(0).sign())

    wrong(checks.check_elect, count_then_mass, "not by the number")

    def elect_in_place(t):
        pos = t.clamp(min=0).sum(0)
        return (pos + t.clamp_(max=0).sum(0)).sign()

    wrong(checks.check_elect, elect_in_place, "in place")

    def strict_quantile(t, d):
        q = torch.quantile(t.abs(), 1 - d, dim=1, keepdim=True)
        return t * (t.abs() > q)

    wrong(checks.check_trim, strict_quantile, "does not give k")

    def own_gamma(trimmed, gamma):
        gamma = trimmed.sum(0).sign()
        agree = (trimmed.sign() == gamma) & (trimmed != 0)
        return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)

    wrong(checks.check_disjoint_mean, own_gamma, "use the gamma you are")

    def threshold(t, f):
        k = int(f * t.numel())
        kth = t.abs().kthvalue(t.numel() - k + 1).values
        return float((t[t.abs() >= kth] ** 2).sum() / (t**2).sum())

    wrong(checks.check_top_mass_share, threshold, "keeps every tied entry")

    def first_appearance(w):
        groups = {}
        for i, task in enumerate(w.argmax(-1).tolist()):
            groups.setdefault(task, []).append(i)
        return [(idx, w[idx].mean(0)) for idx in groups.values()]

    wrong(checks.check_route_groups, first_appearance, "not in order of appearance")

    def filters_in_place(rows, track, budget):
        rows[:] = [r for r in rows if r["track"] == track and r["kind"] != "reference"]
        fits = [r for r in rows if r["stored (models)"] <= budget]
        return max(fits, key=lambda r: r["normalized (%)"])["method"] if fits else None

    wrong(checks.check_best_under_budget, filters_in_place, "do not change the rows")

    by_position = lambda a, e: {  # noqa: E731
        t: 100 * x / y for t, x, y in zip(a, a.values(), e.values(), strict=True)
    }
    wrong(checks.check_normalized_accuracy, by_position, "by task name")
    capped = lambda a, e: {t: min(100.0, 100 * a[t] / e[t]) for t in a}  # noqa: E731
    wrong(checks.check_normalized_accuracy, capped, "do not cap at 100")
