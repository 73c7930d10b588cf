"""Measuring interference between task vectors (the evidence behind TIES and PCB).

Notebook 02 asks *why* adding task vectors goes wrong. The TIES paper (Yadav et al., NeurIPS
2023, Sec. 3 and Fig. 2-3) names two causes, and each function here measures one of them:

* **redundancy**: a few large entries carry most of a task vector's change
  (:func:`mass_curve`: the share of ||tau||^2 held by the top fraction of entries);
* **sign conflicts**: at many positions some tasks push up and others push down
  (:func:`sign_conflicts`: the fraction of positions where the non-zero entries disagree);
* and, as a global summary, the cosine similarity of every pair of task vectors
  (:func:`cosine_matrix`, Ilharco et al., ICLR 2023, Fig. 5: nearly orthogonal vectors).

Everything works per tensor, so it never builds the [T x D] matrix of a large model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from course_lib.merging._base import deltas
from course_lib.merging.ties import trim
from course_lib.state import TaskVector


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
    """Share of ``||tau||^2`` carried by the top ``f`` fraction of entries (by magnitude), per f."""
    flat = vector.flatten().abs().float()
    sq = flat.square().sort(descending=True).values
    cum = sq.cumsum(0)
    total = float(cum[-1]) or 1.0
    out = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must lie in (0, 1], got {f}")
        k = max(1, round(f * sq.numel()))
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
