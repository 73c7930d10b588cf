"""The slide decks (slides/NN_*.md): their sources, and what they render in a real browser.

The fast tests read the markdown only. The slow test builds every deck with
``tools/build_slides.py`` (marp-cli from ``slides/package-lock.json``, figures from
``tools/slide_figures.py``) and opens the HTML in headless Chromium through
``slides/check_decks.mjs``. Without node or Chromium it skips and says why, unless
``COURSE_REQUIRE_BROWSER=1`` (set by ``.ci/run`` when it has a browser): then it fails.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import load_tool
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "00_setup_and_zoo",
    "01_task_vectors",
    "02_interference",
    "03_ties_merging",
    "04_pcb_merging",
    "05_twin_merging",
    "06_llm_merging",
    "07_capstone",
]


build_slides = load_tool("build_slides")


def _source(deck: str) -> str:
    return (ROOT / "slides" / f"{deck}.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- fast
def test_one_deck_per_module():
    assert [p.stem for p in build_slides.deck_sources()] == MODULES


@pytest.mark.parametrize("deck", MODULES)
def test_deck_source(deck):
    text = _source(deck)
    assert build_slides.front_matter(text).get("marp") == "true", f"{deck}: no 'marp: true'"
    assert 6 <= build_slides.count_slides(text) <= 12, f"{deck}: expected 6-12 slides"
    assert build_slides.image_refs(text), f"{deck}: shows no figure"
    assert "notebook" in text.lower(), f"{deck}: no pointer to its notebook"


@pytest.mark.parametrize("deck", MODULES)
def test_every_image_is_drawn_by_slide_figures(deck):
    figures = load_tool("slide_figures").FIGURES
    for ref in build_slides.image_refs(_source(deck)):
        name = ref.removeprefix("figures/").removesuffix(".png")
        assert ref == f"figures/{name}.png", f"{deck}: {ref} is not figures/<name>.png"
        assert name in figures, f"{deck}: {ref} is not drawn by tools/slide_figures.py"


def test_count_slides_and_image_refs():
    deck = "\n".join(
        [
            "---",
            "marp: true",
            "---",
            "",
            "# one",
            "```",
            "---",
            "![](figures/in_code.png)",
            "```",
            "---",
            "![w:300](figures/a.png) and ![bg right](figures/b.png)",
            "",
            "---  ",
            "three",
        ]
    )
    assert build_slides.count_slides(deck) == 3
    assert build_slides.image_refs(deck) == ["figures/a.png", "figures/b.png"]
    assert build_slides.count_slides("# no front matter\n\n---\n\ntwo") == 2
    assert build_slides.front_matter("# no front matter") == {}


# ----------------------------------------------------------------------------- browser
def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _unavailable(reason: str):
    if os.environ.get("COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (COURSE_REQUIRE_BROWSER=1 requires the browser test)")
    pytest.skip(reason)


@pytest.mark.slow
def test_decks_render_in_chromium():
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node/npm not installed: cannot build or check the slides")
    chrome = build_slides.find_chrome()
    if chrome is None:
        _unavailable("no Chromium: set CHROME_PATH or install chromium (apt-get install chromium)")
    try:
        htmls = build_slides.build_decks(quiet=True)
    except build_slides.ToolMissing as err:
        _unavailable(str(err))
    screenshots = build_slides.OUT / "screenshots"
    for old in screenshots.glob("*.png"):
        old.unlink()
    report = build_slides.check_decks(htmls, screenshots, chrome=chrome)

    decks = {d["deck"]: d for d in report["decks"]}
    assert sorted(decks) == MODULES
    for name in MODULES:
        deck = decks[name]
        assert "error" not in deck, f"{name}: {deck.get('error')}"
        expected = build_slides.count_slides(_source(name))
        assert deck["slides"] == expected, (
            f"{name}: {deck['slides']} slides rendered, {expected} in slides/{name}.md"
        )
        assert deck["sections"] == expected, (
            f"{name}: {deck['sections']} content sections rendered, {expected} slides in the markdown"
        )
        shown = [img["src"] for img in deck["images"] + deck["backgrounds"]]
        assert len(shown) >= len(build_slides.image_refs(_source(name))), (
            f"{name}: the markdown shows more images than the page has: {shown}"
        )
        for img in deck["images"] + deck["backgrounds"]:
            assert img["complete"] and img["naturalWidth"] > 0, (
                f"{name}: image {img['src']} did not load ({img})"
            )
        assert not deck["overflow"], f"{name}: content overflows slide(s) {deck['overflow']}"
        assert not deck["external"], f"{name}: needs the network: {deck['external']}"
        assert not deck["failed"], f"{name}: failed requests or page errors: {deck['failed']}"

        shot = screenshots / f"{name}.png"
        assert shot.exists(), f"{name}: no screenshot at {shot}"
        assert _png_size(shot) == (1280, 720), f"{name}: screenshot is {_png_size(shot)}"
        with Image.open(shot) as img:
            colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, f"{name}: screenshot {shot} looks blank"
