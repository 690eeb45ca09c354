"""The exported graph: a napari-unet network followed by its output activation."""

from __future__ import annotations

from typing import Any

import torch

from ..models import build_model


class ProbabilityNet(torch.nn.Module):
    """A napari-unet network followed by its output activation (the exported graph).

    Args:
        variant: registry name (``"unet"``, ``"unetpp"``, …).
        in_channels: input channels C_in.
        num_classes: output classes K.
        config: the keyword configuration of :func:`napari_unet.models.build_model`.

    ``forward(x)``: x (N, C_in, H, W) float32, normalised → (N, K, H', W') probabilities in
    [0, 1] (softmax over K, sigmoid when K = 1); H' = H for padded networks.
    """

    def __init__(
        self, variant: str, in_channels: int, num_classes: int, config: dict[str, Any]
    ) -> None:
        super().__init__()
        self.net = build_model(variant, in_channels, num_classes, **config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)
