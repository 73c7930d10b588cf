"""Execute the course notebooks headless (nbclient), in order.

By default the executed copies go to ``build/notebooks/`` and the committed notebooks are left
alone (what ``make course`` does). ``--inplace`` refreshes the outputs stored in
``notebooks/`` (what an author does before committing a change to a notebook).

Usage::

    python tools/run_notebooks.py                       # all solution notebooks -> build/
    python tools/run_notebooks.py 03 04 --inplace       # refresh notebooks 03 and 04
    python tools/run_notebooks.py --timeout 0           # no time limit per cell

A cell may run for up to ``--timeout`` seconds (an hour by default). The longest cells build
models the first time they run (notebook 06's first cell dequantizes SmolLM2 and trains four
LoRA experts: about 5 minutes on two quiet cores, over 15 on two busy ones), so the limit is
there to stop a cell that hangs, not one that is slow.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 3600  # seconds one cell may run by default (see the module docstring)


def execute(path: Path, target: Path, timeout: int | None = CELL_TIMEOUT) -> float:
    """Run one notebook with its folder as working directory; write it to ``target``.

    ``timeout``: seconds one cell may run (None: no limit)."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    seconds = time.perf_counter() - t0
    nb.metadata.pop("widgets", None)  # state of progress-bar widgets: noise in a stored notebook
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="*", help="notebook number prefixes, e.g. 00 03 (default: all)")
    ap.add_argument("--inplace", action="store_true", help="overwrite notebooks/ with the outputs")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "notebooks")
    ap.add_argument(
        "--timeout", type=int, default=CELL_TIMEOUT, help="seconds one cell may run (0: no limit)"
    )
    args = ap.parse_args(argv)
    # progress bars would fill the stored outputs (with ipywidgets installed, transformers' own
    # bars become widgets that ignore TQDM_DISABLE; huggingface_hub's switch turns them off)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in args.only)]
    if not paths:
        print("no notebook selected", file=sys.stderr)
        return 1
    for path in paths:
        target = path if args.inplace else args.out / path.name
        seconds = execute(path, target, args.timeout or None)
        shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target  # --out
        print(f"{path.name}: {seconds:.0f} s -> {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
