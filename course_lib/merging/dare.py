"""DARE: drop and rescale task vectors (Yu et al., "Language Models are Super Mario", ICML 2024, Sec. 3).

For each expert and each merged tensor, with drop rate p:

    m ~ Bernoulli(p)  element-wise,     tau^_t = (1 - m) * tau_t / (1 - p)

The 1/(1-p) rescale keeps the expected output of a linear layer unchanged
(E[tau^_t] = tau_t). DARE is a pre-processing step: the dropped experts theta_0 + tau^_t are then
merged by any method (``then``, task arithmetic by default). ``drop_only=True`` skips the rescale:
the paper's "DropOnly" ablation. The random masks are seeded per (seed, task, key), so the result does not
depend on the order of the keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from course_lib.merging._base import prepare, register
from course_lib.merging.task_arithmetic import task_arithmetic
from course_lib.state import StateDict, cast_like, to_float32


def drop(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Zero each entry independently with probability ``drop_rate``."""
    keep = torch.rand(tau.shape, generator=generator) >= drop_rate
    return tau * keep


def rescale(tau: Tensor, drop_rate: float) -> Tensor:
    """Multiply the survivors by 1 / (1 - drop_rate) so the expectation is unchanged."""
    return tau / (1.0 - drop_rate)


def _check_drop_rate(drop_rate: float) -> float:
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
        raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(
            f"drop_rate must be in [0, 1) (1 would drop everything), got {drop_rate!r}"
        )
    return float(drop_rate)


def _generator(seed: int, task: int, key: str) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + task * 7919 + zlib.crc32(key.encode())) % 2**63
    )


def dare_experts(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    drop_rate: float,
    seed: int = 0,
    *,
    drop_only: bool = False,
    keys: str | None = None,
    exclude: str | None = None,
) -> list[StateDict]:
    """The dropped experts ``theta_0 + tau^_t`` as new state dicts (inputs are not modified)."""
    p = prepare(pretrained, finetuned, keys, exclude)
    drop_rate = _check_drop_rate(drop_rate)
    out: list[StateDict] = []
    for t, ft in enumerate(finetuned):
        expert: StateDict = {}
        for key in p.merged:
            base = pretrained[key]
            tau = ft[key].float() - base.float()
            if drop_rate > 0:
                tau = drop(tau, drop_rate, _generator(seed, t, key))
                if not drop_only:
                    tau = rescale(tau, drop_rate)
            expert[key] = (base.float() + tau).to(base.dtype)
        for key, target in p.aliases.items():  # tied keys stay tied to the dropped tensor
            expert[key] = expert[target]
        # in the input's key order; the other tensors are copies, never the caller's own
        out.append({k: expert[k] if k in expert else v.clone() for k, v in ft.items()})
    return out


@register("dare")
def dare(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    drop_rate: float = 0.5,
    seed: int = 0,
    then: Callable[..., StateDict] = task_arithmetic,
    *,
    drop_only: bool = False,
    keys: str | None = None,
    exclude: str | None = None,
    **then_kwargs: Any,
) -> StateDict:
    """Drop-and-rescale every task vector, then merge with ``then(pretrained, experts, **then_kwargs)``.

    With ``drop_rate=0`` the experts are unchanged and ``dare`` equals ``then``. Everything runs
    in float32 and the result is rounded once to the inputs' dtypes: dropped experts stored as
    bf16 would round ``theta_0 + tau^_t`` to ``theta_0``'s grid, and a small rescaled update
    would lose most of its value before the merge.
    """
    # checked before widening: float32 copies would hide a dtype mismatch between the inputs
    prepare(pretrained, finetuned, keys, exclude)
    wide = to_float32(pretrained)
    experts = dare_experts(
        wide,
        [to_float32(ft) for ft in finetuned],
        drop_rate,
        seed,
        drop_only=drop_only,
        keys=keys,
        exclude=exclude,
    )
    return cast_like(then(wide, experts, keys=keys, exclude=exclude, **then_kwargs), pretrained)
