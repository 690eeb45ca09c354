"""segment(): ideal probabilities give back the annotated instances; metrics by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.metrics import object_metrics, pixel_iou
from napari_unet.postprocess import segment
from napari_unet.weightmap import targets_from_instances


def test_ideal_three_class_probabilities_recover_the_nuclei(nuclei):
    _, labels = nuclei
    target = targets_from_instances(labels, mode="3class")
    probs = np.stack([(target == k).astype(np.float32) for k in range(3)])
    seg = segment(probs)
    assert seg.dtype == np.uint32
    m = object_metrics(labels, seg)
    assert m["f1"] >= 0.95 and m["mean_matched_iou"] >= 0.95


def test_two_class_and_one_class_paths_split_touching_discs():
    yy, xx = np.mgrid[:60, :100]
    a = (yy - 30) ** 2 + (xx - 35) ** 2 <= 15**2
    b = (yy - 30) ** 2 + (xx - 63) ** 2 <= 15**2  # overlapping discs: one blob with a neck
    fg = (a | b).astype(np.float32)
    assert segment(np.stack([1 - fg, fg])).max() == 2
    assert segment(fg[None]).max() == 2
    semantic = segment(np.stack([1 - fg, fg]), mode="semantic")
    np.testing.assert_array_equal(semantic, fg.astype(np.uint32))


def test_stacks_get_unique_ids_and_small_objects_go():
    fg = np.zeros((2, 40, 40), np.float32)
    fg[:, 5:15, 5:15] = 1
    fg[1, 30:32, 30:32] = 1  # 4 pixels < min_size
    seg = segment(np.stack([1 - fg, fg]), min_size=10)
    assert seg[0].max() == 1 and set(np.unique(seg[1])) == {0, 2}


def test_bad_probabilities():
    with pytest.raises(ValueError, match="C, ..., Y, X"):
        segment(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="class names"):
        segment(np.zeros((2, 4, 4)), class_names=["a"])


def test_object_metrics_by_hand():
    gt = np.zeros((10, 20), np.uint16)
    gt[0:4, 0:4] = 1  # matched exactly
    gt[5:9, 5:9] = 2  # half covered -> IoU 8/16 = 0.5 (counts at ≥ 0.5)
    gt[0:3, 15:18] = 3  # missed
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 7
    pred[5:9, 5:7] = 8
    pred[8:10, 12:14] = 9  # false positive
    m = object_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["mean_matched_iou"] == pytest.approx(0.75)
    exclude = np.zeros(gt.shape, bool)
    exclude[0, 16] = True  # drops gt 3 from scoring
    assert object_metrics(gt, pred, exclude=exclude)["fn"] == 0
    assert pixel_iou(gt, pred) == pytest.approx((16 + 8) / (16 + 16 + 9 + 4))
