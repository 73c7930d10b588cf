"""Give every solution notebook the Colab/Kaggle setup cell and the "Open in" badges.

For each ``notebooks/NN_*.ipynb``:

* the title markdown cell (the first cell) gets, right under its ``# heading`` line, one line
  with an "Open in Colab" and an "Open in Kaggle" badge for that notebook on GitHub;
* the first code cell, right after the title, is ``course_lib.runtime.SETUP_CELL``, tagged
  ``setup``: added if missing, its source updated if it changed (then its outputs are cleared;
  an up-to-date cell keeps the outputs of the last run).

Running it twice changes nothing. Afterwards regenerate the student notebooks
(``python tools/make_student.py``): they copy the setup cell, and their badges point at
``notebooks/student/``.

Usage::

    python tools/setup_cell.py            # update notebooks/NN_*.ipynb in place
    python tools/setup_cell.py --check    # exit 1 if a notebook lacks the current cell or badges
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BLOB = "https://github.com/model-merging-from-scratch/course/blob/main"
COLAB_BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/model-merging-from-scratch/course/blob/main/{path})"
)
KAGGLE_BADGE = (
    "[![Open In Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]"
    "(https://kaggle.com/kernels/welcome?src=" + BLOB + "/{path})"
)
BADGE_START = "[![Open In Colab]"
TAG = "setup"


def _setup_cell_source() -> str:
    """``SETUP_CELL``, read from course_lib/runtime.py without importing course_lib."""
    spec = importlib.util.spec_from_file_location("_runtime", ROOT / "course_lib" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SETUP_CELL


SETUP_CELL = _setup_cell_source()


def badge_line(path: str) -> str:
    """The badges of the notebook at ``path`` in the repository, e.g. ``notebooks/01_x.ipynb``."""
    return COLAB_BADGE.format(path=path) + " " + KAGGLE_BADGE.format(path=path)


def with_badges(title: str, path: str) -> str:
    """The title markdown with the badge line right under its first line (replacing an old one)."""
    head, *rest = title.split("\n")
    if len(rest) >= 2 and rest[0] == "" and rest[1].startswith(BADGE_START):
        rest = rest[2:]
    if not rest or rest[0] != "":
        rest = ["", *rest]
    return "\n".join([head, "", badge_line(path), *rest])


def updated(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A copy of solution notebook ``name`` with the current badges and setup cell."""
    nb = copy.deepcopy(nb)
    title = nb.cells[0] if nb.cells else None
    if title is None or title.cell_type != "markdown" or not title.source.startswith("#"):
        raise ValueError(f"{name}: the first cell must be the title markdown (# ...)")
    title.source = with_badges(title.source, f"notebooks/{name}")
    tagged = [c for c in nb.cells if TAG in c.metadata.get("tags", [])]
    if len(tagged) > 1 or (tagged and tagged[0].cell_type != "code"):
        kinds = [c.cell_type for c in tagged]
        raise ValueError(
            f"{name}: the {TAG!r} tag marks the one setup code cell, found it on {kinds}; "
            "remove it from the others (they would be deleted)"
        )
    nb.cells = [c for c in nb.cells if TAG not in c.metadata.get("tags", [])]
    cell = tagged[0] if tagged else None
    if cell is None:
        cell = nbformat.v4.new_code_cell(SETUP_CELL)
        cell.metadata["tags"] = [TAG]
        cell["id"] = TAG  # a fixed id keeps the file byte-for-byte reproducible
    elif cell.source != SETUP_CELL:
        cell.source = SETUP_CELL
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    nb.cells.insert(1, cell)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"  # the layout of tools/make_student.py and nbformat.write


def solution_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
    args = ap.parse_args(argv)
    stale = []
    for path in solution_notebooks():
        old = path.read_text()
        new = render(updated(nbformat.reads(old, as_version=4), path.name))
        if new == old:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    if stale:
        print("notebooks without the current setup cell (run `python tools/setup_cell.py`):",
              file=sys.stderr)  # fmt: skip
        for s in stale:
            print(f"  {s}", file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(solution_notebooks())} notebooks have the current setup cell and badges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
