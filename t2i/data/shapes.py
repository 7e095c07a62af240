"""The built-in captioned-shapes set: one solid shape on black, captions that say it all.

Every attribute a caption names is drawn exactly (palette, 3x3 grid, two sizes), so
generated images can be scored by their pixels (see ``t2i.evaluation.evaluate``). Pure numpy/PIL.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 180, 25),
    "blue": (25, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (20, 210, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14.0, "large": 28.0}  # bounding-box side in pixels, before +-10% jitter
# Grid cells, row-major; the name is also the caption phrase.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
CELL_CENTRES = (17.0, 32.0, 47.0)  # inside the thirds [0,21.3), [21.3,42.7), [42.7,64)
POSITION_JITTER = 2.0
# Colour-shape pairs that never occur in train/dev/test: the `novel` split (3 of 24 pairs,
# one per shape and colour, so every word is still seen in training).
NOVEL_PAIRS = frozenset({("green", "triangle"), ("purple", "circle"), ("cyan", "square")})
SPLIT_FRACTIONS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",)}
TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "{place}: a {size} {color} {shape}",
    "there is a {size} {color} {shape} {at}",
    "a {color} {shape} , {size} , {where}",
    "the picture shows a {size} {color} {shape} {at} on a black background",
)
PROMPTS = (
    "a small red circle in the top left corner",
    "a large blue square in the center",
    "a big yellow triangle at the bottom",
    "a tiny white disc at the right",
    "a large orange box in the bottom right corner",
    "a small cyan triangle at the top",
    "a large green triangle in the center",  # novel pair
    "a small purple circle at the left",  # novel pair
)


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    extent: float  # bounding-box side in pixels

    @property
    def split_group(self) -> str:
        return "novel" if (self.color, self.shape) in NOVEL_PAIRS else "seen"


def where_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"in the {position} corner" if " " in position else f"at the {position}"


def at_phrase(position: str) -> str:
    return "in the middle" if position == "center" else f"at the {position}"


def vocabulary_words() -> list[str]:
    """Every word any caption or default prompt can contain."""
    text = " ".join(
        [*TEMPLATES, *COLORS, *POSITIONS, *PROMPTS, "in the corner at middle center"]
        + [w for ws in SIZE_WORDS.values() for w in ws]
        + [w for ws in SHAPE_WORDS.values() for w in ws]
    )
    return sorted(set(text.replace("{", " ").replace("}", " ").replace(",", " ").replace(":", " ").split()))


def random_spec(rng: random.Random) -> ShapeSpec:
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    size = rng.choice(list(SIZES))
    cell = rng.randrange(9)
    extent = SIZES[size] * rng.uniform(0.9, 1.1)
    half = extent / 2
    cx = CELL_CENTRES[cell % 3] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = CELL_CENTRES[cell // 3] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    # Keep the whole shape on the canvas (matters only for large shapes at the edge).
    cx = min(max(cx, half), CANVAS - half)
    cy = min(max(cy, half), CANVAS - half)
    return ShapeSpec(color, shape, size, POSITIONS[cell], cx, cy, extent)


def draw(spec: ShapeSpec) -> np.ndarray:
    """The (64, 64, 3) uint8 image of one shape."""
    image = Image.new("RGB", (CANVAS, CANVAS), (0, 0, 0))
    pen = ImageDraw.Draw(image)
    h = spec.extent / 2
    box = (spec.cx - h, spec.cy - h, spec.cx + h, spec.cy + h)
    draw_shape(pen, spec.shape, box, COLORS[spec.color])
    return np.asarray(image, dtype=np.uint8)


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """A circle, square or triangle (pointing up) filling the bounding ``box``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def captions(spec: ShapeSpec, rng: random.Random) -> list[str]:
    """Five captions, one per template, synonyms drawn at random."""
    out = []
    for template in TEMPLATES:
        out.append(
            template.format(
                size=rng.choice(SIZE_WORDS[spec.size]),
                color=spec.color,
                shape=rng.choice(SHAPE_WORDS[spec.shape]),
                where=where_phrase(spec.position),
                at=at_phrase(spec.position),
                place=spec.position,
            ).replace(" , ", ", ")
        )
    return out


def assign_split(spec: ShapeSpec, rng: random.Random) -> str:
    if spec.split_group == "novel":
        return "novel"
    u = rng.random()
    for name, fraction in SPLIT_FRACTIONS:
        if u < fraction:
            return name
        u -= fraction
    return SPLIT_FRACTIONS[-1][0]


def generate(n: int, seed: int):
    """Yield ``(index, split, spec, image, captions)`` for ``n`` images, deterministically."""
    rng = random.Random(seed)
    for index in range(n):
        spec = random_spec(rng)
        yield index, assign_split(spec, rng), spec, draw(spec), captions(spec, rng)


BOX_INSETS = (0.0, 0.5, 1.0)  # pixels; see analyse()
MARGIN = 2  # pixels of crop around the foreground's box


@functools.lru_cache(maxsize=4096)
def shape_template(shape: str, w: int, h: int, inset: float) -> np.ndarray:
    """Bool mask of ``shape`` drawn as :func:`draw` would inside a ``w`` x ``h`` pixel box
    inset by ``inset``, in a crop with :data:`MARGIN` pixels around the box. It depends on
    the box's size only (an integer shift does not change how PIL rasterises it), so each
    size is drawn once."""
    crop = Image.new("L", (w + 2 * MARGIN, h + 2 * MARGIN), 0)
    box = (MARGIN - 0.5 + inset, MARGIN - 0.5 + inset, MARGIN + w - 0.5 - inset, MARGIN + h - 0.5 - inset)
    draw_shape(ImageDraw.Draw(crop), shape, box, 1)
    return np.asarray(crop, dtype=bool)


def analyse(image: np.ndarray) -> dict[str, str | None]:
    """Read colour, shape, size and position back from a (64, 64, 3) image in [0, 1] or
    uint8, by its pixels alone: the foreground is every pixel at least half as bright as
    the brightest; colour = nearest palette entry to its mean; position = grid cell of its
    bounding-box centre; size = bounding-box side (small < 21 px <= large); shape = the
    circle, square or triangle, drawn in the same bounding box or one inset by up to a
    pixel on every side, that overlaps the foreground best (intersection over union).

    Shape by template overlap rather than by how much of the box is filled: on real test
    images softened by a Gaussian blur of sigma 1.5 px (about the softness of any 64x64
    generator's edges) the fill-ratio rule called 64% of small triangles circles; the
    template rule reads 100% of every shape and size right there (``tests/evaluation/test_generate_evaluate.py``).
    The inset: a generated small square with soft edges and a faint one-pixel halo on one
    side had its box one pixel too large, so its square template overlapped less (0.80)
    than the inscribed circle (0.81) and 29% of small novel squares read as circles; fitted
    one pixel in, the square overlaps best, as a person sees it.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    brightness = img.max(axis=2)
    peak = float(brightness.max())
    mask = brightness >= max(0.5 * peak, 0.15)
    if peak < 0.15 or not mask.any():
        return {"color": None, "shape": None, "size": None, "position": None}
    ys, xs = np.nonzero(mask)
    palette = np.array(list(COLORS.values()), dtype=np.float32) / 255.0
    mean = img[mask].mean(axis=0)
    color = list(COLORS)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
    third = CANVAS / 3
    col = min(int((xs.min() + xs.max() + 1) / 2 / third), 2)  # bounding-box centre, as drawn
    row = min(int((ys.min() + ys.max() + 1) / 2 / third), 2)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    padded = np.pad(mask, MARGIN)  # crop coordinates: the box starts MARGIN pixels in
    crop = padded[ys.min(): ys.max() + 1 + 2 * MARGIN, xs.min(): xs.max() + 1 + 2 * MARGIN]
    overlap = dict.fromkeys(SHAPES, 0.0)
    for inset in BOX_INSETS:
        for name in SHAPES:
            template = shape_template(name, int(w), int(h), inset)
            overlap[name] = max(overlap[name], (crop & template).sum() / max(1, (crop | template).sum()))
    return {"color": color, "shape": max(overlap, key=overlap.get), "size": "small" if max(w, h) < 21 else "large",
            "position": POSITIONS[row * 3 + col]}
