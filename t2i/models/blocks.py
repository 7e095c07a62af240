"""Building blocks shared by the generators: caption encoders, conv image encoder/decoder.

Pure PyTorch. Word vectors are a frozen buffer (the dataset's GloVe rows), so a model's
state dict carries everything needed to embed a prompt.
"""

from __future__ import annotations

import torch
from torch import nn


class CaptionEncoder(nn.Module):
    """word ids (B, L), 0 = padding -> a caption feature (B, out_dim).

    ``mean``: the mean of the known words' GloVe vectors (the seed's input, no parameters).
    ``pool``: a per-word MLP, max-pooled over the real words (deep sets).
    ``gru``: a bidirectional GRU over the vectors, mean-pooled over the real words.
    """

    def __init__(self, vocab_size: int, embed_dim: int, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        self.register_buffer("vectors", torch.zeros(vocab_size, embed_dim))
        if kind == "gru":
            self.gru = nn.GRU(embed_dim, hidden // 2, batch_first=True, bidirectional=True)
            self.out_dim = 2 * (hidden // 2)
        elif kind == "pool":
            self.per_word = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, hidden))
            self.out_dim = hidden
        elif kind == "mean":
            self.out_dim = embed_dim
        else:
            raise ValueError(f"unknown text encoder {kind!r} (use 'mean' or 'gru')")
        # Standardise each feature over the batch: a mean of GloVe vectors is dominated by
        # the words every caption shares ("a", "the", "in"); without this the attribute words
        # (colours above all) were learned many epochs later (measured on shapes).
        self.norm = nn.BatchNorm1d(self.out_dim)

    def forward(self, word_ids: torch.Tensor) -> torch.Tensor:
        mask = (word_ids > 0).unsqueeze(-1).float()
        count = mask.sum(1).clamp(min=1.0)
        words = self.vectors[word_ids]
        if self.kind == "pool":
            # Max over per-word features: each word can switch on its own features whatever
            # the caption's length (a mean dilutes "red" by the number of words).
            feats = self.per_word(words).masked_fill(mask == 0, float("-inf"))
            return self.norm(feats.max(1).values)
        if self.kind == "gru":
            words, _ = self.gru(words)
        return self.norm((words * mask).sum(1) / count)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, 3, 64, 64) in [0, 1]: a 4x4 seed map upsampled by 4 conv-transposes
    (DCGAN-style generator, Radford et al. 2016; StackGAN stage I is this shape too)."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.start_channels = 8 * width
        # LeakyReLU, not ReLU: with ReLU the mostly-black targets drove units dead and colour
        # was never learned on shapes (one-hot attributes -> image: 12% vs 100% colour
        # accuracy after 3 epochs, measured).
        self.project = nn.Sequential(nn.Linear(in_dim, 16 * self.start_channels),
                                     nn.BatchNorm1d(16 * self.start_channels), nn.LeakyReLU(0.2, inplace=True))
        channels = [8 * width, 4 * width, 2 * width, width]
        layers: list[nn.Module] = []
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.project(h).view(-1, self.start_channels, 4, 4)
        return self.upsample(x)


class ConvEncoder(nn.Module):
    """(B, 3, 64, 64) -> (B, 16 * 8 * width): four stride-2 convolutions."""

    def __init__(self, width: int):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = 16 * 8 * width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)
