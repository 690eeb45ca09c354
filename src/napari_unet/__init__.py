"""napari-unet: the U-Net family for interactive biomedical segmentation in napari.

The engine (models, tiling, training) imports neither napari nor Qt; heavy modules are
imported lazily so that napari starts fast with the plugin installed.

``napari_unet.predict`` is the *function* :func:`napari_unet.predict.predict`, also after
the submodule of the same name has been imported (``from napari_unet.predict import
...`` keeps working: it reads the submodule from ``sys.modules``). Python's import system
binds a submodule as an attribute of its package after importing it; the package's
module class below turns that binding into the function of the same name.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Passive OpenMP waiting, set before torch is imported (an explicit OMP_WAIT_POLICY stays):
# on a busy machine spinning threads slowed training 4× (bench/hitl.py).
from .runtime import configure_openmp as _configure_openmp  # noqa: E402

_configure_openmp()

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
    "load_pretrained": "napari_unet.models.pretrained",
    "list_pretrained": "napari_unet.models.pretrained",
    "compare_models": "napari_unet.compare",
    "segment_stack": "napari_unet.volume",
    "export_bioimageio": "napari_unet.bioimageio",
}

# public functions that share their name with the submodule defining them
_SHADOWED = {name for name, module in _LAZY.items() if module == f"{__name__}.{name}"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_unet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``napari_unet.<name>`` the public function when the submodule ``<name>``
    is imported (the import system then does ``setattr(package, name, submodule)``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
