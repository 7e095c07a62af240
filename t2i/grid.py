"""Image grids with their prompts (numpy + PIL only)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PAD = 2
LINE = 11


def to_uint8(images) -> np.ndarray:
    """(..., 3, H, W) floats in [0, 1] (tensor or array) -> (..., H, W, 3) uint8."""
    array = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    array = np.moveaxis(array, -3, -1)
    return (array.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def save_grid(images, prompts: list[str], path: str | Path, scale: int = 2) -> Path:
    """(P, n, 3, H, W) -> one PNG: a row of n samples per prompt, its text above the row."""
    tiles = to_uint8(images)
    rows, n, h, w, _ = tiles.shape
    h, w = h * scale, w * scale
    width = max(n * (w + PAD) + PAD, 320)
    chars = max(20, width // 6)
    labels = [textwrap.wrap(p, chars)[:2] or [""] for p in prompts]
    heights = [PAD + LINE * len(lab) + h + PAD for lab in labels]
    canvas = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    y = 0
    for r in range(rows):
        for i, text in enumerate(labels[r]):
            pen.text((PAD, y + PAD + i * LINE), text, fill=(0, 0, 0))
        top = y + PAD + LINE * len(labels[r])
        for c in range(n):
            tile = Image.fromarray(tiles[r, c]).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (PAD + c * (w + PAD), top))
        y += heights[r]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_each(images, folder: str | Path) -> list[Path]:
    """(N, 3, H, W) -> 00000.png, 00001.png, ... at native size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(to_uint8(images)):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(tile).save(paths[-1])
    return paths
