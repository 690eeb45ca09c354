"""Building blocks shared by the U-Net family (convolutions, norms, crops)."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("none", "batch", "group")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``channels`` feature maps.

    ``"batch"`` is BatchNorm2d (affine in eval mode, so tiling stays exact),
    ``"group"`` is GroupNorm with up to 8 groups (statistics over the whole input),
    ``"none"`` is the identity.
    """
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class ConvNormAct(nn.Sequential):
    """3×3 convolution → norm → ReLU. ``(N, Cin, H, W) → (N, Cout, H', W')``.

    ``padding=0`` gives the paper's valid convolution (H' = H − 2·dilation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: str = "batch",
        padding: int | None = None,
        dilation: int = 1,
        kernel_size: int = 3,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=padding,
                dilation=dilation,
                bias=True,
            ),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` (the U-Net "standard unit").

    ``valid=True`` uses unpadded convolutions: each spatial side shrinks by 4 pixels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: str = "batch",
        valid: bool = False,
        mid_channels: int | None = None,
    ) -> None:
        pad = 0 if valid else 1
        mid = mid_channels or out_channels
        super().__init__(
            ConvNormAct(in_channels, mid, norm=norm, padding=pad),
            ConvNormAct(mid, out_channels, norm=norm, padding=pad),
        )


class UpConv(nn.ConvTranspose2d):
    """2×2 transposed convolution with stride 2 (doubles H and W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the spatial centre of ``x`` (N, C, H, W) to (N, C, height, width)."""
    h, w = x.shape[-2:]
    top = (h - height) // 2
    left = (w - width) // 2
    return x[..., top : top + height, left : left + width]


def upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``ref`` (align_corners=False)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return nn.functional.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
