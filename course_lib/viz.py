"""Every figure of the course, one function each.

Each function takes plain data (dicts, tensors, data frames), returns a ``matplotlib`` Figure
and never calls ``plt.show()``, so notebooks, slides and tests share them. Tests check the
returned axes (titles, labels, number of bars or cells), never the pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the notebook's inline backend; Agg elsewhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Table = Mapping[str, Mapping[str, float]]  # method -> task -> accuracy


def _frame(table: Table) -> pd.DataFrame:
    return pd.DataFrame({m: dict(r) for m, r in table.items()}).T


def accuracy_bars(table: Table, title: str = "Accuracy per task", ylabel: str = "accuracy (%)"):
    """Grouped bars: one group per task, one bar per method, plus the mean of each method."""
    df = _frame(table)
    df["mean"] = df.mean(axis=1)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * df.shape[1]), 3.6))
    width = 0.8 / len(df)
    x = np.arange(df.shape[1])
    colors = sns.color_palette("colorblind", len(df))
    for i, (method, row) in enumerate(df.iterrows()):
        ax.bar(
            x + (i - (len(df) - 1) / 2) * width, row.values, width, label=method, color=colors[i]
        )
    ax.set_xticks(x, df.columns, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=min(4, len(df)), loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    return fig


def method_heatmap(table: Table, title: str = "Accuracy (%) per method and task") -> Figure:
    """Methods x tasks heatmap with the numbers written in the cells."""
    df = _frame(table)
    fig, ax = plt.subplots(figsize=(1.0 * df.shape[1] + 2.5, 0.5 * len(df) + 1.2))
    sns.heatmap(df, annot=True, fmt=".1f", cmap="viridis", vmin=0, vmax=100, ax=ax, cbar=False)
    ax.set_title(title)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return fig


def lambda_curves(
    curves: Mapping[str, Mapping[float, float]],
    references: Mapping[str, float] | None = None,
    title: str = "Mean validation accuracy vs scaling lambda",
    xlabel: str = "scaling coefficient lambda",
) -> Figure:
    """One line per method (lambda -> mean accuracy); dashed horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=name)
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(curves) + i}", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cosine_heatmap(matrix, names: Sequence[str], title: str = "Cosine similarity of task vectors"):
    """Symmetric heatmap of pairwise cosine similarities."""
    return pair_heatmap(matrix, names, title, vmax=1.0)


def pair_heatmap(matrix, names: Sequence[str], title: str, vmax: float) -> Figure:
    """A tasks x tasks heatmap of one number per pair of tasks, from 0 (light) to ``vmax``."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(0.6 * len(names) + 2.2, 0.55 * len(names) + 1.2))
    sns.heatmap(
        m, annot=True, fmt=".2f", cmap="rocket_r", vmin=0, vmax=vmax, square=True,
        xticklabels=names, yticklabels=names, ax=ax, annot_kws={"fontsize": 7},
    )  # fmt: skip
    ax.set_title(title)
    fig.tight_layout()
    return fig


def disentanglement_heatmap(
    xi, alphas: Sequence[float], names: Sequence[str], title: str = "Disentanglement error ξ"
) -> Figure:
    """ξ(α₁, α₂) of two task vectors over a grid of coefficients: rows α for ``names[0]``,
    columns α for ``names[1]``, low (light) where the two edits do not disturb each other."""
    m = np.asarray(xi, dtype=float)
    labels = [f"{a:g}" for a in alphas]
    fig, ax = plt.subplots(figsize=(0.55 * len(alphas) + 2.4, 0.5 * len(alphas) + 1.4))
    sns.heatmap(
        m, annot=True, fmt=".2f", cmap="rocket_r", vmin=0, vmax=2, square=True,
        xticklabels=labels, yticklabels=labels, ax=ax, annot_kws={"fontsize": 7},
    )  # fmt: skip
    ax.invert_yaxis()  # α₁ grows upwards, as in a plot of the plane
    ax.set_xlabel(f"α for {names[1]}")
    ax.set_ylabel(f"α for {names[0]}")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def mass_curves(fractions: Sequence[float], curves: Mapping[str, Sequence[float]]) -> Figure:
    """Share of ||tau||^2 held by the top fraction of entries, one line per task vector."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pct = [100 * f for f in fractions]
    for name, ys in curves.items():
        ax.plot(pct, [100 * y for y in ys], marker=".", label=name)
    ax.plot(pct, pct, ls=":", color="gray", label="if every entry mattered equally")
    ax.set_xscale("log")
    ax.set_xlabel("top entries kept (% of the task vector, by magnitude)")
    ax.set_ylabel("share of ||tau||^2 (%)")
    ax.set_title("Redundancy: a few entries carry most of the change")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def conflict_bars(series: Mapping[str, Mapping[str, float]]) -> Figure:
    """Sign-conflict rate per layer group; one bar series per setting (e.g. raw vs trimmed)."""
    df = pd.DataFrame(series)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    (df * 100).plot.bar(ax=ax, rot=30, width=0.8)
    ax.set_ylabel("positions with a sign conflict (%)")
    ax.set_title("Sign conflicts between the task vectors, per layer")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


def tensor_steps(steps: Mapping[str, object], title: str = "") -> Figure:
    """A row of small annotated heatmaps: the same [T, n] (or [n]) tensor after each step."""
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 2.4), squeeze=False)
    arrays = {k: np.atleast_2d(np.asarray(v, dtype=float)) for k, v in steps.items()}
    vmax = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    for ax, (name, a) in zip(axes[0], arrays.items(), strict=True):
        sns.heatmap(
            a, annot=True, fmt=".2g", cmap="RdBu_r", vmin=-vmax, vmax=vmax, cbar=False, ax=ax,
            annot_kws={"fontsize": 8}, xticklabels=False,
            yticklabels=[f"task {i}" for i in range(a.shape[0])] if a.shape[0] > 1 else False,
        )  # fmt: skip
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def histogram(values: Mapping[str, object], title: str, xlabel: str, log: bool = True) -> Figure:
    """Overlaid histograms of a few 1-D samples (e.g. PCB scores of kept vs dropped entries)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, v in values.items():
        ax.hist(np.asarray(v, dtype=float).ravel(), bins=60, alpha=0.6, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rank_curve(
    ratios: Sequence[float], accuracy: Sequence[float], storage: Sequence[float], expert: float
) -> Figure:
    """Twin-Merging: mean accuracy and stored parameters vs the SVD rank ratio."""
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    ax.plot(ratios, accuracy, marker="o", color="C0", label="Twin-Merging accuracy")
    ax.axhline(expert, ls="--", color="C2", label="experts (upper bound)")
    ax.set_xlabel("rank ratio kept by the SVD")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title("Compression of the twin vectors")
    ax2 = ax.twinx()
    ax2.plot(ratios, [100 * s for s in storage], marker="s", color="C3", label="storage")
    ax2.set_ylabel("stored / dense parameters (%)", color="C3")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def confusion(matrix, names: Sequence[str], title: str = "Router: true task vs chosen task"):
    """Row-normalized confusion matrix in percent."""
    m = np.asarray(matrix, dtype=float)
    m = 100 * m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(0.6 * len(names) + 2.4, 0.55 * len(names) + 1.4))
    sns.heatmap(
        m, annot=True, fmt=".0f", cmap="Blues", vmin=0, vmax=100, square=True, cbar=False,
        xticklabels=names, yticklabels=names, ax=ax, annot_kws={"fontsize": 7},
    )  # fmt: skip
    ax.set_xlabel("task chosen by the router (argmax weight)")
    ax.set_ylabel("true task")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid(images, labels: Sequence[str], ncols: int = 8, title: str = "") -> Figure:
    """Images ``[N, H, W, 3]`` in [0, 1] with a caption each."""
    n = len(images)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, lab in zip(axes.ravel(), images, labels, strict=False):
        ax.imshow(np.asarray(img))
        ax.set_title(lab, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def training_curves(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """LoRA fine-tuning: training loss per step (left) and validation accuracy (right), per
    task; ``histories[task]`` holds ``loss``, ``val_step`` and ``val_accuracy``."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for i, (task, h) in enumerate(histories.items()):
        ax1.plot(range(1, len(h["loss"]) + 1), h["loss"], color=f"C{i}", label=task)
        ax2.plot(h["val_step"], h["val_accuracy"], marker="o", color=f"C{i}", label=task)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss on the answer tokens")
    ax1.set_title("Training loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("exact match on validation (%)")
    ax2.set_ylim(-3, 103)
    ax2.set_title("Validation accuracy (best step kept)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def radar(table: Table, title: str = "Score per task (%)") -> Figure:
    """One closed polygon per method over the tasks (a radar or spider chart), 0-100 radially."""
    df = _frame(table)
    angles = np.linspace(0, 2 * np.pi, df.shape[1], endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    fig, ax = plt.subplots(figsize=(5.2, 5.2), subplot_kw={"polar": True})
    for i, (method, row) in enumerate(df.iterrows()):
        values = np.clip(row.to_numpy(dtype=float), 0, 110)
        ax.plot(closed, np.concatenate([values, values[:1]]), color=f"C{i}", label=method)
        ax.fill(closed, np.concatenate([values, values[:1]]), color=f"C{i}", alpha=0.08)
    ax.set_xticks(angles, df.columns, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_yticks([25, 50, 75, 100], ["25", "50", "75", "100"], fontsize=7)
    ax.set_title(title, pad=18)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    return fig


def _spread(values: Sequence[float], gap: float) -> list[float]:
    """Label positions near ``values`` (any order) that are at least ``gap`` apart."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    last = -np.inf
    for i in order:
        out[i] = last = max(values[i], last + gap)
    return out


def cost_scatter(
    points: Mapping[tuple[str, str], tuple[float, float]],
    title: str = "What each method costs and what it keeps",
) -> Figure:
    """Stored parameters (x, log scale, in units of one model) vs normalized mean score (y);
    ``points[(track, method)] = (stored, normalized)``, one panel per track. Labels of points
    with similar costs are stacked apart and joined to their point by a thin line."""
    tracks = list(dict.fromkeys(track for track, _ in points))
    fig, axes = plt.subplots(
        1, len(tracks), figsize=(4.4 * len(tracks), 4.4), sharey=True, squeeze=False
    )
    for i, (ax, track) in enumerate(zip(axes[0], tracks, strict=True)):
        mine = sorted(((xy, m) for (t, m), xy in points.items() if t == track))
        colour = f"C{i}"
        ax.scatter([x for (x, _), _ in mine], [y for (_, y), _ in mine], s=40, color=colour)
        groups: list[list[int]] = []
        for j, ((x, _), _) in enumerate(mine):  # consecutive costs within a factor 1.5
            if groups and x <= 1.5 * mine[groups[-1][0]][0][0]:
                groups[-1].append(j)
            else:
                groups.append([j])
        for idx in groups:
            label_x = 1.12 * max(mine[j][0][0] for j in idx)
            label_y = _spread([mine[j][0][1] for j in idx], gap=5.5)
            for j, ly in zip(idx, label_y, strict=True):
                (x, y), method = mine[j]
                ax.annotate(
                    method, (x, y), xytext=(label_x, ly), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5},
                )  # fmt: skip
        xmax = max(x for (x, _), _ in mine)
        ticks = [v for v in (1, 1.5, 2, 3, 4, 6, 8, 16, 32) if v <= 1.5 * xmax]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
        ax.set_xlim(0.9, 4.0 * xmax)
        ax.set_ylim(-5, 115)
        ax.set_title(f"{track} track", fontsize=10)
        ax.set_xlabel("stored (× one model, log scale)")
    axes[0][0].set_ylabel("normalized mean score (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
