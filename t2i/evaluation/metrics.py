"""Image metrics as pure functions of (N, 3, H, W) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for a peak of 1.0, (N,)."""
    return 10.0 * torch.log10(1.0 / mse(a, b).clamp(min=1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, per channel,
    averaged over the valid region and the channels, (N,)."""
    window = _gaussian_window().to(a.device)
    a, b = a.float(), b.float()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a = F.conv2d(a, window, groups=3)
    mu_b = F.conv2d(b, window, groups=3)
    var_a = F.conv2d(a * a, window, groups=3) - mu_a ** 2
    var_b = F.conv2d(b * b, window, groups=3) - mu_b ** 2
    cov = F.conv2d(a * b, window, groups=3) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Sharpness: variance of the Laplacian of the grey image (Pech-Pacheco et al. 2000), (N,)."""
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1).float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=images.device)
    return F.conv2d(grey, kernel.view(1, 1, 3, 3)).flatten(1).var(1)


def pairwise_diversity(samples: torch.Tensor) -> torch.Tensor:
    """(N, k, 3, H, W) -> mean RMS distance between the k samples of each item, (N,)."""
    flat = samples.float().flatten(2)
    k = flat.shape[1]
    if k < 2:
        return torch.zeros(flat.shape[0])
    dist = torch.cdist(flat, flat) / flat.shape[2] ** 0.5
    return dist.sum((1, 2)) / (k * (k - 1))
