"""Resampling by 2 through a Lanczos-3 windowed sinc, and the nonlinearity applied at twice the
rate through it: the generators' anti-aliasing pieces (Karras et al. 2021, StyleGAN3; Durall
et al. 2020 on what nearest upsampling leaves). Pure PyTorch.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

LANCZOS_A = 3  # lobes of the Lanczos kernel: 6 coarse taps per output pixel


def lanczos_phases(a: int = LANCZOS_A) -> torch.Tensor:
    """(2, 2a + 1) weights of a x2 Lanczos upsampling (a windowed sinc, sinc(d) sinc(d / a);
    Turkowski 1990), one row per output phase: fine pixels sit at coarse positions n -+ 0.25
    (``align_corners=False``), each row reads coarse pixels n - a .. n + a, normalised to sum 1."""
    taps = torch.arange(-a, a + 1, dtype=torch.float64)
    rows = []
    for offset in (-0.25, 0.25):
        d = offset - taps
        weights = torch.where(d.abs() < a, torch.sinc(d) * torch.sinc(d / a), torch.zeros_like(d))
        rows.append(weights / weights.sum())
    return torch.stack(rows).float()


@functools.cache
def lanczos_matrix(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size, 2 size): x @ M upsamples the last axis of x by 2 through :func:`lanczos_phases`,
    edge pixels replicated (taps beyond the border read the border pixel). Cached per device and
    dtype: no host-to-device copy per step."""
    phases = lanczos_phases()
    a = (phases.shape[1] - 1) // 2
    matrix = torch.zeros(size, 2 * size)
    for n in range(size):
        for phase in (0, 1):
            for k in range(-a, a + 1):
                matrix[min(max(n + k, 0), size - 1), 2 * n + phase] += phases[phase, k + a]
    return matrix.to(device, dtype)


@functools.cache
def lanczos_decimation_matrix(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2 size, size): y @ D halves the last axis of y: the transpose of :func:`lanczos_matrix`, each
    row normalised, so each coarse pixel is a Lanczos-weighted mean of the fine ones (a low-pass
    before the decimation, flat to a constant)."""
    upsampling = lanczos_matrix(size)
    return (upsampling / upsampling.sum(1, keepdim=True)).t().contiguous().to(device, dtype)


def separable_resample(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W'): rows (H, H') and columns (W, W') applied as two dense
    matmuls over the channels-last layout the models train in (on CPU far faster than depthwise
    convolutions, and no layout copies)."""
    batch, channels, height, width = x.shape
    out_height, out_width = rows.shape[1], columns.shape[1]
    pixels = x.permute(0, 2, 3, 1).reshape(batch * height, width, channels)  # (B, H, W, C): free if channels-last
    resampled = torch.matmul(columns.t(), pixels).reshape(batch, height, out_width * channels)
    return torch.matmul(rows.t(), resampled).view(batch, out_height, out_width, channels).permute(0, 3, 1, 2)


def lanczos_upsample2x(x: torch.Tensor) -> torch.Tensor:
    """x2 upsampling through a Lanczos-3 low-pass, separable, edges replicated. Against nearest's
    copies of the coarse spectrum (power -0.5 to -1 decade) it leaves -3 to -4 decades, and keeps
    the pass band flat to 0.6 of the coarse Nyquist frequency where bilinear already loses 20 %
    of the amplitude: the filtered upsampling of StyleGAN3 (Karras et al. 2021), a windowed sinc."""
    height, width = x.shape[-2:]
    return separable_resample(x, lanczos_matrix(height, x.device, x.dtype), lanczos_matrix(width, x.device, x.dtype))


def lanczos_downsample2x(x: torch.Tensor) -> torch.Tensor:
    """/2 downsampling through the same Lanczos-3 low-pass (:func:`lanczos_decimation_matrix`)."""
    height, width = x.shape[-2:]
    return separable_resample(x, lanczos_decimation_matrix(height // 2, x.device, x.dtype),
                              lanczos_decimation_matrix(width // 2, x.device, x.dtype))


def leaky_relu(x: torch.Tensor, filtered: bool = False) -> torch.Tensor:
    """LeakyReLU(0.2); ``filtered``: StyleGAN3's filtered nonlinearity (Karras et al. 2021, Sec. 3.2;
    filtered_lrelu in NVlabs/stylegan3: x2 upsample, the nonlinearity, low-pass, /2). A pointwise
    kink makes frequencies past the map's Nyquist that fold back into it as a fine texture tied
    to the pixel grid; applied at twice the rate they are made there and filtered away."""
    if not filtered:
        return nn.functional.leaky_relu(x, 0.2)
    return lanczos_downsample2x(nn.functional.leaky_relu(lanczos_upsample2x(x), 0.2))


def upsample2x(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "lanczos":
        return lanczos_upsample2x(x)
    return nn.functional.interpolate(x, scale_factor=2, mode=mode,
                                     **({"align_corners": False} if mode == "bilinear" else {}))
