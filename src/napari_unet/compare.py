"""Compare models on an annotated image: one table, best first, one row per depth.

:func:`compare_models` runs each model on the image (or on each annotated region with
some context around it), turns every output into instances with
:func:`napari_unet.postprocess.segment` and scores it against the labels with
:func:`napari_unet.metrics.object_metrics` — the same functions the tests, the
benchmarks and training validation use. Deep-supervised models give one row per
output: UNet++ ``L1..L4`` (each a pruned network, timed on its own), UNet 3+
``d1..d5`` and U²-Net ``side1..side6`` + ``fuse`` (one forward gives every head, so
they share its time). Used by ``napari-unet compare`` and the Compare widget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .metrics import object_metrics
from .models.base import SegmentationModel, count_parameters
from .postprocess import segment
from .runtime import is_cancelled

AP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
CONTEXT = 32
"""Pixels of image context predicted around each region (not scored)."""

Roi = tuple[int, int, int, int]


@dataclass
class CompareRow:
    """Scores of one model output on the annotated region(s)."""

    name: str
    """Model name as given (bundled name, file or label)."""
    output: str
    """``final``, or the head: ``L1``..``L4``, ``d1``..``d5``, ``side1``..``fuse``."""
    level: int | None
    """UNet++ pruning level of this row (None otherwise)."""
    final: bool
    """True for the output ``forward`` returns."""
    f1: float
    mean_iou: float
    ap: float | None
    """AP@0.5:0.95: mean over IoU thresholds 0.5..0.95 of TP / (TP + FP + FN)."""
    precision: float
    recall: float
    n_gt: int
    n_pred: int
    seconds: float
    """Wall time of the prediction (all regions), excluding post-processing."""
    parameters: int
    """Parameters used by this output (a pruned UNet++ uses fewer)."""
    model: Any = field(default=None, repr=False, compare=False)
    """The model object (to select it); not part of :meth:`as_dict`."""
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Predicted instances at the labels' size (0 outside the predicted windows) when
    ``keep_labels``; not part of :meth:`as_dict`."""

    @property
    def label(self) -> str:
        return self.name if self.output == "final" else f"{self.name} {self.output}"

    def as_dict(self) -> dict[str, Any]:
        skip = ("model", "labels")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**out, "label": self.label}


def head_names(model: SegmentationModel) -> list[str]:
    """Name of every ``forward_all`` output, in that order (``model.output_names``)."""
    return model.output_names


def _windows(shape: tuple[int, int], rois: Sequence[Roi] | None) -> list[tuple[Roi, Roi]]:
    """(crop with context, region) per region, in image coordinates."""
    h, w = shape
    if not rois:
        return [((0, h, 0, w), (0, h, 0, w))]
    out = []
    for y0, y1, x0, x1 in rois:
        y0, y1, x0, x1 = max(0, int(y0)), min(h, int(y1)), max(0, int(x0)), min(w, int(x1))
        if y1 <= y0 or x1 <= x0:
            raise ValueError(f"region {(y0, y1, x0, x1)} is empty or outside the {h}×{w} image")
        crop = (
            max(0, y0 - CONTEXT),
            min(h, y1 + CONTEXT),
            max(0, x0 - CONTEXT),
            min(w, x1 + CONTEXT),
        )
        out.append((crop, (y0, y1, x0, x1)))
    return out


def _score(
    gt_crops: list[np.ndarray],
    pred_crops: list[np.ndarray],
    excludes: list[np.ndarray | None],
    ap: bool,
) -> dict[str, Any]:
    """Counts pooled over regions → F1, precision, recall, mean matched IoU, AP."""
    thresholds = AP_THRESHOLDS if ap else (0.5,)
    tot = {t: np.zeros(3, int) for t in thresholds}  # tp, fp, fn
    iou_sum, n_gt, n_pred = 0.0, 0, 0
    for gt, pred, exclude in zip(gt_crops, pred_crops, excludes):
        for t in thresholds:
            m = object_metrics(gt, pred, iou_threshold=t, exclude=exclude)
            tot[t] += (m["tp"], m["fp"], m["fn"])
            if t == 0.5:
                iou_sum += m["mean_matched_iou"] * m["tp"]
                n_gt += m["n_gt"]
                n_pred += m["n_pred"]
    tp, fp, fn = (int(v) for v in tot[0.5])
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    ap_value = None
    if ap:
        ap_value = float(
            np.mean([c[0] / c.sum() if c.sum() else 1.0 for c in (tot[t] for t in thresholds)])
        )
    return {
        "f1": float(f1),
        "mean_iou": float(iou_sum / tp) if tp else 0.0,
        "ap": ap_value,
        "precision": tp / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0),
        "recall": tp / n_gt if n_gt else 1.0,
        "n_gt": n_gt,
        "n_pred": n_pred,
    }


def _resolve(model: Any, device: str) -> SegmentationModel:
    """A model object; a bundled name (trained weights); a checkpoint or package path."""
    if isinstance(model, SegmentationModel):
        return model
    if isinstance(model, str) and not model.endswith(".safetensors"):
        from .models.pretrained import load_pretrained

        return load_pretrained(model, device=device)
    from .loader import load_model

    return load_model(model)


def _as_plane(image: Any) -> np.ndarray:
    return np.asarray(image)


def _check_inputs(image: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (Y, X), got shape {labels.shape}")
    image = _as_plane(image)
    if tuple(image.shape[-2:]) != labels.shape and not (
        image.ndim == 3 and image.shape[:2] == labels.shape
    ):
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in size")
    return image, labels


def _crops(image: np.ndarray, labels: np.ndarray, windows: list[tuple[Roi, Roi]]) -> tuple:
    """(image crops, ground-truth crops, exclude masks) of each (crop, region) window: the
    objects outside the region (in the context margin) are excluded from scoring."""
    yx_last = tuple(image.shape[-2:]) == labels.shape
    images, gt_crops, excludes = [], [], []
    for (cy0, cy1, cx0, cx1), (y0, y1, x0, x1) in windows:
        images.append(image[..., cy0:cy1, cx0:cx1] if yx_last else image[cy0:cy1, cx0:cx1])
        gt_crops.append(labels[cy0:cy1, cx0:cx1])
        if (cy0, cy1, cx0, cx1) == (y0, y1, x0, x1):
            excludes.append(None)
        else:
            ex = np.ones((cy1 - cy0, cx1 - cx0), bool)
            ex[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = False
            excludes.append(ex)
    return images, gt_crops, excludes


Output = tuple[str, "int | None", bool, list[np.ndarray], float, int]
"""(output name, level, final?, probabilities per window, seconds, parameters)."""


def _predict_outputs(
    model: SegmentationModel, crops: list[np.ndarray], heads: bool, axes: str | None, device: str
) -> list[Output]:
    """Every output of ``model`` on the crops: UNet++ levels (each timed on its own), the
    heads of one forward (sharing its time), or the final output alone. Times leave out
    a one-off OpenVINO export (:class:`~napari_unet.runtime.RunClock`)."""
    n_params = count_parameters(model)
    multi = heads and model.num_outputs > 1
    outputs: list[Output] = []
    if multi and model.supports_levels:
        for level in range(1, model.num_outputs + 1):
            probs, seconds = _timed(model, crops, axes=axes, device=device, level=level)
            outputs.append(
                (f"L{level}", level, level == model.num_outputs, probs, seconds,
                 int(model.level_parameters(level)))
            )  # fmt: skip
    elif multi:
        per_window, seconds = _timed(model, crops, axes=axes, device=device, outputs="all")
        final_idx = model.final_index % model.num_outputs
        for k, head in enumerate(head_names(model)):
            probs = [all_heads[k] for _, all_heads in per_window]
            outputs.append((head, None, k == final_idx, probs, seconds, n_params))
    else:
        probs, seconds = _timed(model, crops, axes=axes, device=device)
        outputs.append(("final", None, True, probs, seconds, n_params))
    return outputs


def _timed(model: SegmentationModel, crops: list[np.ndarray], **kwargs: Any) -> tuple:
    """(``predict`` of each crop, seconds of their windows in all)."""
    from .inference.predict import predict
    from .runtime import RunClock

    results, seconds = [], 0.0
    for crop in crops:
        clock = RunClock()
        results.append(predict(model, crop, stage=clock, **kwargs))
        seconds += clock.since_run()
    return results, seconds


def _kept_labels(
    shape: tuple[int, int], windows: list[tuple[Roi, Roi]], preds: list[np.ndarray]
) -> np.ndarray:
    """The predicted instances of every window in one (Y, X) uint32 image, ids unique."""
    kept = np.zeros(shape, np.uint32)
    offset = 0
    for ((cy0, cy1, cx0, cx1), _), pred in zip(windows, preds):
        kept[cy0:cy1, cx0:cx1] = np.where(pred > 0, pred + offset, 0)
        offset += int(pred.max())
    return kept


def compare_models(
    models: Mapping[str, Any] | Sequence[str] | None,
    image: Any,
    labels: Any,
    *,
    rois: Sequence[Roi] | None = None,
    heads: bool = True,
    ap: bool = True,
    device: str = "cpu",
    axes: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: Any = None,
    keep_labels: bool = False,
) -> list[CompareRow]:
    """Score each model on ``image`` against instance ``labels``; rows sorted best first.

    Args:
        models: ``{label: model object | bundled name | checkpoint path}``, a list of
            bundled names/paths, or None for every bundled trained variant.
        image: the image, ``(Y, X)``, ``(C, Y, X)`` or ``(Y, X, C)`` (``axes`` when ambiguous).
        labels: ``(Y, X)`` integer instance labels, the ground truth (0 = background).
        rois: regions ``(y0, y1, x0, x1)`` in pixels to score (default: the whole image);
            each is predicted with :data:`CONTEXT` pixels of image around it and only
            ground-truth objects inside it count (objects touching its edge are not
            scored, see ``object_metrics(exclude=)``).
        heads: one row per deep-supervision output.
        ap: also compute AP@0.5:0.95 (slower).
        device: where the models run.
        axes: the image's axes when ambiguous.
        progress: ``progress(done, total, label)`` after each model.
        cancel: an Event or callable; stops between models with
            :class:`napari_unet.Cancelled`.
        keep_labels: each row keeps its predicted instances (``row.labels``, uint32 (Y, X)).

    Returns:
        :class:`CompareRow` list sorted by F1@0.5, then mean IoU, then speed (seconds).
    """
    from .models.pretrained import list_pretrained
    from .runtime import Cancelled

    image, labels = _check_inputs(image, labels)
    if models is None:
        models = {c.name: c.name for c in list_pretrained()}
    elif not isinstance(models, Mapping):
        models = {str(m): m for m in models}
    windows = _windows(labels.shape, rois)
    crops, gt_crops, excludes = _crops(image, labels, windows)
    rows: list[CompareRow] = []
    items = list(models.items())
    for done, (name, spec) in enumerate(items):
        if is_cancelled(cancel):
            raise Cancelled("compare cancelled")
        model = _resolve(spec, device)
        names = model.class_names
        for out_name, level, final, probs, seconds, params in _predict_outputs(
            model, crops, heads, axes, device
        ):
            preds = [segment(p, class_names=names) for p in probs]
            s = _score(gt_crops, preds, excludes, ap)
            kept = _kept_labels(labels.shape, windows, preds) if keep_labels else None
            rows.append(
                CompareRow(
                    name=name,
                    output=out_name,
                    level=level,
                    final=final,
                    seconds=round(seconds, 3),
                    parameters=params,
                    model=model,
                    labels=kept,
                    **s,
                )  # fmt: skip
            )
        if progress is not None:
            progress(done + 1, len(items), name)
    rows.sort(key=lambda r: (-r.f1, -r.mean_iou, r.seconds))
    return rows


def format_rows(rows: Sequence[CompareRow]) -> str:
    """Plain-text table of :func:`compare_models` rows."""
    from .models.summary import align_columns

    header = ("#", "model", "F1@0.5", "mean IoU", "AP@.5:.95", "P", "R", "objects", "s", "params")
    lines = [
        (
            str(i),
            r.label + (" *" if r.final and r.output != "final" else ""),
            f"{r.f1:.3f}",
            f"{r.mean_iou:.3f}",
            "-" if r.ap is None else f"{r.ap:.3f}",
            f"{r.precision:.3f}",
            f"{r.recall:.3f}",
            f"{r.n_pred}/{r.n_gt}",
            f"{r.seconds:.2f}",
            f"{r.parameters / 1e6:.2f}M",
        )
        for i, r in enumerate(rows, start=1)
    ]
    return align_columns(header, lines)
