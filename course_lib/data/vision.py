"""The mini world: eight small image-classification tasks and a captioned pretraining corpus.

Real CLIP is pretrained on captioned web images and then merged across eight downstream tasks
(SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD). The mini profile rebuilds that
setting offline, at 32x32 RGB, in seconds on a CPU:

* two **real** tasks with no counterpart in the pretraining corpus, like CLIP's hard tasks:
  ``digits`` (scikit-learn's 1,797 bundled 8x8 handwritten digits, upsampled) and ``fashion``
  (a vendored, class-balanced Fashion-MNIST subset, see ``data/fashion_mnist/``);
* six **procedural** tasks drawn from the same visual vocabulary as the corpus but in another
  style (other fonts, clutter, noise, rotations): ``shapes``, ``glyphs``, ``textures``,
  ``colors``, ``positions`` and ``street_digits`` (an SVHN look-alike);
* :func:`caption_corpus`, compositional scenes with captions such as
  ``"a small red star at the top left on a background of stripes"``, ``"the letter k in blue"``
  or ``"three green hearts"``: the corpus a tiny CLIP is pretrained on contrastively. Its words
  cover every procedural class name (:func:`corpus_vocabulary`), never the fashion item names.

Everything is deterministic from a seed and vectorized with NumPy: every object is a *sprite*
(a shape or a font glyph, rendered once with PIL and cached) pasted into a batch of canvases
with one bilinear lookup per pixel, so a whole split is drawn in a few array operations.

Splits are ``datasets.Dataset`` with columns ``pixels`` (uint8 ``[3, 32, 32]``) and ``label``
(int64), formatted as NumPy *without* the int64 up-cast that ``with_format("numpy")`` or
``with_format("torch")`` would apply (8x the memory); :meth:`MiniVisionTask.to_pixels` turns
uint8 pixels into normalized float32 only for the batch being used.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from datasets.features.features import Array3DExtensionType
from PIL import Image, ImageDraw, ImageFont

from course_lib import config
from course_lib.data.base import SPLITS, VisionTask

IMAGE_SIZE = 32
TASKS: tuple[str, ...] = (
    "digits",
    "fashion",
    "shapes",
    "glyphs",
    "textures",
    "colors",
    "positions",
    "street_digits",
)
MINI_SIZES = {"train": 2000, "val": 500, "test": 1000}
# the real CLIP benchmark task each mini task stands in for (the full profile loads these)
FULL_ANALOGUES = {
    "digits": "MNIST",
    "fashion": "Cars",
    "shapes": "GTSRB",
    "glyphs": "RESISC45",
    "textures": "DTD",
    "colors": "EuroSAT",
    "positions": "SUN397",
    "street_digits": "SVHN",
}
FASHION_FILE = config.DATA_DIR / "fashion_mnist" / "fashion_mnist_subset.npz"

# ----------------------------------------------------------------------------- vocabulary
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring"]
EXTRA_SHAPES = ["hexagon", "moon"]  # corpus only
SHAPE_PLURALS = {s: s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES + EXTRA_SHAPES}
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
EXTRA_COLORS = ["white", "black", "gray"]  # corpus only
# hue (degrees), saturation range, value range of every named colour
_COLOR_HSV = {
    "red": (0, (0.75, 1.0), (0.75, 1.0)),
    "orange": (30, (0.8, 1.0), (0.85, 1.0)),
    "yellow": (57, (0.75, 1.0), (0.85, 1.0)),
    "green": (125, (0.7, 1.0), (0.55, 0.9)),
    "cyan": (185, (0.7, 1.0), (0.8, 1.0)),
    "blue": (228, (0.75, 1.0), (0.7, 1.0)),
    "purple": (280, (0.6, 0.9), (0.55, 0.85)),
    "pink": (328, (0.3, 0.55), (0.9, 1.0)),
    "white": (0, (0.0, 0.05), (0.93, 1.0)),
    "black": (0, (0.0, 0.1), (0.0, 0.1)),
    "gray": (0, (0.0, 0.05), (0.45, 0.6)),
}
TEXTURES = ["stripes", "checks", "dots", "waves", "zigzags", "grid", "bricks", "spirals"]
POSITIONS = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]  # fmt: skip
LETTERS = list("abcdefghij")  # the glyphs task; the corpus shows all 26 letters
DIGIT_NAMES = [str(d) for d in range(10)]
COUNT_WORDS = ["one", "two", "three", "four", "five", "six"]
SIZES_WORDS = ["small", "large"]
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip

_CLASSNAMES = {
    "digits": DIGIT_NAMES,
    "fashion": FASHION_CLASSES,
    "shapes": SHAPES,
    "glyphs": LETTERS,
    "textures": TEXTURES,
    "colors": COLORS,
    "positions": POSITIONS,
    "street_digits": DIGIT_NAMES,
}
_TEMPLATES = {
    "digits": ['a photo of the number: "{}".', "a handwritten digit {}.", "the digit {}."],
    "fashion": ["a photo of a {}.", "a photo of the {}, a type of clothing.", "a {}."],
    "shapes": ["a photo of a {}.", "a {} shape.", "a drawing of a {}."],
    "glyphs": ["the letter {}.", "a photo of the letter {}.", "a drawing of the letter {}."],
    "textures": ["a photo of a {} texture.", "a pattern of {}.", "a background of {}."],
    "colors": ["a photo of a {} object.", "a {} object.", "a {} shape."],
    "positions": ["an object at the {}.", "a photo of a shape at the {}."],
    "street_digits": ['a photo of the number: "{}".', "the house number {}.", "the number {}."],
}

# ----------------------------------------------------------------------------- fonts
_TASK_FONT_FILES = [
    "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
]  # fmt: skip
_CORPUS_FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf"]  # the corpus' clean style
_SPRITE_RES = 64  # glyphs and shapes are drawn at this size, then box-filtered down
_LEVELS = (32, 12)  # atlas resolutions: big objects sample the 32 one, small ones the 12 one
_MARGIN = 1.25  # a sprite canvas is 1.25x the object's largest side


def _font_dirs() -> list[Path]:
    """Where to look for fonts: matplotlib's bundled DejaVu/STIX/CM first, then the system."""
    dirs = []
    try:
        import matplotlib

        dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    dirs.append(Path("/usr/share/fonts/truetype/dejavu"))
    return dirs


def _find_fonts(files: list[str]) -> list[Path]:
    """The paths of those font files that exist (at least one is required)."""
    found = []
    for name in files:
        for d in _font_dirs():
            if (d / name).is_file():
                found.append(d / name)
                break
    if not found:
        raise FileNotFoundError(f"none of the fonts {files} found in {_font_dirs()}")
    return found


# ----------------------------------------------------------------------------- sprites
def _fit(mask: np.ndarray) -> np.ndarray:
    """Crop ink and centre it on a square canvas so its longest side spans 1/_MARGIN of it."""
    ys, xs = np.nonzero(mask > 8)
    crop = Image.fromarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    side = _SPRITE_RES / _MARGIN
    scale = side / max(crop.size)
    w, h = max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))
    canvas = Image.new("L", (_SPRITE_RES, _SPRITE_RES))
    canvas.paste(
        crop.resize((w, h), Image.LANCZOS), ((_SPRITE_RES - w) // 2, (_SPRITE_RES - h) // 2)
    )
    return np.asarray(canvas)


@functools.lru_cache(maxsize=64)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _SPRITE_RES)


def _render_glyph(char: str, font_path: Path) -> np.ndarray:
    """One character of one font as a centred uint8 mask."""
    font = _font(str(font_path))
    img = Image.new("L", (2 * _SPRITE_RES, 2 * _SPRITE_RES))
    ImageDraw.Draw(img).text((_SPRITE_RES // 3, _SPRITE_RES // 6), char, fill=255, font=font)
    return _fit(np.asarray(img))


def _polygon(points: np.ndarray) -> list[tuple[float, float]]:
    """Unit-box points (x, y in [-0.5, 0.5]) to pixel coordinates of a 4x canvas."""
    s = 2 * _SPRITE_RES
    return [(s / 2 + x * s * 0.8, s / 2 + y * s * 0.8) for x, y in points]


def _render_shape(name: str) -> np.ndarray:
    """One geometric shape as a centred uint8 mask."""
    s = 2 * _SPRITE_RES
    img = Image.new("L", (s, s))
    draw = ImageDraw.Draw(img)
    t = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    if name in ("circle", "ring", "moon"):
        draw.ellipse(_polygon(np.array([[-0.5, -0.5], [0.5, 0.5]])), fill=255)
        if name == "ring":
            draw.ellipse(_polygon(np.array([[-0.28, -0.28], [0.28, 0.28]])), fill=0)
        if name == "moon":
            draw.ellipse(_polygon(np.array([[-0.3, -0.6], [0.7, 0.4]])), fill=0)
    elif name == "square":
        draw.polygon(_polygon(np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])), 255)
    elif name == "triangle":
        draw.polygon(_polygon(np.array([[0, -0.5], [0.5, 0.37], [-0.5, 0.37]])), fill=255)
    elif name == "diamond":
        draw.polygon(_polygon(np.array([[0, -0.5], [0.33, 0], [0, 0.5], [-0.33, 0]])), fill=255)
    elif name in ("star", "hexagon"):
        k = 5 if name == "star" else 6
        a = np.arange(2 * k) * np.pi / k - np.pi / 2
        r = np.where(np.arange(2 * k) % 2 == 0, 0.5, 0.2 if name == "star" else 0.5)
        draw.polygon(_polygon(np.stack([r * np.cos(a), r * np.sin(a)], 1)), fill=255)
    elif name == "cross":
        w = 0.17
        for box in ([[-0.5, -w], [0.5, w]], [[-w, -0.5], [w, 0.5]]):
            draw.rectangle(_polygon(np.array(box)), fill=255)
    elif name == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        draw.polygon(_polygon(np.stack([x, y], 1) / 34), fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return _fit(np.asarray(img))


class _Atlas:
    """Sprites (shapes and glyphs) stored at a few resolutions, zero-padded for bilinear lookup."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}
        masks = []
        for name in SHAPES + EXTRA_SHAPES:
            self.index["shape", name] = len(masks)
            masks.append(_render_shape(name))
        chars = [c.upper() for c in "abcdefghijklmnopqrstuvwxyz"] + DIGIT_NAMES
        self.task_fonts = _find_fonts(_TASK_FONT_FILES)
        self.corpus_fonts = _find_fonts(_CORPUS_FONT_FILES)
        for font in self.task_fonts + self.corpus_fonts:
            for ch in chars:
                self.index[font.name, ch] = len(masks)
                masks.append(_render_glyph(ch, font))
        self.levels = {}
        for res in _LEVELS:
            small = [np.asarray(Image.fromarray(m).resize((res, res), Image.BOX)) for m in masks]
            self.levels[res] = np.pad(
                np.stack(small).astype(np.float32) / 255, ((0, 0), (1, 1), (1, 1))
            )

    def ids(self, kind: str, names: list[str]) -> np.ndarray:
        """Sprite ids of ``names`` (shape names, or characters of font file ``kind``)."""
        return np.array([self.index[kind, n] for n in names])

    def glyph_ids(self, fonts: list[Path], chars: np.ndarray, font_idx: np.ndarray) -> np.ndarray:
        """Sprite ids of characters ``chars[i]`` in font ``fonts[font_idx[i]]``."""
        return np.array(
            [self.index[fonts[f].name, c.upper()] for c, f in zip(chars, font_idx, strict=True)]
        )


@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    """The sprite atlas, rendered once per process (about a second)."""
    return _Atlas()


# ----------------------------------------------------------------------------- drawing helpers
def _sample(atlas: np.ndarray, sid, cx, cy, span, angle=None, aspect=None) -> np.ndarray:
    """Alpha masks ``[N, 32, 32]``: sprite ``sid[i]`` centred at ``(cx, cy)`` (pixels), its canvas
    ``span`` pixels wide, rotated by ``angle`` radians and stretched horizontally by ``aspect``."""
    n = len(sid)
    res = atlas.shape[-1] - 2
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - np.asarray(cx, np.float32)[:, None, None]
    dy = grid[None, :, None] - np.asarray(cy, np.float32)[:, None, None]
    angle = np.zeros(n, np.float32) if angle is None else np.asarray(angle, np.float32)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    sx = np.asarray(span, np.float32) * (1.0 if aspect is None else np.asarray(aspect))
    sy = np.asarray(span, np.float32)
    u = (c * dx + s * dy) / sx[:, None, None]
    v = (c * dy - s * dx) / sy[:, None, None]
    fx = np.clip((u + 0.5) * res + 0.5, 0, res + 0.999)
    fy = np.clip((v + 0.5) * res + 0.5, 0, res + 0.999)
    x0, y0 = fx.astype(np.int32), fy.astype(np.int32)
    wx, wy = fx - x0, fy - y0
    side = res + 2
    flat = atlas.reshape(-1)
    i00 = (np.asarray(sid, np.int32) * side * side)[:, None, None] + y0 * side + x0
    dx1 = (x0 <= res).astype(np.int32)  # step right unless at the padded edge
    dy1 = (y0 <= res).astype(np.int32) * side
    top = flat.take(i00) * (1 - wx) + flat.take(i00 + dx1) * wx
    bottom = flat.take(i00 + dy1) * (1 - wx) + flat.take(i00 + dy1 + dx1) * wx
    return top * (1 - wy) + bottom * wy


def _stamp(canvas, sid, cx, cy, size, color, angle=None, aspect=None, alpha=None) -> None:
    """Paint sprites (object side ``size`` pixels) of colour ``color [N, 3]`` into ``canvas``;
    ``alpha`` (per image, optional) scales their opacity (0 skips an image)."""
    atlas = _atlas()
    size = np.asarray(size, np.float32)
    small = size < 18
    for res, pick in ((_LEVELS[1], small), (_LEVELS[0], ~small)):
        if pick.any():
            args = [_subset(a, pick) for a in (sid, cx, cy, size * _MARGIN, angle, aspect)]
            mask = _sample(atlas.levels[res], *args)
            if alpha is not None:
                mask *= _subset(alpha, pick).astype(np.float32)[:, None, None]
            _blend(canvas, pick, mask, np.asarray(color)[pick])


def _subset(values, pick: np.ndarray):
    """``values[pick]`` for per-image arrays; ``None`` stays ``None``."""
    return None if values is None else np.asarray(values)[pick]


def _blend(canvas: np.ndarray, pick, mask: np.ndarray, color: np.ndarray) -> None:
    """``canvas[pick] = canvas * (1 - mask) + mask * color`` in place."""
    m = mask[..., None]
    if pick.all():  # in place, no copies
        canvas -= m * (canvas - color[:, None, None, :].astype(np.float32))
    else:
        canvas[pick] = canvas[pick] * (1 - m) + m * color[:, None, None, :]


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorized HSV (h in degrees) to RGB in [0, 1], shape ``[N, 3]``."""
    h = (np.asarray(h) % 360) / 60
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.select(
        [sector[:, None] == i for i in range(6)], [np.stack(t, 1) for t in table], default=0
    )
    return rgb + (v - c)[:, None]


def _named_colors(rng: np.random.Generator, names: np.ndarray) -> np.ndarray:
    """RGB ``[N, 3]`` samples of the named colours (hue, saturation and value jittered)."""
    n = len(names)
    h, s, v = np.zeros(n), np.zeros(n), np.zeros(n)
    for name, (hue, (s0, s1), (v0, v1)) in _COLOR_HSV.items():
        pick = names == name
        k = int(pick.sum())
        h[pick] = hue + rng.uniform(-7, 7, k)
        s[pick] = rng.uniform(s0, s1, k)
        v[pick] = rng.uniform(v0, v1, k)
    return _hsv_to_rgb(h, s, v)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _contrasting(rng: np.random.Generator, background: np.ndarray, gap: float = 0.4) -> np.ndarray:
    """Random colours whose luminance differs from ``background``'s by at least ``gap``: random
    hues mixed towards white on dark backgrounds and towards black on light ones."""
    n = len(background)
    rgb = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.2, 1, n), rng.uniform(0.4, 1, n))
    lum, bg = _luminance(rgb), _luminance(background)
    up = bg < 0.5
    target = np.where(up, np.maximum(lum, bg + gap), np.minimum(lum, bg - gap))
    to_white = np.clip((1 - target) / np.maximum(1 - lum, 1e-6), 0, 1)[:, None]
    to_black = np.clip(target / np.maximum(lum, 1e-6), 0, 1)[:, None]
    return np.where(up[:, None], 1 - (1 - rgb) * to_white, rgb * to_black)


def _smooth_field(rng: np.random.Generator, n: int, cells: int, lo=0.0, hi=1.0) -> np.ndarray:
    """Smooth random colour fields ``[N, 32, 32, 3]`` (bilinear upsampling of a coarse grid)."""
    coarse = rng.uniform(lo, hi, (n, cells, cells, 3)).astype(np.float32)
    pos = np.clip((np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * cells - 0.5, 0, cells - 1)
    i0 = np.minimum(pos.astype(int), cells - 2) if cells > 1 else np.zeros(IMAGE_SIZE, int)
    w = pos - i0
    m = np.zeros((IMAGE_SIZE, cells), np.float32)
    m[np.arange(IMAGE_SIZE), i0] = 1 - w
    if cells > 1:
        m[np.arange(IMAGE_SIZE), i0 + 1] += w
    return np.einsum("yi,nijc,xj->nyxc", m, coarse, m, optimize=True)


def _backgrounds(rng: np.random.Generator, n: int, spread: float = 0.25) -> np.ndarray:
    """Smoothly varying backgrounds around a random base colour, ``[N, 32, 32, 3]``."""
    base = rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32)
    return np.clip(base + _smooth_field(rng, n, 3, -spread, spread), 0, 1)


def _finish(rng: np.random.Generator, canvas: np.ndarray, noise: float = 0.03) -> np.ndarray:
    """Add pixel noise, clip and convert ``[N, H, W, 3]`` floats to uint8 ``[N, 3, H, W]``."""
    if noise:
        canvas = canvas + noise * rng.standard_normal(canvas.shape, dtype=np.float32)
    out = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` labels in ``range(k)``, as balanced as possible, in random order."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


# ----------------------------------------------------------------------------- textures
def _texture_values(rng: np.random.Generator, kinds: np.ndarray, period=(4.0, 9.0)) -> np.ndarray:
    """Texture intensities in [0, 1], ``[N, 32, 32]``, for texture class indices ``kinds``."""
    n = len(kinds)
    g = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    xs, ys = g[None, None, :], g[:, None][None]
    theta = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    f = (1 / rng.uniform(*period, n)).astype(np.float32)[:, None, None]  # cycles per pixel
    phase = rng.uniform(0, 1, n).astype(np.float32)[:, None, None]
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = ys * np.cos(theta) - xs * np.sin(theta)
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    two_pi = 2 * np.pi

    def soft(x, sharp=4.0):
        return 1 / (1 + np.exp(-sharp * x))

    for k, name in enumerate(TEXTURES):
        p = kinds == k
        if not p.any():
            continue
        uk, vk, fk, ph = u[p], v[p], f[p], phase[p]
        if name == "stripes":
            val = soft(np.sin(two_pi * (fk * uk + ph)))
        elif name == "checks":
            val = soft(np.sin(two_pi * (fk * uk + ph)) * np.sin(two_pi * (fk * vk + ph)), 8)
        elif name == "dots":
            du, dv = (fk * uk + ph) % 1 - 0.5, (fk * vk + ph) % 1 - 0.5
            val = soft(0.3 - np.sqrt(du**2 + dv**2), 30)
        elif name == "waves":
            val = soft(np.sin(two_pi * (fk * vk + 0.6 * np.sin(two_pi * fk * 0.4 * uk) + ph)))
        elif name == "zigzags":
            tri = np.abs((fk * 0.6 * uk) % 1 - 0.5)
            val = soft(np.sin(two_pi * (fk * vk + 2.0 * tri + ph)), 8)
        elif name == "grid":
            du, dv = np.abs((fk * uk + ph) % 1 - 0.5), np.abs((fk * vk + ph) % 1 - 0.5)
            val = soft(np.maximum(du, dv) - 0.36, 30)
        elif name == "bricks":
            row = np.floor(fk * vk + ph)
            du = np.abs((0.5 * fk * uk + 0.5 * (row % 2)) % 1 - 0.5)
            dv = np.abs((fk * vk + ph) % 1 - 0.5)
            val = soft(np.maximum(dv - 0.38, (du - 0.44) * 2), 30)
        else:  # spirals
            cx = rng.uniform(8, 24, int(p.sum())).astype(np.float32)[:, None, None]
            cy = rng.uniform(8, 24, int(p.sum())).astype(np.float32)[:, None, None]
            r = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
            ang = np.arctan2(ys - cy, xs - cx)
            arms = rng.integers(1, 4, int(p.sum()))[:, None, None]
            val = soft(np.sin(two_pi * fk * r + arms * ang + two_pi * ph))
        out[p] = val
    return out


def _texture_images(
    rng: np.random.Generator, kinds: np.ndarray, contrast=(0.35, 1.0), period=(4.0, 9.0)
):
    """Two-colour texture images ``[N, 32, 32, 3]`` of the given texture classes."""
    n = len(kinds)
    a = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    direction = rng.normal(size=(n, 3)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    b = np.clip(a + direction * rng.uniform(*contrast, (n, 1)), 0, 1)
    b = np.where((np.abs(b - a).sum(1, keepdims=True) < 0.4), 1 - a, b).astype(np.float32)
    t = _texture_values(rng, kinds, period)[..., None]
    return a[:, None, None] * (1 - t) + b[:, None, None] * t


# ----------------------------------------------------------------------------- the eight tasks
def digits(
    rng: np.random.Generator, n: int, split: str, **_
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's real 8x8 digits, upsampled to 32x32 with colour and small jitter.

    The 1,797 sources are split 60/10/30 into train/val/test *before* augmentation (with a fixed
    permutation, independent of the seed), so no source image is shared between splits.
    Returns ``(pixels, labels, source indices)``.
    """
    images, targets = _sklearn_digits()
    order = np.random.default_rng(12345).permutation(len(targets))
    cut = np.cumsum([int(0.6 * len(order)), int(0.1 * len(order))])
    pool = dict(zip(SPLITS, np.split(order, cut), strict=True))[split]
    src = _balanced_sources(rng, targets[pool], pool, n)
    atlas = np.pad(images.astype(np.float32) / 16, ((0, 0), (1, 1), (1, 1)))
    bg = _backgrounds(rng, n, 0.1) * 0.5  # dark
    ink = np.clip(_hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0, 0.6, n), np.ones(n)), 0, 1)
    mask = _sample(
        atlas,
        src,
        16 + rng.uniform(-2, 2, n),
        16 + rng.uniform(-2, 2, n),
        rng.uniform(27, 33, n),
        rng.uniform(-0.15, 0.15, n),
        rng.uniform(0.85, 1.1, n),
    )
    _blend(bg, np.ones(n, bool), mask, ink)
    return _finish(rng, bg, 0.02), targets[src].astype(np.int64), src.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits ``(images [1797, 8, 8], targets)``, read straight from its
    CSV file when possible (importing scikit-learn costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - unusual installs

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def _balanced_sources(
    rng: np.random.Generator, labels: np.ndarray, pool: np.ndarray, n: int
) -> np.ndarray:
    """``n`` source indices from ``pool``, balanced over classes, each used before any repeats."""
    classes = np.unique(labels)
    want = _balanced_labels(rng, n, len(classes))
    out = np.empty(n, np.int64)
    for k, c in enumerate(classes):
        slots = np.flatnonzero(want == k)
        members = pool[labels == c]
        reps = -(-len(slots) // len(members))
        out[slots] = np.concatenate([rng.permutation(members) for _ in range(reps)])[: len(slots)]
    return out


@functools.lru_cache(maxsize=1)
def _fashion_arrays() -> dict[str, np.ndarray]:
    """The vendored Fashion-MNIST subset (28x28 uint8), loaded once."""
    if not FASHION_FILE.is_file():
        raise FileNotFoundError(f"{FASHION_FILE} is missing; see tools/vendor_fashion_mnist.py")
    with np.load(FASHION_FILE) as z:
        return {k: z[k] for k in z.files}


def fashion(
    rng: np.random.Generator, n: int, split: str, **_
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images, padded to 32x32 grey RGB.

    Train and val come from the vendored original-train subset (a fixed 5:1 partition of its
    3,000 images), test from the original-test subset. When a split asks for more images than it
    has, the extra ones are shifted and mirrored copies. Sources are ``train_index`` or
    ``60000 + test_index`` of the original files.
    """
    z = _fashion_arrays()
    if split == "test":
        images, labels, index = z["test_images"], z["test_labels"], z["test_index"] + 60000
    else:
        order = np.random.default_rng(12345).permutation(len(z["train_labels"]))
        part = order[: len(order) * 5 // 6] if split == "train" else order[len(order) * 5 // 6 :]
        images, labels, index = (
            z["train_images"][part],
            z["train_labels"][part],
            z["train_index"][part],
        )
    pool = np.arange(len(labels))
    pick = _balanced_sources(rng, labels.astype(np.int64), pool, n)
    x = np.pad(images[pick].astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    repeat = np.zeros(n, bool)
    seen = set()
    for i, p in enumerate(pick):
        repeat[i] = p in seen
        seen.add(p)
    if repeat.any():  # augment only the repeats: shift by up to 2 px and mirror half of them
        for i in np.flatnonzero(repeat):
            x[i] = np.roll(x[i], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
            if rng.random() < 0.5:
                x[i] = x[i][:, ::-1]
    canvas = np.repeat(x[..., None], 3, axis=-1)
    return _finish(rng, canvas, 0.0), labels[pick].astype(np.int64), index[pick].astype(np.int64)


def shapes(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Eight shapes, random colour/size/position/tilt, on mottled backgrounds with small specks."""
    labels = _balanced_labels(rng, n, len(SHAPES))
    atlas = _atlas()
    canvas = _backgrounds(rng, n)
    for _ in range(2):  # clutter: small specks of random colour
        speck = atlas.ids("shape", ["circle", "square"])[rng.integers(0, 2, n)]
        _stamp(
            canvas,
            speck,
            *rng.uniform(2, 30, (2, n)),
            rng.uniform(2, 4, n),
            rng.uniform(0, 1, (n, 3)),
        )
    size = rng.uniform(16, 25, n)
    cx, cy = (16 + rng.uniform(-1, 1, (2, n)) * (15 - size / 2)).clip(5, 27)
    color = _contrasting(rng, canvas[:, 16, 16])
    sid = atlas.ids("shape", SHAPES)[labels]
    _stamp(canvas, sid, cx, cy, size, color, rng.uniform(-0.25, 0.25, n), rng.uniform(0.9, 1.1, n))
    return _finish(rng, canvas, 0.03), labels


def glyphs(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Ten capital letters in many fonts (none of the corpus' fonts), tilted, coloured."""
    labels = _balanced_labels(rng, n, len(LETTERS))
    atlas = _atlas()
    fonts = atlas.task_fonts
    sid = atlas.glyph_ids(fonts, np.array(LETTERS)[labels], rng.integers(0, len(fonts), n))
    canvas = _backgrounds(rng, n, 0.3)
    size = rng.uniform(19, 26, n)
    cx, cy = 16 + rng.uniform(-1, 1, (2, n)) * (15 - size / 2) * 0.5
    color = _contrasting(rng, canvas[:, 16, 16])
    _stamp(canvas, sid, cx, cy, size, color, rng.uniform(-0.15, 0.15, n), rng.uniform(0.9, 1.1, n))
    return _finish(rng, canvas, 0.03), labels


def textures(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Eight texture classes with random colours, scale, orientation and phase, plus shading."""
    labels = _balanced_labels(rng, n, len(TEXTURES))
    a = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    b = _contrasting(rng, a, 0.35).astype(np.float32)
    t = _texture_values(rng, labels, (5.0, 9.0))[..., None]
    canvas = a[:, None, None] * (1 - t) + b[:, None, None] * t
    shade = _smooth_field(rng, n, 2, 0.85, 1.15)[..., :1]
    return _finish(rng, np.clip(canvas * shade, 0, 1), 0.04), labels


def colors(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """The colour of the main (largest) object: any shape or letter, on a dull background, next
    to a small distractor object of another colour."""
    labels = _balanced_labels(rng, n, len(COLORS))
    atlas = _atlas()
    grey = rng.uniform(0.05, 0.95, (n, 1, 1, 1)).astype(np.float32)
    tint = rng.uniform(-0.12, 0.12, (n, 1, 1, 3)).astype(np.float32)
    canvas = np.clip(grey + tint + _smooth_field(rng, n, 3, -0.1, 0.1), 0, 1)
    color = _named_colors(rng, np.array(COLORS)[labels])
    canvas = _ensure_visible(canvas, color)  # keep the object visible against its background
    other = (labels + rng.integers(1, len(COLORS), n)) % len(COLORS)
    pool = atlas.ids("shape", SHAPES + EXTRA_SHAPES)
    _stamp(canvas, pool[rng.integers(0, len(pool), n)], *rng.uniform(5, 27, (2, n)),
           rng.uniform(5, 8, n), _named_colors(rng, np.array(COLORS)[other]))  # fmt: skip
    size = rng.uniform(14, 24, n)
    is_glyph = rng.random(n) < 0.3
    fonts = atlas.task_fonts
    letters = np.array(list("ABCDEFGHKMNPRSTWXYZ"))[rng.integers(0, 19, n)]
    sid = np.where(is_glyph, atlas.glyph_ids(fonts, letters, rng.integers(0, len(fonts), n)),
                   pool[rng.integers(0, len(pool), n)])  # fmt: skip
    cx, cy = 16 + rng.uniform(-1, 1, (2, n)) * (15 - size / 2) * 0.6
    _stamp(canvas, sid, cx, cy, size, color, rng.uniform(-0.5, 0.5, n))
    return _finish(rng, canvas, 0.04), labels


def positions(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Where a small object sits on a 3x3 grid of regions (any shape, colour and background)."""
    labels = _balanced_labels(rng, n, len(POSITIONS))
    atlas = _atlas()
    canvas = _backgrounds(rng, n, 0.3)
    pool = atlas.ids("shape", SHAPES + EXTRA_SHAPES)
    centres = (np.arange(3) + 0.5) * IMAGE_SIZE / 3
    cx = centres[labels % 3] + rng.uniform(-2, 2, n)
    cy = centres[labels // 3] + rng.uniform(-2, 2, n)
    color = _contrasting(rng, canvas[np.arange(n), cy.astype(int), cx.astype(int)])
    sid = pool[rng.integers(0, len(pool), n)]
    _stamp(canvas, sid, cx, cy, rng.uniform(7, 10, n), color, rng.uniform(-0.5, 0.5, n))
    return _finish(rng, canvas, 0.04), labels


def street_digits(rng: np.random.Generator, n: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN look-alike: a centred house-number digit, its neighbours cut off at the sides,
    on a noisy coloured background, all in one font and colour per image."""
    labels = _balanced_labels(rng, n, 10)
    atlas = _atlas()
    fonts = atlas.task_fonts + atlas.corpus_fonts
    font = rng.integers(0, len(fonts), n)
    canvas = np.clip(_backgrounds(rng, n, 0.2) + _smooth_field(rng, n, 8, -0.12, 0.12), 0, 1)
    color = _contrasting(rng, canvas[:, 16, 16])
    size = rng.uniform(21, 27, n)
    aspect = rng.uniform(0.9, 1.1, n)
    cx, cy = 16 + rng.uniform(-1.5, 1.5, (2, n))
    for side in (-1, 1):  # distractor digits left and right, like crops of house numbers
        show = rng.random(n) < 0.5
        other = np.array(DIGIT_NAMES)[rng.integers(0, 10, n)]
        gap = side * size * rng.uniform(0.6, 0.8, n)
        _stamp(canvas, atlas.glyph_ids(fonts, other, font), cx + gap, cy, size, color,
               None, aspect, show)  # fmt: skip
    sid = atlas.glyph_ids(fonts, np.array(DIGIT_NAMES)[labels], font)
    _stamp(canvas, sid, cx, cy, size, color, rng.uniform(-0.12, 0.12, n), aspect)
    return _finish(rng, _box_blur(canvas, rng.random(n) < 0.25), 0.04), labels


def _box_blur(canvas: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """A light 3x3 blur of the images selected by ``pick``."""
    out = canvas.copy()
    sub = np.pad(canvas[pick], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    acc = sum(sub[:, i : i + IMAGE_SIZE, j : j + IMAGE_SIZE] for i in range(3) for j in range(3))
    out[pick] = 0.5 * canvas[pick] + 0.5 * acc / 9
    return out


_GENERATORS = {
    "digits": digits,
    "fashion": fashion,
    "shapes": shapes,
    "glyphs": glyphs,
    "textures": textures,
    "colors": colors,
    "positions": positions,
    "street_digits": street_digits,
}


# ----------------------------------------------------------------------------- tasks
@dataclass
class MiniVisionTask(VisionTask):
    """A mini-profile task: 32x32 uint8 pixels in the store, normalized float32 batches out.

    Splits are (re)formatted as NumPy with native dtypes on construction, so a task rebuilt from
    ``Dataset.load_from_disk`` serves uint8 pixels too.
    """

    def __post_init__(self) -> None:
        self.splits = {name: _native_numpy(ds) for name, ds in self.splits.items()}

    def to_pixels(self, images) -> torch.Tensor:
        """uint8 ``[B, 3, 32, 32]`` (array or list of arrays) to float32 in [-1, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, dtype=np.uint8)))
        return (x.float() / 255 - 0.5) / 0.5


def _native_numpy(ds: Dataset) -> Dataset:
    """``ds`` served as NumPy arrays of their stored dtypes: ``with_format("numpy")`` alone would
    turn uint8 pixels into int64 (and ``"torch"`` into int64 tensors), 8x the memory."""
    if ds.format["type"] == "numpy" and ds.format["format_kwargs"] == {"dtype": None}:
        return ds
    return ds.with_format("numpy", dtype=None)


def _uint8_images_column(pixels: np.ndarray) -> pa.ExtensionArray:
    """A zero-copy Arrow ``Array3D`` column for uint8 images ``[N, 3, H, W]`` (building it with
    ``Dataset.from_dict`` goes through Python lists and takes seconds)."""
    n, c, h, w = pixels.shape
    flat = pa.array(np.ascontiguousarray(pixels).reshape(-1))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(n * c * h + 1, dtype=np.int32) * w), flat)
    planes = pa.ListArray.from_arrays(pa.array(np.arange(n * c + 1, dtype=np.int32) * h), rows)
    images = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c), planes)
    return pa.ExtensionArray.from_storage(Array3DExtensionType((c, h, w), "uint8"), images)


def _to_dataset(pixels: np.ndarray, labels: np.ndarray, source: np.ndarray | None) -> Dataset:
    """A Dataset served as NumPy with native dtypes (uint8 pixels, int64 labels)."""
    cols = {"pixels": _uint8_images_column(pixels), "label": pa.array(labels.astype(np.int64))}
    if source is not None:
        cols["source"] = pa.array(source.astype(np.int64))
    return _native_numpy(Dataset(pa.table(cols)))


def check_task_name(name: str) -> None:
    """Raise a ValueError naming ``name`` and the valid task names if it is not one of them."""
    if name not in TASKS:
        raise ValueError(f"unknown vision task {name!r}; valid tasks are {list(TASKS)}")


def _split_rng(seed: int, name: str, split: str) -> np.random.Generator:
    """An independent random stream for each (seed, task, split)."""
    return np.random.default_rng([seed, TASKS.index(name), SPLITS.index(split)])


def load_task(
    name: str, profile: str | None = None, *, seed: int = 0, sizes: dict[str, int] | None = None
) -> VisionTask:
    """One task. ``profile`` ``None`` means :func:`course_lib.config.profile`.

    Mini: a :class:`MiniVisionTask` drawn from ``seed``; ``sizes`` overrides entries of
    :data:`MINI_SIZES` (examples per split). Full: delegates to
    :func:`course_lib.data.vision_hub.load_hub_task`, accepting a hub task name (``"SVHN"``) or a
    mini name, mapped through :data:`FULL_ANALOGUES`.
    """
    profile = profile or config.profile()
    if profile == "full":
        from course_lib.data import vision_hub  # lazy: needs the hub

        return vision_hub.load_hub_task(
            _hub_name(name, vision_hub.FULL_TASKS), seed=seed, sizes=sizes
        )
    if profile != "mini":
        raise ValueError(f"profile must be one of {config.PROFILES}, got {profile!r}")
    check_task_name(name)
    sizes = {**MINI_SIZES, **(sizes or {})}
    splits = {}
    for split in SPLITS:
        out = _GENERATORS[name](_split_rng(seed, name, split), int(sizes[split]), split=split)
        splits[split] = _to_dataset(*out) if len(out) == 3 else _to_dataset(*out, None)
    return MiniVisionTask(name, list(_CLASSNAMES[name]), list(_TEMPLATES[name]), splits)


def _hub_name(name: str, full_tasks) -> str:
    """The full-profile task for ``name``: a full task name as is, a mini name via its analogue."""
    if name in full_tasks:
        return name
    if name in FULL_ANALOGUES and FULL_ANALOGUES[name] in full_tasks:
        return FULL_ANALOGUES[name]
    raise ValueError(
        f"unknown vision task {name!r}; valid tasks are {list(full_tasks)} "
        f"(or their mini analogues {list(FULL_ANALOGUES)})"
    )


def load_tasks(
    profile: str | None = None, *, seed: int = 0, sizes: dict[str, int] | None = None, names=None
) -> dict[str, VisionTask]:
    """Several tasks by name, keyed by the names given. Default: all of :data:`TASKS` in the mini
    profile, the eight hub tasks (in :data:`FULL_ANALOGUES` order) in the full profile."""
    profile = profile or config.profile()
    if names is None:
        names = TASKS if profile == "mini" else [FULL_ANALOGUES[n] for n in TASKS]
    return {n: load_task(n, profile, seed=seed, sizes=sizes) for n in names}


def preview_grid(task: VisionTask, per_class: int = 4, split: str = "train"):
    """A figure with ``per_class`` examples of every class, one row per class (labelled)."""
    import matplotlib.pyplot as plt

    labels = task.labels(split).numpy()
    rows = task.num_classes
    fig, axes = plt.subplots(
        rows, per_class, figsize=(per_class * 0.9 + 1.2, rows * 0.9), squeeze=False
    )
    for c in range(rows):
        idx = np.flatnonzero(labels == c)[:per_class].tolist()
        images = task.to_pixels(task._split(split)[idx][task.image_column]) if idx else []
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                ax.imshow(_displayable(images[j], isinstance(task, MiniVisionTask)))
        axes[c, 0].set_ylabel(task.classnames[c], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{task.name} ({split})", fontsize=9)
    fig.tight_layout()
    return fig


def _displayable(image: torch.Tensor, mini: bool) -> np.ndarray:
    """A model input ``[3, H, W]`` as an ``[H, W, 3]`` image in [0, 1] (mini inputs are in
    [-1, 1]; other normalizations are min-max stretched)."""
    x = image.permute(1, 2, 0).numpy()
    x = (x + 1) / 2 if mini else (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return x.clip(0, 1)


# ----------------------------------------------------------------------------- corpus
_CORPUS_BLOCK = 4096
_CORPUS_KINDS = ("object", "text", "count", "texture", "pair")
_CORPUS_WEIGHTS = (0.4, 0.32, 0.1, 0.12, 0.06)
_CORPUS_SHAPES = SHAPES + EXTRA_SHAPES
_CORPUS_COLORS = COLORS + EXTRA_COLORS


def caption_corpus(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` captioned scenes for contrastive pretraining: uint8 ``[n, 3, 32, 32]`` and captions.

    Drawn in blocks of 4,096 images with one random stream per block: complete blocks do not
    depend on ``n``, so ``caption_corpus(8192)`` is a prefix of ``caption_corpus(40000)`` (same
    seed). Captions are lowercase words without punctuation.
    """
    images, captions = [], []
    for block, start in enumerate(range(0, n, _CORPUS_BLOCK)):
        rng = np.random.default_rng([seed, 1000 + block])
        x, c = _corpus_block(rng, min(_CORPUS_BLOCK, n - start))
        images.append(x)
        captions += c
    if not images:
        return np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8), []
    return np.concatenate(images), captions


def _corpus_block(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """One block of corpus scenes: each kind of scene is drawn for its images at once."""
    kind = rng.choice(len(_CORPUS_KINDS), n, p=_CORPUS_WEIGHTS)
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    captions = [""] * n
    for k, name in enumerate(_CORPUS_KINDS):
        idx = np.flatnonzero(kind == k)
        if len(idx):
            sub, caps = _CORPUS_DRAWERS[name](rng, len(idx))
            canvas[idx] = sub
            for i, cap in zip(idx, caps, strict=True):
                captions[i] = cap
    frame = rng.random(n)  # a few captions framed like the prompts: "a photo of ..."
    for i in np.flatnonzero(frame < 0.2):
        captions[i] = ("a photo of " if frame[i] < 0.15 else "a drawing of ") + captions[i]
    return _finish(rng, canvas, 0.015), captions


def _plain_or_textured(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Corpus backgrounds: flat colour, a gently varying colour field (half of the non-textured
    ones, so features do not hinge on flat backgrounds), or (30%) a low-contrast texture. Returns
    the canvas and the texture index per image (-1 for none)."""
    canvas = np.broadcast_to(rng.uniform(0, 1, (n, 1, 1, 3)), (n, IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = canvas.astype(np.float32)
    varied = rng.random(n) < 0.5
    if varied.any():
        canvas[varied] = _backgrounds(rng, int(varied.sum()), 0.2)
    tex = np.where(rng.random(n) < 0.3, rng.integers(0, len(TEXTURES), n), -1)
    has = tex >= 0
    if has.any():
        canvas[has] = _texture_images(rng, tex[has], (0.25, 0.5), (5.0, 11.0))
    return canvas, tex


def _pick(rng: np.random.Generator, words: list[str], n: int) -> np.ndarray:
    return np.array(words)[rng.integers(0, len(words), n)]


def _maybe(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return rng.random(n) < p


def _position_of(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """The region word (one of :data:`POSITIONS`) of pixel positions."""
    col = np.clip((np.asarray(cx) / (IMAGE_SIZE / 3)).astype(int), 0, 2)
    row = np.clip((np.asarray(cy) / (IMAGE_SIZE / 3)).astype(int), 0, 2)
    return np.array(POSITIONS)[row * 3 + col]


def _ensure_visible(canvas: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Darken or lighten backgrounds whose mean is too close to the object's luminance."""
    bg = canvas.mean(axis=(1, 2))
    close = np.abs(_luminance(bg) - _luminance(color)) < 0.3
    shift = np.where(_luminance(color) > 0.5, -0.45, 0.45)[:, None, None, None]
    canvas[close] = np.clip(canvas[close] + shift[close], 0, 1)
    return canvas


def _corpus_object(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """One shape: 'a small red star at the top left on a background of stripes'."""
    canvas, tex = _plain_or_textured(rng, n)
    shape, cname = _pick(rng, _CORPUS_SHAPES, n), _pick(rng, _CORPUS_COLORS, n)
    big = rng.random(n) < 0.5
    size = np.where(big, rng.uniform(17, 26, n), rng.uniform(7, 12, n))
    cx, cy = rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1, (2, n))
    color = _named_colors(rng, cname)
    canvas = _ensure_visible(canvas, color)
    _stamp(
        canvas, _atlas().ids("shape", list(shape)), cx, cy, size, color, rng.uniform(-0.3, 0.3, n)
    )
    pos = _position_of(cx, cy)
    # Colour is the easiest thing to learn; mentioning it rarely makes the shape word matter.
    say_size, say_color, say_pos, say_bg = (_maybe(rng, p, n) for p in (0.3, 0.35, 0.4, 0.4))
    vague, generic = _maybe(rng, 0.15, n), _pick(rng, ["object", "shape"], n)
    caps = []
    for i in range(n):
        words = ["a"]
        if say_size[i]:
            words.append("large" if big[i] else "small")
        if say_color[i]:
            words.append(cname[i])
        words.append(generic[i] if say_color[i] and vague[i] else shape[i])
        if say_pos[i]:
            words += ["in the center"] if pos[i] == "center" else ["at the", pos[i]]
        if say_bg[i] and tex[i] >= 0:
            words += ["on a background of", TEXTURES[tex[i]]]
        caps.append(" ".join(words))
    return canvas, caps


def _corpus_text(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """A letter or digit in a clean font: 'the letter k in blue', 'a large red 7'."""
    atlas = _atlas()
    canvas = np.broadcast_to(rng.uniform(0, 1, (n, 1, 1, 3)), (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    is_digit = rng.random(n) < 0.4
    chars = np.where(
        is_digit, _pick(rng, DIGIT_NAMES, n), _pick(rng, list("abcdefghijklmnopqrstuvwxyz"), n)
    )
    fonts = atlas.corpus_fonts
    sid = atlas.glyph_ids(fonts, chars, rng.integers(0, len(fonts), n))
    cname = _pick(rng, _CORPUS_COLORS, n)
    color = _named_colors(rng, cname)
    canvas = _ensure_visible(canvas.astype(np.float32), color)
    big = rng.random(n) < 0.6
    size = np.where(big, rng.uniform(18, 26, n), rng.uniform(9, 13, n))
    cx, cy = rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1, (2, n))
    _stamp(canvas, sid, cx, cy, size, color)
    pos = _position_of(cx, cy)
    form = rng.choice(4, n, p=(0.2, 0.1, 0.2, 0.5))  # half of the captions name only the char
    caps = []
    for i in range(n):
        kind = rng.choice(["the number ", "the digit "]) if is_digit[i] else "the letter "
        noun = kind + chars[i]
        if form[i] == 0:
            caps.append(f"{noun} in {cname[i]}")
        elif form[i] == 1:
            caps.append(f"a {'large' if big[i] else 'small'} {cname[i]} {chars[i]}")
        elif form[i] == 2:
            where = "in the center" if pos[i] == "center" else f"at the {pos[i]}"
            caps.append(f"{noun} {where}")
        else:
            caps.append(noun)
    return canvas, caps


def _corpus_count(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """One to six equal objects in free cells of a 4x4 grid: 'three green hearts'."""
    canvas, _ = _plain_or_textured(rng, n)
    canvas = np.broadcast_to(canvas.mean(axis=(1, 2), keepdims=True), canvas.shape).copy()
    count = rng.integers(1, len(COUNT_WORDS) + 1, n)
    shape, cname = _pick(rng, _CORPUS_SHAPES, n), _pick(rng, _CORPUS_COLORS, n)
    color = _named_colors(rng, cname)
    canvas = _ensure_visible(canvas, color)
    sid = _atlas().ids("shape", list(shape))
    cells = np.argsort(rng.random((n, 16)), axis=1)
    for k in range(int(count.max())):
        pick = count > k
        cx = (cells[:, k] % 4 + 0.5) * 8 + rng.uniform(-1, 1, n)
        cy = (cells[:, k] // 4 + 0.5) * 8 + rng.uniform(-1, 1, n)
        _stamp(canvas, sid, cx, cy, rng.uniform(5, 7, n), color, alpha=pick)
    caps = []
    for i in range(n):
        noun = shape[i] if count[i] == 1 else SHAPE_PLURALS[shape[i]]
        color_word = f"{cname[i]} " if rng.random() < 0.4 else ""
        caps.append(f"{COUNT_WORDS[count[i] - 1]} {color_word}{noun}")
    return canvas, caps


def _corpus_texture(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """A full-frame texture: 'a pattern of stripes', 'a texture of red and blue checks'."""
    tex = rng.integers(0, len(TEXTURES), n)
    a, b = _pick(rng, COLORS + EXTRA_COLORS, n), _pick(rng, COLORS + EXTRA_COLORS, n)
    ca, cb = _named_colors(rng, a), _named_colors(rng, b)
    t = _texture_values(rng, tex, (5.0, 11.0))[..., None]
    canvas = ca[:, None, None] * (1 - t) + cb[:, None, None] * t
    form = rng.integers(0, 3, n)
    caps = []
    for i in range(n):
        word = TEXTURES[tex[i]]
        if form[i] == 0 or a[i] == b[i]:
            caps.append(f"a pattern of {word}")
        elif form[i] == 1:
            caps.append(f"{a[i]} and {b[i]} {word}")
        else:
            caps.append(f"a texture of {word}")
    return canvas.astype(np.float32), caps


def _corpus_pair(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """Two shapes side by side: 'a red circle left of a blue square'."""
    canvas, _ = _plain_or_textured(rng, n)
    canvas = np.broadcast_to(canvas.mean(axis=(1, 2), keepdims=True), canvas.shape).copy()
    names = [_pick(rng, _CORPUS_SHAPES, n) for _ in range(2)]
    cnames = [_pick(rng, COLORS, n) for _ in range(2)]
    for j, cx in enumerate((rng.uniform(7, 10, n), rng.uniform(22, 25, n))):
        color = _named_colors(rng, cnames[j])
        sid = _atlas().ids("shape", list(names[j]))
        _stamp(canvas, sid, cx, rng.uniform(9, 23, n), rng.uniform(9, 13, n), color)
    form = rng.integers(0, 2, n)
    caps = []
    for i in range(n):
        left, right = f"a {cnames[0][i]} {names[0][i]}", f"a {cnames[1][i]} {names[1][i]}"
        caps.append(f"{left} left of {right}" if form[i] else f"{left} and {right}")
    return canvas, caps


_CORPUS_DRAWERS = {
    "object": _corpus_object,
    "text": _corpus_text,
    "count": _corpus_count,
    "texture": _corpus_texture,
    "pair": _corpus_pair,
}

# ----------------------------------------------------------------------------- vocabulary
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lowercase word tokens; punctuation marks become separate tokens (``"t-shirt."`` gives
    ``["t", "-", "shirt", "."]``)."""
    return _WORD.findall(text.lower())


def corpus_vocabulary() -> list[str]:
    """Every token that can appear in a corpus caption or in any task prompt (sorted).

    Tokens are produced by :func:`words`: lowercase, punctuation split off as separate tokens.
    """
    pieces = [
        "a the in at on of and left large small number digit letter pattern texture background",
        "center photo drawing object shape",
        *SHAPES, *EXTRA_SHAPES, *SHAPE_PLURALS.values(), *COLORS, *EXTRA_COLORS, *TEXTURES,
        *POSITIONS, *COUNT_WORDS, *DIGIT_NAMES, "abcdefghijklmnopqrstuvwxyz",
    ]  # fmt: skip
    vocab = set(" ".join(pieces).split()) | set("abcdefghijklmnopqrstuvwxyz")
    for task in TASKS:
        for template in _TEMPLATES[task]:
            for cname in _CLASSNAMES[task]:
                vocab.update(words(template.format(cname)))
    vocab.discard("abcdefghijklmnopqrstuvwxyz")
    return sorted(vocab)
