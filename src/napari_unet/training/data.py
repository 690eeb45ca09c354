"""Training data: normalised image, targets, ignore mask and the region rule; patch sampling.

**Region rule (sparse annotations).** Inside the training region (a rectangle
``(y0, y1, x0, x1)``; by default the bounding box of all annotated pixels grown by
``margin`` pixels) every labelled pixel belongs to its cell and every unlabelled pixel is
background: annotate *all* cells inside the rectangle. Everything outside it is unknown
and ignored by the loss (the image there still gives the network context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..normalize import apply_normalization, normalization_stats, sample_plane
from ..weightmap import border_weight_map, targets_from_instances, two_class_target

DEFAULT_MARGIN = 16


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """``"Y0:Y1,X0:X1"`` → (y0, y1, x0, x1)."""
    try:
        ys, xs = text.split(",")
        y0, y1 = (int(v) for v in ys.split(":"))
        x0, x1 = (int(v) for v in xs.split(":"))
    except ValueError:
        raise ValueError(f"ROI {text!r} is not of the form Y0:Y1,X0:X1") from None
    return y0, y1, x0, x1


def default_roi(labels: np.ndarray, margin: int = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
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


def check_roi(roi: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = (int(v) for v in roi)
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(shape[0], y1), min(shape[1], x1)
    if y1 - y0 < 4 or x1 - x0 < 4:
        raise ValueError(
            f"training region {roi} is empty or smaller than 4×4 inside the image {shape}"
        )
    return y0, y1, x0, x1


@dataclass
class TrainingData:
    """Tensors of one image on the training device.

    ``image`` (C, H, W) float32 normalised; ``target`` (H, W) int64 class indices;
    ``ignore`` (H, W) bool, True outside the training region; ``weight`` (H, W) float32
    or None; ``train_mask`` / ``val_mask`` (H, W) bool split of the region.
    """

    image: torch.Tensor
    target: torch.Tensor
    ignore: torch.Tensor
    weight: torch.Tensor | None
    roi: tuple[int, int, int, int]
    val_roi: tuple[int, int, int, int] | None
    labels: np.ndarray
    image_np: np.ndarray
    known: np.ndarray
    """(K, 2) coordinates of trainable pixels (patch centres are drawn from them)."""


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
    if not np.isfinite(arr).all():
        raise ValueError("training image contains NaN or infinite values")
    return arr


def prepare(
    image: Any,
    labels: Any,
    *,
    num_classes: int,
    in_channels: int,
    norm: dict[str, Any],
    roi: tuple[int, int, int, int] | None,
    val_fraction: float,
    weight_map: bool,
    device: torch.device,
) -> TrainingData:
    """Normalise, build targets and masks, split the region into train/validation parts."""
    img = as_channels_first(image, in_channels)
    lab = np.asarray(labels)
    if lab.shape != img.shape[-2:]:
        raise ValueError(f"labels {lab.shape} and image {img.shape[-2:]} differ in size")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers (instance ids), got {lab.dtype}")
    roi = check_roi(roi if roi is not None else default_roi(lab), lab.shape)
    y0, y1, x0, x1 = roi
    region = np.zeros(lab.shape, bool)
    region[y0:y1, x0:x1] = True
    inside = np.where(region, lab, 0)
    if not inside.any():
        raise ValueError(f"no annotated cell inside the training region {roi}")

    if num_classes >= 3:
        target = targets_from_instances(inside, mode="3class")
        weight = border_weight_map(inside) if weight_map else None
    elif num_classes == 2:
        target, weight = two_class_target(inside)
        weight = weight if weight_map else None
    else:
        target = targets_from_instances(inside, mode="2class")
        weight = border_weight_map(inside) if weight_map else None

    val_roi = None
    ignore = ~region
    if val_fraction > 0:
        # the last val_fraction of the region along its longer side is held back
        if y1 - y0 >= x1 - x0:
            cut = y1 - round((y1 - y0) * val_fraction)
            val_roi = (cut, y1, x0, x1) if y1 - cut >= 16 and cut - y0 >= 16 else None
        else:
            cut = x1 - round((x1 - x0) * val_fraction)
            val_roi = (y0, y1, cut, x1) if x1 - cut >= 16 and cut - x0 >= 16 else None
    if val_roi is not None:
        vy0, vy1, vx0, vx1 = val_roi
        ignore = ignore.copy()
        ignore[vy0:vy1, vx0:vx1] = True

    stats = normalization_stats(sample_plane(img), norm)
    img_n = apply_normalization(img, stats)
    return TrainingData(
        image=torch.from_numpy(img_n).to(device),
        target=torch.from_numpy(target.astype(np.int64)).to(device),
        ignore=torch.from_numpy(ignore).to(device),
        weight=None if weight is None else torch.from_numpy(weight.astype(np.float32)).to(device),
        roi=roi,
        val_roi=val_roi,
        labels=lab,
        image_np=img,
        known=np.argwhere(~ignore),
    )


def sample_batch(
    data: TrainingData, batch_size: int, patch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random ``patch``² crops whose centre lies in a known (trainable) pixel.

    Returns image (N, C, P, P), target (N, P, P), ignore (N, P, P), weight or None.
    Images smaller than the patch are reflect-padded; padding is ignored.
    """
    img, tgt, ign, wgt = data.image, data.target, data.ignore, data.weight
    h, w = tgt.shape
    ph, pw = max(0, patch - h), max(0, patch - w)
    if ph or pw:
        img = torch.nn.functional.pad(img[None], (0, pw, 0, ph), mode="reflect")[0]
        tgt = torch.nn.functional.pad(tgt, (0, pw, 0, ph))
        ign = torch.nn.functional.pad(ign, (0, pw, 0, ph), value=True)
        if wgt is not None:
            wgt = torch.nn.functional.pad(wgt, (0, pw, 0, ph))
        h, w = tgt.shape
    known = data.known
    picks = torch.randint(len(known), (batch_size,), generator=generator).numpy()
    ims, tgs, igs, wgs = [], [], [], []
    for k in picks:
        cy, cx = known[k]
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
