"""What every merging method shares: input checks, key planning and a registry.

Each method lives in its own module and registers itself with :func:`register`, so
``METHODS["ties_merging"]`` and ``course_lib.merging.ties_merging`` are the same function
(the way mergekit keeps one method per module). Methods are pure: they never modify their
inputs and always return a new state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from course_lib.state import MergePlan, check_tied, plan, validate

MergeFn = Callable[..., dict[str, Tensor]]
METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    """Class-free registry: ``@register("ties_merging")`` above a merge function."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        # merges are arithmetic on weights, never part of a graph: parameters that require
        # grad (dict(model.named_parameters())) give plain tensors, not graph nodes
        fn = torch.no_grad()(fn)
        METHODS[name] = fn
        return fn

    return deco


def prepare(
    pretrained: Mapping[str, Tensor] | None,
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: str | None,
    exclude: str | None,
    *,
    needs_pretrained: bool = True,
) -> MergePlan:
    """Validate the inputs and return the plan of keys to merge.

    The reference model for key order and passthrough tensors is ``pretrained`` when given,
    else ``finetuned[0]``; ``pretrained=None`` is for methods without a base model
    (:func:`weight_average`), every other one needs it.
    """
    if needs_pretrained and pretrained is None:
        raise ValueError("pretrained is None: this method needs the base model's state dict")
    validate(pretrained, finetuned, merged_keys=())  # structure first: keys, shapes, dtypes
    reference = pretrained if pretrained is not None else finetuned[0]
    p = plan(reference, keys, exclude)
    check_tied(p, finetuned)  # a tied key is merged once: its copies must agree
    validate(pretrained, finetuned, merged_keys=p.merged)  # then finiteness of merged tensors
    return p


def deltas(
    pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], key: str
) -> Tensor:
    """Stacked task vectors ``[T, *shape]`` of one tensor, in float32 (never the whole model)."""
    base = pretrained[key].float()
    return torch.stack([ft[key].float() - base for ft in finetuned])


def delta_rows(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    key: str,
    where: Tensor | slice,
    out: Tensor | None = None,
) -> Tensor:
    """Task vectors of one tensor at flat positions ``where`` (indices or a slice): ``[T, m]`` fp32.

    ``out`` (``[T, >= m]``) is reused when it is large enough, so streaming a model chunk by chunk
    allocates nothing per chunk: the result is then a view of ``out``, overwritten by the next call.
    """
    # detached: this runs in worker threads, where the caller's torch.no_grad() does not reach
    base = pretrained[key].detach().reshape(-1)[where]
    rows = [ft[key].detach().reshape(-1)[where] for ft in finetuned]
    m = base.numel()
    if out is None or out.shape[1] < m:
        out = torch.empty(len(rows), m)
    out = out[:, :m]
    if base.dtype == torch.float32:
        for t, row in enumerate(rows):
            torch.sub(row, base, out=out[t])
    else:
        base = base.float()
        for t, row in enumerate(rows):
            out[t].copy_(row).sub_(base)
    return out
