"""Check learners' notebooks: run each one headless and report every exercise's check cell.

For instructors. Hand out ``notebooks/student/``; collect the learners' copies; run::

    python tools/grade.py submissions/*.ipynb            # a table: one row per notebook
    python tools/grade.py alice/03_ties_merging.ipynb --details

Each notebook runs from the course's ``notebooks/student/`` folder (so relative paths work) with
errors allowed, and every cell tagged ``check`` is classified:

* ``pass``  - the check printed its confirmation (``course_lib.checks`` returned True);
* ``open``  - the answer is still the stub (``NotImplementedError``);
* ``wrong`` - the checker raised and explained the mistake (shown with ``--details``);
* ``error`` - the cell did not reach the checker, e.g. an earlier cell failed or timed out;
* ``changed`` - the check cell is not the one handed out: edited (a commented-out call would
  otherwise run without error and pass) or deleted.

Check cells are compared with the handed-out copy in ``notebooks/student/`` that shares the most
cell ids with the submission (so renamed files are found), by cell id (or, for a cell cut and
pasted, which gets a new id, by its source) and source. A submission
that shares no cell id with any of them is graded on its own check cells, with a warning.

The exit status is 0 when every check of every notebook passes, else 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    cell: int  # index of the check cell in the notebook
    status: str  # pass | open | wrong | error | changed
    message: str = ""


def classify(cell) -> Check:
    """The status of one executed ``check`` cell from its outputs."""
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if not errors:
        ran = cell.get("execution_count") is not None
        return Check(-1, "pass" if ran else "error", "" if ran else "the cell did not run")
    name, value = errors[0].get("ename", ""), errors[0].get("evalue", "")
    if name == "NotImplementedError":
        return Check(-1, "open", value)
    if name in ("ExerciseError", "AssertionError"):
        return Check(-1, "wrong", value)
    return Check(-1, "error", f"{name}: {value}")


def is_check(cell) -> bool:
    return cell.cell_type == "code" and "check" in cell.metadata.get("tags", [])


def grade_executed(nb, reference=None) -> list[Check]:
    """Classify the check cells of an already executed notebook.

    With ``reference`` (the handed-out notebook), its check cells are the ones graded, found in
    ``nb`` by cell id, or by their unchanged source where the id changed (a cell cut and pasted):
    a missing one or one whose source differs is ``changed``."""
    if reference is None:  # graded on its own check cells
        found: list[int | None] = [i for i, cell in enumerate(nb.cells) if is_check(cell)]
        given = [nb.cells[i] for i in found]
    else:
        given = [cell for cell in reference.cells if is_check(cell)]
        found = _locate(nb, given)
    out = []
    for cell, i in zip(given, found, strict=True):
        if i is None:
            out.append(Check(-1, "changed", f"check cell {cell.get('id')} was deleted"))
        elif nb.cells[i].cell_type != "code" or nb.cells[i].source.strip() != cell.source.strip():
            out.append(Check(i, "changed", "the check cell was edited"))
        else:
            check = classify(nb.cells[i])
            check.cell = i
            out.append(check)
    return out


def _locate(nb, given: list) -> list[int | None]:
    """The index in ``nb`` of each handed-out check cell: by id, else (a cell cut and pasted
    gets a new id) the first unused code cell with the same source; None when deleted."""
    index = {cell.get("id"): i for i, cell in enumerate(nb.cells)}
    found = [index.get(cell.get("id")) for cell in given]
    for n, cell in enumerate(given):  # a cell cut and pasted gets a new id: same source, unused
        if found[n] is None:
            same = [
                i
                for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and c.source.strip() == cell.source.strip()
                and i not in found
            ]  # fmt: skip
            found[n] = same[0] if same else None
    return found


def find_reference(nb, student_dir: Path):
    """The handed-out notebook sharing the most cell ids with ``nb`` (None if none shares one)."""
    ids = {cell.get("id") for cell in nb.cells} - {None}
    best, shared = None, 0
    for path in sorted(student_dir.glob("*.ipynb")):
        candidate = nbformat.read(path, as_version=4)
        common = len(ids & {cell.get("id") for cell in candidate.cells})
        if common > shared:
            best, shared = candidate, common
    return best


def grade(
    path: Path, workdir: Path | None = None, timeout: int = 1800, reference_dir: Path | None = None
) -> list[Check]:
    """Execute ``path`` headless (errors allowed) and classify its check cells.

    A cell running longer than ``timeout`` seconds is interrupted and counts as an error, and so
    does everything after a dead kernel: one stuck submission does not stop the grading."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    reference_dir = reference_dir or ROOT / "notebooks" / "student"
    reference = find_reference(nb, reference_dir)
    if reference is None:
        print(f"warning: {path.name} shares no cell with {reference_dir}: edited or deleted "
              "check cells cannot be detected", file=sys.stderr)  # fmt: skip
    os.environ.setdefault("TQDM_DISABLE", "1")
    workdir = workdir or ROOT / "notebooks" / "student"
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
        resources={"metadata": {"path": str(workdir)}},
    )  # fmt: skip
    try:
        client.execute()
    except (CellTimeoutError, DeadKernelError) as error:  # cells not reached stay unexecuted
        print(f"warning: {path.name}: {type(error).__name__}: {error}", file=sys.stderr)
    return grade_executed(nb, reference)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--details", action="store_true", help="print each wrong answer's reason")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    ap.add_argument(
        "--reference", type=Path, default=ROOT / "notebooks" / "student",
        help="the folder of the handed-out notebooks (default notebooks/student)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    all_pass = True
    statuses = ("pass", "open", "wrong", "error", "changed")
    print(f"{'notebook':40s} " + " ".join(f"{s:>{max(len(s), 4)}s}" for s in statuses))
    for path in args.notebooks:
        checks = grade(path, timeout=args.timeout, reference_dir=args.reference)
        count = {s: sum(c.status == s for c in checks) for s in statuses}
        all_pass &= bool(checks) and count["pass"] == len(checks)
        print(f"{path.name:40s} " + " ".join(f"{count[s]:{max(len(s), 4)}d}" for s in statuses))
        if args.details:
            for c in checks:
                if c.status != "pass":
                    first = (c.message.splitlines() or [""])[0]
                    print(f"    cell {c.cell}: {c.status}: {first[:160]}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
