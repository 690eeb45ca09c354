"""From a napari image layer to the array the engine predicts, and back to layer space.

Pure numpy + napari layer attributes; no Qt, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LEADING_LETTERS = {0: "", 1: "Z", 2: "TZ"}


@dataclass
class Request:
    """What to predict for one image layer and where the results go."""

    source: Any
    """The napari layer the run was started on (captured at start)."""
    data: Any
    """Array handed to ``predict`` (a view/crop of the layer data; may be lazy)."""
    axes: str
    out_shape: tuple[int, ...]
    """Shape of the labels layer (*leading, Y, X) written back."""
    index: tuple[int, ...] = ()
    """Leading index of the predicted plane ("current slice only"), else ()."""
    channel: int | None = None
    """Channel of a multi-channel image given to a one-channel model (``predict(channel=)``)."""
    offset: tuple[int, int] = (0, 0)
    """(y0, x0) of the predicted crop ("visible field of view only")."""
    scale: tuple[float, ...] = ()
    translate: tuple[float, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def n_leading(self) -> int:
        return len(self.out_shape) - 2


def layer_array(layer: Any) -> Any:
    """Full-resolution data of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def leading_count(layer: Any, in_channels: int, channels: bool | None = None) -> tuple[int, bool]:
    """(number of leading T/Z axes, whether a channel axis sits before Y, X).

    ``channels``: the user's answer to "is the axis before Y, X channels?" (the channel
    picker); None guesses: channels when it equals a multi-channel model's input.
    """
    shape = layer_array(layer).shape
    if layer.rgb:
        return len(shape) - 3, False
    if channels is None:
        channels = in_channels > 1 and len(shape) >= 3 and shape[-3] == in_channels
    if channels and len(shape) >= 3:
        return len(shape) - 3, True
    return len(shape) - 2, False


def guess_channels(layer: Any) -> bool:
    """Whether the axis before Y, X of a non-RGB layer looks like channels, not planes.

    Axis labels decide when they name it (c/channel vs z/t); otherwise up to 4 entries
    are taken for channels (a (2, Y, X) image is two channels, not two Z-planes).
    """
    shape = layer_array(layer).shape
    if layer.rgb or len(shape) < 3:
        return False
    labels = [str(a).lower() for a in (getattr(layer, "axis_labels", None) or ())]
    if len(labels) == len(shape):
        name = labels[-3]
        if name in ("c", "ch", "channel", "channels"):
            return True
        if name in ("z", "t", "time", "plane", "slice"):
            return False
    return shape[-3] <= 4


def is_stack(layer: Any, in_channels: int = 1, channels: bool | None = None) -> bool:
    return leading_count(layer, in_channels, channels)[0] > 0


def camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def canvas_size(viewer: Any) -> tuple[int, int] | None:
    """(height, width) of the canvas in screen pixels (``viewer.canvas.size`` since 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "size"):
        return tuple(int(v) for v in canvas.size)  # type: ignore[return-value]
    size = getattr(viewer, "_canvas_size", None)
    return tuple(int(v) for v in size) if size is not None else None


def visible_box(viewer: Any, layer: Any) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the layer pixels inside the canvas, or None when unknown."""
    canvas = canvas_size(viewer)
    if canvas is None:
        return None
    if list(viewer.dims.displayed) != [viewer.dims.ndim - 2, viewer.dims.ndim - 1]:
        return None  # transposed/3-D display: fall back to the whole plane
    h, w = canvas
    cam = camera(viewer)
    zoom = float(cam.zoom)
    cy, cx = (float(c) for c in cam.center[-2:])
    point = np.asarray(viewer.dims.point, dtype=float)
    corners = []
    for y, x in ((cy - h / zoom / 2, cx - w / zoom / 2), (cy + h / zoom / 2, cx + w / zoom / 2)):
        p = point.copy()
        p[-2:] = (y, x)
        corners.append(np.asarray(layer.world_to_data(p))[-2:])
    (ya, xa), (yb, xb) = corners
    shape = layer_array(layer).shape
    H, W = shape[-3:-1] if layer.rgb else shape[-2:]
    y0, y1 = sorted((ya, yb))
    x0, x1 = sorted((xa, xb))
    y0, x0 = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    y1, x1 = min(H, int(np.ceil(y1)) + 1), min(W, int(np.ceil(x1)) + 1)
    if y1 - y0 < 2 or x1 - x0 < 2:
        raise ValueError("the image is not in view; pan to it or untick 'visible field of view'")
    return y0, y1, x0, x1


def make_request(
    viewer: Any,
    layer: Any,
    in_channels: int,
    *,
    current_slice: bool = False,
    field_of_view: bool = False,
    channels: bool | None = None,
    channel: int | None = None,
) -> Request:
    """Crop/slice the layer as asked and record how results map back to the layer.

    ``channels``/``channel``: the channel picker's answer (see :func:`leading_count`) and
    the channel a one-channel model reads (None: all channels / luminance of RGB).
    """
    base = layer_array(layer)
    shape = tuple(int(s) for s in base.shape)
    n_lead, channel_axis = leading_count(layer, in_channels, channels)
    n_channels = shape[-1] if layer.rgb else shape[-3] if channel_axis else 1
    if channel is not None and not 0 <= channel < n_channels:
        raise ValueError(f"{layer.name!r} has no channel {channel + 1}")
    if channel is None and channel_axis and n_channels != in_channels:
        raise ValueError(
            f"{layer.name!r} has {n_channels} channels but the model reads {in_channels}: "
            "pick a channel"
        )
    if n_lead not in _LEADING_LETTERS:
        raise ValueError(
            f"{layer.name!r} has {len(shape)} dimensions; napari-unet predicts 2-D images, "
            "Z-stacks and time series (up to TZYX)"
        )
    H, W = shape[-3:-1] if layer.rgb else shape[-2:]
    # layer dimensions that the labels output keeps (drop a channel axis)
    dims = (
        list(range(layer.ndim))
        if layer.rgb or not channel_axis
        else [
            *range(n_lead),
            layer.ndim - 2,
            layer.ndim - 1,
        ]
    )
    scale = [float(layer.scale[d]) for d in dims]
    translate = [float(layer.translate[d]) for d in dims]
    notes: list[str] = []
    index: tuple[int, ...] = ()
    data = base
    if current_slice and n_lead:
        point = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
        index = tuple(int(np.clip(round(point[d]), 0, shape[d] - 1)) for d in range(n_lead))
        data = base[index]
        notes.append(f"slice {index}")
    y0, y1, x0, x1 = 0, H, 0, W
    if field_of_view:
        data, (y0, y1, x0, x1) = _crop_to_view(viewer, layer, data, (H, W), notes)
    translate[-2] += y0 * scale[-2]
    translate[-1] += x0 * scale[-1]
    lead_letters = "" if index else _LEADING_LETTERS[n_lead]
    axes = lead_letters + ("YXC" if layer.rgb else "CYX" if channel_axis else "YX")
    out_shape = (*shape[:n_lead], y1 - y0, x1 - x0)
    return Request(
        source=layer,
        data=data,
        axes=axes,
        out_shape=out_shape,
        index=index,
        channel=channel if (channel_axis or layer.rgb) else None,
        offset=(y0, x0),
        scale=tuple(scale),
        translate=tuple(translate),
        notes=notes,
    )


def _crop_to_view(
    viewer: Any, layer: Any, data: Any, plane: tuple[int, int], notes: list[str]
) -> tuple[Any, tuple[int, int, int, int]]:
    """``data`` cropped to the part of the layer inside the canvas, and that box
    (y0, y1, x0, x1); the whole plane when the view is unknown (a note says which)."""
    H, W = plane
    box = visible_box(viewer, layer)
    if box is None:
        notes.append("field of view unknown: whole plane")
        return data, (0, H, 0, W)
    y0, y1, x0, x1 = box
    if box != (0, H, 0, W):
        crop = (..., slice(y0, y1), slice(x0, x1))
        if layer.rgb:
            crop = (*crop, slice(None))
        data = data[crop]
        notes.append(f"field of view y {y0}:{y1}, x {x0}:{x1}")
    return data, box


def place(
    request: Request,
    result: np.ndarray,
    previous: Any = None,
    *,
    channels: bool = False,
    relabel: bool = False,
) -> np.ndarray:
    """Put a plane result back into the output's shape ("current slice only").

    ``result`` is (C, *pred_leading, y, x) when ``channels`` else (*pred_leading, y, x).
    Without a slice index it is returned unchanged. With one, the other slices come from
    ``previous`` (the plugin's earlier output of the same shape) or are zero; instance
    ids of the new slice are shifted above the other slices' ids when ``relabel``.
    """
    if not request.index:
        return result
    lead = (result.shape[0],) if channels else ()
    full_shape = (*lead, *request.out_shape)
    if previous is not None and tuple(previous.shape) == full_shape:
        full = np.array(previous, dtype=result.dtype, copy=True)
    else:
        full = np.zeros(full_shape, dtype=result.dtype)
    target = (slice(None), *request.index) if channels else request.index
    if relabel:
        full[target] = 0
        top = full.max() if full.size else 0
        result = np.where(result > 0, result + top, 0).astype(result.dtype)
    full[target] = result
    return full
