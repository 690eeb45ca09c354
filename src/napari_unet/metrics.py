"""Segmentation metrics used by tests, benchmarks and the Train widget's validation."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every gt object and every predicted object.

    Returns ``(iou (n_gt, n_pred), gt_ids, pred_ids)``; label 0 is background.
    """
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    gt_ids, gt_inv = np.unique(gt, return_inverse=True)
    pr_ids, pr_inv = np.unique(pred, return_inverse=True)
    overlap = np.zeros((len(gt_ids), len(pr_ids)), dtype=np.int64)
    np.add.at(overlap, (gt_inv, pr_inv), 1)
    area_gt = overlap.sum(axis=1, keepdims=True)
    area_pr = overlap.sum(axis=0, keepdims=True)
    union = area_gt + area_pr - overlap
    iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
    keep_g = gt_ids != 0
    keep_p = pr_ids != 0
    return iou[np.ix_(keep_g, keep_p)], gt_ids[keep_g], pr_ids[keep_p]


def object_metrics(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    exclude: np.ndarray | None = None,
) -> dict[str, Any]:
    """Object precision / recall / F1 at an IoU threshold, and mean matched IoU.

    Objects are matched one-to-one (Hungarian on IoU) and a match counts when its IoU
    ≥ ``iou_threshold``. ``exclude`` (bool mask): ground-truth objects touching it are
    not scored, and neither are predicted objects lying mostly inside it or matching
    an excluded ground-truth object best.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and prediction {pred.shape} differ in shape")
    iou, gt_ids, pr_ids = iou_matrix(gt, pred)
    keep_g = np.ones(len(gt_ids), bool)
    keep_p = np.ones(len(pr_ids), bool)
    if exclude is not None:
        touching = np.unique(gt[exclude & (gt > 0)])
        keep_g = ~np.isin(gt_ids, touching)
        inside = np.bincount(pred[exclude].ravel(), minlength=int(pred.max()) + 1)
        total = np.bincount(pred.ravel(), minlength=int(pred.max()) + 1)
        keep_p = inside[pr_ids] <= 0.5 * total[pr_ids]
        if iou.size:
            best_gt = iou.argmax(axis=0)
            keep_p &= ~((iou.max(axis=0) > 0) & ~keep_g[best_gt])
    iou = iou[np.ix_(keep_g, keep_p)]
    n_gt, n_pred = iou.shape
    matched = np.zeros(0)
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        matched = iou[rows, cols]
        matched = matched[matched >= iou_threshold]
    tp = len(matched)
    fp, fn = n_pred - tp, n_gt - tp
    precision = tp / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0)
    recall = tp / n_gt if n_gt else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_matched_iou": float(matched.mean()) if tp else 0.0,
    }


def pixel_iou(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """IoU of the foreground (label > 0) of two label images, optionally inside ``mask``."""
    g = np.asarray(gt) > 0
    p = np.asarray(pred) > 0
    if mask is not None:
        g, p = g[mask], p[mask]
    union = np.logical_or(g, p).sum()
    return float(np.logical_and(g, p).sum() / union) if union else 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2·|A∩B| / (|A| + |B|) of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
