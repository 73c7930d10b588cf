"""Build the course's Marp decks (slides/NN_*.md) to self-contained HTML in build/slides/.

Three steps, each a function that ``make slides`` and ``tests/test_slides.py`` share:

1. :func:`ensure_marp` installs marp-cli (and puppeteer-core, for the browser check) into
   ``slides/node_modules`` with ``npm ci`` from the committed ``slides/package-lock.json``, only
   when that folder is missing or was installed from other package files;
2. :func:`build_figures` draws the figures with ``tools/slide_figures.py`` into
   ``build/slides/figures/``;
3. :func:`build_decks` converts every deck to ``build/slides/<deck>.html``. The HTML inlines its
   theme, scripts and formulas (MathJax renders them at build time); figures stay files,
   referenced as ``figures/<name>.png``, so ``build/slides/`` works offline as a folder.

:func:`check_decks` opens the built decks in headless Chromium (``slides/check_decks.mjs``) and
returns what rendered; :func:`count_slides` and :func:`image_refs` read a deck's source.

Usage::

    python tools/build_slides.py            # figures + every deck -> build/slides/
    python tools/build_slides.py --check    # ... then open them in Chromium, screenshots too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "slides"
OUT = ROOT / "build" / "slides"
NODE_MODULES = SLIDES / "node_modules"
MARP = NODE_MODULES / ".bin" / "marp"
STAMP = NODE_MODULES / ".course-installed"  # sha256 of the package files npm ci installed
THEME = SLIDES / "theme.css"
CHECKER = SLIDES / "check_decks.mjs"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ToolMissing(RuntimeError):
    """node/npm is not installed, or ``npm ci`` could not install the packages (offline)."""


# ----------------------------------------------------------------------------- deck sources
def deck_sources() -> list[Path]:
    """The decks, in module order: ``slides/NN_*.md``."""
    return sorted(SLIDES.glob("[0-9][0-9]_*.md"))


_FENCE = re.compile(r"^\s*(```|~~~)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)")


def _body_lines(text: str) -> list[str]:
    """The deck's lines after the YAML front matter, outside fenced code blocks."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        try:
            end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        except StopIteration:
            end = 0  # no closing line: Marp reads it as a slide separator, not front matter
        lines = lines[end + 1 :]
    body, fence = [], None
    for line in lines:
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            body.append(line)
    return body


def count_slides(text: str) -> int:
    """Slides in a Marp deck: ``---`` separator lines outside the front matter and code, plus 1."""
    return 1 + sum(line.rstrip() == "---" for line in _body_lines(text))


def image_refs(text: str) -> list[str]:
    """Paths of the images a deck shows (``![...](path)``, ``![bg ...](path)`` included)."""
    return [m.group(1) for line in _body_lines(text) for m in _IMAGE.finditer(line)]


def front_matter(text: str) -> dict[str, str]:
    """The front matter's ``key: value`` lines (enough for Marp's global directives)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            return out
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip().strip("\"'")
    return {}


# ----------------------------------------------------------------------------- tools
def _package_digest() -> str:
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        h.update((SLIDES / name).read_bytes())
    return h.hexdigest()


def ensure_marp(quiet: bool = False) -> Path:
    """``npm ci`` in slides/ unless node_modules matches the committed lock file; the marp CLI."""
    digest = _package_digest()
    if MARP.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return MARP
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ToolMissing(
            "node and npm are needed to build the slides (apt-get install nodejs npm)"
        )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=SLIDES,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not MARP.exists():
        raise ToolMissing(f"npm ci in slides/ failed (offline?):\n{proc.stdout}{proc.stderr}")
    STAMP.write_text(digest + "\n")
    if not quiet:
        print(
            f"npm ci: marp-cli installed in {time.perf_counter() - t0:.0f} s -> slides/node_modules"
        )
    return MARP


def find_chrome() -> str | None:
    """The browser for the check: ``$CHROME_PATH``, else chromium (or Chrome) on the PATH."""
    path = os.environ.get("CHROME_PATH")
    if path:
        return path if Path(path).exists() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


# ----------------------------------------------------------------------------- building
def build_figures(out: Path = OUT / "figures") -> list[Path]:
    """Draw every slide figure (tools/slide_figures.py, in its own process: Agg, fresh seeds)."""
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "slide_figures.py"), "--out", str(out)], check=True
    )
    return sorted(out.glob("*.png"))


def build_decks(
    out: Path = OUT, decks: list[Path] | None = None, figures: bool = True, quiet: bool = False
) -> list[Path]:
    """Build the figures (unless ``figures=False``) and every deck; return the HTML paths."""
    decks = deck_sources() if decks is None else decks
    if not decks:
        raise FileNotFoundError(f"no deck in {SLIDES} (expected NN_*.md)")
    marp = ensure_marp(quiet)
    if figures:
        build_figures(out / "figures")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for deck in decks:
        html = out / f"{deck.stem}.html"
        proc = subprocess.run(
            [str(marp), "--no-stdin", "--html", "--theme-set", str(THEME), "-o", str(html), str(deck)],
            cwd=SLIDES,
            capture_output=True,
            text=True,
        )  # fmt: skip
        if proc.returncode != 0 or not html.exists():
            raise RuntimeError(f"marp failed on {deck.name}:\n{proc.stdout}{proc.stderr}")
        paths.append(html)
    if not quiet:
        print(f"{len(paths)} decks -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return paths


# ----------------------------------------------------------------------------- checking
def check_decks(
    htmls: list[Path],
    screenshots: Path = OUT / "screenshots",
    chrome: str | None = None,
    every_slide: bool = False,
    timeout: float = 300,
) -> dict:
    """Open the decks in headless Chromium (slides/check_decks.mjs); its JSON report as a dict."""
    chrome = chrome or find_chrome()
    if chrome is None:
        raise ToolMissing("no Chromium: set CHROME_PATH or install chromium")
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node is needed to check the slides in a browser")
    ensure_marp(quiet=True)  # installs puppeteer-core too
    cmd = [node, str(CHECKER), "--screenshots", str(screenshots)]
    cmd += ["--all"] if every_slide else []
    proc = subprocess.run(
        cmd + [str(h) for h in htmls],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CHROME_PATH": chrome},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"check_decks.mjs failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def problems(report: dict, sources: dict[str, Path]) -> list[str]:
    """Everything wrong in a :func:`check_decks` report, one line each, naming the deck."""
    out = []
    for deck in report["decks"]:
        name = deck["deck"]
        if "error" in deck:
            out.append(f"{name}: {deck['error']}")
            continue
        expected = count_slides(sources[name].read_text(encoding="utf-8"))
        if deck["slides"] != expected or deck["sections"] != expected:
            out.append(
                f"{name}: {deck['slides']} slides / {deck['sections']} sections rendered, "
                f"{expected} in the markdown"
            )
        for img in deck["images"] + deck["backgrounds"]:
            if not (img["complete"] and img["naturalWidth"] > 0):
                out.append(f"{name}: image {img['src']} did not load")
        for o in deck["overflow"]:
            out.append(f"{name}: slide {o['slide']} overflows ({o['scrollHeight']} px > 720 px)")
        out += [f"{name}: needs the network: {u}" for u in deck["external"]]
        out += [f"{name}: {f}" for f in deck["failed"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--no-figures", action="store_true", help="reuse the figures already built")
    ap.add_argument("--check", action="store_true", help="open every deck in headless Chromium")
    ap.add_argument("--every-slide", action="store_true", help="with --check: screenshot all")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        htmls = build_decks(args.out, figures=not args.no_figures)
        if args.check:
            report = check_decks(htmls, args.out / "screenshots", every_slide=args.every_slide)
            found = problems(report, {d.stem: d for d in deck_sources()})
            print("\n".join(found) or f"{len(htmls)} decks render cleanly in {report['browser']}")
            if found:
                return 1
    except (ToolMissing, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"build_slides: {err}", file=sys.stderr)
        return 1
    print(f"slides built in {time.perf_counter() - t0:.0f} s: open build/slides/<deck>.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
