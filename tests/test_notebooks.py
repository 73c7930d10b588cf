"""The notebooks: student versions are generated, up to date, and really leave the exercises open.

The solution notebooks themselves are executed by nbval (``pytest --nbval-lax notebooks/``,
part of ``make test``): every cell must run and every ``assert`` cell states a lesson's claim.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_six_vision_notebooks_with_exercises_and_checks():
    assert [p.name[:2] for p in SOLUTIONS][:6] == ["00", "01", "02", "03", "04", "05"]
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        checks = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
        assert len(checks) >= 2, f"{path.name}: needs at least two checked exercises"
        sources = "\n".join(c.source for c in nb.cells)
        assert "viz." in sources, f"{path.name}: needs a figure from course_lib.viz"
        assert "## What we learned" in sources and "**Objectives.**" in sources, path.name


def test_strip_solutions_replaces_each_block_with_a_stub():
    ms = load_tool("make_student")
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(f)"
    out, blocks = ms.strip_solutions(src, "cell")
    assert blocks == 1
    assert out == 'def f(x):\n    raise NotImplementedError("write your answer here")\n\nprint(f)'
    with pytest.raises(ValueError, match="never closed"):
        ms.strip_solutions("### BEGIN SOLUTION\nx = 1", "cell")
    with pytest.raises(ValueError, match="without BEGIN"):
        ms.strip_solutions("x = 1\n### END SOLUTION", "cell")


def _lesson(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 09 · A lesson"), *cells]
    return nb


@pytest.mark.parametrize(
    "cell",
    [
        nbformat.v4.new_code_cell("## BEGIN SOLUTION\nanswer = 42\n## END SOLUTION"),  # misspelt
        nbformat.v4.new_code_cell("### BEGIN SOLUTION (tiers)\nanswer = 42"),  # never matched
        nbformat.v4.new_markdown_cell("Answer:\n### BEGIN SOLUTION\n42\n### END SOLUTION"),
    ],
    ids=["two-hashes", "suffix", "markdown"],
)
def test_a_marker_left_after_stripping_stops_the_generator(cell):
    """Only exact marker lines in code cells are stripped: anything else would hand out the
    answer, so the generator refuses the notebook and names the cell."""
    ms = load_tool("make_student")
    exercise = nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    ms.student_version(_lesson(exercise), "09_lesson.ipynb")  # a well-marked one is fine
    with pytest.raises(ValueError, match="09_lesson.ipynb cell 2.*SOLUTION"):
        ms.student_version(_lesson(exercise, cell), "09_lesson.ipynb")


def test_relative_links_still_resolve_from_the_student_folder():
    ms = load_tool("make_student")
    text = "See [the measurements](../docs/measurements.md#x) and [03](03_ties_merging.ipynb)."
    exercise = nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    student = ms.student_version(_lesson(nbformat.v4.new_markdown_cell(text), exercise), "x")
    linked = student.cells[2].source
    assert "](../../docs/measurements.md#x)" in linked and "](03_ties_merging.ipynb)" in linked
    for path in SOLUTIONS:  # every relative link of the handed-out copies exists
        for cell in nbformat.read(ms.STUDENT / path.name, as_version=4).cells:
            for target in re.findall(r"\]\((?!https?:|#)([^)#]+)", cell.source):
                assert (ms.STUDENT / target).exists(), f"{path.name}: broken link {target}"


def test_student_notebooks_are_up_to_date():
    assert load_tool("make_student").main(["--check"]) == 0, "run: python tools/make_student.py"


def test_student_notebooks_carry_no_solution_and_no_output():
    ms = load_tool("make_student")
    for path in SOLUTIONS:
        student = nbformat.read(ms.STUDENT / path.name, as_version=4)
        for cell in student.cells:
            assert "BEGIN SOLUTION" not in cell.source
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_student_notebook_check_cells_fail_with_not_implemented(path):
    """Run the student notebook: only the check cells may fail, and with NotImplementedError."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "student" / path.name, as_version=4)
    os.environ.setdefault("TQDM_DISABLE", "1")
    NotebookClient(
        nb, timeout=900, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(ROOT / "notebooks" / "student")}},
    ).execute()  # fmt: skip
    checked = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if "check" in cell.metadata.get("tags", []):
            checked += 1
            assert errors and errors[0].ename == "NotImplementedError", (
                f"{path.name} cell {i}: the check cell should fail with NotImplementedError, "
                f"got {[e.ename for e in errors] or 'no error'}"
            )
        else:
            assert not errors, f"{path.name} cell {i} failed: {errors[0].ename}: {errors[0].evalue}"
    assert checked >= 2
