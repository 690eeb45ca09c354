"""A prediction of one :class:`~._geometry.Request`: computed in a worker through
:func:`napari_unet.pipeline.segment_image`, then written as new layers on the GUI thread.

Used by the Predict widget, the Train widget (its prediction when done) and the
Layers ▸ Segment menu command.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._common import find_output, output_key, write_output
from ._events import PostProgress, Progress, Stage
from ._geometry import Request, place
from ._state import get_state


def run_prediction(
    model: Any,
    request: Request,
    *,
    labels_mode: str | None,
    probabilities: bool,
    device: str = "auto",
    tile_size: int | None = None,
    batch_size: int | None = None,
    level: int | None = None,
    previous: dict[str, Any] | None = None,
    report: Any = None,
    cancel: Any = None,
    objects_3d: bool = False,
) -> dict[str, Any]:
    """Engine part of a prediction (runs in the worker thread): probabilities → labels.

    ``report`` receives :class:`~._events.Stage`, :class:`~._events.Progress` (tiles) and
    :class:`~._events.PostProgress` (planes) events. ``objects_3d``: instance labels of a
    (Z, Y, X) stack made in 3-D (one object per nucleus across planes, voxel size from
    the layer's scale) instead of plane by plane. The arrays come back in the layer's
    shape (:func:`~._geometry.place`: "current slice only" keeps ``previous``'s others).
    """
    from ..pipeline import segment_image

    previous = previous or {}
    objects_3d = objects_3d and labels_mode == "instance"
    if objects_3d and sum(a in "TZ" for a in request.axes) != 1:
        raise ValueError(
            "3-D objects need a (Z, Y, X) stack; this image gives "
            f"{request.axes.replace('C', '')} planes (untick '3-D objects' or pick one "
            "time point)"
        )
    spacing = tuple(float(s) for s in request.scale[-3:]) if objects_3d else None
    t0 = time.perf_counter()

    def send(event_type: type) -> Any:
        return None if report is None else lambda *args: report(event_type(*args))

    res = segment_image(
        model, request.data, axes=request.axes, channel=request.channel, device=device,
        tile_size=tile_size, batch_size=batch_size, level=level, mode=labels_mode,
        objects_3d=objects_3d, spacing=spacing,
        progress=send(Progress), post_progress=send(PostProgress),
        stage=send(Stage), cancel=cancel, threads="auto",
    )  # fmt: skip
    out: dict[str, Any] = {
        "seconds": res.seconds,
        "device": res.device,
        "runtime": res.runtime,
        "class_names": list(res.class_names),
    }
    if res.labels is not None:
        out["labels"] = place(
            request, res.labels, previous.get("labels"), relabel=labels_mode == "instance"
        )
        out["n_labels"] = res.objects
    if probabilities:
        out["probabilities"] = place(
            request, res.probabilities, previous.get("probabilities"), channels=True
        )
    out["total_seconds"] = time.perf_counter() - t0
    return out


def result_name(source_name: str, label: str, run: int, kind: str = "") -> str:
    """``nuclei [unetpp #2]``, ``nuclei [unetpp #2 probabilities]``."""
    return f"{source_name} [{label} #{run}{' ' + kind if kind else ''}]"


def write_results(
    viewer: Any,
    request: Request,
    model: Any,
    result: dict[str, Any],
    labels_mode: str | None,
    *,
    label: str | None = None,
    run: int | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """New layers for a finished prediction, by kind (``replace``: the last ones' data).

    Named by source, model and run (``nuclei [unet #3]``), visible, the labels selected.
    """
    src = request.source
    state = get_state(viewer)
    label = label or model.name
    run = run if run is not None else state.next_run()
    written: dict[str, Any] = {}
    info = {
        "napari_unet_model": model.name,
        "napari_unet_model_label": label,
        "napari_unet_run": run,
        "napari_unet_classes": result["class_names"],
    }
    if "probabilities" in result:
        probs = result["probabilities"]
        existed = replace and find_output(viewer, output_key(src, "probabilities")) is not None
        src_labels = tuple(src.axis_labels)
        dims = src_labels[-(probs.ndim - 1) :] if len(src_labels) >= probs.ndim - 1 else ()
        extra = {"axis_labels": ("class", *dims)} if dims else {}
        written["probabilities"] = write_output(
            viewer,
            output_key(src, "probabilities"),
            "image",
            probs,
            name=result_name(src.name, label, run, "probabilities"),
            scale=(1.0, *request.scale),
            translate=(0.0, *request.translate),
            metadata=info,
            colormap="magma",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            visible=True,
            replace=replace,
            select=True,
            **extra,
        )
        if not existed and probs.shape[0] > 1:
            # show the first foreground class rather than the background on the class slider
            names = result["class_names"]
            first = next((i for i, n in enumerate(names) if n != "background"), 0)
            axis = viewer.dims.ndim - probs.ndim
            if axis >= 0:
                viewer.dims.set_current_step(axis, first)
    if "labels" in result:
        kind = f"{labels_mode} labels"
        suffix = "" if labels_mode == "instance" else "semantic"
        written["labels"] = write_output(
            viewer,
            output_key(src, kind),
            "labels",
            result["labels"].astype(np.uint32, copy=False),
            name=result_name(src.name, label, run, suffix),
            scale=request.scale,
            translate=request.translate,
            metadata=info,
            replace=replace,
            select=True,
        )
    return written
