"""Shared fixtures. Tests never touch the network: a hub call without this hangs ~50 s."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib import evalcache  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_eval_cache():
    """Tests evaluate for real: no accuracy comes from the cache of an earlier run (a test that
    monkeypatches the evaluation would otherwise be served the real number). Tests of the cache
    and of the real mini world switch it on themselves; notebook kernels are other processes."""
    with evalcache.using("off"):
        yield


def load_tool(name: str):
    """The script ``tools/<name>.py`` as a module (loaded once; registered in ``sys.modules``,
    where dataclasses and pickling look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_models(num_tasks=3, seed=0, shapes=None, scale=0.1):
    """A pretrained state dict and ``num_tasks`` fine-tuned ones (random, float32)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"enc.weight": (8, 6), "enc.bias": (8,), "out.weight": (4, 8)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        for _ in range(num_tasks)
    ]
    return pre, fts


@pytest.fixture
def models():
    return random_models()


def require(module: str):
    """Import ``module``, an optional test dependency (the ``crosscheck`` and ``llm`` extras).

    Without it the test skips, so that a partial install still runs the rest. CI sets
    ``COURSE_REQUIRE_EXTRAS=1``, where a missing or broken module fails the test instead: a
    cross-check against mergekit or FusionBench must not pass by skipping.
    """
    if os.environ.get("COURSE_REQUIRE_EXTRAS") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"COURSE_REQUIRE_EXTRAS=1 and {module} does not import: {error!r}")
    return pytest.importorskip(module)
