"""A small text-image dual encoder (image CNN + caption encoder in one embedding space) and
its CLIP-style symmetric InfoNCE loss (Radford et al. 2021).

Trained per dataset in ``t2i.training.encoders`` for two roles: the evaluation judge of
R-precision and the frozen encoder of the gan's alignment loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i.models.blocks import CaptionEncoder, stride2_convs


def deep_stages(width: int) -> list[nn.Module]:
    """Four stages of a strided 3x3 conv and a 3x3 conv at the reduced size (BatchNorm, ReLU
    after each), 3 -> width -> 2w -> 4w -> 8w channels (64 -> 4 pixels): twice the depth of
    :func:`~t2i.models.blocks.stride2_convs` at about the cost of a 1.4x wider one."""
    channels = [3, width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = []
    for a, b in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                   nn.Conv2d(b, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    return layers


class DualEncoder(nn.Module):
    """``tower``: the image CNN, "strided" (four strided convs: the gan's alignment-loss
    encoder) or "deep" (:func:`deep_stages`: the evaluation judge, another architecture)."""

    def __init__(self, vectors: np.ndarray, dim: int = 128, width: int = 32, tower: str = "strided"):
        super().__init__()
        if tower == "strided":
            convs = stride2_convs(width, kernel=3, norm="all")
        elif tower == "deep":
            convs = deep_stages(width)
        else:
            raise ValueError(f"unknown image tower {tower!r} (use 'strided' or 'deep')")
        self.image = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, dim))
        self.text_encoder = CaptionEncoder(vectors.shape[0], vectors.shape[1], "pool", 256)
        self.text_encoder.vectors.copy_(torch.as_tensor(vectors))
        self.text = nn.Sequential(self.text_encoder, nn.Linear(self.text_encoder.out_dim, dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(word_ids), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, caption) pairs."""
    logits = log_scale.exp() * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
