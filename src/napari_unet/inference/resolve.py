"""Which network a prediction runs: an object, a file, a bundled name or the default."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..models.base import SegmentationModel


class Resolved(NamedTuple):
    """A network and whether its weights were trained (False: a variant built fresh)."""

    model: SegmentationModel
    trained: bool


def resolve_model(model: SegmentationModel | str | Path | None) -> Resolved:
    """The network a caller means, and whether it is trained.

    Args:
        model: a model object (taken as trained), a checkpoint / bioimage.io package path,
            a bundled trained variant's name (``"unetpp"``:
            :func:`napari_unet.load_pretrained`), another variant name (built untrained)
            or None (the bundled default U-Net).

    Returns:
        ``Resolved(model, trained)``; nothing is warned here — callers say it their way.
    """
    if isinstance(model, SegmentationModel):
        return Resolved(model, True)
    from .. import checkpoint

    if model is None:
        return Resolved(checkpoint.load_default_model(), True)
    path = Path(model)
    if path.suffix or path.exists():
        from ..loader import load_model  # a checkpoint or a bioimage.io package

        return Resolved(load_model(path), True)
    from ..models.pretrained import is_pretrained, load_pretrained

    if is_pretrained(str(model)):
        return Resolved(load_pretrained(str(model)), True)
    from ..models import build_model

    return Resolved(build_model(str(model)), False)
