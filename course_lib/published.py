"""Published numbers, kept apart from anything this course measures.

Every table here is a figure printed in a paper (or reprinted in a later paper's README), not a
result of our code. Notebooks, slides and the leaderboard show them *labelled as published*,
next to the mini profile's own measurements, never mixed into them.

Source of the ViT-B/32 table: the AdaMerging paper (Yang et al., ICLR 2024) for the rows
zero-shot through TIES, as reprinted in the WUDI-Merging (ICML 2025) README; the PCB row is the
PCB paper's per-task appendix table (Du et al., NeurIPS 2024), reprinted in the same README.
Task arithmetic uses lambda = 0.3; TIES is the TIES paper's no-validation setting (k = 20,
lambda = 1). Checkpoints: the task_vectors OpenCLIP ViT-B/32 fine-tunes. Twin-Merging's own
vision table could not be retrieved; third-party re-runs report 83.1-87.8 average (indicative).
"""

from __future__ import annotations

VIT_B32_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")

VIT_B32_SOURCE = (
    "published: AdaMerging (ICLR 2024) and PCB-Merging (NeurIPS 2024) tables, reprinted in the "
    "WUDI-Merging README; CLIP ViT-B/32, task_vectors checkpoints, absolute top-1 %"
)

# Absolute top-1 accuracy (%) on the eight test sets, in VIT_B32_TASKS order.
VIT_B32: dict[str, tuple[float, ...]] = {
    "zero-shot": (62.3, 59.7, 60.7, 45.5, 31.4, 32.6, 48.5, 43.8),
    "experts": (75.3, 77.7, 96.1, 99.7, 97.5, 98.7, 99.7, 79.4),
    "weight averaging": (65.3, 63.4, 71.4, 71.7, 64.2, 52.8, 87.5, 50.1),
    "task arithmetic": (55.2, 54.9, 66.7, 78.9, 80.2, 69.7, 97.3, 50.4),
    "TIES-Merging": (59.8, 58.6, 70.7, 79.7, 86.2, 72.1, 98.3, 54.2),
    "PCB-Merging": (66.7, 65.5, 78.5, 79.3, 86.4, 77.1, 98.2, 59.1),
}

# Twin-Merging on ViT-B/32 as re-run by later papers (absolute average %, indicative only).
TWIN_VIT_B32_RERUNS = {"T-Switch (CVPR 2025)": 83.07, "BD-Merging": 84.10, "FREE-Merging": 87.8}


def vit_b32_table() -> dict[str, dict[str, float]]:
    """The published ViT-B/32 rows as ``{method: {task: accuracy}}`` (the course's table shape)."""
    return {m: dict(zip(VIT_B32_TASKS, row, strict=True)) for m, row in VIT_B32.items()}
