"""Which network a prediction runs: an object, a file, a bundled name or the default."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..models.base import SegmentationModel


def resolve_model(model: SegmentationModel | str | Path | None) -> SegmentationModel:
    """A model object, a checkpoint / package path, a bundled trained variant's name
    (``"unetpp"``: :func:`napari_unet.load_pretrained`), another variant name (untrained, with
    a warning) or None (the bundled default U-Net)."""
    if isinstance(model, SegmentationModel):
        return model
    from .. import checkpoint

    if model is None:
        return checkpoint.load_default_model()
    path = Path(model)
    if path.suffix or path.exists():
        from ..loader import load_model  # a checkpoint or a bioimage.io package

        return load_model(path)
    from ..models.pretrained import is_pretrained, load_pretrained

    if is_pretrained(str(model)):
        return load_pretrained(str(model))
    from ..models import build_model

    warnings.warn(f"{model!r} is a variant name: its weights are untrained", stacklevel=2)
    return build_model(str(model))
