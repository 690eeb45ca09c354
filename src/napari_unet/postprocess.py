"""Probabilities → semantic or instance labels (uint32)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed


def default_class_names(num_classes: int) -> list[str]:
    """Conventional meaning of the output channels when a model does not say."""
    if num_classes == 1:
        return ["foreground"]
    if num_classes == 2:
        return ["background", "foreground"]
    if num_classes == 3:  # the 3-class targets of napari_unet.weightmap
        return ["background", "interior", "boundary"]
    return ["background", *(f"class {i}" for i in range(1, num_classes))]


def segment(
    probabilities: np.ndarray,
    *,
    mode: str = "instance",
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    min_size: int = 15,
    seed_h: float = 1.0,
) -> np.ndarray:
    """Labels from class probabilities ``(C, *leading, Y, X)`` → uint32 ``(*leading, Y, X)``.

    * ``mode="semantic"``: argmax class index (one-class models: foreground > threshold).
    * ``mode="instance"``: objects numbered 1..N per image, unique across planes.
      The *core* is interior > threshold for 3-class (background/interior/boundary)
      models and foreground > threshold otherwise. Seeds are the regional maxima of the
      core's (σ = 1 px smoothed) distance transform that rise at least ``seed_h`` pixels
      above their surroundings (h-maxima), so cores of touching cells joined by a neck
      still get one seed each; a watershed on the distance grows them over the
      foreground. Objects smaller than ``min_size`` pixels are removed.
      (``seed_h`` = 1 was chosen on synthetic validation images: F1@0.5 0.942 vs 0.933
      with one seed per connected core.)

    Args:
        probabilities: (C, *leading, Y, X) class probabilities in [0, 1] (the output of
            :func:`napari_unet.predict`).
        mode: ``"instance"`` or ``"semantic"``.
        class_names: one name per class (default: background / interior / boundary for 3
            classes); decides which channel is the core.
        threshold: probability above which a pixel is core / foreground.
        min_size: smallest object kept, in pixels.
        seed_h: h-maxima height of the seeds, in pixels of (smoothed) distance.

    Returns:
        uint32 (*leading, Y, X) labels: 0 background, objects 1..N (instance) or class
        indices (semantic).
    """
    probs = np.asarray(probabilities)
    if probs.ndim < 3:
        raise ValueError(f"probabilities must be (C, ..., Y, X), got shape {probs.shape}")
    if mode not in ("instance", "semantic"):
        raise ValueError(f"mode must be 'instance' or 'semantic', got {mode!r}")
    names = list(class_names or default_class_names(probs.shape[0]))
    if len(names) != probs.shape[0]:
        raise ValueError(f"{len(names)} class names for {probs.shape[0]} channels")
    leading = probs.shape[1:-2]
    out = np.zeros(probs.shape[1:], dtype=np.uint32)
    offset = 0
    for idx in np.ndindex(*leading) if leading else [()]:
        plane = probs[(slice(None), *idx)]
        if mode == "semantic":
            out[idx] = _semantic(plane, names, threshold)
            continue
        labels = _instances(plane, names, threshold, min_size, seed_h)
        n = int(labels.max())
        out[idx] = np.where(labels > 0, labels + offset, 0)
        offset += n
    return out


def _semantic(plane: np.ndarray, names: list[str], threshold: float) -> np.ndarray:
    if plane.shape[0] == 1:
        return (plane[0] > threshold).astype(np.uint32)
    return plane.argmax(axis=0).astype(np.uint32)


def _foreground(plane: np.ndarray, names: list[str]) -> np.ndarray:
    if plane.shape[0] == 1:
        return plane[0]
    if "background" in names:
        return 1.0 - plane[names.index("background")]
    return plane[1:].sum(axis=0)


def _instances(
    plane: np.ndarray, names: list[str], threshold: float, min_size: int, seed_h: float
) -> np.ndarray:
    fg = _foreground(plane, names) > threshold
    core = plane[names.index("interior")] > threshold if "interior" in names else fg
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(core), 1.0)
    seeds, _ = ndi.label(h_maxima(dist, seed_h) & core, structure=np.ones((3, 3)))
    labels = watershed(-dist, seeds, mask=fg | core)
    labels = _remove_small(labels, min_size)
    return relabel_sequential(labels.astype(np.uint32))[0]


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero every label with fewer than ``min_size`` pixels (a new array)."""
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)
