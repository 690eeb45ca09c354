"""From napari layers to training data: the rectangles of a Shapes layer in image pixels,
the image and annotation arrays of an entry (the displayed plane, or every annotated plane
of a Z-stack), and the training list's rows. Read on the GUI thread when training starts;
no Qt, no engine import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._geometry import layer_array, leading_count


def rectangle_rois(shapes: Any, image: Any) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) in ``image`` data pixels of every rectangle of ``shapes``.

    Rectangles outside the image (or under 4×4 px inside it) are skipped; none left is
    an error."""
    types = list(shapes.shape_type)
    if "rectangle" not in types:
        raise ValueError(f"{shapes.name!r} has no rectangle; draw one (a training region)")
    shape = layer_array(image).shape
    h, w = shape[-3:-1] if image.rgb else shape[-2:]
    rois = []
    for kind, data in zip(types, shapes.data):
        if kind != "rectangle":
            continue
        vertices = np.asarray(data, dtype=float)
        pts = np.array([image.world_to_data(shapes.data_to_world(v)) for v in vertices])
        ys, xs = pts[:, -2], pts[:, -1]
        y0, y1 = max(0, int(np.floor(ys.min()))), min(h, int(np.ceil(ys.max())))
        x0, x1 = max(0, int(np.floor(xs.min()))), min(w, int(np.ceil(xs.max())))
        if y1 - y0 >= 4 and x1 - x0 >= 4:
            rois.append((y0, y1, x0, x1))
    if not rois:
        raise ValueError(
            f"every rectangle of {shapes.name!r} is outside {image.name!r} or smaller than 4×4 px"
        )
    return rois


def rectangle_roi(shapes: Any, image: Any) -> tuple[int, int, int, int]:
    """The first rectangle of :func:`rectangle_rois`."""
    return rectangle_rois(shapes, image)[0]


def training_arrays(
    viewer: Any,
    image: Any,
    labels: Any,
    in_channels: int,
    channels: bool | None = None,
    channel: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (Y,X) or (C,Y,X), labels (Y,X), note) — the displayed plane of stacks; a Z-stack
    annotated in 3-D gives the whole stack ((Z,[C],Y,X), (Z,Y,X)): the engine trains on every
    plane that has annotations."""
    n_lead, channel_axis = leading_count(image, in_channels, channels)
    img = layer_array(image)
    note = ""
    lab3 = labels.data
    if n_lead == 1 and not image.rgb and lab3.ndim == 3 and lab3.shape[0] == img.shape[0]:
        stack = np.asarray(img)
        if channel is not None and stack.ndim == 4:
            stack = stack[:, channel]
        lab3 = np.array(lab3, copy=True)  # a snapshot
        if lab3.shape[-2:] != stack.shape[-2:]:
            raise ValueError(
                f"labels {labels.name!r} are {lab3.shape[-2]}×{lab3.shape[-1]} but the image "
                f"planes are {stack.shape[-2]}×{stack.shape[-1]}"
            )
        planes = int(sum(bool(p.any()) for p in lab3))
        return stack, lab3, f" ({planes} annotated plane{'s' if planes != 1 else ''})"
    if n_lead:
        point = np.asarray(image.world_to_data(viewer.dims.point))
        index = tuple(int(np.clip(round(point[d]), 0, img.shape[d] - 1)) for d in range(n_lead))
        img = img[index]
        note = f" (slice {index})"
    img = np.asarray(img)
    if image.rgb:
        img = np.moveaxis(img, -1, 0)
    if channel is not None and img.ndim == 3:
        img = img[channel]
    lab = labels.data
    if lab.ndim > 2:
        point = np.asarray(labels.world_to_data(viewer.dims.point))
        index = tuple(
            int(np.clip(round(point[d]), 0, lab.shape[d] - 1)) for d in range(lab.ndim - 2)
        )
        lab = lab[index]
    lab = np.array(lab, copy=True)  # a snapshot: painting during training changes nothing
    if lab.shape != img.shape[-2:]:
        raise ValueError(
            f"labels {labels.name!r} are {lab.shape[0]}×{lab.shape[1]} but the image plane is "
            f"{img.shape[-2]}×{img.shape[-1]}"
        )
    return img, lab, note


@dataclass(eq=False)
class DataEntry:
    """One row of the training list: layers (read when training starts)."""

    image: Any
    labels: Any
    regions: Any = None
    val_regions: Any = None
    channels: bool | None = None
    channel: int | None = None

    def describe(self) -> str:
        where = (
            f"rectangles of {self.regions.name!r}"
            if self.regions is not None
            else ("annotated area")
        )
        text = f"{self.image.name} + {self.labels.name}, {where}"
        if self.val_regions is not None:
            text += f"; validation: {self.val_regions.name!r}"
        return text


Roi = tuple[int, int, int, int]


def engine_entries(
    viewer: Any, entries: list[DataEntry], in_channels: int
) -> tuple[list[dict[str, Any]], list[list[Roi] | None], str]:
    """(``TrainingEntry`` keyword dicts, the regions of each entry, note) from the layers,
    read now (GUI thread). Raises ValueError for a layer that cannot be trained on."""
    out, all_rois, notes = [], [], []
    for e in entries:
        img, lab, note = training_arrays(
            viewer, e.image, e.labels, in_channels, e.channels, e.channel
        )
        rois = rectangle_rois(e.regions, e.image) if e.regions is not None else None
        val = rectangle_rois(e.val_regions, e.image) if e.val_regions is not None else []
        all_rois.append(rois)
        out.append(
            {"image": img, "labels": lab, "regions": rois, "val_regions": val, "name": e.image.name}
        )
        if note:
            notes.append(e.image.name + note)
    return out, all_rois, "; ".join(notes)
