"""The U-Net family: one registry (:func:`build_model`, in :mod:`.registry`), one module per
variant, the shared base class in :mod:`.base`."""

from __future__ import annotations

from .base import ModelInfo, SegmentationModel, count_parameters
from .registry import build_model, canonical_name, config_defaults, list_models, model_description

__all__ = [
    "ModelInfo",
    "SegmentationModel",
    "build_model",
    "canonical_name",
    "config_defaults",
    "count_parameters",
    "list_models",
    "model_description",
]
