"""Evaluation: accuracy per task, absolute and normalized, and the results tables.

Absolute accuracy is top-1 accuracy in percent. *Normalized* accuracy divides a merged model's
accuracy on task t by the accuracy of task t's own expert (Yadav et al., 2023, App.; Lu et al.,
2024, Sec. 5): 100 means "as good as keeping the expert". Both are reported per task and as the
mean over tasks (reference ``algorithms.md`` section 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from course_lib.data.base import VisionTask

# Images per forward pass when evaluating. Smaller batches stay in the CPU's caches: the mini
# encoder read the eight test sets in 2.4 s with 128 against 3.2 s with 512 (2 cores, one A/B
# run), with the same predictions.
EVAL_BATCH_SIZE = 128


@torch.no_grad()
def predictions(
    model: nn.Module,
    task: VisionTask,
    split: str = "test",
    *,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(predicted, true)`` labels of a classifier (a module mapping pixels to logits).

    The model is moved to ``device`` (all of it: a zero-shot head is a buffer of the classifier,
    and an encoder already on the GPU with its head left on the CPU cannot run).
    """
    model.to(device).eval()
    preds, labels = [], []
    for x, y in task.batches(split, batch_size, limit=limit):
        preds.append(model(x.to(device)).argmax(dim=-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(
    model: nn.Module,
    task: VisionTask,
    split: str = "test",
    *,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy in percent."""
    pred, true = predictions(model, task, split, device=device, batch_size=batch_size, limit=limit)
    return 100.0 * float((pred == true).float().mean())


def normalized(accs: Mapping[str, float], expert_accs: Mapping[str, float]) -> dict[str, float]:
    """Per-task normalized accuracy: 100 * acc_t / expert_acc_t."""
    missing = set(accs) - set(expert_accs)
    if missing:
        raise ValueError(f"no expert accuracy for tasks {sorted(missing)}")
    zero = [t for t in accs if expert_accs[t] == 0]
    if zero:
        raise ValueError(
            f"the expert of {zero[0]!r} scores 0%: normalized accuracy (acc / expert acc) is "
            "undefined there; report absolute accuracy for that task"
        )
    return {t: 100.0 * a / expert_accs[t] for t, a in accs.items()}


def results_table(
    rows: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str] | None = None,
    *,
    normalize_by: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """A methods x tasks table with an ``avg`` column; normalized when ``normalize_by`` is given."""
    tasks = list(tasks) if tasks is not None else list(next(iter(rows.values())))
    data = {}
    for method, accs in rows.items():
        missing = [t for t in tasks if t not in accs]
        if missing:
            raise ValueError(f"method {method!r} has no accuracy for tasks {missing}")
        vals = {t: accs[t] for t in tasks}
        if normalize_by is not None:
            vals = normalized(vals, normalize_by)
        data[method] = {**vals, "avg": sum(vals.values()) / len(vals)}
    return pd.DataFrame.from_dict(data, orient="index")[[*tasks, "avg"]]


def markdown(df: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub-markdown table (no extra dependency such as ``tabulate``)."""
    cols = ["method", *df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * len(df.columns) + "|"]
    for name, row in df.iterrows():
        cells = [f"{v:.{digits}f}" for v in row.to_numpy()]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines)
