"""napari-unet: the U-Net family for interactive biomedical segmentation in napari.

The engine (models, tiling, training) imports neither napari nor Qt; heavy modules are
imported lazily so that napari starts fast with the plugin installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "napari_unet.models",
    "list_models": "napari_unet.models",
    "predict": "napari_unet.predict",
    "Cancelled": "napari_unet.tiling",
    "segment": "napari_unet.postprocess",
    "border_weight_map": "napari_unet.weightmap",
    "save_model": "napari_unet.checkpoint",
    "load_model": "napari_unet.checkpoint",
    "train": "napari_unet.training.trainer",
    "predict_distributed": "napari_unet.distributed",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_unet' has no attribute {name!r}")
