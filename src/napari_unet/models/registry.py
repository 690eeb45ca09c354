"""The registry of the U-Net family: names and aliases → factories, built by name.

Variant modules are imported on first use (by name, through :mod:`importlib`), so that
listing the variants or building one does not import every network. The arrow points one
way: this module knows :mod:`.base` and the variants; :mod:`.base` knows neither.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from .base import SegmentationModel

__all__ = [
    "build_model",
    "canonical_name",
    "config_defaults",
    "list_models",
    "model_description",
]

_PACKAGE = __name__.rpartition(".")[0]


@dataclass(frozen=True)
class _Entry:
    module: str
    factory: str
    description: str
    aliases: tuple[str, ...] = ()


# name -> where the factory lives; modules are imported on first use.
_REGISTRY: dict[str, _Entry] = {
    "unet": _Entry(
        "unet", "UNet", "U-Net (Ronneberger 2015), padding 'same' or the paper's 'valid'"
    ),
    "wide_unet": _Entry(
        "unet", "wide_unet", "wide U-Net control from the UNet++ paper (35..560)", ("wideunet",)
    ),
    "unetpp": _Entry(
        "unetpp",
        "UNetPlusPlus",
        "UNet++ (Zhou 2018), nested skips, prunable L1..L4",
        ("unet++", "nestedunet", "unetplusplus"),
    ),
    "unet3p": _Entry(
        "unet3p",
        "UNet3Plus",
        "UNet 3+ (Huang 2020), full-scale skips and deep supervision",
        ("unet3+", "unet3plus"),
    ),
    "u2net": _Entry(
        "u2net",
        "u2net",
        "U²-Net (Qin 2020), nested RSU blocks, 6 side outputs + fusion",
        ("u²net",),
    ),
    "u2netp": _Entry("u2net", "u2netp", "U²-Net† (small U²-Net, 1.1M parameters)", ("u²netp",)),
    "swin_unet": _Entry(
        "swin_unet", "SwinUNet", "Swin-UNet (Cao 2021), pure-transformer U-shape", ("swinunet",)
    ),
}


def _key(name: str) -> str:
    key = name.strip().lower().replace("²", "2").replace("++", "pp").replace("+", "p")
    return re.sub(r"[\s_\-]", "", key)


_LOOKUP: dict[str, str] = {}
for _name, _entry in _REGISTRY.items():
    for _alias in (_name, *_entry.aliases):
        _LOOKUP[_key(_alias)] = _name


def list_models() -> list[str]:
    """Canonical names of every registered variant."""
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    """Map a name or alias ("unet++", "U2-Net", ...) to its registry name."""
    try:
        return _LOOKUP[_key(name)]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def model_description(name: str) -> str:
    return _REGISTRY[canonical_name(name)].description


def _factory(name: str) -> Callable[..., SegmentationModel]:
    entry = _REGISTRY[name]
    module = importlib.import_module(f"{_PACKAGE}.{entry.module}")
    return getattr(module, entry.factory)


def config_defaults(name: str) -> dict[str, object]:
    """Config keys a variant accepts, with their defaults."""
    params = inspect.signature(_factory(canonical_name(name))).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k not in ("in_channels", "num_classes") and p.default is not inspect.Parameter.empty
    }


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 2, **config: object
) -> SegmentationModel:
    """Build a variant by name. Unknown names or config keys raise ``ValueError``.

    The returned model records ``model.name``, its full ``model.config`` (defaults
    included) and the factory that built it, so a checkpoint (and the receptive-field
    probe) can rebuild it exactly.
    """
    canonical = canonical_name(name)
    factory = _factory(canonical)
    params = inspect.signature(factory).parameters
    accepted = [p for p in params if p not in ("in_channels", "num_classes")]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {canonical}; accepted: {accepted}")
    bound = inspect.signature(factory).bind(in_channels, num_classes, **config)
    bound.apply_defaults()
    model = factory(*bound.args, **bound.kwargs)
    model.name = canonical
    model.config = {k: v for k, v in bound.arguments.items() if k in accepted}
    model._factory = factory
    return model
