"""U²-Net and U²-Net† (Qin et al., Pattern Recognition 2020).

A two-level nested U-structure: every stage of the outer U is itself a small U-Net,
the ReSidual U-block (RSU). ``RSU-L`` has ``L - 2`` max-pools (2×2, stride 2,
``ceil_mode=True``), a dilation-2 bottom convolution, a concatenating decoder with
bilinear up-sampling to the skip's size and a residual connection around the whole
block. ``RSU-4F`` replaces pooling by dilations 1, 2, 4, 8 (for the low-resolution
stages). Six side outputs (3×3 convolutions, up-sampled bilinearly to the input size)
are fused by a 1×1 convolution; ``forward_all`` returns ``[side1, …, side6, fused]``
as logits (the reference applies a sigmoid; here the loss does).

Module names follow the reference implementation (``xuebinqin/U-2-Net``,
``model/u2net.py``), so with ``norm="batch"`` and ``width=1`` its released
``u2net.pth`` / ``u2netp.pth`` state dicts load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import make_norm, upsample_like

# (height L, mid channels, out channels); L = 0 marks RSU-4F. Input channels follow
# from the wiring. Encoder stages 1..6, then decoder stages 5d..1d.
U2NET_STAGES: tuple[tuple[int, int, int], ...] = (
    (7, 32, 64),
    (6, 32, 128),
    (5, 64, 256),
    (4, 128, 512),
    (0, 256, 512),
    (0, 256, 512),
)
U2NET_DECODER: tuple[tuple[int, int, int], ...] = (
    (0, 256, 512),
    (4, 128, 256),
    (5, 64, 128),
    (6, 32, 64),
    (7, 16, 64),
)
U2NETP_STAGES: tuple[tuple[int, int, int], ...] = (
    (7, 16, 64),
    (6, 16, 64),
    (5, 16, 64),
    (4, 16, 64),
    (0, 16, 64),
    (0, 16, 64),
)
U2NETP_DECODER: tuple[tuple[int, int, int], ...] = (
    (0, 16, 64),
    (4, 16, 64),
    (5, 16, 64),
    (6, 16, 64),
    (7, 16, 64),
)


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, stride=2, ceil_mode=True)


class REBNCONV(nn.Module):
    """3×3 convolution (dilation ``d``, padding ``d``) → norm → ReLU; size-preserving."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = make_norm(norm, out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """ReSidual U-block RSU-``height`` (``height`` ≥ 3): ``(N, in, H, W) → (N, out, H, W)``.

    Encoder ``rebnconv1..(L-1)`` with ``pool1..(L-2)`` between them, bottom
    ``rebnconvL`` with dilation 2, decoder ``rebnconv(L-1)d..1d`` on
    ``cat(up(deeper), skip)``, output ``hx1d + hxin``.
    """

    def __init__(
        self, height: int, in_ch: int, mid_ch: int, out_ch: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        if height < 3:
            raise ValueError(f"RSU height must be ≥ 3, got {height}")
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch, 1, norm)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, 1, norm)
        for i in range(1, height - 1):
            self.add_module(f"pool{i}", _pool())
            self.add_module(f"rebnconv{i + 1}", REBNCONV(mid_ch, mid_ch, 1, norm))
        self.add_module(f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, 2, norm))
        for i in range(height - 1, 1, -1):
            self.add_module(f"rebnconv{i}d", REBNCONV(2 * mid_ch, mid_ch, 1, norm))
        self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for i in range(1, self.height - 1):
            hx = getattr(self, f"pool{i}")(skips[-1])
            skips.append(getattr(self, f"rebnconv{i + 1}")(hx))
        hx = getattr(self, f"rebnconv{self.height}")(skips[-1])
        for i in range(self.height - 1, 0, -1):
            skip = skips[i - 1]
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((upsample_like(hx, skip), skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: dilations 1, 2, 4, 8 instead of pooling; ``(N, in, H, W) → (N, out, H, W)``."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, norm: str = "batch") -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, 1, norm)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, 1, norm)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, 2, norm)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, 4, norm)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, 8, norm)
        self.rebnconv3d = REBNCONV(2 * mid_ch, mid_ch, 4, norm)
        self.rebnconv2d = REBNCONV(2 * mid_ch, mid_ch, 2, norm)
        self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


def _block(height: int, in_ch: int, mid_ch: int, out_ch: int, norm: str) -> nn.Module:
    if height == 0:
        return RSU4F(in_ch, mid_ch, out_ch, norm)
    return RSU(height, in_ch, mid_ch, out_ch, norm)


class U2Net(SegmentationModel):
    """U²-Net: six RSU encoder stages, five RSU decoder stages, six sides + fusion.

    ``stages`` / ``decoder`` list ``(L, mid, out)`` per stage (``L = 0``: RSU-4F);
    ``width`` scales every channel count (rounded, at least 1). Input
    ``(N, in_channels, H, W)`` → logits ``(N, num_classes, H, W)``; ``forward_all``
    returns the six side outputs (shallow to deep) and the fused output last.
    """

    size_divisor = 32
    name = "u2net"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        stages: Sequence[tuple[int, int, int]] = U2NET_STAGES,
        decoder: Sequence[tuple[int, int, int]] = U2NET_DECODER,
        norm: str = "batch",
        width: float = 1.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if len(stages) != 6 or len(decoder) != 5:
            raise ValueError("U²-Net needs 6 encoder and 5 decoder stage specs")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)

        enc_out: list[int] = []
        c_in = in_channels
        for i, (height, mid, out) in enumerate(stages, start=1):
            mid, out = _scale(mid, width), _scale(out, width)
            self.add_module(f"stage{i}", _block(height, c_in, mid, out, norm))
            if i < 6:
                self.add_module(f"pool{i}{i + 1}", _pool())
            enc_out.append(out)
            c_in = out

        side_ch = [0] * 6
        side_ch[5] = enc_out[5]
        deeper = enc_out[5]
        for i, (height, mid, out) in zip(range(5, 0, -1), decoder):
            mid, out = _scale(mid, width), _scale(out, width)
            self.add_module(f"stage{i}d", _block(height, deeper + enc_out[i - 1], mid, out, norm))
            side_ch[i - 1] = out
            deeper = out

        for i, ch in enumerate(side_ch, start=1):
            self.add_module(f"side{i}", nn.Conv2d(ch, num_classes, 3, padding=1))
        self.outconv = nn.Conv2d(6 * num_classes, num_classes, 1)

    @property
    def num_outputs(self) -> int:
        return 7

    @property
    def output_names(self) -> list[str]:
        return [f"side{i}" for i in range(1, 7)] + ["fuse"]

    def _probe_config(self) -> dict:
        # Thinnest copy with the same wiring: 16 → 1 channel, 512 → 32.
        return {"width": 1 / 16, "norm": "none"}

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = []
        hx = x
        for i in range(1, 7):
            if i > 1:
                hx = getattr(self, f"pool{i - 1}{i}")(hx)
            hx = getattr(self, f"stage{i}")(hx)
            enc.append(hx)
        dec = [enc[5]]  # hx6, then hx5d, hx4d, ..., hx1d
        for i in range(5, 0, -1):
            skip = enc[i - 1]
            hx = getattr(self, f"stage{i}d")(torch.cat((upsample_like(dec[-1], skip), skip), 1))
            dec.append(hx)
        feats = dec[::-1]  # hx1d, hx2d, ..., hx5d, hx6
        sides = [
            upsample_like(getattr(self, f"side{i}")(f), x) for i, f in enumerate(feats, start=1)
        ]
        fused = self.outconv(torch.cat(sides, 1))
        return [*sides, fused]


def u2net(
    in_channels: int = 1, num_classes: int = 2, norm: str = "batch", width: float = 1.0
) -> U2Net:
    """Full U²-Net (44.0M parameters for 3 → 1 channels)."""
    return U2Net(in_channels, num_classes, U2NET_STAGES, U2NET_DECODER, norm, width)


def u2netp(
    in_channels: int = 1, num_classes: int = 2, norm: str = "batch", width: float = 1.0
) -> U2Net:
    """U²-Net† (small version, 1.13M parameters for 3 → 1 channels)."""
    return U2Net(in_channels, num_classes, U2NETP_STAGES, U2NETP_DECODER, norm, width)
