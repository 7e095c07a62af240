"""Differentiable augmentation of everything the discriminator sees (DiffAugment, Zhao et al.
2020, "Differentiable Augmentation for Data-Efficient GAN Training"; its reference code's
ops, for images in [0, 1] instead of [-1, 1]). The same policy transforms real and generated
images, each image with its own random draw, and gradients flow through it to the
generator, so D cannot memorise a small training set and G is not taught the augmentations.

``scale`` is not a DiffAugment op: it is ADA's isotropic scaling (Karras et al. 2020, "Training
Generative Adversarial Networks with Limited Data"), written for the alignment encoder's view
(``loss.align_augment``), where an integer shift leaves a periodic texture as readable as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def brightness(x: torch.Tensor) -> torch.Tensor:
    # The reference adds U(-0.5, 0.5) to [-1, 1] images: half that on [0, 1].
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5) * 0.5


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size, filling with mid-grey (the reference
    zero-pads [-1, 1] images: 0 there is grey, as in :func:`cutout`)."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + dy + 1, 0, h + 1)
    gx = torch.clamp(gx + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1], value=0.5)
    return padded.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Blank a square of half the image's side at a random place with mid-grey (the
    reference's zero of [-1, 1] images)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - ch // 2, 0, h - 1)
    gx = torch.clamp(gx + ox - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    mask = mask.unsqueeze(1)
    return x * mask + 0.5 * (1 - mask)


def scale(x: torch.Tensor, log2_std: float = 0.2) -> torch.Tensor:
    """Zoom each image about its centre by 2^N(0, 0.2^2) (ADA's isotropic scaling), resampled
    bilinearly, so a texture's period and phase change from view to view; revealed pixels are
    mid-grey as in :func:`translation`."""
    factor = torch.exp2(torch.randn(x.size(0), device=x.device) * log2_std)
    theta = torch.zeros(x.size(0), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor  # the grid reads from output coordinates / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


POLICIES = {"color": (brightness, saturation, contrast), "translation": (translation,), "cutout": (cutout,), "scale": (scale,)}


def parse_policy(policy: str) -> tuple[str, ...]:
    """"translation,cutout" -> its op names; "" -> none. Unknown names are a ValueError."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    for name in policy:
        for op in POLICIES[name]:
            x = op(x)
    return x
