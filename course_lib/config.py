"""One place for the course's settings: profile, device, paths and seeds.

The profile is ``mini`` (offline, CPU, minutes) or ``full`` (GPU + Hugging Face hub). It is read
from the ``COURSE_PROFILE`` environment variable; without it, ``full`` is chosen only when CUDA
is available and the hub is not switched off (``HF_HUB_OFFLINE=1``).

``data/``, ``results/`` and the cache live in the course folder: ``$COURSE_HOME`` if set (on
Colab and Kaggle ``course_lib.runtime`` points it at the clone, since an installed package no
longer sits in its repository), else the repository this file belongs to. ``$COURSE_CACHE``
moves the cache alone.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from course_lib.runtime import hub_offline

PROFILES = ("mini", "full")
ROOT = Path(os.environ.get("COURSE_HOME") or Path(__file__).resolve().parent.parent)
DATA_DIR = ROOT / "data"
CACHE_DIR = Path(os.environ.get("COURSE_CACHE", DATA_DIR / "cache"))
RESULTS_DIR = ROOT / "results"
DEFAULT_SEED = 0


def profile() -> str:
    """The active profile: ``$COURSE_PROFILE`` if set, else ``full`` on an online GPU, else ``mini``."""
    value = os.environ.get("COURSE_PROFILE")
    if value:
        if value not in PROFILES:
            raise ValueError(f"COURSE_PROFILE must be one of {PROFILES}, got {value!r}")
        return value
    return "full" if torch.cuda.is_available() and not hub_offline() else "mini"


def device() -> torch.device:
    """CUDA when available (and not disabled with ``COURSE_DEVICE=cpu``), else the CPU."""
    forced = os.environ.get("COURSE_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch so every run of a profile gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds legacy global-state users (e.g. sklearn)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` PyTorch CPU threads (``None``: as it is), then restore the count.

    Results on the CPU can depend on the thread count (how a sum is split between threads), so
    code that must give the same bits on every machine fixes it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe() -> str:
    """A one-line summary printed at the top of every notebook and command."""
    return f"profile={profile()} device={device()} torch={torch.__version__}"


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A ``tqdm`` bar, off when ``progress`` is False or ``TQDM_DISABLE`` is set (headless runs,
    e.g. ``tools/run_notebooks.py``, so stored notebook outputs stay clean)."""
    from tqdm import tqdm

    off = os.environ.get("TQDM_DISABLE", "") not in ("", "0", "false", "False")
    return tqdm(iterable, disable=off or not progress, **kwargs)
