"""Files that are either whole or absent: atomic writes and content digests.

Every cache of the course (the model zoo, the LLM weights, the saved results, the evaluation
cache) writes through :func:`atomic_path`, so a crash, a full disk or two processes writing at
once never leave half a file where a reader would trust it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def sha256(path: Path) -> str:
    """sha256 of a file, or of every file below a directory (sorted by relative path)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(
    path: Path, obj: object, indent: int | None = None, *, sort_keys: bool = False
) -> Path:
    """Write ``obj`` as JSON to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys))
    return path


def save_tensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` as a safetensors file at ``path``, atomically (made contiguous first)."""
    with atomic_path(path) as tmp:
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp), metadata=None if metadata is None else dict(metadata))
    return path
