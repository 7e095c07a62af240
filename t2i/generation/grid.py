"""Image grids with their prompts: torchvision tiles the samples, PIL writes the prompts."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image

PAD = 2
LINE = 11


def to_uint8(images) -> np.ndarray:
    """(..., 3, H, W) floats in [0, 1] (tensor or array) -> (..., H, W, 3) uint8."""
    array = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    array = np.moveaxis(array, -3, -1)
    return (array.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def save_grid(images, prompts: list[str], path: str | Path, scale: int = 2) -> Path:
    """(P, n, 3, H, W) -> one PNG: a row of n samples per prompt, its text above the row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, prompts, scale).save(path)
    return path


def grid_image(images, prompts: list[str], scale: int = 2) -> Image.Image:
    """The picture :func:`save_grid` writes (also served as PNG bytes by t2i.serving)."""
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
        samples = torch.as_tensor(tiles[r]).permute(0, 3, 1, 2)  # (n, 3, h, w) uint8
        samples = samples.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest upscale
        strip = make_grid(samples, nrow=n, padding=PAD, pad_value=255)  # PAD before, between and after
        canvas.paste(Image.fromarray(strip.permute(1, 2, 0).numpy()), (0, top - PAD))
        y += heights[r]
    return canvas


def png_bytes(picture: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an (H, W, 3) uint8 array; PIL writes no timestamp, so
    equal pixels give equal bytes."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_each(images, folder: str | Path) -> list[Path]:
    """(N, 3, H, W) -> 00000.png, 00001.png, ... at native size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(torch.as_tensor(images).detach().cpu().float()):
        paths.append(folder / f"{i:05d}.png")
        save_image(tile, paths[-1])  # rounds as to_uint8 does
    return paths
