"""tools/grade.py: an instructor's check of learners' notebooks."""

import time

import nbformat
from conftest import load_tool
from nbformat.v4 import new_code_cell, new_notebook


def _check(source):
    return new_code_cell(source, metadata={"tags": ["check"]})


def test_grade_classifies_pass_open_wrong_and_error(tmp_path, capsys):
    grade = load_tool("grade")
    ok = "lambda a, e: {t: 100 * a[t] / e[t] for t in a}"
    fraction = "lambda a, e: {t: a[t] / e[t] for t in a}"
    nb = new_notebook(
        cells=[
            new_code_cell("from course_lib import checks"),
            _check(f"checks.check_normalized_accuracy({ok})"),
            _check('raise NotImplementedError("write your answer here")'),
            _check(f"checks.check_normalized_accuracy({fraction})"),
            _check("checks.check_normalized_accuracy(my_answer_never_defined)"),
        ]
    )
    path = tmp_path / "learner.ipynb"
    nbformat.write(nb, path)
    checks = grade.grade(path, workdir=tmp_path)
    assert [(c.cell, c.status) for c in checks] == [
        (1, "pass"), (2, "open"), (3, "wrong"), (4, "error"),
    ]  # fmt: skip
    assert "percent" in checks[2].message  # the checker's explanation is kept
    assert "NameError" in checks[3].message
    assert grade.main([str(path), "--details"]) == 1
    out = capsys.readouterr().out
    assert "learner.ipynb" in out and "cell 3: wrong" in out


def test_grade_passes_a_notebook_whose_checks_all_pass(tmp_path):
    grade = load_tool("grade")
    nb = new_notebook(cells=[_check("from course_lib import checks\nprint('fine')")])
    path = tmp_path / "done.ipynb"
    nbformat.write(nb, path)
    assert grade.main([str(path)]) == 0


def test_a_cell_that_never_ran_is_an_error():
    grade = load_tool("grade")
    cell = _check("checks.check_trim(my_trim)")
    assert grade.classify(cell).status == "error"


def test_an_edited_or_deleted_check_cell_is_changed_not_passed(tmp_path):
    """Commenting out the check call runs without error: the grader must not call that a pass."""
    grade = load_tool("grade")
    ok = "lambda a, e: {t: 100 * a[t] / e[t] for t in a}"
    handed_out = new_notebook(
        cells=[
            new_code_cell("from course_lib import checks", id="imports"),
            new_code_cell(f"answer = {ok}", id="answer"),
            _check("checks.check_normalized_accuracy(answer)"),
            _check("checks.check_normalized_accuracy(answer)"),
            _check("checks.check_normalized_accuracy(answer)"),
        ]
    )
    for i, cell in enumerate(handed_out.cells[2:]):
        cell["id"] = f"check-{i}"
    (tmp_path / "student").mkdir()
    nbformat.write(handed_out, tmp_path / "student" / "01_lesson.ipynb")
    submitted = nbformat.from_dict(handed_out)
    submitted.cells[3].source = "# checks.check_normalized_accuracy(answer)"  # silenced
    del submitted.cells[4]  # deleted
    path = tmp_path / "alice_01_lesson.ipynb"  # renamed: found by its cell ids
    nbformat.write(submitted, path)
    checks = grade.grade(path, workdir=tmp_path, reference_dir=tmp_path / "student")
    assert [(c.cell, c.status) for c in checks] == [(2, "pass"), (3, "changed"), (-1, "changed")]
    assert "check-2" in checks[2].message
    # without the reference the silenced cell would have passed
    (tmp_path / "none").mkdir()
    alone = grade.grade(path, workdir=tmp_path, reference_dir=tmp_path / "none")
    assert [c.status for c in alone] == [
        "pass", "pass",
    ]  # fmt: skip
    assert grade.main([str(path), "--reference", str(tmp_path / "student")]) == 1
    moved = nbformat.from_dict(handed_out)  # cut and pasted: a new id, the same source
    moved.cells[2]["id"] = "pasted"
    nbformat.write(moved, path)
    checks = grade.grade(path, workdir=tmp_path, reference_dir=tmp_path / "student")
    assert [c.status for c in checks] == ["pass", "pass", "pass"]


def test_a_cell_that_runs_too_long_is_interrupted_and_grading_goes_on(tmp_path):
    grade = load_tool("grade")
    nb = new_notebook(
        cells=[
            new_code_cell("import time\ntime.sleep(120)"),
            _check("raise AssertionError('reached after the interrupt')"),
        ]
    )
    path = tmp_path / "stuck.ipynb"
    nbformat.write(nb, path)
    start = time.monotonic()
    checks = grade.grade(path, workdir=tmp_path, timeout=5, reference_dir=tmp_path / "none")
    assert time.monotonic() - start < 100
    assert [c.status for c in checks] == ["wrong"]  # the next cells still ran
    assert "reached after the interrupt" in checks[0].message
