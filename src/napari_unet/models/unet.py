"""U-Net (Ronneberger et al., MICCAI 2015) and the wide U-Net control of UNet++.

``padding="valid"`` is the paper's network: unpadded 3×3 convolutions, 2×2 max-pool,
2×2 transposed-convolution up-sampling, centre-cropped skips, so a 572×572 input gives
a 388×388 output (``border`` = 92 px lost per side at depth 4). ``padding="same"`` is the
common padded form whose output has the input's size.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import DoubleConv, UpConv, center_crop

PADDINGS = ("same", "valid")


class UNet(SegmentationModel):
    """U-Net with widths ``base_channels·2^i`` for ``i = 0..depth``.

    Input ``(N, in_channels, H, W)`` → logits ``(N, num_classes, H', W')`` with
    ``H' = H`` for ``padding="same"`` and ``H' = output_size(H)`` for ``"valid"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 32,
        depth: int = 4,
        padding: str = "same",
        norm: str = "batch",
    ) -> None:
        super().__init__(in_channels, num_classes)
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        self.padding = padding
        self.depth = depth
        valid = padding == "valid"
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.widths = widths
        self.encoders = nn.ModuleList(
            DoubleConv(c_in, c_out, norm=norm, valid=valid)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.decoders = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], norm=norm, valid=valid)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        self.size_divisor = 2**depth
        if valid:
            self.min_input_size = self.legal_size(1)

    # ------------------------------------------------------------- valid geometry
    def _valid_output(self, n: int) -> int | None:
        """Output size for input ``n`` in valid mode, or ``None`` if ``n`` is illegal."""
        for _ in range(self.depth):
            n -= 4
            if n <= 0 or n % 2:
                return None
            n //= 2
        n -= 4
        for _ in range(self.depth):
            if n <= 0:
                return None
            n = 2 * n - 4
        return n if n > 0 else None

    def output_size(self, n: int) -> int:
        if self.padding == "same":
            return n
        out = self._valid_output(n)
        if out is None:
            raise ValueError(self._illegal_message(n))
        return out

    def legal_size(self, n: int) -> int:
        if self.padding == "same":
            return super().legal_size(n)
        m = max(n, 1)
        while self._valid_output(m) is None:
            m += 1
        return m

    def valid_input_size(self, output_size: int) -> int:
        """Smallest legal input (valid mode) whose output covers ``output_size`` pixels."""
        if self.padding == "same":
            return super().legal_size(output_size)
        n = self.legal_size(1)
        while self.output_size(n) < output_size:
            n += self.size_divisor
        return n

    def _illegal_message(self, n: int) -> str:
        above = self.legal_size(n)
        below = above - self.size_divisor
        near = f"{below} or {above}" if below >= self.min_input_size else f"{above}"
        return (
            f"input size {n} is not legal for the valid U-Net of depth {self.depth}: "
            f"every pooled feature map must have an even size. Nearest legal sizes: {near} "
            f"(use model.valid_input_size(output_size) to pick one)"
        )

    @property
    def border(self) -> int:
        if self.padding == "same":
            return 0
        n = self.legal_size(1)
        return (n - self.output_size(n)) // 2

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding == "same":
            return super()._pad(x)
        self.check_input(x)
        h, w = (self.output_size(n) for n in x.shape[-2:])
        return x, (h, w)

    def _probe_config(self) -> dict:
        return {"base_channels": 2, "norm": "none"}

    # -------------------------------------------------------------------- forward
    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = up(x)
            skip = skips.pop()
            if self.padding == "valid":
                skip = center_crop(skip, *x.shape[-2:])
            x = torch.cat([skip, x], dim=1)
            del skip  # free the skip and the up-sampled map before the convolutions
            x = dec(x)
        return [self.head(x)]


def wide_unet(
    in_channels: int = 1,
    num_classes: int = 2,
    base_channels: int = 35,
    depth: int = 4,
    padding: str = "same",
    norm: str = "batch",
) -> UNet:
    """The UNet++ paper's wide U-Net control: widths 35, 70, 140, 280, 560.

    With ``norm="none"`` it has about as many parameters as UNet++ (9.28M vs 9.04M).
    """
    return UNet(in_channels, num_classes, base_channels, depth, padding, norm)
