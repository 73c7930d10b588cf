"""tools/grade.py: an instructor's check of learners' notebooks."""

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
