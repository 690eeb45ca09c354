"""The bundled trained variants: ``load_pretrained(name)`` and ``list_pretrained()``.

Every file lives in ``napari_unet/weights/`` (nothing is downloaded) and was trained on
synthetic nuclei only by ``scripts/train_zoo.py`` (the padded U-Net by
``scripts/train_default_model.py``). A card's numbers (parameters, GFLOP per
megapixel, CPU seconds per megapixel, F1@0.5 and mean matched IoU on the development
image, per-head scores) are read from the checkpoint's own metadata.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .registry import canonical_name

__all__ = [
    "PretrainedCard",
    "is_pretrained",
    "list_pretrained",
    "load_pretrained",
    "pretrained_path",
]


@dataclass(frozen=True)
class _Bundled:
    file: str
    title: str
    aliases: tuple[str, ...] = ()


# name -> file in napari_unet/weights and a title; the order is the display order.
_BUNDLED: dict[str, _Bundled] = {
    "unet": _Bundled("default.safetensors", "U-Net (padded, bundled default)", ("default",)),
    "unet_valid": _Bundled(
        "unet_valid.safetensors", "U-Net (the paper's valid convolutions)", ("valid_unet",)
    ),
    "unetpp": _Bundled("unetpp.safetensors", "UNet++ (deep supervision, L1..L4)"),
    "unet3p": _Bundled("unet3p.safetensors", "UNet 3+ (full-scale deep supervision)"),
    "u2netp": _Bundled("u2netp.safetensors", "U²-Net† (small U²-Net)"),
    "swin_unet": _Bundled("swin_unet.safetensors", "Swin-UNet (small)"),
}


@dataclass(frozen=True)
class PretrainedCard:
    """What the Model widget, ``compare`` and the README show for a bundled variant."""

    name: str
    variant: str
    title: str
    path: Path
    config: dict[str, Any] = field(repr=False)
    parameters: int | None
    gflop_per_mp: float | None
    cpu_seconds_per_mp: float | None
    dev_f1: float | None
    dev_mean_iou: float | None
    dev_heads: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    training: dict[str, Any] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    def summary(self) -> str:
        """One line: parameters, cost and development-image score. No speed: the stored
        ``cpu_seconds_per_mp`` is torch eager fp32 at training time on a busy machine,
        3-25× the default runtime's (see the README's zoo table)."""
        parts = [self.title]
        if self.parameters is not None:
            parts.append(f"{self.parameters / 1e6:.2f}M params")
        if self.gflop_per_mp is not None:
            parts.append(f"{self.gflop_per_mp:.0f} GFLOP/MP")
        if self.dev_f1 is not None:
            parts.append(f"dev F1@0.5 {self.dev_f1:.3f}")
        return " · ".join(parts)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _lookup(name: str) -> str | None:
    key = _key(str(name))
    if key in _BUNDLED:
        return key
    for bundled, entry in _BUNDLED.items():
        if key in entry.aliases:
            return bundled
    try:  # registry aliases: "unet++" -> "unetpp", "U²-Net†" stays unknown here
        canon = canonical_name(str(name))
    except ValueError:
        return None
    return canon if canon in _BUNDLED else None


def _weights_dir() -> Path:
    return Path(str(importlib.resources.files("napari_unet") / "weights"))


def pretrained_path(name: str) -> Path:
    """The bundled checkpoint of ``name``; ``ValueError`` when there is none."""
    key = _lookup(name)
    if key is None:
        raise ValueError(
            f"no bundled trained model named {name!r}; bundled: {', '.join(available())}"
        )
    path = _weights_dir() / _BUNDLED[key].file
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled {key} weights are missing ({path}); this installation ships "
            "without them — retrain with scripts/train_zoo.py"
        )
    return path


def is_pretrained(name: Any) -> bool:
    """True when ``name`` names a bundled trained variant that is installed."""
    if not isinstance(name, str):
        return False
    key = _lookup(name)
    return key is not None and (_weights_dir() / _BUNDLED[key].file).is_file()


def available() -> list[str]:
    """Names of the bundled variants whose weights are installed."""
    return [k for k, e in _BUNDLED.items() if (_weights_dir() / e.file).is_file()]


def load_pretrained(name: str, device: str | torch.device = "cpu"):
    """The bundled trained ``name`` (e.g. ``"unetpp"``, ``"UNet++"``, ``"unet3p"``,
    ``"u2netp"``, ``"swin_unet"``, ``"unet_valid"``, ``"unet"``) in eval mode.

    Loaded through :func:`napari_unet.checkpoint.load_model` (safetensors only, never
    unpickled); weights stored as fp16 are loaded into fp32 parameters.
    """
    from ..checkpoint import load_model

    model = load_model(pretrained_path(name), device=device)
    model.pretrained_name = _lookup(name)
    return model


def _card(key: str) -> PretrainedCard:
    from ..checkpoint import read_metadata

    entry = _BUNDLED[key]
    path = _weights_dir() / entry.file
    meta = read_metadata(path)
    training = meta.get("training") or {}
    return PretrainedCard(
        name=key,
        variant=str(meta.get("variant")),
        title=entry.title,
        path=path,
        config=dict(meta.get("config") or {}),
        parameters=training.get("parameters"),
        gflop_per_mp=training.get("gflop_per_mp"),
        cpu_seconds_per_mp=training.get("cpu_seconds_per_mp"),
        dev_f1=training.get("dev_f1", training.get("f1_dsb_dev_image")),
        dev_mean_iou=training.get("dev_mean_iou"),
        dev_heads=training.get("dev_heads"),
        training=training,
    )


def list_pretrained() -> list[PretrainedCard]:
    """Cards of every installed bundled variant, in display order."""
    return [_card(k) for k in available()]
