"""Building blocks shared by the generators: caption encoders, conv image encoder/decoder.

Pure PyTorch. Word vectors are a frozen buffer (the dataset's GloVe rows), so a model's
state dict carries everything needed to embed a prompt.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from t2i.config import ModelConfig
from t2i.models.resampling import leaky_relu, upsample2x


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
        # the words every caption shares ("a", "the", "in"), which drowns the attribute words.
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
        # LeakyReLU, not ReLU: mostly-black targets drive ReLU units dead, and colour is
        # then never learned.
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


def stride2_convs(width: int, kernel: int = 4, norm: str = "after_first") -> list[nn.Module]:
    """Four stride-2 convolutions, 3 -> width -> 2w -> 4w -> 8w channels (64 -> 4 pixels),
    each followed by LeakyReLU(0.2). ``norm``: "after_first" (DCGAN's discriminator:
    BatchNorm after every conv but the first, those convs without a bias), "none" (DF-GAN's
    discriminator) or "all" (BatchNorm after every conv)."""
    channels = [3, width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
        normed = norm == "all" or (norm == "after_first" and i > 0)
        layers.append(nn.Conv2d(a, b, kernel, 2, 1,
                                bias=norm == "all" or not normed))
        if normed:
            layers.append(nn.BatchNorm2d(b))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class ConvEncoder(nn.Module):
    """(B, 3, 64, 64) -> (B, 16 * 8 * width): four stride-2 convolutions."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(*stride2_convs(width, kernel=4, norm="after_first"), nn.Flatten())
        self.out_dim = 16 * 8 * width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def bounded_logvar(raw: torch.Tensor, low: float = -8.0, high: float = 4.0) -> torch.Tensor:
    """A log-variance softly clamped to [low, high]: ``low + softplus(x - low) - softplus(x - high)``,
    the identity well inside the bounds, flat beyond them, smooth everywhere.

    An unbounded log-variance can run away while the KL weight warms up from 0, until
    exp(logvar) overflows the KL. Bounds of e^-8..e^4 (sigma 0.018..7.4) lie outside the
    values trained models use, so the objective is unchanged where it matters.
    """
    softplus = nn.functional.softplus
    return low + softplus(raw - low) - softplus(raw - high)


class TextAffine(nn.Module):
    """Channel-wise scale and shift of a feature map predicted from the caption: the
    "affine transformation" fusion of DF-GAN (Tao et al. 2022, DFBlock), i.e. conditional
    batch norm / FiLM (Perez et al. 2018). Starts as the identity (scale 1, shift 0)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.scale = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))
        self.shift = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))
        for head in (self.scale, self.shift):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale(cond)[:, :, None, None]) + self.shift(cond)[:, :, None, None]


def flat_spectrum_basis(count: int, size: int) -> torch.Tensor:
    """(count, size * size): random-phase images whose power is exactly 1 at every frequency
    (mean square 1 per pixel). Gaussian draws have that power only on average: a fixed basis of
    64 of them keeps a speckle of +-0.05 decades (up to +0.16) at each frequency, which no 3x3
    conv after it can undo and the grid check reads as spikes."""
    spectrum = torch.fft.fft2(torch.randn(count, size, size))
    images = torch.fft.ifft2(spectrum / spectrum.abs().clamp(min=1e-12)).real  # |W(f)| = |W(-f)|: real
    return (images / images.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()).reshape(count, size * size)


def channel_signs(channels: int, count: int) -> torch.Tensor:
    """(channels, count) of +-1, to combine ``count`` basis images into one noise image per channel.
    Rows of a Sylvester-Hadamard matrix in random order where ``count`` is a power of two: their
    mutual orthogonality leaves the channels' images uncorrelated (exactly so over a flat basis;
    past ``count`` channels the rows repeat in a new order). Otherwise random signs (correlated
    ~1 / sqrt(count))."""
    if count & (count - 1):
        return torch.randint(0, 2, (channels, count)).float() * 2 - 1
    hadamard = torch.ones(1, 1)
    while len(hadamard) < count:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    return hadamard[torch.cat([torch.randperm(count) for _ in range(-(-channels // count))])[:channels]]


class PixelNoise(nn.Module):
    """StyleGAN's noise inputs (Karras et al. 2019, sec. 3.2 and fig. 1, "B"): one noise image
    added to every channel of a conv's output with a learned per-channel strength. A filtered
    upsampling passes on no detail finer than the coarse map's; this gives each resolution its own
    source, stationary, so it makes no grid. The noise image is a fixed random projection of the
    generator's noise z (variance 1 per pixel; ``basis`` "flat": the same power at every
    frequency, see :func:`flat_spectrum_basis`) rather than a fresh draw: a seed still fixes the
    image (``sample_from_noise``, serving), and z = 0 (the mean draw) adds none.

    StyleGAN starts the strengths at 0 and trains them at lr 0.002; at the gan's 1e-4 they
    random-walked to ~0.003 in 4 epochs (docs/results.md). So they start at ``initial`` (about a
    fifth of a fresh conv's output scale) and learn ``LR_GAIN`` times faster: ProGAN's runtime
    weight scaling (Karras et al. 2018, sec. 4.1), under Adam a per-parameter learning rate.

    ``per_channel``: each channel gets its own noise image, the basis combined with that channel's
    fixed signs (:func:`channel_signs`; still variance 1 per pixel). One shared image reaches the
    next conv's output through a single effective 3x3 kernel (the strengths times the weights,
    summed over channels), whose power has a direction; independent images add up as a sum of
    the kernels' powers.

    ``spectrum`` "learned": the noise image passes a zero-phase filter with one learned gain per
    frequency (a global filter, Rao et al. 2021, "GFNet"), normalised to mean power 1, before the
    strengths. A white image reaches the output through a few 3x3 convs, whose power has only a
    handful of degrees of freedom per direction: the texture's spectrum is fixed by them, not
    learned, and the one excess every run kept came from this noise (docs/results.md)."""

    LR_GAIN = 10.0

    def __init__(self, source_dim: int, channels: int, size: int, initial: float = 0.1, basis: str = "gaussian",
                 per_channel: bool = False, spectrum: str = "fixed"):
        super().__init__()
        images = flat_spectrum_basis(source_dim, size) if basis == "flat" else torch.randn(source_dim, size * size)
        self.register_buffer("basis", images / math.sqrt(source_dim))
        # None is not saved: checkpoints with shared images load unchanged
        self.register_buffer("signs", channel_signs(channels, source_dim) if per_channel else None)
        self.scaled_strength = nn.Parameter(torch.full((channels,), initial / self.LR_GAIN))
        # log amplitude gain per rfft2 frequency, 0 = white; learns LR_GAIN times faster, as the strengths
        self.scaled_log_gain = nn.Parameter(torch.zeros(size, size // 2 + 1)) if spectrum == "learned" else None

    def gain(self) -> torch.Tensor:
        """(size, size // 2 + 1) amplitude gain per frequency, mean square 1 over the full spectrum
        (the strengths keep the noise's scale). rfft2's half-plane: irfft2 mirrors it, so the
        filtered image stays real and the filter has zero phase."""
        gain = torch.exp(self.scaled_log_gain * self.LR_GAIN)
        full = torch.cat([gain, gain[:, 1:(gain.shape[1] - 1)]], 1)  # the mirrored columns, for the mean
        return gain / full.pow(2).mean().sqrt()

    @property
    def strength(self) -> torch.Tensor:
        return self.scaled_strength * self.LR_GAIN

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        source = source.to(x.dtype)
        if self.signs is not None:  # (B, 1, S) x (C, S) -> (B, C, S): one combination per channel
            source = source[:, None, :] * self.signs.to(x.dtype)
        noise = (source @ self.basis.to(x.dtype)).view(x.shape[0], -1, *x.shape[2:])
        if self.scaled_log_gain is not None:
            spectrum = torch.fft.rfft2(noise.float()) * self.gain()
            noise = torch.fft.irfft2(spectrum, s=noise.shape[-2:]).to(x.dtype)
        return x + self.strength.to(x.dtype).view(1, -1, 1, 1) * noise


def add_noise(noise: PixelNoise | None, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    return x if noise is None else noise(x, source)


class ModulatedUpBlock(nn.Module):
    """x2 upsample -> 3x3 conv -> BN (no affine) -> caption affine -> LeakyReLU (``filtered``: StyleGAN3's).
    Upsample + conv rather than a transposed conv avoids checkerboard artefacts (Odena et
    al. 2016); StackGAN's and DF-GAN's generators upsample this way, with "nearest", whose
    copies of the coarse spectrum one 3x3 conv does not remove; "bilinear" filters them
    (StyleGAN2's upsampling is a filtered one for this reason; Karras et al. 2020)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, upsample: str = "nearest",
                 padding: str = "zeros", noise: PixelNoise | None = None, filtered: bool = False):
        super().__init__()
        self.upsample, self.filtered = upsample, filtered
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False, padding_mode=padding)
        self.noise = noise
        self.norm = nn.BatchNorm2d(out_channels, affine=False)
        self.affine = TextAffine(cond_dim, out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, noise_source: torch.Tensor | None = None) -> torch.Tensor:
        x = add_noise(self.noise, self.conv(upsample2x(x, self.upsample)), noise_source)
        return leaky_relu(self.affine(self.norm(x), cond), self.filtered)


class ResidualUpBlock(nn.Module):
    """DF-GAN's generator block (Tao et al. 2022, G_Block in tobran/DF-GAN): x2 upsample, then
    a 1x1-conv shortcut plus a residual of two stages (fuse -> 3x3 conv), each fusion two
    caption affines with LeakyReLU (its DFBLK). No batch norm: every block re-reads the
    condition instead. Two convs per resolution, where :class:`ModulatedUpBlock` has one,
    give the block a second filter over nearest upsampling's spectral copies."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, upsample: str = "nearest",
                 padding: str = "zeros", noise: PixelNoise | None = None, filtered: bool = False):
        super().__init__()
        self.upsample, self.filtered = upsample, filtered
        self.noise = noise  # after the second conv, before the shortcut joins
        self.fuse1 = nn.ModuleList([TextAffine(cond_dim, in_channels), TextAffine(cond_dim, in_channels)])
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, padding_mode=padding)
        self.fuse2 = nn.ModuleList([TextAffine(cond_dim, out_channels), TextAffine(cond_dim, out_channels)])
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, padding_mode=padding)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def fuse(self, affines: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for affine in affines:
            x = leaky_relu(affine(x, cond), self.filtered)
        return x

    def forward(self, x: torch.Tensor, cond: torch.Tensor, noise_source: torch.Tensor | None = None) -> torch.Tensor:
        x = upsample2x(x, self.upsample)
        h = self.conv1(self.fuse(self.fuse1, x, cond))
        h = add_noise(self.noise, self.conv2(self.fuse(self.fuse2, h, cond)), noise_source)
        return self.shortcut(x) + h


UP_BLOCKS = {"plain": ModulatedUpBlock, "residual": ResidualUpBlock}


class ModulatedDecoder(nn.Module):
    """(B, in_dim), (B, cond_dim) -> (B, 3, 64, 64) in [0, 1]: a 4x4 seed map from ``in_dim``
    and four upsampling blocks, each re-reading the caption through :class:`TextAffine`
    (``block``: "plain" = :class:`ModulatedUpBlock`, "residual" = DF-GAN's :class:`ResidualUpBlock`).

    The caption reaches every resolution directly instead of only through the first
    linear layer: on shapes this is what lets colour and shape words compose into pairs
    never seen in training (each word switches its own channels on). From ``cfg``: ``width``,
    ``upsample``, ``block`` and ``padding`` (how every 3x3 conv pads: "zeros", or "reflect": no
    image edge for the convs to detect and draw on). ``noise_dim`` > 0 gives every block
    :class:`PixelNoise` read from a (B, noise_dim) source passed to :meth:`forward`."""

    def __init__(self, in_dim: int, cond_dim: int, cfg: ModelConfig, noise_dim: int = 0):
        super().__init__()
        width, padding = cfg.width, cfg.padding
        self.start_channels = 8 * width
        self.project = nn.Sequential(nn.Linear(in_dim, 16 * self.start_channels),
                                     nn.BatchNorm1d(16 * self.start_channels), nn.LeakyReLU(0.2, inplace=True))
        channels = [8 * width, 4 * width, 2 * width, width, width]
        self.blocks = nn.ModuleList(
            UP_BLOCKS[cfg.block](a, b, cond_dim, cfg.upsample, padding,
                                 PixelNoise(noise_dim, b, 8 << i, basis=cfg.noise_basis,
                                            per_channel=cfg.noise_images == "per_channel",
                                            spectrum=cfg.noise_spectrum) if noise_dim else None,
                                 filtered=cfg.activation == "filtered")
            for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])))
        # A residual block ends in a conv, not an activation: DF-GAN's to_rgb starts with one.
        pre_activation = [nn.LeakyReLU(0.2)] if cfg.block == "residual" else []
        self.to_rgb = nn.Sequential(*pre_activation, nn.Conv2d(width, 3, 3, 1, 1, padding_mode=padding), nn.Sigmoid())

    def forward(self, h: torch.Tensor, cond: torch.Tensor, noise_source: torch.Tensor | None = None) -> torch.Tensor:
        x = self.project(h).view(-1, self.start_channels, 4, 4)
        for block in self.blocks:
            x = block(x, cond, noise_source)
        return self.to_rgb(x)
