"""Border weight map (fast vs brute force, formula, balancing) and training targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import ellipse

from napari_unet.weightmap import (
    border_cutoff,
    border_weight_map,
    border_weight_map_bruteforce,
    class_weight_values,
    separate_touching,
    targets_from_instances,
    two_class_target,
)


def _random_ellipses(seed: int, shape: tuple[int, int] = (48, 56), n: int = 8) -> np.ndarray:
    """Ellipses that may touch (a later cell only fills free pixels) and may cross edges."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(2, 7, 2)
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(0, 3))
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = k
    return labels


def _layouts() -> dict[str, np.ndarray]:
    touching = np.zeros((30, 40), np.uint16)
    touching[5:20, 5:15] = 1
    touching[5:20, 15:25] = 2  # shares an edge with 1
    touching[21:28, 10:30] = 3  # 1-px background gap to 1 and 2
    single = np.zeros((25, 25), np.int64)
    single[8:14, 9:20] = 4
    borders = np.zeros((32, 32), np.int32)
    borders[:6, :6] = 1
    borders[-5:, -9:] = 2
    borders[10:20, -3:] = 3
    borders[-1, :4] = 4
    sparse = np.zeros((30, 30), np.int32)
    sparse[3:8, 3:8] = 5
    sparse[20:26, 18:27] = 900  # non-consecutive label values
    sparse[12:14, 25:30] = 5  # label 5 split into two pieces
    return {
        "touching": touching,
        "single": single,
        "empty": np.zeros((20, 24), np.uint8),
        "borders": borders,
        "sparse": sparse,
        **{f"random{s}": _random_ellipses(s) for s in range(3)},
    }


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize(("w0", "sigma"), [(10.0, 5.0), (5.0, 1.5), (1.0, 12.0)])
def test_fast_equals_bruteforce(name: str, w0: float, sigma: float) -> None:
    labels = _layouts()[name]
    fast = border_weight_map(labels, w0, sigma)
    brute = border_weight_map_bruteforce(labels, w0, sigma)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    assert np.abs(fast - brute).max() <= 1e-4


def test_formula_two_cells() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[:, :5] = 1  # columns 0..4
    labels[:, 15:20] = 2  # columns 15..19
    w0, sigma = 10.0, 5.0
    w = border_weight_map(labels, w0, sigma, class_weights=None)
    d1, d2 = 10 - 4, 15 - 10  # pixel (7, 10): 6 px to cell 1, 5 px to cell 2
    assert w[7, 10] == pytest.approx(
        1 + w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), rel=1e-6
    )
    # Right of cell 2: nearest is cell 2 (3 px), second is cell 1 (22 - 4 = 18 px).
    assert w[3, 22] == pytest.approx(1 + w0 * math.exp(-((3 + 18) ** 2) / (2 * sigma**2)), rel=1e-5)
    assert np.all(w[labels > 0] == 1.0)  # cells get no border term
    only_one = np.where(labels == 1, 1, 0)
    assert np.all(border_weight_map(only_one, w0, sigma, class_weights=None) == 1.0)


def test_class_weight_balancing() -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[:2, :] = 1  # 20 foreground, 80 background pixels
    w_bg, w_fg = class_weight_values(labels, "balanced")
    assert (w_bg, w_fg) == pytest.approx((100 / 160, 100 / 40))
    wc = border_weight_map(labels, w0=0.0)
    assert wc.mean() == pytest.approx(1.0)
    assert wc[labels > 0].sum() == pytest.approx(wc[labels == 0].sum())
    assert np.all(border_weight_map(labels, class_weights=None) == 1.0)
    assert np.all(border_weight_map(labels, class_weights="none") == 1.0)
    custom = border_weight_map(labels, class_weights=(0.5, 3.0))
    assert set(np.unique(custom).tolist()) == {0.5, 3.0}
    assert class_weight_values(np.zeros((4, 4), int)) == (1.0, 1.0)
    assert class_weight_values(np.ones((4, 4), int)) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros((4, 4, 4), int), {}, "2-D"),
        (np.zeros(5, int), {}, "2-D"),
        (np.zeros((4, 4), float), {}, "integer"),
        (np.zeros((4, 4), bool), {}, "integer"),
        (np.full((4, 4), -1), {}, "≥ 0"),
        (np.zeros((4, 4), int), {"sigma": 0.0}, "sigma"),
        (np.zeros((4, 4), int), {"w0": -1.0}, "w0"),
        (np.zeros((4, 4), int), {"class_weights": "inverse"}, "class_weights"),
        (np.zeros((4, 4), int), {"class_weights": (1.0, 2.0, 3.0)}, "class_weights"),
    ],
)
def test_validation(labels: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        border_weight_map(labels, **kwargs)
    with pytest.raises(ValueError, match=match):
        border_weight_map_bruteforce(labels, **kwargs)


def test_cutoff_bounds_the_dropped_term() -> None:
    d = border_cutoff(3.0)
    assert math.exp(-(d**2) / (2 * 3.0**2)) == pytest.approx(1e-6)


def _two_touching() -> np.ndarray:
    labels = np.zeros((20, 30), np.int32)
    labels[4:16, 3:14] = 1
    labels[4:16, 14:26] = 2
    return labels


def test_three_class_separates_touching_cells() -> None:
    labels = _two_touching()
    target = targets_from_instances(labels, "3class")
    assert target.dtype == np.uint8 and set(np.unique(target).tolist()) == {0, 1, 2}
    assert np.all(target[labels == 0] == 0) and np.all(target[labels > 0] > 0)
    assert np.all(target[4:16, 13:15] == 2)  # both sides of the contact are boundary
    _, n = ndi.label(target == 1, structure=np.ones((3, 3)))
    assert n == 2
    thick = targets_from_instances(labels, "3class", boundary_width=2)
    assert np.count_nonzero(thick == 2) > np.count_nonzero(target == 2)
    assert np.all(thick[6:14, 5:12] == 1) and np.all(thick[4:16, 12:16] == 2)
    with pytest.raises(ValueError, match="boundary_width"):
        targets_from_instances(labels, "3class", boundary_width=0)
    with pytest.raises(ValueError, match="mode"):
        targets_from_instances(labels, "4class")


def test_two_class_gap_and_weights() -> None:
    labels = _two_touching()
    gapped = separate_touching(labels)
    assert np.all(gapped[4:16, 13] == 0)  # 1-px gap cut from the lower label
    assert np.array_equal(gapped == 2, labels == 2)
    _, n = ndi.label(gapped > 0, structure=np.ones((3, 3)))
    assert n == 2
    target = targets_from_instances(labels, "2class")
    assert np.array_equal(target, (gapped > 0).astype(np.uint8))
    tgt, w = two_class_target(labels, w0=10.0, sigma=5.0)
    assert np.array_equal(tgt, target) and w.dtype == np.float32
    w_bg, _ = class_weight_values(gapped)
    assert w[10, 13] == pytest.approx(w_bg + 10.0 * math.exp(-4 / 50), rel=1e-5)
    assert w[10, 13] == w.max()
