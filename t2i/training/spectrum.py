"""Durall et al. 2020 ("Watch your Up-Convolution: CNN Based Generative Deep Neural Networks are
Failing to Reproduce Spectral Distributions", CVPR): a generator whose upsampling copies the
coarse map's spectrum up to higher frequencies is caught by the images' power spectrum, and a
term matching the generated spectrum to the real one (their spectral regularisation) removes
the copies. Evaluation's grid check reads the same statistic (t2i.evaluation.distribution).
"""

from __future__ import annotations

import torch
from torch import nn

LUMA = (0.299, 0.587, 0.114)
EPS = 1e-8


def mean_power_spectrum(images: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (H, W): the mean power spectrum of the images' luminance, each
    image's mean removed (then multiplied by ``window``, (H, W), if given), zero frequency at
    the centre. Differentiable."""
    luma = (images.float() * images.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1)
    luma = luma - luma.mean(dim=(1, 2), keepdim=True)
    if window is not None:
        luma = luma * window.to(luma)
    return torch.fft.fftshift(torch.fft.fft2(luma).abs().pow(2).mean(0))


def hann_window(height: int, width: int) -> torch.Tensor:
    """(H, W) separable 2-D Hann window (Harris 1978; symmetric: zero on the border rows and columns)."""
    return torch.outer(torch.hann_window(height, periodic=False), torch.hann_window(width, periodic=False))


def ring_weights(size: int) -> torch.Tensor:
    """(size, size), zero frequency at the centre: 1 / |f| (|f| in cycles per image), scaled to
    mean 1; the zero frequency (mean removed) weighs 0. A ring of radius r holds ~2 pi r
    frequencies, so each whole ring weighs alike, as each radius does in Durall et al.'s 1-D
    azimuthal average: by a plain mean the eight frequencies of the largest scale weigh as much
    as any eight of the 4,096."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    radius = torch.hypot(*torch.meshgrid(offsets, offsets, indexing="ij"))
    weights = 1.0 / radius.clamp(min=1.0)
    weights[size // 2, size // 2] = 0.0
    return weights / weights.mean()


def power_weights(real_power: torch.Tensor) -> torch.Tensor:
    """1 + each frequency's share of the photos' power (mean share 1): the log-gap's plain pull
    everywhere, plus one that grows with the power. A gap in decades moves the pixels by about
    gap / amplitude per unit of loss, so under a plain mean the largest scales, whose amplitude
    is 2-3 decades above the finest's, barely pull; weighting by power evens that out (for a
    small gap, P_real x gap^2 is the linear-power chi-square distance, up to a constant)."""
    return 1.0 + real_power / real_power.mean()


def outlier_weights(gap: torch.Tensor, scale: float) -> torch.Tensor:
    """1 + (gap / scale)^2 per frequency, re-read from the gap at each step (iteratively
    reweighted least squares): where |gap| > scale the pull grows ~ gap^3 instead of ~ gap, so the
    loss leans toward the largest gap, which the grid check reports. In a plain mean of squared
    gaps one frequency 0.3 decades off weighs only as much as 225 at 0.02 (seed-noise level)."""
    return 1.0 + (gap / scale).pow(2)


def spectrum_matching_loss(fake_power: torch.Tensor, gap: torch.Tensor, weights: torch.Tensor,
                           integral: torch.Tensor | None = None) -> torch.Tensor:
    """Its value: mean over frequencies of ``weights`` x ``gap``^2, the gap in decades between
    the generated and the real spectrum. Its gradient: that of the weighted mean of
    (log10 P_fake - log10 P_real)^2 through the batch's own spectrum ``fake_power``, with the
    (less noisy) ``gap`` standing in for the batch's, plus ``integral`` (the gap's accumulated
    pull, :class:`SpectrumTracker`) where given. Durall et al. compare 1-D azimuthal
    averages; here the whole 2-D map, because nearest upsampling copies a texture to a few
    directional (fy, fx) an average blurs together."""
    gap = gap.detach()
    pull = 2 * weights * gap + (integral if integral is not None else 0.0)
    surrogate = (pull * torch.log10(fake_power + EPS)).mean()
    return (weights * gap.pow(2)).mean() + surrogate - surrogate.detach()


@torch.no_grad()
def inference_draws(generator: nn.Module, word_ids: torch.Tensor) -> torch.Tensor:
    """One draw per caption as ``generator.sample`` makes it after training: batch norm on its
    running statistics, not the batch's (the two draw different spectra: docs/results.md)."""
    was_training = generator.training
    generator.eval()
    try:
        return generator.sample(word_ids)[:, 0]
    finally:
        generator.train(was_training)


INTEGRAL_CLIP = 0.1  # decades: the most one step's gap adds to the integral (no wind-up while G is far off)
WINDOW_VIEWS = {"none": ("",), "hann": ("windowed_",), "both": ("", "windowed_")}  # SpectrumTracker's buffer prefixes


class SpectrumTracker(nn.Module):
    """Moving averages of the real and the generated batches' power spectra, and the matching
    loss against them. One batch of 32 knows each frequency's power to about +-18 % (0.08
    decades): in a batch-against-batch loss that noise, spread over all 4,096 frequencies,
    drowns an excess at a few of them. Averaged over ~1 / momentum batches the gap is known to
    about 0.01 decades, so where the spectra agree the gradient is ~0 and it pushes where they
    do not.

    ``window``: the spectra of the images as they are ("none"), Hann-windowed ("hann") or both
    ("both", the sum of the two terms). A periodic FFT reads each image's left/right and
    top/bottom edges as a jump whose power lies along the fx = 0 and fy = 0 axes and leaks to
    every frequency; matched as they are, a generator can trade its edges' jumps against its
    texture and still match. Through the window the spectrum is the interior's own.

    ``integral_rate`` > 0 adds integral control (a PI controller; the gap as a constraint with
    one Lagrange multiplier per frequency, raised by dual ascent as in GECO, Rezende & Viola
    2018): each step every frequency's pull grows by rate x 2 x weight x gap (the gap clipped
    to +-INTEGRAL_CLIP). A pull proportional to the gap settles where it balances the other
    terms' push, so a gap those terms hold up persists; the integral grows until it is gone.
    ``integral_limit`` > 0 bounds each frequency's integral to the pull of a gap that many decades
    (integrator clamping, the textbook anti-windup, Astrom & Hagglund 2006): a deficit the
    generator cannot answer yet (early in training, or where it answers slowly) would otherwise
    build a pull that overshoots long after the gap has closed."""

    def __init__(self, size: int, momentum: float = 0.02, weighting: str = "uniform", outlier_gap: float = 0.0,
                 window: str = "none", integral_rate: float = 0.0, integral_limit: float = 0.0):
        super().__init__()
        self.momentum = momentum
        self.outlier_gap = outlier_gap  # see outlier_weights
        self.integral_rate, self.integral_limit = integral_rate, integral_limit
        self.by_power = weighting == "power"  # weights follow the real spectrum, set each step
        self.views = WINDOW_VIEWS[window]
        # Not saved: derived from the size, so runs from before them resume unchanged.
        self.register_buffer("weights", ring_weights(size) if weighting == "ring" else torch.ones(size, size),
                             persistent=False)
        self.register_buffer("window", hann_window(size, size), persistent=False)
        for view in self.views:  # the plain view keeps the names runs from before the windowed one saved
            self.register_buffer(f"{view}real", torch.zeros(size, size))
            self.register_buffer(f"{view}fake", torch.zeros(size, size))
            if integral_rate > 0:  # only then, so runs without it save and resume as before
                self.register_buffer(f"{view}integral", torch.zeros(size, size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, fake: torch.Tensor, real: torch.Tensor, measured: torch.Tensor | None = None) -> torch.Tensor:
        """The term on ``fake`` (the batch it pulls); the running generated spectrum is read from
        ``measured`` instead where given (other draws of the same generator, e.g. as it samples
        after training), so the gap, and its integral, is that of those draws."""
        terms = [self._term(fake, real, view, measured) for view in self.views]
        self.steps += 1
        return sum(terms)  # "both": each view pulls as hard as it would alone

    def base_weights(self, real_power: torch.Tensor) -> torch.Tensor:
        """Each frequency's weight before the outlier factor: by ``weighting``, from the running real spectrum."""
        return power_weights(real_power) if self.by_power else self.weights

    def _term(self, fake: torch.Tensor, real: torch.Tensor, view: str, measured: torch.Tensor | None) -> torch.Tensor:
        window = self.window if view else None
        fake_power = mean_power_spectrum(fake, window)
        real_mean, fake_mean = getattr(self, f"{view}real"), getattr(self, f"{view}fake")
        with torch.no_grad():
            rate = 1.0 if self.steps == 0 else self.momentum
            real_mean.lerp_(mean_power_spectrum(real, window), rate)
            fake_mean.lerp_(fake_power.detach() if measured is None else mean_power_spectrum(measured, window), rate)
            gap = torch.log10(fake_mean + EPS) - torch.log10(real_mean + EPS)
            weights = self.base_weights(real_mean)
            integral = None
            if self.integral_rate > 0:
                integral = getattr(self, f"{view}integral")
                integral.add_(self.integral_rate * 2 * weights * gap.clamp(-INTEGRAL_CLIP, INTEGRAL_CLIP))
                if self.integral_limit > 0:
                    bound = 2 * weights * self.integral_limit
                    integral.clamp_(min=-bound, max=bound)
            if self.outlier_gap > 0:
                weights = weights * outlier_weights(gap, self.outlier_gap)
        return spectrum_matching_loss(fake_power, gap, weights, integral)
