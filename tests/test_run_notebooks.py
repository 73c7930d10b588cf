"""tools/run_notebooks.py: what `make course` runs the notebooks with."""

import nbformat
import pytest
from conftest import load_tool
from nbclient.exceptions import CellTimeoutError
from nbformat.v4 import new_code_cell, new_notebook


@pytest.mark.parametrize(
    ("args", "expected"), [([], 3600), (["--timeout", "120"], 120), (["--timeout", "0"], None)]
)
def test_the_cell_time_limit_reaches_every_notebook(monkeypatch, capsys, tmp_path, args, expected):
    run = load_tool("run_notebooks")
    seen = []
    monkeypatch.setattr(run, "execute", lambda path, target, timeout: seen.append(timeout) or 1.0)
    assert run.main(["00", "01", "--out", str(tmp_path), *args]) == 0
    assert seen == [expected, expected]  # 0 means no limit (None for nbclient)
    assert str(tmp_path) in capsys.readouterr().out  # an --out outside the repository is shown


def test_a_cell_over_the_limit_stops_the_run(tmp_path):
    run = load_tool("run_notebooks")
    path = tmp_path / "slow.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("import time; time.sleep(30)")]), path)
    with pytest.raises(CellTimeoutError):
        run.execute(path, tmp_path / "out.ipynb", timeout=2)
    assert not (tmp_path / "out.ipynb").exists()
