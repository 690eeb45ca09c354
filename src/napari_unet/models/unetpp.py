"""UNet++ (Zhou et al., DLMIA 2018): nested, dense skip pathways with deep supervision.

Node ``X[i][j]`` sits at depth ``i`` (resolution 1/2^i) and column ``j``:
``X[i][0]`` is the encoder; ``X[i][j] = H([X[i][0..j-1], U(X[i+1][j-1])])`` with ``U`` a
2×2 transposed convolution and ``H`` two 3×3 conv+norm+ReLU. Four 1×1 heads read
``X[0][1..4]``. Pruned to level ``L`` the network is the sub-graph ``i + j ≤ L`` and only
those nodes are computed.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import DoubleConv, UpConv


class UNetPlusPlus(SegmentationModel):
    """UNet++ with widths ``base_channels·2^i`` (32..512 in the paper's setting).

    ``forward(x, level=L)`` → logits ``(N, num_classes, H, W)`` of the head on ``X[0][L]``
    (default: the deepest level, ``depth``). ``forward_all(x)`` → the ``depth`` heads,
    L1 first. ``deep_supervision=False`` keeps only the deepest head (no pruning), which
    is the paper's parameter count (9,041,601 in the Keras setting; 9,041,700 with the
    three extra 1×1 heads).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 32,
        depth: int = 4,
        norm: str = "batch",
        deep_supervision: bool = True,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        self.depth = depth
        self.deep_supervision = deep_supervision
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.widths = widths
        self.pool = nn.MaxPool2d(2)
        # nodes[f"{i}_{j}"]: the conv unit of X[i][j]; ups[f"{i}_{j}"]: U feeding X[i][j]
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(depth + 1):
            c_in = in_channels if i == 0 else widths[i - 1]
            self.nodes[f"{i}_0"] = DoubleConv(c_in, widths[i], norm=norm)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.ups[f"{i}_{j}"] = UpConv(widths[i + 1], widths[i])
                self.nodes[f"{i}_{j}"] = DoubleConv((j + 1) * widths[i], widths[i], norm=norm)
        # Without deep supervision only the X[0][depth] head exists (the paper's count).
        n_heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(
            nn.Conv2d(widths[0], num_classes, kernel_size=1) for _ in range(n_heads)
        )
        self.size_divisor = 2**depth

    @property
    def num_outputs(self) -> int:
        return len(self.heads)

    @property
    def output_names(self) -> list[str]:
        n = self.num_outputs
        return ["final"] if n == 1 else [f"L{i}" for i in range(1, n + 1)]

    @property
    def levels(self) -> int:
        """``forward(x, level=L)`` for ``L`` in ``1..depth`` (below ``depth`` only with
        deep supervision, whose heads read ``X[0][L]``)."""
        return self.depth

    @property
    def supports_levels(self) -> bool:
        """Pruning needs the side heads: only with deep supervision."""
        return bool(self.deep_supervision)

    def _head(self, level: int) -> nn.Module:
        return self.heads[level - 1] if self.deep_supervision else self.heads[0]

    def _probe_config(self) -> dict:
        return {"base_channels": 2, "norm": "none"}

    def _check_level(self, level: int | None) -> int:
        level = self.depth if level is None else int(level)
        if not 1 <= level <= self.depth:
            raise ValueError(f"UNet++ level must be in 1..{self.depth}, got {level}")
        if level != self.depth and not self.deep_supervision:
            raise ValueError(
                f"UNet++ pruned to level {level} needs the X[0][{level}] head, which only "
                "exists with deep_supervision=True"
            )
        return level

    def _nodes(self, x: torch.Tensor, level: int) -> dict[tuple[int, int], torch.Tensor]:
        """Compute every node X[i][j] with i + j ≤ level."""
        X: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(level + 1):
            X[i, 0] = self.nodes[f"{i}_0"](x if i == 0 else self.pool(X[i - 1, 0]))
            # anti-diagonal i + j = i: fill column nodes that became computable
            for j in range(1, i + 1):
                r = i - j
                up = self.ups[f"{r}_{j}"](X[r + 1, j - 1])
                skips = [X[r, k] for k in range(j)]
                X[r, j] = self.nodes[f"{r}_{j}"](torch.cat([*skips, up], dim=1))
        return X

    def _forward(self, x: torch.Tensor, level: int | None = None) -> torch.Tensor:
        level = self._check_level(level)
        X = self._nodes(x, level)
        return self._head(level)(X[0, level])

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        X = self._nodes(x, self.depth)
        if not self.deep_supervision:
            return [self.heads[0](X[0, self.depth])]
        return [self.heads[j - 1](X[0, j]) for j in range(1, self.depth + 1)]

    def level_parameters(self, level: int) -> int:
        """Parameters used by the network pruned to ``level``."""
        level = self._check_level(level)
        names = {f"{i}_{j}" for i in range(level + 1) for j in range(level + 1 - i)}
        total = sum(p.numel() for k in names for p in self.nodes[k].parameters())
        total += sum(p.numel() for k in names if k in self.ups for p in self.ups[k].parameters())
        return total + sum(p.numel() for p in self._head(level).parameters())
