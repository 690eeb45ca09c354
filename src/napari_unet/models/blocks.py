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


class UpsampleConvNormAct(nn.Sequential):
    """Bilinear ×``scale`` up-sampling → :class:`ConvNormAct` (a UNet 3+ decoder branch).

    ``(N, Cin, h, w) → (N, Cout, h·scale, w·scale)``. Same children (and state-dict keys)
    as ``nn.Sequential(nn.Upsample(...), ConvNormAct(...))``, computed in a cheaper but
    equal order: bilinear resizing acts on every channel alike, so it commutes with the
    convolution's channel mixing. For each of the k×k kernel taps ``o`` the 1×1 mixing
    ``W_o · x`` runs at the low resolution (``Cout`` channels), is up-sampled, shifted by
    the tap's offset (zeros outside, as the convolution's zero padding) and summed:
    ``conv(up(x)) = b + Σ_o shift_o(up(W_o · x))``. Equal to float rounding; the
    full-resolution ``Cin``-channel map is never built (for the deepest UNet 3+ branch
    ``Cin`` = 1024 vs ``Cout`` = 64), so memory and FLOPs drop by about ``Cin / Cout``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int, *, norm: str) -> None:
        super().__init__(
            nn.Upsample(scale_factor=scale, mode="bilinear"),
            ConvNormAct(in_channels, out_channels, norm=norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, block = self[0], self[1]
        conv = block[0]
        k = conv.kernel_size[0]
        if (
            conv.kernel_size != (k, k)
            or conv.stride != (1, 1)
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or conv.padding != (k // 2, k // 2)
        ):
            return super().forward(x)
        n_out, pad = conv.out_channels, k // 2
        # (Cout, Cin, k, k) → (k·k·Cout, Cin, 1, 1): every tap's 1×1 mixing at once
        taps = conv.weight.permute(2, 3, 0, 1).reshape(k * k * n_out, -1, 1, 1)
        mixed = nn.functional.conv2d(x, taps)
        height, width = (int(n * up.scale_factor) for n in x.shape[-2:])
        # accumulate half-precision taps in float32, as a convolution would
        acc = torch.promote_types(mixed.dtype, torch.float32)
        out = mixed.new_zeros((x.shape[0], n_out, height, width), dtype=acc)
        for t in range(k * k):
            v = up(mixed[:, t * n_out : (t + 1) * n_out])
            sy, sx = t // k - pad, t % k - pad
            # out[y, x] += v[y + sy, x + sx] where that pixel exists
            out[
                ...,
                max(0, -sy) : height - max(0, sy),
                max(0, -sx) : width - max(0, sx),
            ] += v[..., max(0, sy) : height - max(0, -sy), max(0, sx) : width - max(0, -sx)]
        out = out.to(mixed.dtype)
        if conv.bias is not None:
            out = out + conv.bias.view(1, -1, 1, 1).to(out.dtype)
        for layer in list(block)[1:]:
            out = layer(out)
        return out
