"""Remember accuracies: evaluating a model is a pure function of its weights, data and code.

Every lambda search, notebook and leaderboard evaluates merged models, and merges are
deterministic, so the same weights come back again and again: notebook 03 evaluates the task
arithmetic curve of notebook 01 once more, the capstone the merges of notebook 06, a second run of
a notebook all of its own. :class:`Memo` stores each task's accuracy in ``<cache>/evals/`` under a
key made of everything the number depends on:

- the zoo's ``world`` (data, theta_0, experts, LoRA recipe: ``Zoo.world``, ``LLMZoo.world``),
- the task, its head (vision), the split and the number of examples,
- a digest of the evaluated weights' bytes (names, dtypes, shapes, values),
- the digest of the course's numeric source code, torch's version and the device.

Change any of them and the key changes, so a stale number is never served: at worst, work is done
again. A zoo without a ``world`` (made by hand) is never cached.

The time an evaluation took is stored with it. :func:`seconds_saved` adds up the time of the
evaluations served from the cache, so a method's measured cost (``experiments.stopwatch``) can
count them as the time they took when they ran.

``COURSE_EVAL_CACHE=off`` (or ``with evalcache.using("off")``) switches it off; ``refresh``
evaluates everything again and overwrites the stored numbers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from course_lib import config
from course_lib.leaderboard import source_digest

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
    """Seconds the evaluations served from the cache took when they were computed (this process)."""
    return _saved["seconds"]


def hits() -> int:
    """Number of accuracies served from the cache in this process."""
    return _saved["hits"]


def state_digest(state: Mapping[str, Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in sorted key order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def _code() -> str:
    """What computes: the numeric source digest, torch's version and the device (once a process)."""
    return f"{source_digest()}:torch {torch.__version__}:{config.device().type}"


class Memo:
    """The cached accuracies of one state on one split: ``memo(task, compute) -> float``.

    ``compute()`` runs only when the accuracy is not stored (or the mode is ``refresh``).
    """

    def __init__(self, world: str, state: Mapping[str, Tensor], split: str, limit: int | None):
        self.active = mode() != "off" and bool(world)
        self.prefix = (
            f"{world}|{split}|{limit}|{state_digest(state)}|{_code()}" if self.active else ""
        )

    def path(self, task: str, salt: str = "") -> Path:
        key = hashlib.sha256(f"{self.prefix}|{task}|{salt}".encode()).hexdigest()
        return root() / key[:2] / f"{key}.json"

    def __call__(self, task: str, compute: Callable[[], float], salt: str = "") -> float:
        if not self.active:
            return compute()
        path = self.path(task, salt)
        if mode() == "on":
            stored = _read(path)
            if stored is not None:
                _saved["hits"] += 1
                _saved["seconds"] += stored["seconds"]
                return stored["accuracy"]
        t0 = time.perf_counter()
        value = compute()
        _write(path, {"accuracy": value, "seconds": time.perf_counter() - t0, "task": task})
        return value


def tensor_salt(t: Tensor, *extra: object) -> str:
    """A short digest of one tensor (e.g. a zero-shot head) and a few values, for ``salt``."""
    return state_digest({"t": t}) + "".join(f"|{e}" for e in extra)


def _read(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
        accuracy, seconds = stored["accuracy"], stored["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: computed again and rewritten
    if not isinstance(accuracy, (int, float)) or not isinstance(seconds, (int, float)):
        return None
    return {"accuracy": float(accuracy), "seconds": float(seconds)}


def _write(path: Path, record: dict) -> None:
    """Write atomically: a crash, or two processes at once, never leave half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk costs speed, never a result
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
