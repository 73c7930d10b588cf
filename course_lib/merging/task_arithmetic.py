"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2-4).

    tau_t   = theta_t - theta_0                     (task vector)
    theta_m = theta_0 + sum_t lambda_t * tau_t      (addition; one lambda for all tasks in the paper)

Negation (forgetting) is ``theta_0 - lambda * tau``; write it with
``(-task_vector(theta_0, theta_t)).apply_to(theta_0, lambda)``. With ``lambda = 1/T`` this is
exactly weight averaging. The paper picks lambda on validation data from {0, 0.05, ..., 1};
0.3 is the common default (AdaMerging, FusionBench).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from course_lib.merging._base import prepare, register
from course_lib.state import StateDict, check_scaling, with_passthrough


@register("task_arithmetic")
def task_arithmetic(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    scaling: float | Sequence[float] = 0.3,
    *,
    keys: str | None = None,
    exclude: str | None = None,
) -> StateDict:
    """``theta_0 + sum_t lambda_t (theta_t - theta_0)``, computed tensor by tensor."""
    p = prepare(pretrained, finetuned, keys, exclude)
    lam = check_scaling(scaling, len(finetuned))
    merged = {}
    for key in p.merged:
        base = pretrained[key].float()
        acc = base.clone()
        for lt, ft in zip(lam, finetuned, strict=True):
            acc.add_(ft[key].float() - base, alpha=lt)
        merged[key] = acc.to(pretrained[key].dtype)
    return with_passthrough(merged, pretrained)
