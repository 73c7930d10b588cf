"""Draw the figures of the slide decks (slides/*.md) with ``course_lib.viz``.

Every figure comes from a function of ``course_lib.viz`` called on small, seeded inputs that need
no model zoo: the TIES and PCB steps on the 3 x 6 example of notebooks 03-04, toy task vectors
for redundancy, sign conflicts and cosines, a seeded low-rank-plus-noise twin vector for the SVD
curve, a toy router, tiny LoRA factors, and the *published* ViT-B/32 table of
``course_lib.published``. Nothing here is a measurement of the course's own models, so the decks
never go stale; the notebooks and ``results/`` hold the measured numbers.

A deck refers to a figure as ``figures/<name>.png``; :data:`FIGURES` lists every name.

Usage::

    python tools/slide_figures.py                          # all figures -> build/slides/figures/
    python tools/slide_figures.py ties_steps --out /tmp/f  # one figure elsewhere
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before course_lib.viz, which keeps whatever backend is active

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from course_lib import viz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "slides" / "figures"
DPI = 100
SEED = 0

FIGURES: dict[str, Callable[[], Figure]] = {}  # file name (without .png) -> drawing function

# The 3 x 6 task-vector example of notebooks 03 (TIES) and 04 (PCB): rows are tasks.
TOY_TAU = torch.tensor(
    [
        [0.9, -0.1, 0.3, -0.7, 0.05, 0.2],
        [-0.8, 0.4, 0.25, -0.6, 0.0, -0.3],
        [0.2, 0.5, -0.35, 0.1, -0.9, 0.15],
    ]
)
TOY_NAMES = list("ABCDEFGH")


def figure(name: str):
    """Register a drawing function under the figure's file name."""

    def register(fn: Callable[[], Figure]) -> Callable[[], Figure]:
        FIGURES[name] = fn
        return fn

    return register


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _row_labels(fig: Figure, prefix: str = "row") -> Figure:
    """``viz.tensor_steps`` names the rows "task i"; a matrix's rows are rows."""
    for ax in fig.axes:
        labels = ax.get_yticklabels()
        if len(labels) > 1:
            ax.set_yticklabels([f"{prefix} {i}" for i in range(len(labels))], rotation=0)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- 00 setup and zoo
@figure("tasks_grid")
def tasks_grid() -> Figure:
    """Two test images of each of the eight mini tasks (drawn from seed 0, no zoo needed)."""
    from course_lib.data.vision import load_tasks

    tasks = load_tasks("mini", sizes={"train": 40, "val": 40, "test": 40})
    images, labels = [], []
    for cls in (0, 1):
        for name, task in tasks.items():
            first = int(np.flatnonzero(task.labels("test").numpy() == cls)[0])
            x, _ = next(task.batches("test", 40))
            images.append(((x[first].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            labels.append(f"{name}\n{task.classnames[cls]}")
    return viz.image_grid(images, labels, ncols=8, title="The eight mini tasks, two classes each")


@figure("published_zero_shot_vs_experts")
def published_zero_shot_vs_experts() -> Figure:
    from course_lib.published import vit_b32_table

    table = vit_b32_table()
    return viz.accuracy_bars(
        {"zero-shot θ₀": table["zero-shot"], "one expert per task": table["experts"]},
        title="Published: CLIP ViT-B/32, zero-shot vs experts (top-1 %)",
    )


# ----------------------------------------------------------------------------- 01 task vectors
@figure("task_vector_steps")
def task_vector_steps() -> Figure:
    """tau = theta_t - theta_0 on six weights, then addition and negation."""
    from course_lib.state import task_vector

    g = _gen(1)
    theta0 = {"w": torch.randn(6, generator=g).mul(0.6).round(decimals=2)}
    theta_t = {"w": (theta0["w"] + torch.randn(6, generator=g).mul(0.5)).round(decimals=2)}
    tau = task_vector(theta0, theta_t)
    return viz.tensor_steps(
        {
            "θ₀ (pretrained)": theta0["w"],
            "θₜ (expert)": theta_t["w"],
            "τₜ = θₜ − θ₀": tau["w"],
            "θ₀ + 0.5·τₜ": tau.apply_to(theta0, 0.5)["w"],
            "θ₀ − τₜ (negation)": (-tau).apply_to(theta0)["w"],
        },
        title="A task vector on six weights (toy numbers)",
    )


@figure("toy_cosines")
def toy_cosines() -> Figure:
    """Eight seeded random task vectors in 20,000 dimensions; A and B share a direction."""
    from course_lib.analysis import cosine_matrix
    from course_lib.state import TaskVector

    g = _gen(2)
    shared = torch.randn(20_000, generator=g)
    vectors = []
    for i in range(8):
        v = torch.randn(20_000, generator=g)
        if i < 2:
            v = v + 0.8 * shared
        vectors.append(TaskVector({"enc.weight": v[:16_000].reshape(160, 100), "out": v[16_000:]}))
    return viz.cosine_heatmap(
        cosine_matrix(vectors).abs(),
        TOY_NAMES,
        title="Toy: |cosine| of 8 random task vectors\n(A and B share a direction)",
    )


# ----------------------------------------------------------------------------- 02 interference
@figure("toy_mass_curves")
def toy_mass_curves() -> Figure:
    from course_lib.analysis import mass_curve
    from course_lib.state import TaskVector

    g = _gen(3)
    n = 50_000
    samples = {
        "Gaussian entries": torch.randn(n, generator=g),
        "Laplace entries": torch.distributions.Laplace(0.0, 1.0).sample((n,)),
        "Student-t entries (df 2)": torch.distributions.StudentT(2.0).sample((n,)),
    }
    fractions = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0]
    curves = {k: mass_curve(TaskVector({"w": v}), fractions) for k, v in samples.items()}
    fig = viz.mass_curves(fractions, curves)
    fig.axes[0].set_title("Redundancy in toy vectors: heavy tails put the mass in few entries")
    return fig


@figure("toy_sign_conflicts")
def toy_sign_conflicts() -> Figure:
    """Eight toy task vectors per layer; the layers' tasks agree more and more."""
    from course_lib.analysis import sign_conflicts

    g = _gen(4)
    agreement = [0.0, 0.4, 0.8, 1.6]
    pretrained = {f"layers.{i}.weight": torch.zeros(48, 48) for i in range(len(agreement))}
    common = {k: torch.randn(48, 48, generator=g) for k in pretrained}
    finetuned = [
        {
            k: a * common[k] + torch.randn(48, 48, generator=g)
            for a, k in zip(agreement, pretrained, strict=True)
        }
        for _ in range(8)
    ]
    fig = viz.conflict_bars(
        {
            "all entries": sign_conflicts(pretrained, finetuned),
            "after trim (top 20% per task)": sign_conflicts(pretrained, finetuned, density=0.2),
        }
    )
    fig.axes[0].set_title("Toy: sign conflicts of 8 task vectors (deeper layers agree more)")
    return fig


@figure("toy_disentanglement")
def toy_disentanglement() -> Figure:
    """Disentanglement error of a linear toy model with two tasks on their own input features:
    tau_1 also leaks a little into task 2's features, so xi stays low except where task 2's own
    vector is weak or absent (around the column alpha_2 = 0)."""
    from course_lib.analysis import disentanglement_error
    from course_lib.state import TaskVector

    g = _gen(5)
    inputs = {t: torch.zeros(400, 4) for t in ("task 1", "task 2")}
    inputs["task 1"][:, :2] = torch.randn(400, 2, generator=g)
    inputs["task 2"][:, 2:] = torch.randn(400, 2, generator=g)
    theta0 = {"w": torch.randn(3, 4, generator=g)}
    tau1, tau2 = torch.zeros(3, 4), torch.zeros(3, 4)
    tau1[:, :2] = 2 * torch.randn(3, 2, generator=g)
    tau1[:, 2:] = 0.3 * torch.randn(3, 2, generator=g)  # the leak into task 2's features
    tau2[:, 2:] = 2 * torch.randn(3, 2, generator=g)
    vectors = {"task 1": TaskVector({"w": tau1}), "task 2": TaskVector({"w": tau2})}

    def predict(state, task):
        return (inputs[task] @ state["w"].T).argmax(dim=1)

    alphas = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    xi = disentanglement_error(predict, theta0, vectors, alphas, progress=False)
    return viz.disentanglement_heatmap(
        xi, alphas, list(vectors), title="Toy: τ₁ leaks a little into task 2's features"
    )


# ----------------------------------------------------------------------------- 03 TIES
@figure("ties_steps")
def ties_steps() -> Figure:
    from course_lib.merging.ties import disjoint_merge, elect, trim

    trimmed = trim(TOY_TAU, density=0.5)
    gamma = elect(trimmed)
    return viz.tensor_steps(
        {
            "task vectors τ": TOY_TAU,
            "1. trim (top 50%)": trimmed,
            "2. elect: sign γ": gamma,
            "3. disjoint_merge": disjoint_merge(trimmed, gamma),
            "plain mean of τ": TOY_TAU.mean(0),
        }
    )


# ----------------------------------------------------------------------------- 04 PCB
def _pcb_toy() -> dict[str, torch.Tensor]:
    """PCB's steps on the 3 x 6 example (no clipping; keep the top half of each row)."""
    from course_lib.merging.pcb import (
        drop_weights,
        inter_balance,
        intra_balance,
        normalized_magnitude,
        rescale_merge,
    )

    lo, hi = torch.zeros(3), TOY_TAU.abs().amax(dim=1)
    m, tau_c = normalized_magnitude(TOY_TAU, lo, hi)
    intra, inter = intra_balance(m), inter_balance(TOY_TAU, m)
    beta = intra * inter
    w = drop_weights(beta, beta.quantile(0.5, dim=1), beta.amax(dim=1))
    merged = rescale_merge(tau_c, w, [1.0, 1.0, 1.0])
    return {"intra": intra, "inter": inter, "beta": beta, "w": w, "merged": merged}


@figure("pcb_scores")
def pcb_scores() -> Figure:
    s = _pcb_toy()
    return viz.tensor_steps(
        {
            "task vectors τ": TOY_TAU,
            "intra_balance: exp(N m²)": s["intra"],
            "inter_balance: Σⱼ tanh(uᵢuⱼ)": s["inter"],
            "β = intra · inter": s["beta"],
        }
    )


@figure("pcb_merge")
def pcb_merge() -> Figure:
    s = _pcb_toy()
    return viz.tensor_steps(
        {
            "task vectors τ": TOY_TAU,
            "drop: weights w (top 50% of β)": s["w"],
            "rescale: Σ w τ / Σ w": s["merged"],
            "plain mean of τ": TOY_TAU.mean(0),
        }
    )


@figure("pcb_scores_hist")
def pcb_scores_hist() -> Figure:
    """PCB scores of the first of 8 toy task vectors, kept (top 10%) vs dropped."""
    from course_lib.merging.pcb import balance

    g = _gen(5)
    common = torch.randn(4096, generator=g)
    stack = torch.stack(
        [0.5 * common + torch.distributions.StudentT(3.0).sample((4096,)) for _ in range(8)]
    )
    a = stack.abs()
    beta, _ = balance(stack, a.quantile(0.01, dim=1), a.quantile(0.99, dim=1))
    cut = beta[0].quantile(0.9)
    return viz.histogram(
        {"dropped (below the 90th percentile)": beta[0][beta[0] < cut], "kept (top 10%)": beta[0][beta[0] >= cut]},
        title="Toy: PCB scores β of one task vector (8 tasks)",
        xlabel="β = intra_balance · inter_balance",
    )  # fmt: skip


# ----------------------------------------------------------------------------- 05 Twin-Merging
@figure("twin_rank_curve")
def twin_rank_curve() -> Figure:
    """Truncated SVD of a seeded low-rank-plus-noise twin vector: energy kept and storage."""
    from course_lib.merging.twin import compress

    g = _gen(6)
    shapes = {"layers.0.weight": (64, 64), "layers.1.weight": (128, 64), "layers.1.bias": (128,)}
    vector = {}
    for key, shape in shapes.items():
        if len(shape) == 2:
            u, v = torch.randn(shape[0], 4, generator=g), torch.randn(4, shape[1], generator=g)
            vector[key] = u @ v / 4 + 0.25 * torch.randn(shape, generator=g)
        else:
            vector[key] = 0.25 * torch.randn(shape, generator=g)
    total = sum(float(t.square().sum()) for t in vector.values())
    ratios = [0.02, 0.05, 0.1, 0.2, 0.3, 0.45]
    kept, storage = [], []
    for r in ratios:
        (c,) = compress([vector], rank_ratio=r)
        err = sum(float((c[k] - vector[k]).square().sum()) for k in vector)
        kept.append(100 * (1 - err / total))
        storage.append(c.compression)
    fig = viz.rank_curve(ratios, kept, storage, expert=100.0)
    ax, ax2 = fig.axes
    ax.set_ylabel("share of ||v||² kept (%)")
    ax.set_title("Toy: compressing a twin vector (rank 4 + noise)")
    ax.lines[0].set_label("energy kept by the SVD")
    ax.lines[1].set_label("dense twin vector")
    ax2.lines[0].set_label("stored / dense parameters")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    return fig


@figure("twin_router_confusion")
def twin_router_confusion() -> Figure:
    """The course's Router trained on 8 seeded Gaussian clusters (A and B overlap)."""
    from course_lib.merging.twin import Router, train_router

    g = _gen(7)
    centres = 2.5 * torch.randn(8, 8, generator=g)
    centres[1] = centres[0] + 0.8 * torch.randn(8, generator=g)  # two tasks that look alike

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(8).repeat_interleave(n)
        return centres[y] + torch.randn(8 * n, 8, generator=g), y

    torch.manual_seed(SEED)
    router = Router(8, 8, hidden=32)
    x, y = sample(60)
    train_router(router, x, y, val=sample(20), epochs=30, batch_size=64, progress=False)
    xt, yt = sample(50)
    chosen = router.weights(xt).argmax(dim=-1)
    counts = torch.zeros(8, 8)
    counts.index_put_((yt, chosen), torch.ones(len(yt)), accumulate=True)
    return viz.confusion(counts, TOY_NAMES, title="Toy router: true task vs chosen task")


# ----------------------------------------------------------------------------- 06 LLM merging
def _toy_lora_experts(count: int, out: int = 4, rank: int = 2, inp: int = 5):
    from course_lib.models.lora import LoraExpert

    g = _gen(8)
    return [
        LoraExpert(
            f"task {t}",
            {"w": (torch.randn(rank, inp, generator=g) * 0.5, torch.randn(out, rank, generator=g))},
            scale=1.0,  # alpha / r
        )
        for t in range(count)
    ]


@figure("lora_delta")
def lora_delta() -> Figure:
    (expert,) = _toy_lora_experts(1)
    a, b = expert.factors["w"]
    fig = viz.tensor_steps(
        {"B [4×2]": b, "A [2×5]": a, "τ = (α/r)·B·A [4×5]": expert.delta()["w"]},
        title="A LoRA expert is a rank-r task vector (toy factors, α/r = 1)",
    )
    return _row_labels(fig)


@figure("lora_factor_vs_delta")
def lora_factor_vs_delta() -> Figure:
    from course_lib.models.lora import factor_merge

    experts = _toy_lora_experts(3)
    dense = 0.3 * sum(e.delta()["w"] for e in experts)
    factors = factor_merge(experts, scaling=0.3)["w"]
    fig = viz.tensor_steps(
        {
            "ΔW space: 0.3·Σₜ BₜAₜ": dense,
            "factor space: B*·A*": factors,
            "difference (cross terms BₛAₜ)": factors - dense,
        },
        title="Merging 3 toy LoRA experts: dense updates vs factors",
    )
    return _row_labels(fig)


# ----------------------------------------------------------------------------- 07 capstone
@figure("published_heatmap")
def published_heatmap() -> Figure:
    from course_lib.published import vit_b32_table

    # No mean column: the mean of the rounded per-task numbers can differ by 0.1 from the
    # averages the papers print (and the slides quote).
    return viz.method_heatmap(
        vit_b32_table(), title="Published: CLIP ViT-B/32, 8 tasks, top-1 % (not run here)"
    )


@figure("published_radar")
def published_radar() -> Figure:
    """Published static merges, each task normalized by the published expert (100 = expert)."""
    from course_lib.published import vit_b32_table

    table = vit_b32_table()
    experts = table["experts"]
    merges = ("weight averaging", "task arithmetic", "TIES-Merging", "PCB-Merging")
    normalized = {m: {t: 100 * table[m][t] / experts[t] for t in experts} for m in merges}
    return viz.radar(normalized, "Published ViT-B/32: % of the expert, per task")


# ----------------------------------------------------------------------------- writing
def write(names: list[str] | None = None, out: Path = OUT, dpi: int = DPI) -> list[Path]:
    """Draw the named figures (default: all) into ``out`` as ``<name>.png``; return the paths."""
    import matplotlib.pyplot as plt

    unknown = sorted(set(names or []) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and vary the numbers)
    paths = []
    for name in names or list(FIGURES):
        torch.manual_seed(SEED)  # the distributions' .sample() use the global generator
        fig = FIGURES[name]()
        path = out / f"{name}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"figures to draw (default: all of {len(FIGURES)})")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--dpi", type=int, default=DPI)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = write(args.names or None, args.out, args.dpi)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{len(paths)} figures in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
