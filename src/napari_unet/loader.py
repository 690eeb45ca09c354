"""``napari_unet.load_model``: a model from a file, whichever kind it is.

The one place that knows both file kinds: a ``.safetensors`` checkpoint
(:func:`napari_unet.checkpoint.load_model`) and a bioimage.io model package ``.zip``
(:func:`napari_unet.bioimageio.load_bioimageio`). It sits above both, so that the
bioimage.io code may use checkpoints (export attaches one, import reads it back) while the
checkpoint code knows nothing of bioimage.io.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import checkpoint

__all__ = ["load_model"]


def load_model(path: str | os.PathLike[str], device: Any = "cpu") -> Any:
    """Load a model file, in eval mode, on ``device``.

    Args:
        path: a napari-unet ``.safetensors`` checkpoint, or a bioimage.io model package
            (``.zip`` holding an ``rdf.yaml``: a napari-unet package through its attached
            checkpoint, another 2-D package through its ONNX weights). Nothing is unpickled.
        device: ``"cpu"``, ``"cuda"`` or a torch device (ONNX models run on the CPU).

    Returns:
        A :class:`napari_unet.models.base.SegmentationModel` with ``normalization``,
        ``class_names`` and ``checkpoint_path`` (see :func:`napari_unet.checkpoint.load_model`).

    Raises:
        FileNotFoundError: a missing file.
        ValueError: anything else (pickle-based, corrupt, unknown variant, …).
    """
    path = Path(path)
    if path.suffix.lower() == ".zip":
        from .bioimageio.load import is_bioimageio_package, load_bioimageio

        if is_bioimageio_package(path):
            return load_bioimageio(path, device=device)
    return checkpoint.load_model(path, device=device)
