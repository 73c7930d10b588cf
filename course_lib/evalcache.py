"""Remember what evaluating a model computes: a pure function of its weights, data and code.

Every lambda search, notebook and leaderboard evaluates merged models, and merges are
deterministic, so the same weights come back again and again: notebook 03 evaluates the task
arithmetic curve of notebook 01 once more, the capstone the merges of notebook 06, a second run of
a notebook all of its own. :func:`remember` stores a computed value in ``<cache>/evals/`` under a
key made of everything it depends on:

- the zoo's ``world`` (data, theta_0, experts, LoRA recipe: ``Zoo.world``, ``LLMZoo.world``),
- what was computed on what: for an accuracy (:class:`Memo`) the task, its head (vision), the
  split, the number of examples and a digest of the evaluated weights' bytes (names, dtypes,
  shapes, values), the same for the per-image predictions of ``Zoo.predict``; for the LLM's
  router features the prompts and the base model's weights; for Twin's answers the merged
  weights and the prompts; for Twin's compressed vectors the vectors and the rank ratio,
- the digest of the course's numeric source code, the versions of torch and transformers, and
  the device.

Change any of them and the key changes, so a stale value is never served: at worst, work is done
again. A zoo without a ``world`` (made by hand) is never cached. Four kinds of value are stored:
``accuracy`` (a number, JSON), ``answers`` (a list of strings, JSON), ``tensor`` and ``tensors``
(a dict of tensors; both safetensors).

The time a value took to compute is stored with it. :func:`seconds_saved` adds up the time of the
values served from the cache, so a method's measured cost (``experiments.stopwatch``) can count
them as the time they took when they ran.

``COURSE_EVAL_CACHE=off`` (or ``with evalcache.using("off")``) switches it off; ``refresh``
computes everything again and overwrites the stored values.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from course_lib import config
from course_lib.files import atomic_path
from course_lib.leaderboard import library_versions, source_digest

V = TypeVar("V")

MODES = ("on", "off", "refresh")
_override: str | None = None
_saved = {"hits": 0, "seconds": 0.0}


def mode() -> str:
    """``on`` (read and write), ``off``, or ``refresh`` (evaluate and overwrite)."""
    value = _override or os.environ.get("COURSE_EVAL_CACHE", "on")
    if value not in MODES:
        raise ValueError(f"COURSE_EVAL_CACHE must be one of {MODES}, got {value!r}")
    return value


@contextlib.contextmanager
def using(value: str) -> Iterator[None]:
    """Run a block with the cache in mode ``value`` (``on``, ``off`` or ``refresh``)."""
    global _override
    if value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {value!r}")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def root() -> Path:
    return config.CACHE_DIR / "evals"


def seconds_saved() -> float:
    """Seconds the values served from the cache took when they were computed (this process)."""
    return _saved["seconds"]


def hits() -> int:
    """Number of values (accuracies, features, answers, ...) served from the cache in this process."""
    return _saved["hits"]


def state_digest(state: Mapping[str, Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in sorted key order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    return h.hexdigest()


def _code() -> str:
    """What computes: the numeric source digest, the versions of torch and transformers, and the
    device, read at every call (``COURSE_DEVICE`` may change within a session)."""
    return f"{_source()}:{library_versions()}:{config.device().type}"


@functools.cache
def _source() -> str:  # the modules a process runs are the ones it imported: read once
    return source_digest()


# ----------------------------------------------------------------------------- kinds of value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
    return value


def _dump_json(check: Callable[[object], object]) -> Callable[[Path, object, float], None]:
    def dump(path: Path, value: object, seconds: float) -> None:
        path.write_text(json.dumps({"value": check(value), "seconds": seconds}))

    return dump


def _load_json(check: Callable[[object], object]) -> Callable[[Path], tuple[object, float]]:
    def load(path: Path) -> tuple[object, float]:
        stored = json.loads(path.read_text())
        return check(stored["value"]), _number(stored["seconds"])

    return load


def _dump_tensor(path: Path, value: Tensor, seconds: float) -> None:
    _dump_tensors(path, {"value": value}, seconds)


def _load_tensor(path: Path) -> tuple[Tensor, float]:
    tensors, seconds = _load_tensors(path)
    return tensors["value"], seconds


def _dump_tensors(path: Path, value: Mapping[str, Tensor], seconds: float) -> None:
    # ``path`` is already remember()'s temporary file: a plain write (files.save_tensors would
    # add a second temporary and rename)
    tensors = {k: v.contiguous() for k, v in value.items()}
    save_file(tensors, str(path), metadata={"seconds": repr(seconds)})


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], float]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, float(f.metadata()["seconds"])  # noqa: SIM118


@dataclass(frozen=True)
class Kind:
    """How one kind of value is written to, and read back from, its file."""

    suffix: str
    dump: Callable[[Path, Any, float], None]
    load: Callable[[Path], tuple[Any, float]]  # raises on a missing or damaged entry


KINDS = {
    "accuracy": Kind(".json", _dump_json(_number), _load_json(_number)),
    "answers": Kind(".json", _dump_json(_strings), _load_json(_strings)),
    "tensor": Kind(".safetensors", _dump_tensor, _load_tensor),
    "tensors": Kind(".safetensors", _dump_tensors, _load_tensors),
}
_DAMAGED = (OSError, ValueError, KeyError, TypeError, SafetensorError)


def entry(world: str, parts: Sequence[object], kind: str = "accuracy") -> Path:
    """Where the value of ``kind`` for ``parts`` (with the code that computes it) is stored."""
    text = "|".join([world, kind, *map(str, parts), _code()])
    key = hashlib.sha256(text.encode()).hexdigest()
    return root() / key[:2] / f"{key}{KINDS[kind].suffix}"


def active(world: str) -> bool:
    """Whether values of ``world`` are read and stored (the cache is on and the world known)."""
    return bool(world) and mode() != "off"


def remember(
    world: str, parts: Sequence[object], compute: Callable[[], V], kind: str = "accuracy"
) -> V:
    """``compute()``, or the value stored for the same ``world``, ``parts`` and code.

    ``parts`` must name every input of ``compute`` that ``world`` does not (weights digests,
    task, split, prompts...). With no ``world`` or with the cache off, ``compute()`` just runs.
    """
    if not active(world):
        return compute()
    path, codec = entry(world, parts, kind), KINDS[kind]
    if mode() == "on":
        try:
            value, seconds = codec.load(path)
        except _DAMAGED:  # missing or damaged: computed again and rewritten
            pass
        else:
            _saved["hits"] += 1
            _saved["seconds"] += seconds
            return value
    t0 = time.perf_counter()
    value = compute()
    # a read-only or full disk costs speed, never a result
    with contextlib.suppress(OSError), atomic_path(path) as tmp:
        codec.dump(tmp, value, time.perf_counter() - t0)
    return value


# ----------------------------------------------------------------------------- accuracies


class Memo:
    """The cached values of one state on one split, per task: ``memo(task, compute)``, an
    accuracy by default (``kind`` names another kind of value, e.g. a tensor of predictions).

    ``compute()`` runs only when the value is not stored (or the mode is ``refresh``). The
    state is digested once, and only when the cache is on and the zoo has a world.
    """

    def __init__(self, world: str, state: Mapping[str, Tensor], split: str, limit: int | None):
        self.world = world if active(world) else ""
        self.parts = (split, limit, state_digest(state)) if self.world else ()

    def path(self, task: str, salt: str = "") -> Path:
        return entry(self.world, [*self.parts, task, salt])

    def __call__(
        self,
        task: str,
        compute: Callable[[], V],
        salt: str | Callable[[], str] = "",
        kind: str = "accuracy",
    ) -> V:
        """``salt`` (or a function computing it, called only when the cache is used) names what
        else the value depends on, e.g. the task's zero-shot head."""
        if not self.world:
            return compute()
        salt = salt() if callable(salt) else salt
        return remember(self.world, [*self.parts, task, salt], compute, kind)


def tensor_salt(t: Tensor, *extra: object) -> str:
    """A short digest of one tensor (e.g. a zero-shot head) and a few values, for ``salt``."""
    return state_digest({"t": t}) + "".join(f"|{e}" for e in extra)
