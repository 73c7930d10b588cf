"""State-dict arithmetic: validation, key selection and the :class:`TaskVector`.

Every merging method in :mod:`course_lib.merging` works on plain ``dict[str, Tensor]`` state
dicts. This module holds the pieces they all share:

* :func:`validate` checks that the inputs can be merged at all and raises a ``ValueError`` that
  names the offending key and what is wrong (missing key, shape, dtype, NaN/Inf).
* :func:`plan` decides, once, which keys are merged: floating-point tensors that match the
  ``keys`` regex and do not match ``exclude``. Integer buffers (position ids, masks) are never
  merged; keys that share storage with an earlier key (tied weights) are merged once.
* :class:`TaskVector` is the difference ``tau = theta_ft - theta_0`` with ``+``, ``-``, unary
  ``-``, scalar ``*``, ``sum()`` and :meth:`TaskVector.apply_to` (Ilharco et al., 2023, Sec. 2).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

__all__ = [
    "StateDict",
    "MergePlan",
    "TaskVector",
    "plan",
    "validate",
    "task_vector",
    "task_vectors",
    "with_passthrough",
    "check_scaling",
    "check_fraction",
]


def _fmt_shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def is_mergeable(tensor: Tensor) -> bool:
    """Only floating-point tensors carry learned weights; int/bool buffers are never merged."""
    return torch.is_floating_point(tensor)


@dataclass(frozen=True)
class MergePlan:
    """Which keys a merge touches.

    ``merged`` keys are combined by the method; ``passthrough`` keys are copied from the
    reference state dict (pretrained, or the first model for weight averaging); ``aliases`` maps
    a tied key to the key whose merged tensor it shares.
    """

    merged: tuple[str, ...]
    passthrough: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)

    def count(self, state_dict: Mapping[str, Tensor]) -> int:
        """Number of parameters that are merged (tied keys counted once)."""
        return sum(state_dict[k].numel() for k in self.merged)


def _storage_id(t: Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]] | None:
    """Where ``t``'s values live: equal for two views of one tensor (tied weights). None for a
    meta tensor and for an empty one (every empty tensor has data pointer 0: none is tied)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def plan(
    reference: Mapping[str, Tensor], keys: str | None = None, exclude: str | None = None
) -> MergePlan:
    """Split the keys of ``reference`` into merged, passthrough and tied aliases.

    A key is merged when it is a floating-point tensor, ``re.search(keys, name)`` matches (or
    ``keys`` is None) and ``re.search(exclude, name)`` does not (or ``exclude`` is None).
    A key whose tensor is a view of the same storage as an earlier merged key (tied embeddings,
    e.g. ``lm_head.weight`` and ``embed_tokens.weight``) is merged once and re-tied.
    """
    inc = re.compile(keys) if keys is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    merged: list[str] = []
    passthrough: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in reference.items():
        selected = (inc is None or inc.search(name)) and not (exc is not None and exc.search(name))
        if not (selected and is_mergeable(tensor)):
            passthrough.append(name)
            continue
        sid = _storage_id(tensor)
        if sid is not None and sid in seen:
            aliases[name] = seen[sid]
            continue
        if sid is not None:
            seen[sid] = name
        merged.append(name)
    if not merged:
        raise ValueError(
            f"no tensor selected for merging (keys={keys!r}, exclude={exclude!r}); "
            f"the state dict has {len(reference)} keys, e.g. {list(reference)[:3]}"
        )
    return MergePlan(tuple(merged), tuple(passthrough), aliases)


def check_finite(name: str, tensor: Tensor, where: str) -> None:
    """Raise ``ValueError`` naming key ``name`` of ``where`` if ``tensor`` holds NaN or Inf."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return
    # NaN propagates through min/max and an Inf is its own min or max: one aminmax pass decides
    # (measured ~18x faster than isfinite(t).all(), which builds a bool tensor of t's size).
    low, high = torch.aminmax(tensor)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        bad = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise ValueError(f"key {name!r} in {where} contains {bad} values; refusing to merge")


def validate(
    pretrained: Mapping[str, Tensor] | None,
    finetuned: Sequence[Mapping[str, Tensor]],
    merged_keys: Iterable[str] | None = None,
) -> None:
    """Raise ``ValueError`` naming the key and problem if the models cannot be merged.

    Checks: at least one fine-tuned model; every model has exactly the reference's keys; every
    value is a tensor of the reference's shape and dtype; merged tensors are finite.
    The reference is ``pretrained`` when given, else ``finetuned[0]``.
    """
    if isinstance(finetuned, Mapping):
        raise ValueError("finetuned must be a list of state dicts, got a single state dict")
    if not isinstance(finetuned, Sequence):  # a generator would be used up by these checks
        raise ValueError(
            f"finetuned must be a list or tuple of state dicts, got {type(finetuned).__name__}"
        )
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError("finetuned is empty: need at least one fine-tuned state dict to merge")
    named = [("pretrained", pretrained)] if pretrained is not None else []
    named += [(f"finetuned[{i}]", sd) for i, sd in enumerate(finetuned)]
    ref_name, ref = named[0]
    for where, sd in named:
        if not isinstance(sd, Mapping):
            raise ValueError(f"{where} must be a dict of tensors, got {type(sd).__name__}")
        for name, t in sd.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"key {name!r} in {where} is a {type(t).__name__}, not a Tensor")
    ref_keys = set(ref)
    for where, sd in named[1:]:
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref_keys]
        if missing:
            raise ValueError(
                f"key {missing[0]!r} is in {ref_name} but missing from {where}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            raise ValueError(
                f"key {extra[0]!r} is in {where} but not in {ref_name}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name, t in ref.items():
            other = sd[name]
            if other.shape != t.shape:
                raise ValueError(
                    f"key {name!r}: shape {_fmt_shape(other)} in {where} but "
                    f"{_fmt_shape(t)} in {ref_name}"
                )
            if other.dtype != t.dtype:
                raise ValueError(
                    f"key {name!r}: dtype {other.dtype} in {where} but {t.dtype} in {ref_name}"
                )
            if other.device != t.device:
                raise ValueError(
                    f"key {name!r}: device {other.device} in {where} but {t.device} in "
                    f"{ref_name}; move every model to one device (.to(device)) first"
                )
    check = (
        list(merged_keys) if merged_keys is not None else [k for k in ref if is_mergeable(ref[k])]
    )
    for where, sd in named:
        for name in check:
            check_finite(name, sd[name], where)


def check_number(name: str, value: float) -> float:
    """A finite real number (``bool`` is refused: ``True`` is not a scaling coefficient).
    Python and NumPy numbers and one-element float/int tensors are accepted."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be finite")
    return float(value)


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """An integer count of at least ``minimum`` (``bool`` and integral floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_tied(plan_: MergePlan, finetuned: Sequence[Mapping[str, Tensor]]) -> None:
    """Keys tied in the reference (one storage, e.g. ``lm_head.weight`` and the embeddings) are
    merged once, from the first of them; each fine-tuned model must hold equal values there,
    or its change to the other key would be dropped without a word."""
    for alias, target in plan_.aliases.items():
        for i, sd in enumerate(finetuned):
            a, b = sd[alias], sd[target]
            same = _storage_id(a)
            if same is not None and same == _storage_id(b):
                continue
            if not torch.equal(a, b):
                raise ValueError(
                    f"key {alias!r} is tied to {target!r} in the reference model (one tensor) "
                    f"but holds different values in finetuned[{i}]; tie them there too or "
                    f"exclude one of the two keys"
                )


def check_fraction(name: str, value: float) -> float:
    """Validate a keep fraction such as TIES ``density`` or PCB ``ratio``: must lie in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries kept), got {value!r}")
    return float(value)


def check_scaling(scaling: float | Sequence[float], num_tasks: int) -> list[float]:
    """Return one finite scaling coefficient per task (a number is broadcast)."""
    if isinstance(scaling, numbers.Real) or (isinstance(scaling, Tensor) and scaling.dim() == 0):
        return [check_number("scaling", scaling)] * num_tasks
    if isinstance(scaling, (str, bytes, Mapping, set, frozenset)) or not isinstance(
        scaling, Iterable
    ):  # a dict would give its keys, a set no order
        raise ValueError(
            f"scaling must be a number or a list with one number per task, got {scaling!r}"
        )
    values = [check_number(f"scaling[{i}]", v) for i, v in enumerate(scaling)]
    if len(values) != num_tasks:
        raise ValueError(
            f"scaling has {len(values)} values but there are {num_tasks} fine-tuned models; "
            "pass one float or one value per task"
        )
    return values


def same_keys(a: TaskVector, b: TaskVector, op: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same keys and shapes; ``op`` says
    what was being done ("add", "compare"...), the message names the first offending key."""
    if a.vector.keys() != b.vector.keys():
        only_a = sorted(set(a.vector) - set(b.vector))
        only_b = sorted(set(b.vector) - set(a.vector))
        key = (only_a or only_b)[0]
        side = "left" if only_a else "right"
        raise ValueError(f"cannot {op} task vectors: key {key!r} is only in the {side} operand")
    for k, t in a.vector.items():
        if b.vector[k].shape != t.shape:
            raise ValueError(
                f"cannot {op} task vectors: key {k!r} has shape {_fmt_shape(t)} vs "
                f"{_fmt_shape(b.vector[k])}"
            )


class TaskVector(Mapping[str, Tensor]):
    """A task vector ``tau = theta_ft - theta_0`` (Ilharco et al., ICLR 2023, Sec. 2).

    It is a read-only mapping from parameter name to difference tensor, closed under the
    arithmetic of the paper: ``tau_a + tau_b`` (addition), ``-tau`` (negation, forgetting),
    ``lam * tau`` (scaling) and ``sum([...])``. ``apply_to(theta_0, lam)`` returns
    ``theta_0 + lam * tau`` as a new state dict; keys that are not in the vector (heads,
    integer buffers) keep their pretrained values.
    """

    __slots__ = ("vector",)

    def __init__(self, vector: Mapping[str, Tensor]):
        self.vector: StateDict = dict(vector)

    # -- Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        return self.vector[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        return f"TaskVector({len(self.vector)} tensors, {self.numel():,} parameters)"

    # -- arithmetic -------------------------------------------------------------------------
    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        same_keys(self, other, "add")
        return TaskVector({k: v + other.vector[k] for k, v in self.vector.items()})

    def __radd__(self, other: object) -> TaskVector:
        # Lets the builtin sum() start from 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        same_keys(self, other, "subtract")
        return TaskVector({k: v - other.vector[k] for k, v in self.vector.items()})

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.vector.items()})

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        check_number("the scalar", scalar)
        return TaskVector({k: v * scalar for k, v in self.vector.items()})

    __rmul__ = __mul__

    # -- utilities --------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(v.numel() for v in self.vector.values())

    def norm(self) -> float:
        """Global L2 norm of the concatenated vector."""
        return float(sum(v.double().pow(2).sum() for v in self.vector.values()) ** 0.5)

    def flatten(self) -> Tensor:
        """All entries, in sorted key order, as one 1-D tensor (for small models and plots)."""
        return torch.cat([self.vector[k].reshape(-1) for k in sorted(self.vector)])

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity of two task vectors over their common keys."""
        same_keys(self, other, "compare")
        dot = sum((v.double() * other.vector[k].double()).sum() for k, v in self.vector.items())
        return float(dot / max(self.norm() * other.norm(), 1e-30))

    def apply_to(self, pretrained: Mapping[str, Tensor], scaling: float = 1.0) -> StateDict:
        """Return ``theta_0 + scaling * tau``; keys not in the vector are copied unchanged,
        except a key tied to one in the vector (same storage in ``pretrained``, e.g. a tied
        ``lm_head.weight``), which stays tied to the updated tensor."""
        scaling = check_number("scaling", scaling)
        missing = [k for k in self.vector if k not in pretrained]
        if missing:
            raise ValueError(f"key {missing[0]!r} of the task vector is not in pretrained")
        out: StateDict = {}
        for name, base in pretrained.items():
            if name in self.vector:
                delta = self.vector[name]
                if delta.shape != base.shape:
                    raise ValueError(
                        f"key {name!r}: task vector shape {_fmt_shape(delta)} but pretrained "
                        f"shape {_fmt_shape(base)}"
                    )
                if not (base.is_floating_point() and delta.is_floating_point()):
                    raise ValueError(
                        f"key {name!r}: cannot add a task vector of dtype {delta.dtype} to a "
                        f"pretrained tensor of dtype {base.dtype} (floating-point tensors only)"
                    )
                out[name] = (base.float() + scaling * delta.float()).to(base.dtype)
        return with_passthrough(out, pretrained)


def with_passthrough(updated: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> StateDict:
    """The whole state dict, in ``reference``'s key order: the ``updated`` tensors, and every
    other key cloned from ``reference``, except a key that shares storage with an updated one
    (a tied ``lm_head.weight``): it points at the updated tensor, so the tie survives.

    Every merger and :meth:`TaskVector.apply_to` build their output with it. A tied key left out
    of the merge (by ``exclude`` or ``keys``) therefore follows the merged tensor: a copy of the
    old value would, once loaded into the tied model, overwrite the merge or be overwritten."""
    by_storage: dict[tuple, str] = {}
    for name, t in updated.items():
        # the inputs were checked finite: an Inf here is an overflow of the output's dtype
        check_finite(name, t, "the merged model (the result overflows its dtype)")
        sid = _storage_id(reference[name])
        if sid is not None:
            by_storage.setdefault(sid, name)
    out: StateDict = {}
    for name, base in reference.items():
        if name in updated:
            out[name] = updated[name]
            continue
        sid = _storage_id(base)
        tied = by_storage.get(sid) if sid is not None else None
        out[name] = updated[tied] if tied is not None else base.clone()
    return out


def to_float32(state: Mapping[str, Tensor]) -> StateDict:
    """``state`` with every floating tensor in float32 (exact for bf16 and fp16); float32 and
    integer tensors are the same objects, and tensors sharing storage stay shared."""
    done: dict[tuple, Tensor] = {}
    out: StateDict = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.dtype == torch.float32:
            out[name] = t
            continue
        sid = _storage_id(t)
        if sid is None:
            out[name] = t.float()
        else:
            out[name] = done.setdefault(sid, t.float())
    return out


def cast_like(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> StateDict:
    """Each tensor of ``state`` in the dtype of ``reference``'s tensor of the same name (rounded
    once); a tensor that several keys share (a tie) is cast once and stays shared."""
    done: dict[int, Tensor] = {}
    out: StateDict = {}
    for name, t in state.items():
        dtype = reference[name].dtype
        if t.dtype == dtype:
            out[name] = t
        else:
            out[name] = done.setdefault(id(t), t.to(dtype))
    return out


def task_vector(
    pretrained: Mapping[str, Tensor],
    finetuned_one: Mapping[str, Tensor],
    keys: str | None = None,
    exclude: str | None = None,
) -> TaskVector:
    """``tau = theta_ft - theta_0`` over the merged keys (Ilharco et al., 2023, Eq. 1), in float32
    whatever the checkpoints' dtype: a bf16 or fp16 difference would round, and
    ``tau.apply_to(theta_0)`` would not give ``theta_ft`` back (nor agree with the mergers,
    which all compute in float32)."""
    return task_vectors(pretrained, [finetuned_one], keys, exclude)[0]


def task_vectors(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: str | None = None,
    exclude: str | None = None,
) -> list[TaskVector]:
    """One :class:`TaskVector` per fine-tuned model (float32, as :func:`task_vector`)."""
    validate(pretrained, finetuned)
    p = plan(pretrained, keys, exclude)
    check_tied(p, finetuned)
    return [
        TaskVector({k: ft[k].float() - pretrained[k].float() for k in p.merged}) for ft in finetuned
    ]
