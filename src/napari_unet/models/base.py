"""Base class shared by every network: input checks, padding, metadata, ``info``, RF probe.

This module imports no other part of :mod:`napari_unet.models` (the registry and the
variants import it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

_NORM_TYPES = (
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    nn.Dropout,
    nn.Dropout2d,
)


@dataclass(frozen=True)
class ModelInfo:
    """What the tiler, the widgets and the CLI need to know about a network.

    Sizes are in pixels of the input image.
    """

    name: str
    config: dict[str, Any] = field(repr=False)
    in_channels: int
    num_classes: int
    parameters: int
    border: int
    """Pixels lost per side (valid convolutions); 0 for padded nets."""
    size_divisor: int
    """Input sizes the network computes without internal padding are multiples of this."""
    receptive_field: int
    """Receptive-field radius measured by an impulse probe (pixels from the centre)."""
    deep_supervision_outputs: int
    """Number of tensors ``forward_all`` returns."""
    tile_exact: bool
    """True when tiles with a halo ≥ ``receptive_field`` reproduce the whole-image output."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pad_end_reflect(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of ``x`` (N, C, H, W) up to (height, width).

    Padding larger than the image is done in steps (mirror of the mirror), so even
    tiny inputs reach any size.
    """
    while x.shape[-2] < height or x.shape[-1] < width:
        ph = min(height - x.shape[-2], x.shape[-2] - 1)
        pw = min(width - x.shape[-1], x.shape[-1] - 1)
        x = nn.functional.pad(x, (0, max(pw, 0), 0, max(ph, 0)), mode="reflect")
    return x


def round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


class SegmentationModel(nn.Module):
    """Common behaviour of the U-Net family.

    Subclasses implement ``_forward_all(x)`` on an input whose height and width are
    multiples of ``size_divisor`` and return a list of logits ``(N, num_classes, H, W)``,
    shallow to deep, the final output last. ``forward`` pads the input on the
    bottom/right by reflection to the divisor and crops the result back, so any size
    ≥ ``min_input_size`` works and the output has the input's size.

    Metadata every model carries (saved in checkpoints, read by the CLI, the widgets and
    the exporters; the defaults apply until a checkpoint or training sets them):

    * ``class_names`` — one name per output channel; unset: the conventional names of
      :func:`napari_unet.postprocess.default_class_names`;
    * ``normalization`` — the intensity normalisation it was trained with (a JSON-able
      dict, see :mod:`napari_unet.inference.normalize`); ``None``: the default;
    * ``training_summary`` — the compact record of its last training run, or ``None``;
    * ``levels`` / ``supports_levels`` — UNet++-style pruning: ``forward(x, level=L)``
      for ``L`` in ``1..levels``; 0 / False for networks that cannot be pruned;
    * ``has_classifier`` — an image-level classifier trained with the segmentation (UNet
      3+'s CGM): training calls ``forward_all_with_cls``; False for the others.
    """

    size_divisor: int = 1
    min_input_size: int = 2
    name: str = "model"
    normalization: dict[str, Any] | None = None
    """Intensity normalisation (JSON-able); ``None`` means the default of
    :func:`napari_unet.inference.normalize.get_normalization`."""
    training_summary: dict[str, Any] | None = None
    """Compact record of the last training run (``TrainHistory.summary()``), or ``None``."""
    _class_names: list[str] | None = None
    _factory: Callable[..., SegmentationModel] | None = None
    """What built this network (set by :func:`~.registry.build_model`): with ``config`` it
    rebuilds it; ``None`` for a network constructed directly."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be ≥ 1, got {in_channels}, {num_classes}"
            )
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.config: dict[str, Any] = {}
        self._receptive_field: int | None = None

    # ----------------------------------------------------------------- subclass API
    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._forward_all(x)[-1]

    @property
    def num_outputs(self) -> int:
        """How many tensors ``forward_all`` returns."""
        return 1

    @property
    def final_index(self) -> int:
        """Index of the final output (what ``forward`` returns) in ``forward_all``'s list."""
        return -1

    @property
    def output_names(self) -> list[str]:
        """Name of every ``forward_all`` output, in that order (Compare rows, Inspect's
        side outputs): ``final`` for one output; UNet++ ``L1..``, UNet 3+ ``d1..``,
        U²-Net ``side1..side6, fuse``."""
        n = self.num_outputs
        return ["final"] if n == 1 else [f"out{i}" for i in range(1, n + 1)]

    @property
    def border(self) -> int:
        """Pixels lost per side by valid (unpadded) convolutions: 0 for padded networks,
        92 for the paper's valid U-Net at depth 4 (572² in → 388² out). Not the tiler's
        ``halo`` (the context kept around each window's core, see
        :mod:`napari_unet.inference.plan`)."""
        return 0

    @property
    def tile_exact(self) -> bool:
        """No normalisation or attention whose statistics span the whole input."""
        return not any(isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) for m in self.modules())

    def _probe_config(self) -> dict[str, Any] | None:
        """Config overrides for a thin copy used by the receptive-field probe.

        ``None`` probes a copy of the model itself.
        """
        return None

    # ------------------------------------------------------------------- metadata
    @property
    def class_names(self) -> list[str]:
        """One name per output channel (a new list): the names set by a checkpoint or by
        training, else :func:`napari_unet.postprocess.default_class_names` (the one
        definition of the conventional names) of ``num_classes``."""
        if self._class_names:
            return list(self._class_names)
        from ..postprocess import default_class_names  # numpy/scipy only; loaded on use

        return default_class_names(self.num_classes)

    @class_names.setter
    def class_names(self, names: Sequence[str] | None) -> None:
        self._class_names = [str(n) for n in names] if names else None

    @property
    def levels(self) -> int:
        """Deepest level ``forward(x, level=L)`` accepts (UNet++: ``depth``, levels
        ``1..levels``); 0 for networks that cannot be pruned."""
        return 0

    @property
    def supports_levels(self) -> bool:
        """True when ``forward(x, level=L)`` prunes the network (UNet++)."""
        return self.levels > 0

    def check_level(self, level: int | None) -> None:
        """Raise a one-line ValueError unless ``level`` (None: the whole network) may prune
        this network (``predict(level=)``, the dask run)."""
        if level is None or self.supports_levels:
            return
        if self.levels:
            raise ValueError(
                f"{self.name} was built without deep supervision: it cannot be pruned "
                f"(level= needs its side heads); leave level unset"
            )
        raise ValueError(f"level= prunes UNet++ only; {self.name} has no levels")

    @property
    def has_classifier(self) -> bool:
        """True when the network also classifies the whole image (UNet 3+ with its CGM):
        ``forward_all_with_cls(x)`` then returns ``(forward_all(x), logits (N, 2))`` and
        training adds :func:`napari_unet.training.losses.cgm_loss`."""
        return False

    # ------------------------------------------------------------------ public API
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` is not (N, C, H, W) usable here."""
        if x.ndim != 4:
            raise ValueError(
                f"{self.name} expects a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} was built for {self.in_channels} input channel(s), "
                f"got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"input {h}×{w} is too small for {self.name}: each side needs at least "
                f"{self.min_input_size} pixels"
            )

    def legal_size(self, n: int) -> int:
        """Smallest input size ≥ ``n`` that needs no internal padding."""
        return round_up(max(n, self.min_input_size), self.size_divisor)

    def output_size(self, n: int) -> int:
        """Output size along one axis for an input of ``n`` pixels."""
        return n

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self.check_input(x)
        h, w = x.shape[-2:]
        return pad_end_reflect(x, round_up(h, self.size_divisor), round_up(w, self.size_divisor)), (
            h,
            w,
        )

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final logits ``(N, num_classes, H, W)`` for input ``(N, in_channels, H, W)``."""
        xp, (h, w) = self._pad(x)
        return self._forward(xp, **kwargs)[..., :h, :w]

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every deep-supervision / side output as logits at output size, shallow to deep."""
        xp, (h, w) = self._pad(x)
        return [y[..., :h, :w] for y in self._forward_all(xp)]

    @property
    def receptive_field(self) -> int:
        if self._receptive_field is None:
            self._receptive_field = measure_receptive_field(self)
        return self._receptive_field

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            config=dict(self.config),
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            parameters=count_parameters(self),
            border=self.border,
            size_divisor=self.size_divisor,
            receptive_field=self.receptive_field,
            deep_supervision_outputs=self.num_outputs,
            tile_exact=self.tile_exact,
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _probe_copy(model: SegmentationModel) -> SegmentationModel:
    """A float64 copy with the same wiring whose output is positive and monotone in the input.

    Weights become 1/fan-in (biases 0), max-pools become average pools with the same
    geometry and norms/dropout become identities, so the input gradient of one output
    pixel is non-zero exactly on the pixels that pixel can depend on.
    """
    overrides = model._probe_config()
    if overrides is None or model._factory is None:  # a copy of the model itself
        probe = copy.deepcopy(model)
    else:  # a thin copy with the same wiring, rebuilt by the factory that built the model
        probe = model._factory(1, 1, **{**model.config, **overrides})
        probe.name, probe.config = model.name, {**model.config, **overrides}

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(
                    module,
                    name,
                    nn.AvgPool2d(
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        ceil_mode=child.ceil_mode,
                        count_include_pad=False,
                    ),
                )
            elif isinstance(child, _NORM_TYPES):
                setattr(module, name, nn.Identity())
            else:
                swap(child)

    swap(probe)
    probe = probe.double().eval()
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                w = m.weight
                fan_in = w.shape[1] * (w[0, 0].numel() if w.ndim > 2 else 1)
                if isinstance(m, nn.ConvTranspose2d):
                    fan_in = w.shape[0]
                w.fill_(1.0 / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
    return probe


def measure_receptive_field(model: SegmentationModel, max_size: int = 16384) -> int:
    """Receptive-field radius (pixels) measured with an impulse probe along one axis.

    The probe is a tall strip; the gradient of the centre output pixel with respect to
    the input marks the pixels it depends on. The strip grows until that support no
    longer reaches the strip's ends; past ``max_size`` the radius is reported as
    ``max_size // 2`` (effectively global). Works inside ``torch.no_grad()`` and
    ``torch.inference_mode()`` blocks too (e.g. a first ``model.info`` there).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _measure_receptive_field(model, max_size)


def _measure_receptive_field(model: SegmentationModel, max_size: int) -> int:
    probe = _probe_copy(model)
    width = probe.legal_size(probe.size_divisor)
    height = probe.legal_size(max(64, 4 * probe.size_divisor))
    while True:
        x = torch.ones(1, probe.in_channels, height, width, dtype=torch.float64, requires_grad=True)
        y = probe(x)
        r_out, c_out = y.shape[-2] // 2, y.shape[-1] // 2
        y[0, :, r_out, c_out].sum().backward()
        rows = torch.nonzero(x.grad[0].abs().sum(dim=(0, 2)) > 0).flatten()
        centre = r_out + probe.border
        touches = rows.min() == 0 or rows.max() == height - 1
        if not touches:
            return int(max(centre - rows.min(), rows.max() - centre))
        if height >= max_size:
            return max_size // 2
        height = probe.legal_size(min(2 * height, max_size))
