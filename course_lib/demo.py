"""A small, real end-to-end merge: digit classifiers under four input distortions.

This is the course's first main job (``make course``) until the mini-CLIP world exists. Every
number it prints is computed on the spot, in about a minute on two CPU cores:

* data: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, offline);
* theta_0: an MLP (64 -> 128 -> 128 -> 10) trained on the *undistorted* digits;
* four tasks: the same digits rotated by 90 degrees, mirrored, colour-inverted and transposed;
* experts: theta_0 fine-tuned on each task with the classification head frozen (the
  task_vectors recipe: AdamW, cosine schedule, small lr), only the body changes;
* merges of the four bodies with every method of :mod:`course_lib.merging`, lambdas chosen on a
  validation split, and Twin-Merging routed per input by a router trained on validation inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from course_lib.config import seed_everything
from course_lib.merging import (
    Router,
    compress,
    merge_with_weights,
    pcb_merging,
    search_scaling,
    shared_expert,
    task_arithmetic,
    ties_merging,
    train_router,
    twin_vectors,
    weight_average,
)

TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "rotate90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "mirror": lambda x: torch.flip(x, dims=(-1,)),
    "invert": lambda x: 1.0 - x,
    "transpose": lambda x: x.transpose(-2, -1),
}
BODY = r"^body\."


def make_model() -> nn.Module:
    body = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU()
    )
    return _Net(body)


class _Net(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def load_digits_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Train / val / test splits (60/20/20) of sklearn's digits, images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


def fit(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, params=None, seed: int = 0
) -> None:
    """AdamW with a cosine schedule, mini-batches of 64."""
    gen = torch.Generator().manual_seed(seed)
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    model.load_state_dict(state)
    return float((model(x).argmax(-1) == y).float().mean()) * 100


def run(seed: int = 0, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Train theta_0 and the experts, merge them every way, return accuracy per method and task."""
    seed_everything(seed)
    say = print if verbose else (lambda *a, **k: None)
    splits = load_digits_splits(seed)
    data = {t: {s: (f(x), y) for s, (x, y) in splits.items()} for t, f in TASKS.items()}

    model = make_model()
    fit(model, *splits["train"], epochs=30, lr=3e-3, seed=seed)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    say("pretrained theta_0 on undistorted digits")

    experts = []
    for i, task in enumerate(TASKS):
        model.load_state_dict(theta0)
        fit(
            model,
            *data[task]["train"],
            epochs=20,
            lr=1e-3,
            params=model.body.parameters(),
            seed=seed + i,
        )
        experts.append({k: v.clone() for k, v in model.state_dict().items()})
    say(f"fine-tuned {len(experts)} experts (body only, head frozen)")

    def scores(state: Mapping[str, Tensor], split: str = "test") -> dict[str, float]:
        return {t: accuracy(model, state, *data[t][split]) for t in TASKS}

    def mean_val(state: Mapping[str, Tensor]) -> float:
        s = scores(state, "val")
        return sum(s.values()) / len(s)

    table: dict[str, dict[str, float]] = {"zero-shot (theta_0)": scores(theta0)}
    table["experts (each on its task)"] = {
        t: scores(e)[t] for t, e in zip(TASKS, experts, strict=True)
    }
    table["weight average"] = scores(weight_average(experts, keys=BODY))
    ta = search_scaling(
        lambda s: mean_val(task_arithmetic(theta0, experts, s, keys=BODY)), len(experts)
    )
    table[f"task arithmetic (lambda={ta.best_scaling[0]:g})"] = scores(
        task_arithmetic(theta0, experts, ta.best_scaling, keys=BODY)
    )
    ties_grid = [round(0.5 + 0.1 * i, 2) for i in range(16)]
    ties = search_scaling(
        lambda s: mean_val(ties_merging(theta0, experts, 0.2, s[0], keys=BODY)),
        len(experts),
        grid=ties_grid,
    )
    table[f"TIES (k=20%, lambda={ties.best_scaling[0]:g})"] = scores(
        ties_merging(theta0, experts, 0.2, ties.best_scaling[0], keys=BODY)
    )
    pcb = search_scaling(
        lambda s: mean_val(pcb_merging(theta0, experts, 0.1, s, keys=BODY)),
        len(experts),
        grid=ties_grid,
    )
    table[f"PCB (r=10%, lambda={pcb.best_scaling[0]:g})"] = scores(
        pcb_merging(theta0, experts, 0.1, pcb.best_scaling, keys=BODY)
    )
    say("merged with weight averaging, task arithmetic, TIES and PCB (lambda from val)")

    shared = shared_expert(theta0, experts, keys=BODY)
    vectors = compress(twin_vectors(shared, experts, keys=BODY), rank_ratio=0.25)
    model.load_state_dict(theta0)
    with torch.no_grad():
        feats = {t: {s: model.body(x) for s, (x, _) in data[t].items()} for t in TASKS}
    router = Router(128, len(TASKS), hidden=64, dropout=0.1)
    val_x = torch.cat([feats[t]["val"] for t in TASKS])
    val_y = torch.cat([torch.full((len(feats[t]["val"]),), i) for i, t in enumerate(TASKS)])
    train_router(router, val_x, val_y, epochs=60, lr=3e-3, batch_size=64, seed=seed, progress=False)
    twin = {}
    for t in TASKS:
        x, y = data[t]["test"]
        weights = router.weights(feats[t]["test"])
        correct = 0
        for xi, yi, wi in zip(x, y, weights, strict=True):
            model.load_state_dict(merge_with_weights(shared, vectors, wi))
            with torch.no_grad():
                correct += int(model(xi[None]).argmax(-1).item() == yi.item())
        twin[t] = 100.0 * correct / len(y)
    table["Twin-Merging (rank 25%, per input)"] = twin
    say("Twin-Merging: shared expert + SVD twin vectors routed per test input")
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: absolute accuracy per task, mean, and normalized mean (vs the experts)."""
    tasks = list(next(iter(table.values())))
    expert = next(v for k, v in table.items() if k.startswith("experts"))
    head = "| method | " + " | ".join(tasks) + " | mean | normalized |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, row in table.items():
        mean = sum(row.values()) / len(row)
        norm = sum(row[t] / expert[t] for t in tasks) / len(tasks) * 100
        cells = " | ".join(f"{row[t]:.1f}" for t in tasks)
        lines.append(f"| {name} | {cells} | {mean:.1f} | {norm:.1f} |")
    return "\n".join(lines)
