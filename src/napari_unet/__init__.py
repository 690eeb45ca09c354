"""napari-unet: the U-Net family for interactive biomedical segmentation in napari.

The engine (models, tiling, training) imports neither napari nor Qt; heavy modules are
imported lazily so that napari starts fast with the plugin installed.

Public API: ``napari_unet.predict`` (:func:`napari_unet.inference.predict`), ``train``,
``segment``, ``load_pretrained``, ... — each the function of that name, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Passive OpenMP waiting, set before torch is imported (an explicit OMP_WAIT_POLICY stays):
# on a busy machine spinning threads slowed training 4× (bench/hitl.py).
from .runtime import configure_openmp as _configure_openmp  # noqa: E402

_configure_openmp()

_LAZY = {
    "build_model": "napari_unet.models",
    "list_models": "napari_unet.models",
    "predict": "napari_unet.inference.predict",
    "Cancelled": "napari_unet.runtime",
    "segment": "napari_unet.postprocess",
    "segment_image": "napari_unet.pipeline",
    "border_weight_map": "napari_unet.weightmap",
    "save_model": "napari_unet.checkpoint",
    "load_model": "napari_unet.loader",
    "train": "napari_unet.training.trainer",
    "predict_distributed": "napari_unet.distributed",
    "load_pretrained": "napari_unet.models.pretrained",
    "list_pretrained": "napari_unet.models.pretrained",
    "compare_models": "napari_unet.compare",
    "segment_stack": "napari_unet.volume",
    "export_bioimageio": "napari_unet.bioimageio",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_unet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
