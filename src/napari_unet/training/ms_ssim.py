"""Multi-scale SSIM (Wang 2003) with unknown pixels, for the UNet 3+ hybrid loss.

:func:`ms_ssim` compares maps ``(N, K, H, W)`` with a Gaussian window, normalised
convolutions that ignore unknown pixels and 2× confidence-weighted pooling between
scales; :func:`~.losses.ms_ssim_loss` turns it into ``1 − MS-SSIM`` of the foreground
probabilities. Everything runs in float32 with autocast off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim", "ms_ssim_scales"]

#: Wang et al. 2003, scales 1 (finest) .. 5.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_TINY = 1e-12
_CS_FLOOR = 1e-4  # MS-SSIM factors are clamped here before the fractional powers


def ms_ssim_scales(height: int, width: int, window: int = 11, max_scales: int = 5) -> int:
    """Number of MS-SSIM scales for an image: the most (≤ ``max_scales``) whose coarsest
    level still has ``min(H, W) / 2^(M−1) ≥ window``; at least 1."""
    side = min(height, width)
    if side < window:
        return 1
    return max(1, min(max_scales, 1 + int(math.floor(math.log2(side / window)))))


def _gaussian(window: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian (window,)."""
    x = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix applying the 1-D kernel ``g`` along an axis with zero padding."""
    r = g.numel() // 2
    i = torch.arange(n, device=g.device)
    offset = i[None, :] - i[:, None]
    return torch.where(offset.abs() <= r, g[(offset + r).clamp(0, 2 * r)], 0.0)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, K, H, W), zero padding, same size.

    Banded matrix products: exact, and much faster than a depthwise convolution on CPU.
    """
    h, w = x.shape[-2:]
    return _band(h, g) @ x @ _band(w, g).T


def _ssim_maps(
    x: torch.Tensor, y: torch.Tensor, conf: torch.Tensor, g: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance and contrast-structure maps (B, 1, H, W) from confidence-weighted
    (normalised-convolution) local statistics; all inputs (B, 1, H, W)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    stack = torch.cat([conf, conf * x, conf * y, conf * x * x, conf * y * y, conf * x * y], 1)
    f = _blur(stack, g)
    norm = f[:, :1].clamp_min(_TINY)
    mx, my, xx, yy, xy = (f[:, i : i + 1] / norm for i in range(1, 6))
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    cs = (2 * cov + c2) / (vx + vy + c2)
    return lum, cs


def _weighted_mean(values: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """Confidence-weighted spatial mean (B,) of (B, 1, H, W) maps."""
    return (values * conf).sum((1, 2, 3)) / conf.sum((1, 2, 3)).clamp_min(_TINY)


def _downsample(
    x: torch.Tensor, y: torch.Tensor, conf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2× confidence-weighted average pooling of (B, 1, H, W) maps (odd sizes kept)."""

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 2, ceil_mode=True)

    conf2 = pool(conf)
    den = conf2.clamp_min(_TINY)
    return pool(conf * x) / den, pool(conf * y) / den, conf2


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    known: torch.Tensor | None = None,
    window: int = 11,
    sigma: float = 1.5,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Multi-scale SSIM (Wang 2003) of maps ``x, y (N, K, H, W)`` → ``(N, K)``.

    ``MS-SSIM = mean(l·cs at scale M)^{w_M} · Π_{j<M} mean(cs_j)^{w_j}`` with a
    Gaussian window (11, σ 1.5), ``C1 = (0.01 L)², C2 = (0.03 L)²`` and 2× average
    pooling between scales.

    * **Small patches**: ``M = ms_ssim_scales(H, W)`` (the coarsest scale keeps
      ≥ ``window`` pixels per side) and the first ``M`` weights are renormalised to
      sum 1. Windows are zero-padded "same" windows treated as below, so every pixel
      has a window.
    * **Ignored pixels** (``known`` (N, H, W), bool or a float confidence): local means,
      variances and covariance are normalised convolutions that use only known
      pixels (pixels outside the image are unknown too), the maps are averaged only
      over windows whose centre is known, and pooling averages known pixels only (a
      coarse pixel is known when any of its fine pixels is). Values at unknown
      pixels therefore never matter. Images with no known pixel give 1.
    * Each factor is clamped to ``≥ 1e-4`` before the fractional power, which keeps
      anti-correlated maps (negative ``cs``) finite.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x and y must be equal (N, K, H, W), got {x.shape} and {y.shape}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ms_ssim(x.float(), y, known, window, sigma, weights, data_range)


def _ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    known: torch.Tensor | None,
    window: int,
    sigma: float,
    weights: Sequence[float],
    data_range: float,
) -> torch.Tensor:
    n, k, h, w = x.shape
    conf = torch.ones((n, h, w), device=x.device) if known is None else known.float()
    conf = conf.to(x.device)[:, None].expand(n, k, h, w).reshape(n * k, 1, h, w)
    x, y = x.reshape(n * k, 1, h, w), y.float().reshape(n * k, 1, h, w)
    scales = ms_ssim_scales(h, w, window, len(weights))
    wts = torch.tensor(weights[:scales], dtype=torch.float32, device=x.device)
    wts = wts / wts.sum()
    g = _gaussian(window, sigma, x.device)
    valid = conf.sum((1, 2, 3)) > 0
    result = torch.ones(n * k, device=x.device)
    for j in range(scales):
        if j > 0:
            x, y, conf = _downsample(x, y, conf)
        lum, cs = _ssim_maps(x, y, conf, g, data_range)
        value = _weighted_mean(lum * cs if j == scales - 1 else cs, conf)
        result = result * value.clamp_min(_CS_FLOOR).pow(wts[j])
    return torch.where(valid, result, 1.0).view(n, k)
