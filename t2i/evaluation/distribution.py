"""How far generated images lie from real ones as a whole set, with no download:

* **judge Fréchet distance** (FD) and **kernel distance** (KD): FID's and KID's formulas
  (Heusel et al. 2017; Bińkowski et al. 2018, via ``torchmetrics``) computed on the pooled
  image features of t2i's own evaluation judge, not Inception's: the numbers are not FID
  and compare only with each other. Their floor is real train images against real test
  images, reported beside them.
* **power-spectrum check**: the mean 2-D power spectrum of the images' luminance against
  the real images' (Durall et al. 2020). An upsampling grid (checkerboard artefacts, Odena
  et al. 2016) puts power on a few isolated frequencies: ``peak`` is the largest excess over
  the real spectrum at any one frequency (log10, so 1.0 = ten times the real power there),
  ``distance`` the mean gap over all frequencies (blur shows there, as missing high
  frequencies). Real train against real test images gives the floor of both. The check is
  reported twice: on the images as they are (the statistic Durall et al.'s spectral term,
  ``loss.spectrum_weight``, trains) and through a Hann window (Harris 1978; the term reads it
  too with ``loss.spectrum_window``): a periodic FFT sees each image's left/right and
  top/bottom edges as a jump, and the window tapers them away, so power on the fx = 0 and
  fy = 0 axes is the images' own.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from t2i.models.dual_encoder import DualEncoder
from t2i.training.spectrum import EPS, hann_window, mean_power_spectrum

KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000


class JudgeFeatures(nn.Module):
    """The judge's image tower up to its pooled CNN features (before the projection into the
    caption space, as FID reads Inception's pool features); ``num_features`` for torchmetrics."""

    def __init__(self, judge: DualEncoder):
        super().__init__()
        self.trunk = judge.image[:-1]  # every layer but the final Linear projection
        self.num_features = judge.image[-1].in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images.float())


def judge_features(features: JudgeFeatures, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, num_features), in batches."""
    return torch.cat([features(images[start: start + batch]) for start in range(0, len(images), batch)])


def judge_distances(judge: DualEncoder, real: torch.Tensor, sets: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {"fd": ..., "kd": ..., "kd_std": ...}} of each image set (N, 3, H, W) in [0, 1]
    against ``real``. Each set's judge features are computed once and handed to both metrics
    (their extractor is a pass-through), the real ones once for every set."""
    features = JudgeFeatures(judge).eval()
    passthrough = nn.Identity()
    passthrough.num_features = features.num_features  # read by torchmetrics instead of a dummy forward
    real_features = judge_features(features, real)
    fd = FrechetInceptionDistance(feature=passthrough, reset_real_features=False)
    kd = KernelInceptionDistance(feature=passthrough, subsets=KID_SUBSETS, reset_real_features=False)
    fd.update(real_features, real=True)
    kd.update(real_features, real=True)
    out = {}
    for name, images in sets.items():
        fake_features = judge_features(features, images)
        for metric in (fd, kd):
            metric.reset()  # drops the previous set's features only (reset_real_features=False)
            metric.update(fake_features, real=False)
        kd.subset_size = min(KID_SUBSET_SIZE, len(real), len(images))
        kd_mean, kd_std = kd.compute()
        out[name] = {"fd": float(fd.compute()), "kd": float(kd_mean), "kd_std": float(kd_std), "n": len(images)}
    return out


def log_power_spectrum(images: torch.Tensor, windowed: bool = False) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (H, W) log10 of the mean power spectrum of the luminance
    (each image's mean removed, then Hann-windowed if ``windowed``; zero frequency at the centre)."""
    window = hann_window(*images.shape[-2:]) if windowed else None
    return torch.log10(mean_power_spectrum(images, window) + EPS)


def isolated_excess(excess: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (H, W): each frequency's excess less the median excess of its 8 neighbours
    (the spectrum wraps around; the zero frequency is left out: no grid sits there, and once
    each image's mean is removed it holds no power, or through a window only the window's
    weighted mean of what is left). A grid's power swings from one frequency to the next and stands
    out; a broad excess (more contrast at some scale than the photos have) cancels."""
    around = [torch.roll(excess, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    isolated = excess - torch.stack(around).median(0).values
    isolated[excess.shape[0] // 2, excess.shape[1] // 2] = float("-inf")  # zero frequency: each mean is removed
    return isolated


def spectrum_check(real: torch.Tensor, sets: dict[str, torch.Tensor], windowed: bool = False) -> dict[str, dict]:
    """{name: {"peak": max over frequencies of log10(P / P_real), "peak_at": that frequency as
    [fy, fx] in cycles per image (signed; a grid of period p pixels sits at multiples of
    side / p), "spike" / "spike_at": the same for :func:`isolated_excess` (the excess at one
    frequency above its neighbours'), "distance": mean |log10 P - log10 P_real|}} for each
    image set against ``real``, on the Hann-windowed images if ``windowed``."""
    reference = log_power_spectrum(real, windowed)
    out = {}
    for name, images in sets.items():
        excess = log_power_spectrum(images, windowed) - reference
        out[name] = {}
        for key, values in (("peak", excess), ("spike", isolated_excess(excess))):
            side_y, side_x = values.shape
            row, column = divmod(int(values.argmax()), side_x)
            out[name] |= {key: float(values[row, column]), f"{key}_at": [row - side_y // 2, column - side_x // 2]}
        out[name]["distance"] = float(excess.abs().mean())
    return out
