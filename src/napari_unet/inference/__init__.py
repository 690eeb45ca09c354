"""Single-process inference, top-down: :func:`predict` (the public API) → an input
:class:`~.source.PlaneSource` (layout, normalisation, mirrored windows) → the planner
(:mod:`.plan`) → the tiler (:mod:`.tiler`) → a runtime (torch, or a compiled CPU runtime
from :mod:`.backends`). Nothing here imports the CLI, the widgets or the cluster code,
except that ``predict(scheduler=...)`` hands the whole run to :mod:`napari_unet.distributed`.
"""

from __future__ import annotations

from ..runtime import Cancelled, select_device
from .plan import DEFAULT_BATCH, DEFAULT_TILE, TilePlan, plan_tiles, tile_plan_for
from .predict import predict
from .resolve import resolve_model

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_TILE",
    "Cancelled",
    "TilePlan",
    "plan_tiles",
    "predict",
    "resolve_model",
    "select_device",
    "tile_plan_for",
]
