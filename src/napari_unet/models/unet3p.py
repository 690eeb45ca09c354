"""UNet 3+ (Huang et al., ICASSP 2020): full-scale skip connections.

Follows the reference implementation (ZJUGiveLab/UNet-Version, ``UNet_3Plus``,
``UNet_3Plus_DeepSup`` and ``UNet_3Plus_DeepSup_CGM``):

* encoder widths ``base·[1, 2, 4, 8, 16]``, each stage two 3×3 conv → norm → ReLU,
  2×2 max-pool between stages;
* every decoder stage ``X_De^i`` concatenates one branch per encoder level, each
  mapped to ``cat_channels = base_channels`` maps by a 3×3 conv → norm → ReLU:
  shallower encoder maps are max-pooled down (kernel = stride = 2^k, ``ceil_mode``),
  the same-scale encoder map is used directly, deeper decoder maps (and the
  bottleneck ``X_En^5``) are upsampled bilinearly by 2^k; the ``5·cat_channels``
  maps are fused by a 3×3 conv → norm → ReLU of the same width;
* the output is a 3×3 conv on ``X_De^1``;
* deep supervision adds a 3×3 conv head on every decoder stage and on the bottleneck,
  each upsampled bilinearly to full resolution;
* the classification-guided module (CGM) predicts from the bottleneck whether the
  image contains the structure at all (dropout → 1×1 conv → global max-pool).

With the paper's defaults (``base_channels=64``, 3 input channels, 1 class) the network
has 26,971,777 parameters, and 26,991,687 with deep supervision and CGM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import ConvNormAct, DoubleConv, UpsampleConvNormAct

#: Logit magnitude used by the CGM gate to force background.
GATE_LOGIT = 20.0


def _full_scale_decoder(
    widths: list[int], cat: int, norm: str
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The full-scale skips of every decoder stage, deepest first, and their fusions.

    Stage for level ``lvl`` (0-based, ``depth - 1`` down to 0) has one branch per level
    ``j``: shallower encoder maps max-pooled down, the same-scale encoder map, deeper
    decoder maps (the bottleneck for the last level) upsampled; each gives ``cat``
    channels, fused by a conv over the ``cat · levels`` concatenation.
    """
    levels = len(widths)
    up = cat * levels
    stages, fusions = nn.ModuleList(), nn.ModuleList()
    for lvl in reversed(range(levels - 1)):
        branches = nn.ModuleList()
        for j in range(levels):
            if j < lvl:  # shallower encoder map, max-pooled down
                k = 2 ** (lvl - j)
                branch = nn.Sequential(
                    nn.MaxPool2d(k, k, ceil_mode=True),
                    ConvNormAct(widths[j], cat, norm=norm),
                )
            elif j == lvl:  # same-scale encoder map
                branch = ConvNormAct(widths[j], cat, norm=norm)
            else:  # deeper decoder map (bottleneck for the last level), upsampled
                c_in = widths[j] if j == levels - 1 else up
                branch = UpsampleConvNormAct(c_in, cat, 2 ** (j - lvl), norm=norm)
            branches.append(branch)
        stages.append(branches)
        fusions.append(ConvNormAct(up, up, norm=norm))
    return stages, fusions


class UNet3Plus(SegmentationModel):
    """UNet 3+ with optional deep supervision and classification-guided module.

    Input ``(N, in_channels, H, W)`` → logits ``(N, num_classes, H, W)``; any
    ``H, W ≥ 2`` works (the input is reflect-padded to a multiple of ``2^depth``).

    ``depth`` is the number of pooling steps (``depth=4``: five encoder levels, as in
    the paper). Each decoder stage then has ``(depth + 1)·base_channels`` channels.

    **Output order.** ``forward_all`` returns the side outputs in the paper's order
    ``[d1, d2, ..., d_{depth+1}]``: ``d1`` is the full-resolution decoder output (the
    final prediction) and ``d_{depth+1}`` comes from the bottleneck, all upsampled to
    the input size. Unlike the other variants the final output is therefore *first*;
    ``forward`` returns ``d1``. Without deep supervision ``forward_all`` returns
    ``[d1]``.

    **CGM.** ``cgm=None`` means "on when ``deep_supervision`` is". The classifier gives
    2-class logits (index 1: "image contains the structure"), see :meth:`forward_cls`.
    Segmentation outputs stay logits. In training mode they are never gated; train
    with :meth:`forward_all_with_cls` and a classification loss on its second value.
    In eval mode, images the classifier calls empty (argmax 0) get background logits
    everywhere (``-GATE_LOGIT`` for a single class; ``+GATE_LOGIT`` for class 0 and
    ``-GATE_LOGIT`` for the others). CGM pools over the whole input, so tiled
    inference is not exact with it (``tile_exact`` is False).
    """

    name = "unet3p"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        norm: str = "batch",
        deep_supervision: bool = False,
        cgm: bool | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be ≥ 1, got {base_channels}")
        self.depth = int(depth)
        self.deep_supervision = bool(deep_supervision)
        self.cgm = self.deep_supervision if cgm is None else bool(cgm)
        self.size_divisor = 2**self.depth

        levels = self.depth + 1
        widths = [base_channels * 2**i for i in range(levels)]
        self.widths = widths
        cat = base_channels
        up = cat * levels
        self.cat_channels = cat
        self.up_channels = up

        # ---------------------------------------------------------------- encoder
        self.encoders = nn.ModuleList(
            DoubleConv(c_in, c_out, norm=norm)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2)

        # ---------------------------------------------------------------- decoder
        # stages[s] builds X_De^i with i = depth - s (0-based level index i - 1),
        # deepest first. branches[j] takes level j (0-based) to level i - 1.
        self.stages, self.fusions = _full_scale_decoder(widths, cat, norm)

        # ------------------------------------------------------------------ heads
        # heads[i] predicts from level i (0-based): decoder stages, then bottleneck.
        n_heads = levels if self.deep_supervision else 1
        self.heads = nn.ModuleList(
            nn.Conv2d(widths[i] if i == levels - 1 else up, num_classes, 3, padding=1)
            for i in range(n_heads)
        )
        self.upscores = nn.ModuleList(
            nn.Identity() if i == 0 else nn.Upsample(scale_factor=2**i, mode="bilinear")
            for i in range(n_heads)
        )

        # -------------------------------------------------------------------- CGM
        self.cls: nn.Module | None = None
        if self.cgm:
            self.cls = nn.Sequential(
                nn.Dropout(p=0.5),
                nn.Conv2d(widths[-1], 2, kernel_size=1),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(1),
            )

        self._init_weights()

    def _init_weights(self) -> None:
        """Reference initialisation: Kaiming-normal (fan-in) convolutions, BN ~ N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    # --------------------------------------------------------------- properties
    @property
    def num_outputs(self) -> int:
        return len(self.heads)

    @property
    def output_names(self) -> list[str]:
        n = self.num_outputs
        return ["final"] if n == 1 else [f"d{i}" for i in range(1, n + 1)]

    @property
    def tile_exact(self) -> bool:
        if self.cgm:
            return False
        return super().tile_exact

    def _probe_config(self) -> dict[str, Any]:
        return {"base_channels": 2, "cgm": False, "deep_supervision": False}

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats

    def _decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feature maps ``[X_De^1, ..., X_De^depth, X_En^{depth+1}]`` (shallow to deep)."""
        levels = self.depth + 1
        maps: list[torch.Tensor | None] = [None] * self.depth + [feats[-1]]
        for s, (branches, fuse) in enumerate(zip(self.stages, self.fusions)):
            lvl = self.depth - 1 - s
            parts = [
                branch(feats[j] if j <= lvl else maps[j])
                for j, branch in zip(range(levels), branches)
            ]
            joined = torch.cat(parts, dim=1)
            del parts  # free the branch outputs before the fusion convolution
            maps[lvl] = fuse(joined)
        return maps  # type: ignore[return-value]

    def _heads(self, maps: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        return [self.upscores[i](self.heads[i](maps[i])) for i in range(n)]

    def _classify(self, bottleneck: torch.Tensor) -> torch.Tensor | None:
        return None if self.cls is None else self.cls(bottleneck)

    def _gate(
        self, outputs: list[torch.Tensor], cls_logits: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Eval-mode CGM: background logits for images the classifier calls empty."""
        if cls_logits is None or self.training:
            return outputs
        empty = (cls_logits.argmax(dim=1) == 0).view(-1, 1, 1, 1)
        background = torch.full((self.num_classes,), -GATE_LOGIT)
        if self.num_classes > 1:
            background[0] = GATE_LOGIT
        background = background.view(1, -1, 1, 1)
        return [torch.where(empty, background.to(y), y) for y in outputs]

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self._encode(x)
        outputs = self._heads(self._decode(feats), self.num_outputs)
        return self._gate(outputs, self._classify(feats[-1]))

    @property
    def final_index(self) -> int:
        return 0

    def _forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        feats = self._encode(x)
        (d1,) = self._heads(self._decode(feats), 1)
        return self._gate([d1], self._classify(feats[-1]))[0]

    # --------------------------------------------------------------- public API
    @property
    def has_classifier(self) -> bool:
        """True with the CGM (``cgm=True``, or ``None`` with deep supervision)."""
        return self.cgm

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """CGM logits ``(N, 2)``; index 1 means "the image contains the structure".

        Only the encoder runs. Raises ``RuntimeError`` when the model has no CGM.
        """
        if self.cls is None:
            raise RuntimeError(f"{self.name} was built with cgm=False: no classifier")
        xp, _ = self._pad(x)
        return self.cls(self._encode(xp)[-1])

    def forward_all_with_cls(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(forward_all outputs, CGM logits (N, 2))`` for training, never gated.

        The second value is ``None`` when the model has no CGM.
        """
        xp, (h, w) = self._pad(x)
        feats = self._encode(xp)
        outputs = self._heads(self._decode(feats), self.num_outputs)
        return [y[..., :h, :w] for y in outputs], self._classify(feats[-1])
