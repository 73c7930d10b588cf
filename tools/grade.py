"""Check learners' notebooks: run each one headless and report every exercise's check cell.

For instructors. Hand out ``notebooks/student/``; collect the learners' copies; run::

    python tools/grade.py submissions/*.ipynb            # a table: one row per notebook
    python tools/grade.py alice/03_ties_merging.ipynb --details

Each notebook runs from the course's ``notebooks/student/`` folder (so relative paths work) with
errors allowed, and every cell tagged ``check`` is classified:

* ``pass``  - the check printed its confirmation (``course_lib.checks`` returned True);
* ``open``  - the answer is still the stub (``NotImplementedError``);
* ``wrong`` - the checker raised and explained the mistake (shown with ``--details``);
* ``error`` - the cell did not reach the checker, e.g. an earlier cell failed.

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
    status: str  # pass | open | wrong | error
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


def grade_executed(nb) -> list[Check]:
    """Classify every check cell of an already executed notebook."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "check" in cell.metadata.get("tags", []):
            check = classify(cell)
            check.cell = i
            out.append(check)
    return out


def grade(path: Path, workdir: Path | None = None, timeout: int = 900) -> list[Check]:
    """Execute ``path`` headless (errors allowed) and classify its check cells."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("TQDM_DISABLE", "1")
    workdir = workdir or ROOT / "notebooks" / "student"
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
    ).execute()  # fmt: skip
    return grade_executed(nb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--details", action="store_true", help="print each wrong answer's reason")
    args = ap.parse_args(argv)
    all_pass = True
    print(f"{'notebook':40s} {'pass':>4s} {'open':>4s} {'wrong':>5s} {'error':>5s}")
    for path in args.notebooks:
        checks = grade(path)
        count = {s: sum(c.status == s for c in checks) for s in ("pass", "open", "wrong", "error")}
        all_pass &= bool(checks) and count["pass"] == len(checks)
        print(
            f"{path.name:40s} {count['pass']:4d} {count['open']:4d} {count['wrong']:5d} "
            f"{count['error']:5d}"
        )
        if args.details:
            for c in checks:
                if c.status != "pass":
                    first = (c.message.splitlines() or [""])[0]
                    print(f"    cell {c.cell}: {c.status}: {first[:160]}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
