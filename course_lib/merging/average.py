"""Weight averaging, the uniform "model soup" (Wortsman et al., ICML 2022).

    theta_m = sum_t w_t * theta_t / sum_t w_t        (w_t = 1 by default)

No pretrained model is needed. Keys that are not merged (integer buffers, keys excluded by the
filter) are copied from ``finetuned[0]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from course_lib.merging._base import prepare, register
from course_lib.state import StateDict, check_number, with_passthrough


def _normalized_weights(weights: Sequence[float] | None, num_models: int) -> list[float]:
    if weights is None:
        return [1.0 / num_models] * num_models
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        raise ValueError(f"weights must be one number per model, got {weights!r}")
    w = [check_number(f"weights[{i}]", x) for i, x in enumerate(weights)]
    if len(w) != num_models:
        raise ValueError(f"weights has {len(w)} values but there are {num_models} models")
    for i, x in enumerate(w):
        if not (x >= 0.0) or x == float("inf"):
            raise ValueError(f"weights[{i}] is {x}; weights must be finite and >= 0")
    total = sum(w)
    if total == float("inf"):  # every weight would become 0
        raise ValueError(f"weights sum to inf ({w}); scale them down, only their ratios matter")
    if total <= 0:
        raise ValueError("weights sum to 0; at least one model needs a positive weight")
    return [x / total for x in w]


@register("weight_average")
def weight_average(
    finetuned: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    keys: str | None = None,
    exclude: str | None = None,
) -> StateDict:
    """Weighted mean of the models' parameters: ``sum_t w_t theta_t / sum_t w_t``."""
    p = prepare(None, finetuned, keys, exclude, needs_pretrained=False)
    w = _normalized_weights(weights, len(finetuned))
    merged = {}
    for key in p.merged:
        acc = sum(wt * ft[key].float() for wt, ft in zip(w, finetuned, strict=True))
        merged[key] = acc.to(finetuned[0][key].dtype)
    return with_passthrough(merged, finetuned[0])
