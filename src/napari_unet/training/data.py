"""Training data: entries (image, annotation, regions), targets, ignore masks, validation.

**Entries.** Training data is a list of :class:`TrainingEntry` — one per image, each with
any number of rectangles ``(y0, y1, x0, x1)`` (every rectangle of a napari Shapes layer).
With no rectangle, the region is the bounding box of the annotated pixels grown by
``margin`` pixels (:func:`default_roi`).

**Region rule (sparse annotations).** Inside the union of an entry's rectangles every
labelled pixel belongs to its cell and every unlabelled pixel is background: annotate
*all* cells inside a rectangle. Everything outside is unknown and ignored by the loss (the
image there still gives the network context).

**Validation** (:func:`plan_validation`), chosen by the caller:

* ``"none"`` — nothing is held out, no score.
* a held-out fraction of the annotated **objects** — whole cells (with a 3-pixel ring
  around them) drawn at random are removed from training and scored, spread over all
  regions (not a strip).
* **regions of its own** — ``TrainingEntry.val_regions``: rectangles annotated like
  training rectangles, removed from training and scored.

A score is only reported for at least :data:`MIN_VAL_OBJECTS` objects; below that the
reason is given instead (:attr:`TrainingSummary.val_note`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ..inference.normalize import apply_normalization, normalization_stats, sample_plane
from ..weightmap import border_weight_map, targets_from_instances, two_class_target
from .summary import MIN_VAL_OBJECTS, TrainingSummary  # noqa: F401 - also imported from here

DEFAULT_MARGIN = 16
VAL_RING = 3
"""Pixels around a held-out object that are also held out (its boundary stays unseen)."""
VAL_CONTEXT = 32
"""Image context (pixels) around validation areas when predicting them."""

Rect = tuple[int, int, int, int]


def parse_roi(text: str) -> Rect:
    """``"Y0:Y1,X0:X1"`` → (y0, y1, x0, x1)."""
    try:
        ys, xs = text.split(",")
        y0, y1 = (int(v) for v in ys.split(":"))
        x0, x1 = (int(v) for v in xs.split(":"))
    except ValueError:
        raise ValueError(f"ROI {text!r} is not of the form Y0:Y1,X0:X1") from None
    return y0, y1, x0, x1


def default_roi(labels: np.ndarray, margin: int = DEFAULT_MARGIN) -> Rect:
    """Bounding box of the annotated pixels grown by ``margin``, clipped to the image."""
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        raise ValueError(
            "the labels contain no annotation (all pixels are 0); label a few cells first"
        )
    h, w = labels.shape
    return (
        max(0, int(ys.min()) - margin),
        min(h, int(ys.max()) + 1 + margin),
        max(0, int(xs.min()) - margin),
        min(w, int(xs.max()) + 1 + margin),
    )


def check_roi(roi: Sequence[int], shape: tuple[int, int]) -> Rect:
    """Clip a rectangle to the image; refuse one smaller than 4×4 (or the image) inside it."""
    y0, y1, x0, x1 = (int(round(float(v))) for v in roi)
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(shape[0], y1), min(shape[1], x1)
    if y1 - y0 < min(4, shape[0]) or x1 - x0 < min(4, shape[1]) or y1 <= y0 or x1 <= x0:
        raise ValueError(
            f"training region {tuple(roi)} is empty or smaller than 4×4 inside the image {shape}"
        )
    return y0, y1, x0, x1


@dataclass
class TrainingEntry:
    """One image to train on.

    ``image``: (Y, X) or (C, Y, X) array. ``labels``: (Y, X) integer instance labels, 0 =
    unlabelled. ``regions``: rectangles (y0, y1, x0, x1) in pixels; empty or None = the
    annotated area (bounding box of the labels + 16 px). ``val_regions``: rectangles kept
    for validation (annotate all cells there too); never trained on. ``name``: shown in
    summaries (e.g. the layer name).
    """

    image: Any
    labels: Any
    regions: Sequence[Sequence[int]] | None = None
    val_regions: Sequence[Sequence[int]] = ()
    name: str = ""


def as_entries(image: Any, labels: Any = None, roi: Any = None) -> list[TrainingEntry]:
    """Normalise the accepted forms of training data to a list of :class:`TrainingEntry`.

    * ``image`` a :class:`TrainingEntry`, or a list of them (``labels``/``roi`` unused);
    * ``image`` a list of ``(image, labels)`` or ``(image, labels, regions)`` tuples;
    * ``image`` / ``labels`` arrays (or equal-length lists of arrays) and ``roi`` one
      rectangle (for every image), a list of rectangles (one image: all of them; several
      images: one per image, None = annotated area) or a list of lists (per image).
    """
    if isinstance(image, TrainingEntry):
        return [image]
    if isinstance(image, (list, tuple)) and image and labels is None:
        out = []
        for item in image:
            if isinstance(item, TrainingEntry):
                out.append(item)
            elif isinstance(item, (list, tuple)) and len(item) in (2, 3):
                out.append(TrainingEntry(item[0], item[1], item[2] if len(item) == 3 else None))
            else:
                raise ValueError(
                    "training data: expected TrainingEntry or (image, labels[, regions]) items"
                )
        return out
    if labels is None:
        raise ValueError("training data: labels are missing")
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    label_list = list(labels) if isinstance(labels, (list, tuple)) else [labels]
    if len(images) != len(label_list):
        raise ValueError(f"{len(images)} image(s) but {len(label_list)} label image(s)")
    if roi is None:
        per: list[Any] = [None] * len(images)
    elif _is_rect(roi):
        per = [[roi]] * len(images)
    elif not many:
        per = [list(roi)]
    else:
        per = list(roi)
        if len(per) != len(images):
            raise ValueError(f"{len(images)} image(s) but {len(per)} ROI(s)")
        per = [None if r is None else ([r] if _is_rect(r) else list(r)) for r in per]
    return [TrainingEntry(im, lab, r) for im, lab, r in zip(images, label_list, per)]


def planes_of_stacks(entries: list[TrainingEntry], in_channels: int) -> list[TrainingEntry]:
    """Z-stacks train per plane: an entry whose labels are (Z, Y, X) — with an image (Z, Y, X)
    or (Z, C, Y, X) — becomes one 2-D entry per plane that has annotations (the regions
    apply to every plane). Other entries are returned as they are.

    Args:
        entries: training entries (labels (Y, X) or (Z, Y, X)).
        in_channels: the model's input channels (tells (C, Y, X) from (Z, Y, X) images).

    Returns:
        The entries with every stack replaced by its annotated planes.
    """
    out: list[TrainingEntry] = []
    for entry in entries:
        labels = entry.labels
        shape = tuple(getattr(labels, "shape", ()))
        image_shape = tuple(getattr(entry.image, "shape", ()))
        stack = len(shape) == 3 and (
            image_shape == shape
            or (
                len(image_shape) == 4
                and image_shape[0] == shape[0]
                and image_shape[1] == in_channels
            )
        )
        if not stack:
            out.append(entry)
            continue
        planes = [z for z in range(shape[0]) if np.asarray(labels[z]).any()]
        if not planes:
            raise ValueError(f"{entry.name or 'the stack'}: no plane has annotations")
        for z in planes:
            out.append(
                TrainingEntry(
                    np.asarray(entry.image[z]),
                    np.asarray(labels[z]),
                    entry.regions,
                    entry.val_regions,
                    f"{entry.name or 'stack'} z={z}",
                )
            )
    return out


def _is_rect(r: Any) -> bool:
    return (
        isinstance(r, (list, tuple, np.ndarray))
        and len(r) == 4
        and all(np.isscalar(v) and not isinstance(v, (str, bytes)) for v in r)
    )


@dataclass
class TrainingData:
    """Tensors of one image on the training device.

    ``image`` (C, H, W) float32 normalised; ``target`` (H, W) int64 class indices;
    ``ignore`` (H, W) bool, True where the loss must not look (outside the regions, held
    out); ``weight`` (H, W) float32 or None. ``val_mask`` (H, W) bool: scored pixels (None:
    nothing scored here); ``val_labels``: ground truth scored there; ``val_boxes``: crops
    (y0, y1, x0, x1) covering ``val_mask``.
    """

    image: torch.Tensor
    target: torch.Tensor
    ignore: torch.Tensor
    weight: torch.Tensor | None
    roi: Rect
    rois: list[Rect]
    labels: np.ndarray
    image_np: np.ndarray
    known: np.ndarray
    """(K, 2) coordinates of trainable pixels (patch centres are drawn from them)."""
    val_mask: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_boxes: list[Rect] = field(default_factory=list)
    objects: int = 0
    val_objects: int = 0
    name: str = ""

    @property
    def val_roi(self) -> Rect | None:
        """Bounding box of the scored pixels (None when nothing is scored here)."""
        if self.val_mask is None or not self.val_mask.any():
            return None
        ys, xs = np.nonzero(self.val_mask)
        return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def as_channels_first(image: Any, in_channels: int) -> np.ndarray:
    """(Y, X) or (C, Y, X) image → float (C, Y, X) matching the model's input channels."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"training image must be 2-D (Y, X) or (C, Y, X), got shape {arr.shape}")
    if arr.shape[0] != in_channels:
        raise ValueError(
            f"training image has {arr.shape[0]} channel(s), the model expects {in_channels}"
        )
    if min(arr.shape[-2:]) < 2:
        raise ValueError(f"training image {arr.shape[-2:]} is too small (at least 2×2 pixels)")
    if not np.isfinite(arr).all():
        raise ValueError("training image contains NaN or infinite values")
    return arr


def _rect_mask(shape: tuple[int, int], rects: Sequence[Rect]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for y0, y1, x0, x1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def _inner_rim(shape: tuple[int, int], rect: Rect) -> np.ndarray:
    """1-px inner border of ``rect`` on the sides that are not the image border."""
    y0, y1, x0, x1 = rect
    rim = np.zeros(shape, bool)
    if y0 > 0:
        rim[y0, x0:x1] = True
    if y1 < shape[0]:
        rim[y1 - 1, x0:x1] = True
    if x0 > 0:
        rim[y0:y1, x0] = True
    if x1 < shape[1]:
        rim[y0:y1, x1 - 1] = True
    return rim


def _boxes(mask: np.ndarray, shape: tuple[int, int], context: int) -> list[Rect]:
    """Crops (with ``context``) covering the connected parts of ``mask``, merged if close."""
    grown = ndi.binary_dilation(mask, iterations=context) if mask.any() else mask
    lab, _ = ndi.label(grown)
    out = []
    for sl in ndi.find_objects(lab):
        if sl is not None:
            out.append((sl[0].start, sl[0].stop, sl[1].start, sl[1].stop))
    return out


def prepare_entry(
    entry: TrainingEntry,
    *,
    num_classes: int,
    in_channels: int,
    norm: dict[str, Any],
    weight_map: bool,
    device: torch.device,
    val_fraction: float = 0.0,
    use_val_regions: bool = True,
    rng: np.random.Generator | None = None,
) -> TrainingData:
    """Normalise, build targets and masks, hold out validation objects or regions.

    ``val_fraction`` > 0 holds out that fraction of the objects lying wholly inside the
    training regions (rounded, at least one when the fraction is positive);
    ``use_val_regions`` removes and scores ``entry.val_regions``.
    """
    img = as_channels_first(entry.image, in_channels)
    lab = _checked_labels(entry.labels, img.shape[-2:])
    shape = lab.shape
    regions = list(entry.regions) if entry.regions is not None else []
    rois = [check_roi(r, shape) for r in regions] if regions else [default_roi(lab)]
    region = _rect_mask(shape, rois)
    inside = np.where(region, lab, 0)
    if not inside.any():
        where = rois[0] if len(rois) == 1 else f"{len(rois)} regions"
        raise ValueError(f"no annotated cell inside the training region {where}")
    target, weight = _targets(inside, num_classes, weight_map)
    val_rects = [check_roi(r, shape) for r in entry.val_regions] if use_val_regions else []
    if val_rects:
        val_mask, val_labels, n_val, held = _validation_regions(lab, val_rects)
    else:
        val_mask, val_labels, n_val, held = _held_out_objects(lab, region, val_fraction, rng)
    ignore = ~region if held is None else ~region | held
    known_mask = ~ignore
    stats = normalization_stats(sample_plane(img, native=True), norm)
    img_n = apply_normalization(img, stats)
    return TrainingData(
        image=torch.from_numpy(np.ascontiguousarray(img_n, dtype=np.float32)).to(device),
        target=torch.from_numpy(target.astype(np.int64)).to(device),
        ignore=torch.from_numpy(ignore).to(device),
        weight=None if weight is None else torch.from_numpy(weight.astype(np.float32)).to(device),
        roi=_bounding_rect(rois),
        rois=rois,
        labels=lab,
        image_np=img,
        known=np.argwhere(known_mask),
        val_mask=val_mask,
        val_labels=val_labels,
        val_boxes=_boxes(val_mask, shape, VAL_CONTEXT) if val_mask is not None else [],
        objects=int(np.unique(lab[known_mask & (lab > 0)]).size),
        val_objects=n_val,
        name=entry.name,
    )


def _checked_labels(labels: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` as an array of instance ids (≥ 0) of the image's (Y, X) ``shape``."""
    lab = np.asarray(labels)
    if lab.shape != shape:
        raise ValueError(f"labels {lab.shape} and image {shape} differ in size")
    if not np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool:
        raise ValueError(f"labels must be integers (instance ids), got {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be ≥ 0 (0 = background, > 0 = one cell per value)")
    return lab


def _targets(
    inside: np.ndarray, num_classes: int, weight_map: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) class targets of the instances ``inside`` the regions and, with
    ``weight_map``, their (H, W) pixel weights."""
    if num_classes >= 3:
        target = targets_from_instances(inside, mode="3class")
        return target, border_weight_map(inside) if weight_map else None
    if num_classes == 2:
        target, weight = two_class_target(inside)
        return target, weight if weight_map else None
    target = targets_from_instances(inside, mode="2class")
    return target, border_weight_map(inside) if weight_map else None


_HoldOut = tuple[np.ndarray | None, np.ndarray | None, int, np.ndarray | None]
"""(scored mask, scored labels, scored objects, pixels taken out of training), all (H, W)."""


def _validation_regions(lab: np.ndarray, val_rects: list[Rect]) -> _HoldOut:
    """(scored mask, scored labels, scored objects, pixels removed from training) for
    validation rectangles: objects touching a rectangle's inner rim are not scored."""
    shape = lab.shape
    vmask = _rect_mask(shape, val_rects)
    val_labels = np.where(vmask, lab, 0)
    exclude = ~vmask
    for r in val_rects:
        exclude |= _inner_rim(shape, r)
    ids = np.unique(val_labels[val_labels > 0])
    touching = np.unique(lab[exclude & (lab > 0) & vmask])
    return ~exclude, val_labels, int(np.setdiff1d(ids, touching).size), vmask


def _held_out_objects(
    lab: np.ndarray, region: np.ndarray, val_fraction: float, rng: np.random.Generator | None
) -> _HoldOut:
    """The same for ``val_fraction`` of the objects wholly inside the training ``region``
    (with a ring of ``VAL_RING`` px); nothing when the fraction is 0 or no object is whole."""
    if not val_fraction > 0:
        return None, None, 0, None
    inside = np.where(region, lab, 0)
    ids = np.unique(inside[inside > 0])
    # objects wholly inside the regions (a cut object would be scored on a fragment)
    cut = np.unique(lab[~region & np.isin(lab, ids)])
    whole = np.setdiff1d(ids, cut)
    k = min(len(whole), max(1, int(round(val_fraction * len(ids))))) if len(whole) else 0
    if not k:
        return None, None, 0, None
    rng = rng if rng is not None else np.random.default_rng(0)
    held = np.sort(rng.choice(whole, size=k, replace=False))
    held_mask = np.isin(lab, held)
    ring = ndi.binary_dilation(held_mask, iterations=VAL_RING) & region
    return ring, np.where(held_mask, lab, 0), k, ring


def _bounding_rect(rois: list[Rect]) -> Rect:
    """The smallest rectangle containing every one of ``rois``."""
    return (
        min(r[0] for r in rois),
        max(r[1] for r in rois),
        min(r[2] for r in rois),
        max(r[3] for r in rois),
    )


def prepare(
    image: Any,
    labels: Any,
    *,
    num_classes: int,
    in_channels: int,
    norm: dict[str, Any],
    roi: Rect | None,
    val_fraction: float,
    weight_map: bool,
    device: torch.device,
) -> TrainingData:
    """One image, one rectangle (the former interface of :func:`prepare_entry`)."""
    return prepare_entry(
        TrainingEntry(image, labels, None if roi is None else [roi]),
        num_classes=num_classes,
        in_channels=in_channels,
        norm=norm,
        weight_map=weight_map,
        device=device,
        val_fraction=val_fraction,
    )


def _pad_to(t: torch.Tensor, ph: int, pw: int, mode: str, value: Any = 0) -> torch.Tensor:
    """Pad the last two dims by (ph, pw) at the bottom/right; ``reflect`` works at any size
    (repeated mirror steps, replicate for a 1-pixel side)."""
    if mode != "reflect":
        return torch.nn.functional.pad(t, (0, pw, 0, ph), value=value)
    x = t[None] if t.dim() == 2 else t
    x = x[None] if x.dim() == 3 else x
    dtype = x.dtype
    if not torch.is_floating_point(x):
        x = x.float()
    while ph > 0 or pw > 0:
        h, w = x.shape[-2:]
        sy, sx = min(ph, h - 1), min(pw, w - 1)
        if (ph > 0 and sy == 0) or (pw > 0 and sx == 0):
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
            break
        x = torch.nn.functional.pad(x, (0, sx, 0, sy), mode="reflect")
        ph, pw = ph - sy, pw - sx
    x = x.to(dtype)
    return x.reshape(*t.shape[:-2], *x.shape[-2:])


def _pad_around(t: torch.Tensor, b: int, mode: str, value: Any = 0) -> torch.Tensor:
    """Pad the last two dims by ``b`` on every side (:func:`_pad_to` on both corners)."""
    t = _pad_to(t.flip(-2, -1), b, b, mode, value).flip(-2, -1)
    return _pad_to(t, b, b, mode, value)


def sample_batch(
    data: TrainingData,
    batch_size: int,
    patch: int,
    generator: torch.Generator,
    border: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random ``patch``² crops whose centre lies in a known (trainable) pixel.

    Returns image (N, C, P, P), target (N, P, P), ignore (N, P, P), weight or None.
    Images smaller than the patch are mirror-padded (any size); padding is ignored.
    ``border`` (a valid U-Net's ``model.border``): the image is first mirrored by that
    many pixels on every side, as inference does, so that the centre-cropped output of a
    patch can reach every known pixel, those near the image edge included.
    """
    img, tgt, ign, wgt = data.image, data.target, data.ignore, data.weight
    known = data.known
    if border > 0:
        img = _pad_around(img, border, "reflect")
        tgt = _pad_around(tgt, border, "constant")
        ign = _pad_around(ign, border, "constant", value=True)
        if wgt is not None:
            wgt = _pad_around(wgt, border, "constant")
    h, w = tgt.shape
    ph, pw = max(0, patch - h), max(0, patch - w)
    if ph or pw:
        img = _pad_to(img, ph, pw, "reflect")
        tgt = _pad_to(tgt, ph, pw, "constant")
        ign = _pad_to(ign, ph, pw, "constant", value=True)
        if wgt is not None:
            wgt = _pad_to(wgt, ph, pw, "constant")
        h, w = tgt.shape
    picks = torch.randint(len(known), (batch_size,), generator=generator).numpy()
    ims, tgs, igs, wgs = [], [], [], []
    for k in picks:
        cy, cx = known[k] + border
        y = int(np.clip(cy - patch // 2, 0, h - patch))
        x = int(np.clip(cx - patch // 2, 0, w - patch))
        sl = (slice(y, y + patch), slice(x, x + patch))
        ims.append(img[(slice(None), *sl)])
        tgs.append(tgt[sl])
        igs.append(ign[sl])
        if wgt is not None:
            wgs.append(wgt[sl])
    return (
        torch.stack(ims),
        torch.stack(tgs),
        torch.stack(igs),
        torch.stack(wgs) if wgt is not None else None,
    )


def region_objects(entry: TrainingEntry) -> tuple[int, int]:
    """(objects with pixels inside the entry's regions, those wholly inside them).

    Validation regions are not subtracted (cheap count used to plan validation).
    """
    lab = np.asarray(entry.labels)
    if lab.ndim != 2:
        return 0, 0
    regions = list(entry.regions) if entry.regions is not None else []
    try:
        rois = [check_roi(r, lab.shape) for r in regions] if regions else [default_roi(lab)]
    except ValueError:
        return 0, 0
    region = _rect_mask(lab.shape, rois)
    ids = np.unique(lab[region & (lab > 0)])
    cut = np.unique(lab[~region & np.isin(lab, ids)])
    return int(ids.size), int(np.setdiff1d(ids, cut).size)
