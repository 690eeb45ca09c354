"""Training targets from instance labels, and the U-Net paper's border weight map.

Everything here works on 2-D instance-label images ``labels`` (H, W) of integers:
0 is background, every value > 0 is one cell (a label may be split into several pieces;
distances are then to its nearest piece). Distances are Euclidean, in pixels, between
pixel centres.

* :func:`border_weight_map` — w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / (2σ²))
  (Ronneberger et al. 2015, eq. 2), computed locally per cell (fast);
  :func:`border_weight_map_bruteforce` is the exact one-EDT-per-cell reference.
* :func:`targets_from_instances` — class maps for "3class" (background / interior /
  boundary) and "2class" (foreground with 1-px gaps between touching cells) U-Nets.
* :func:`two_class_target` — the paper's pair (2-class target, weight map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "BORDER_TOLERANCE",
    "border_cutoff",
    "border_weight_map",
    "border_weight_map_bruteforce",
    "class_weight_values",
    "separate_touching",
    "targets_from_instances",
    "two_class_target",
]

BORDER_TOLERANCE = 1e-6
"""The fast map drops border terms smaller than ``BORDER_TOLERANCE · w0``."""

ClassWeights = str | Sequence[float] | None


# --------------------------------------------------------------------------- helpers
def _as_labels(labels: Any) -> np.ndarray:
    """Validate a 2-D non-negative integer label image; return it as a numpy array."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(
            f"labels must be a 2-D (H, W) instance-label image, got shape {arr.shape}; "
            "process 3-D stacks plane by plane"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer instance-label image, got dtype {arr.dtype}; "
            "for a binary mask use skimage.measure.label(mask) first"
        )
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be ≥ 0 (0 = background, > 0 = one cell per value)")
    return arr


def _compact(arr: np.ndarray) -> np.ndarray:
    """Labels as a signed int array small enough for ``ndi.find_objects``."""
    if arr.size and int(arr.max()) > arr.size:
        from skimage.segmentation import relabel_sequential

        arr = relabel_sequential(arr)[0]
    return arr.astype(np.int32 if arr.size < 2**31 else np.int64, copy=False)


def _check_params(w0: float, sigma: float) -> None:
    if not (math.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0 must be a finite number ≥ 0, got {w0}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (pixels), got {sigma}")


def border_cutoff(sigma: float, tolerance: float = BORDER_TOLERANCE) -> float:
    """Distance D (pixels) with exp(−D² / (2σ²)) = ``tolerance``.

    Where d1 + d2 > D the border term is below ``tolerance · w0``. For the default
    tolerance 1e-6, D ≈ 5.26 σ.
    """
    return float(sigma) * math.sqrt(2.0 * math.log(1.0 / tolerance))


def class_weight_values(
    labels: Any, class_weights: ClassWeights = "balanced"
) -> tuple[float, float]:
    """(w_background, w_foreground) for ``labels`` (H, W).

    * ``"balanced"``: inverse class frequency, scaled so that the mean of w_c over the
      image is exactly 1: with N pixels of which n_fg are foreground (label > 0) and
      n_bg background, w_fg = N / (2·n_fg) and w_bg = N / (2·n_bg) — each class then
      carries half of the total weight. If one class is absent, both weights are 1.
    * ``None`` or ``"none"``: (1, 1).
    * a pair ``(w_background, w_foreground)`` of finite numbers ≥ 0: used as given.
    """
    if class_weights is None or (isinstance(class_weights, str) and class_weights == "none"):
        return 1.0, 1.0
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(
                f"class_weights must be 'balanced', 'none', None or a (w_background, "
                f"w_foreground) pair, got {class_weights!r}"
            )
        arr = np.asarray(labels)
        n = arr.size
        n_fg = int(np.count_nonzero(arr))
        n_bg = n - n_fg
        if n_fg == 0 or n_bg == 0:
            return 1.0, 1.0
        return n / (2.0 * n_bg), n / (2.0 * n_fg)
    pair = tuple(float(v) for v in class_weights)
    if len(pair) != 2 or not all(math.isfinite(v) and v >= 0 for v in pair):
        raise ValueError(
            f"class_weights pair must be two finite numbers ≥ 0 (w_background, "
            f"w_foreground), got {class_weights!r}"
        )
    return pair


def _border_term(
    labels: np.ndarray, d1: np.ndarray, d2: np.ndarray, w0: float, sigma: float
) -> np.ndarray:
    """w0·exp(−(d1+d2)²/(2σ²)) on background pixels, 0 on cells; float32 (H, W)."""
    term = np.zeros(labels.shape, np.float32)
    bg = labels == 0
    s = d1[bg] + d2[bg]  # inf where fewer than two cells are near: exp(−inf) = 0
    term[bg] = w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))
    return term


def _class_map(labels: np.ndarray, class_weights: ClassWeights) -> np.ndarray:
    w_bg, w_fg = class_weight_values(labels, class_weights)
    return np.where(labels > 0, np.float32(w_fg), np.float32(w_bg)).astype(np.float32)


# ------------------------------------------------------------------------ weight map
def border_weight_map(
    labels: Any,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = "balanced",
) -> np.ndarray:
    """The U-Net border weight map (Ronneberger 2015, eq. 2), float32 (H, W).

    w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / (2σ²)), where d1 and d2 are the
    Euclidean distances in pixels from x to the nearest pixel of the nearest and of the
    second-nearest cell (distinct label values > 0).

    Border term: only **background pixels** (label 0) get it, as in the paper, where it
    weights the thin background gaps separating touching cells; cell pixels get w_c only.
    With fewer than two cells in the image there is no border term.

    Class term w_c: see :func:`class_weight_values` (``"balanced"`` makes the mean of
    w_c over the image 1; the border term comes on top).

    ``sigma`` is in pixels. Speed: every cell only influences pixels within
    D = :func:`border_cutoff` (σ) ≈ 5.26 σ, because beyond that the term is below
    1e-6·w0; so each cell gets one distance transform on its bounding box grown by D,
    and the two smallest distances per pixel are kept in running arrays. The result
    differs from :func:`border_weight_map_bruteforce` by at most 1e-6·w0 (plus float32
    rounding). Cost ~ number of cells × (cell size + 2D)².

    Args:
        labels: (H, W) instance labels, integers ≥ 0 (0 = background).
        w0: border weight (dimensionless; the paper's 10).
        sigma: border width σ in pixels (the paper's 5).
        class_weights: ``"balanced"``, None (w_c = 1) or {class: weight}; see
            :func:`class_weight_values`.

    Returns:
        float32 (H, W) per-pixel loss weights.

    Raises:
        ValueError: non-2-D or non-integer/negative labels and bad parameters.
    """
    lab = _as_labels(labels)
    _check_params(w0, sigma)
    weights = _class_map(lab, class_weights)
    if w0 == 0 or lab.size == 0:
        return weights
    lab = _compact(lab)
    slices = [(i + 1, s) for i, s in enumerate(ndi.find_objects(lab)) if s is not None]
    if len(slices) < 2:
        return weights
    reach = int(math.ceil(border_cutoff(sigma)))
    h, w = lab.shape
    d1 = np.full(lab.shape, np.inf)
    d2 = np.full(lab.shape, np.inf)
    for value, (rs, cs) in slices:
        win = (
            slice(max(rs.start - reach, 0), min(rs.stop + reach, h)),
            slice(max(cs.start - reach, 0), min(cs.stop + reach, w)),
        )
        # Exact distance to this cell for every window pixel: the whole cell lies
        # inside the window; pixels outside are > reach away, i.e. negligible.
        dist = ndi.distance_transform_edt(lab[win] != value)
        a, b = d1[win], d2[win]
        np.minimum(b, np.maximum(a, dist), out=b)
        np.minimum(a, dist, out=a)
    weights += _border_term(lab, d1, d2, w0, sigma)
    return weights


def border_weight_map_bruteforce(
    labels: Any,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = "balanced",
) -> np.ndarray:
    """Reference for :func:`border_weight_map`: one whole-image EDT per cell, no cutoff.

    Same definition and return value (float32 (H, W)); slow (≈ 0.1 s per cell at
    1024×1024), meant for tests and benchmarks.
    """
    lab = _as_labels(labels)
    _check_params(w0, sigma)
    weights = _class_map(lab, class_weights)
    values = np.unique(lab[lab > 0])
    if w0 == 0 or len(values) < 2:
        return weights
    d1 = np.full(lab.shape, np.inf)
    d2 = np.full(lab.shape, np.inf)
    for value in values:
        dist = ndi.distance_transform_edt(lab != value)
        d2 = np.minimum(d2, np.maximum(d1, dist))
        d1 = np.minimum(d1, dist)
    weights += _border_term(lab, d1, d2, w0, sigma)
    return weights


# --------------------------------------------------------------------------- targets
def separate_touching(labels: Any) -> np.ndarray:
    """Labels (H, W) with a 1-px background gap between touching cells.

    A cell pixel becomes background when one of its 8 neighbours belongs to a cell with a
    *larger* label value; so the gap is cut from the lower-numbered cell, and afterwards
    no two different cells are 8-connected (a cell no more than 1-2 px thick may lose
    all its pixels where it is squeezed between higher-numbered cells). Cells touching only
    background are unchanged.
    """
    lab = _as_labels(labels)
    if lab.size == 0:
        return lab.copy()
    neighbour_max = ndi.maximum_filter(lab, size=3, mode="constant", cval=0)
    out = lab.copy()
    out[(neighbour_max > lab) & (lab > 0)] = 0
    return out


def targets_from_instances(
    labels: Any, mode: str = "3class", boundary_width: int = 1
) -> np.ndarray:
    """Class map uint8 (H, W) for training a semantic U-Net from instance ``labels``.

    * ``"3class"``: 0 background, 1 cell interior, 2 cell boundary — the rim of each
      cell where it 4-touches a *different* label or the background
      (``skimage.segmentation.find_boundaries(mode="inner")``), ``boundary_width`` pixels
      thick (the rim is peeled that many times). Touching cells are thus separated by
      boundary pixels (2 px for width 1) and their interiors are not 8-connected. The
      image edge does not count as a boundary.
    * ``"2class"``: 0 background, 1 foreground, with touching cells separated by a 1-px
      background gap (:func:`separate_touching`). For the matching weight map use
      :func:`two_class_target`.
    """
    lab = _as_labels(labels)
    if mode == "2class":
        return (separate_touching(lab) > 0).astype(np.uint8)
    if mode != "3class":
        raise ValueError(f"mode must be '3class' or '2class', got {mode!r}")
    if int(boundary_width) != boundary_width or boundary_width < 1:
        raise ValueError(f"boundary_width must be an integer ≥ 1, got {boundary_width}")
    from skimage.segmentation import find_boundaries

    target = (lab > 0).astype(np.uint8)
    current = lab.copy()
    for _ in range(int(boundary_width)):
        rim = find_boundaries(current, mode="inner") & (current > 0)
        if not rim.any():
            break
        target[rim] = 2
        current[rim] = 0
    return target


def two_class_target(
    labels: Any,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = "balanced",
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's training pair: (target uint8 (H, W) 0/1, weights float32 (H, W)).

    The target is foreground with 1-px gaps between touching cells
    (:func:`separate_touching`); the weights are :func:`border_weight_map` of the gapped
    labels, so the gap pixels (d1 = d2 = 1) get the highest border weight,
    ≈ w_bg + w0·exp(−2/σ²).
    """
    gapped = separate_touching(labels)
    return (gapped > 0).astype(np.uint8), border_weight_map(gapped, w0, sigma, class_weights)
