"""The training loop shared by the Train widget, the CLI and scripts.

``train`` fine-tunes a model in place on a list of :class:`~.data.TrainingEntry` (image,
annotation, rectangles) — or, as before, on ``image, labels, roi=`` — and reports through
a callback:

* ``{"kind": "start", "summary": TrainingSummary, ...}`` once, before the first step: how
  many images, regions, objects and pixels went in, the validation chosen (and why there is
  no score when there are too few objects), the budget, precision and threads;
* ``{"kind": "step", "step", "epoch", "loss", "elapsed", "fraction", "total_steps"}``;
* ``{"kind": "epoch", "epoch", "step", "loss", "val_f1", "val_iou", "val_objects",
  "val_note", "elapsed"}`` (``val_f1`` is None when nothing is scored).

The budget is a number of steps (``steps``, or ``epochs`` × ``steps_per_epoch``; default
10 × 20) so that the result does not depend on the machine's load; ``seconds`` adds a time
limit. Weights are only ever the last good ones: cancelling, a non-finite loss, an
exception (in the callback too) or ``KeyboardInterrupt`` restore the weights of the end of
the last completed epoch (the initial weights before the first) — never half-updated.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..inference.normalize import get_normalization
from ..metrics import object_metrics
from ..models.base import SegmentationModel, round_up
from ..postprocess import default_class_names, segment
from ..runtime import Precision, choose_precision, is_cancelled, openmp_passive, torch_threads
from .augment import Augmenter
from .data import (
    MIN_VAL_OBJECTS,
    TrainingData,
    TrainingEntry,
    TrainingSummary,
    as_entries,
    planes_of_stacks,
    prepare_entry,
    region_objects,
    sample_batch,
)
from .losses import compute_loss, default_loss_for, get_loss

DEFAULT_STEPS_PER_EPOCH = 20
DEFAULT_EPOCHS = 10
VALIDATION_MODES = ("auto", "none", "objects", "regions")


@dataclass
class TrainHistory:
    """What happened: per-step losses, per-epoch summaries, time, how it ended, the data."""

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False
    diverged: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    rois: list[tuple[int, int, int, int]] = field(default_factory=list)
    """Bounding box of the training regions per image (y0, y1, x0, x1)."""
    data: TrainingSummary = field(default_factory=TrainingSummary)
    """Images, regions, objects, pixels, validation — see :class:`TrainingSummary`."""
    error: str | None = None
    """Set when an exception ended the run (the weights were restored; it is re-raised)."""

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Compact record stored in checkpoints."""
        last = self.epochs[-1] if self.epochs else {}
        d = self.data
        return {
            "steps": len(self.losses),
            "epochs": len(self.epochs),
            "seconds": round(self.seconds, 2),
            "final_loss": last.get("loss"),
            "val_f1": last.get("val_f1"),
            "val_iou": last.get("val_iou"),
            "val_objects": d.val_objects if d.scored else 0,
            "validation": d.validation,
            "cancelled": self.cancelled,
            "data_images": d.images,
            "data_regions": d.regions,
            "data_objects": d.objects,
            "data_pixels": d.pixels,
            **self.settings,
        }


class _Stop(Exception):
    pass


def _resolve_budget(
    epochs: int | None, steps: int | None, seconds: float | None, steps_per_epoch: int
) -> int | None:
    """Total steps (None: time budget only)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
    if epochs is not None and steps is not None:
        raise ValueError("give either epochs or steps, not both")
    for name, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (int(v) != v or v < 0):
            raise ValueError(f"{name} must be a whole number ≥ 0, got {v!r}")
    if seconds is not None and not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be ≥ 0, got {seconds!r}")
    if steps is not None:
        return int(steps)
    if epochs is not None:
        return int(epochs) * steps_per_epoch
    if seconds is not None:
        return None
    return DEFAULT_EPOCHS * steps_per_epoch


def _plan_validation(
    entries: list[TrainingEntry], validation: Any, val_fraction: float
) -> tuple[str, float, bool, str]:
    """(mode, fraction to hold out, use val_regions, note when nothing is scored)."""
    if validation is None or validation is False:
        validation = "none"
    if isinstance(validation, (int, float)) and not isinstance(validation, bool):
        val_fraction, validation = float(validation), "objects"
    if validation not in VALIDATION_MODES:
        raise ValueError(
            f"validation must be one of {', '.join(VALIDATION_MODES)} or a fraction, "
            f"got {validation!r}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    has_regions = any(len(e.val_regions) for e in entries)
    if validation == "none":
        return "none", 0.0, False, "No validation (none chosen)."
    if validation == "regions" or (validation == "auto" and has_regions):
        if not has_regions:
            raise ValueError("validation='regions' but no entry has validation regions")
        return "regions", 0.0, True, ""
    if validation == "auto" and val_fraction == 0:
        return "none", 0.0, False, "No validation (held-out fraction 0)."
    if validation == "objects" and val_fraction == 0:
        raise ValueError("validation='objects' needs val_fraction > 0")
    counts = [region_objects(e) for e in entries]
    total = sum(c[0] for c in counts)
    held = sum(min(whole, max(1, round(val_fraction * n))) if whole else 0 for n, whole in counts)
    if held < MIN_VAL_OBJECTS:
        if validation == "auto":
            return (
                "none",
                0.0,
                False,
                f"No validation: {val_fraction:.0%} of {total} annotated objects is {held}, "
                f"fewer than {MIN_VAL_OBJECTS}; all objects are used for training "
                "(annotate more cells or draw a validation region).",
            )
        return "objects", val_fraction, False, ""
    return "objects", val_fraction, False, ""


def _val_note(summary: TrainingSummary) -> str:
    if summary.validation == "none":
        return summary.val_note
    n = summary.val_objects
    what = (
        "held-out objects" if summary.validation == "objects" else "objects in validation regions"
    )
    if n < MIN_VAL_OBJECTS:
        return (
            f"No validation score: {n} {what}, fewer than {MIN_VAL_OBJECTS} "
            "(a score on so few would be noise)."
        )
    return f"Validation: object F1 at IoU 0.5 on {n} {what}, never trained on."


def _validate(
    model: SegmentationModel, datasets: list[TrainingData], device: torch.device
) -> dict[str, Any]:
    """Object F1@0.5 and pixel IoU over every scored area (predicted with image context)."""
    from ..inference.predict import predict

    names = getattr(model, "class_names", None) or default_class_names(model.num_classes)
    tp = fp = fn = 0
    inter = union = 0
    for d in datasets:
        if d.val_mask is None:
            continue
        for cy0, cy1, cx0, cx1 in d.val_boxes:
            crop = d.image_np[:, cy0:cy1, cx0:cx1]
            # torch: the weights change every epoch, an optimized export would not pay off
            probs = predict(model, crop, axes="CYX", device=device, tile_size=1024, runtime="torch")
            pred = segment(probs, class_names=names)
            gt = d.val_labels[cy0:cy1, cx0:cx1]
            scored = d.val_mask[cy0:cy1, cx0:cx1]
            m = object_metrics(gt, pred, exclude=~scored)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
            g, p = gt[scored] > 0, pred[scored] > 0
            inter += int((g & p).sum())
            union += int((g | p).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"val_f1": f1, "val_iou": inter / union if union else 1.0, "tp": tp, "fp": fp, "fn": fn}


def train(
    model: SegmentationModel,
    image: Any,
    labels: Any = None,
    *,
    roi: Any = None,
    loss: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    seconds: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 4,
    patch_size: int = 128,
    validation: str | float | None = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    threads: int | None = None,
    optimizer: str = "adamw",
    schedule: str = "cosine",
    augment: bool | dict[str, Any] = True,
    steps_per_epoch: int = DEFAULT_STEPS_PER_EPOCH,
    callback: Callable[[dict[str, Any]], None] | None = None,
    cancel: Any = None,
) -> TrainHistory:
    """Train ``model`` in place and return the history (the model ends on the device it
    started on, in eval mode).

    Data: ``image`` a :class:`TrainingEntry` or a list of them (several images, each with
    any number of rectangles and optional validation rectangles), or — as before —
    ``image`` (Y, X)/(C, Y, X) array(s), ``labels`` instance labels (0 = unlabelled) and
    ``roi`` rectangle(s) (y0, y1, x0, x1); see :func:`~.data.as_entries`. Pixels outside
    every rectangle are ignored by the loss; with no rectangle the region is the
    annotations' bounding box + 16 px.

    Budget: ``steps``, or ``epochs`` of ``steps_per_epoch`` steps (default 10 epochs);
    ``seconds`` adds a time limit (alone: time only). ``epochs=0``/``steps=0`` train
    nothing (the model is unchanged).

    Validation: ``"auto"`` (validation regions when given, else ``val_fraction`` of the
    objects held out when that is at least 5 objects, else none — the start summary says
    why), ``"none"``, ``"objects"`` (hold out ``val_fraction`` of the objects), a float
    (that fraction) or ``"regions"`` (``TrainingEntry.val_regions``). No score is
    reported on fewer than 5 objects.

    ``precision``: "auto" (bf16 autocast on CUDA and on CPUs with bf16 matrix units),
    "bf16" or "fp32". ``threads``: torch CPU threads for this run (None: the policy of
    :func:`napari_unet.runtime.choose_threads`); restored afterwards.
    ``loss``: a preset of :func:`~.losses.get_loss`; None (default): the one the
    variant's paper prescribes, :func:`~.losses.default_loss_for`. ``optimizer``: "adamw" or "sgd".
    ``cancel`` (Event or callable) stops within one step, keeping the last good weights.
    ``schedule``: "cosine" (with a step budget, the learning rate decays from ``lr`` to 0
    along a half cosine, so that the weights settle at the end of the budget) or
    "constant" (also used for a time-only budget).
    Deterministic on the CPU for a given ``seed`` and thread count (with a step budget).
    """
    from ..runtime import select_device

    total_steps = _resolve_budget(epochs, steps, seconds, steps_per_epoch)
    preset = get_loss(default_loss_for(model) if loss is None else loss)
    dev, dev_why = select_device(device)
    prec = choose_precision(dev, precision)
    entries = planes_of_stacks(as_entries(image, labels, roi), model.in_channels)
    if not entries:
        raise ValueError("no training data given")
    mode, fraction, use_regions, note = _plan_validation(entries, validation, val_fraction)
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if not getattr(model, "normalization", None):
        model.normalization = get_normalization(model)
    if not getattr(model, "class_names", None):
        model.class_names = default_class_names(model.num_classes)

    rng = np.random.default_rng(seed)
    datasets = [
        prepare_entry(
            e,
            num_classes=model.num_classes,
            in_channels=model.in_channels,
            norm=model.normalization,
            weight_map=preset.name == "ce",
            device=dev,
            val_fraction=fraction,
            use_val_regions=use_regions,
            rng=rng,
        )
        for e in entries
    ]
    summary = TrainingSummary(
        images=len(datasets),
        regions=sum(len(d.rois) for d in datasets),
        objects=sum(d.objects for d in datasets),
        pixels=sum(len(d.known) for d in datasets),
        validation=mode,
        val_objects=sum(d.val_objects for d in datasets),
        val_pixels=sum(int(d.val_mask.sum()) for d in datasets if d.val_mask is not None),
        val_note=note,
        per_image=[
            {
                "name": d.name,
                "shape": tuple(d.labels.shape),
                "regions": d.rois,
                "objects": d.objects,
                "pixels": len(d.known),
                "val_objects": d.val_objects,
            }
            for d in datasets
        ],
        steps=total_steps,
        seconds=seconds,
        precision=prec.name,
        device=dev_why,
    )
    summary.val_note = _val_note(summary)
    if not all(len(d.known) for d in datasets):
        raise ValueError("a training image has no trainable pixel left after validation")

    patch = round_up(max(patch_size, model.size_divisor), model.size_divisor)
    if model.border > 0:
        patch = model.legal_size(patch)
    history = TrainHistory(
        settings={
            "loss": preset.name,
            "lr": lr,
            "batch_size": batch_size,
            "patch_size": patch,
            "optimizer": optimizer,
            "schedule": schedule if total_steps else "constant",
            "seed": seed,
            "images": len(datasets),
            "precision": prec.name,
        },
        data=summary,
    )
    history.rois = [d.roi for d in datasets]
    with torch_threads(threads if dev.type == "cpu" else torch.get_num_threads()) as n:
        summary.threads = n if dev.type == "cpu" else None
        history.settings["threads"] = summary.threads
        history.settings["openmp_wait"] = "passive" if openmp_passive() else "default"
        _loop(
            model,
            datasets,
            history,
            dev=dev,
            prec=prec,
            preset=preset,
            total_steps=total_steps,
            seconds=seconds,
            lr=lr,
            batch_size=batch_size,
            patch=patch,
            seed=seed,
            optimizer=optimizer,
            schedule=schedule,
            augment=augment,
            steps_per_epoch=steps_per_epoch,
            callback=callback,
            cancel=cancel,
        )
    model.training_summary = history.summary()
    return history


def _loop(
    model: SegmentationModel,
    datasets: list[TrainingData],
    history: TrainHistory,
    *,
    dev: torch.device,
    prec: Precision,
    preset: Any,
    total_steps: int | None,
    seconds: float | None,
    lr: float,
    batch_size: int,
    patch: int,
    seed: int,
    optimizer: str,
    schedule: str,
    augment: bool | dict[str, Any],
    steps_per_epoch: int,
    callback: Callable[[dict[str, Any]], None] | None,
    cancel: Any,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    aug = None
    if augment:
        kwargs = augment if isinstance(augment, dict) else {}
        aug = Augmenter(generator=torch.Generator().manual_seed(seed + 1), **kwargs)
    home = next(model.parameters()).device
    model.to(dev)
    good = copy.deepcopy(model.state_dict())
    scored = history.data.scored
    start = time.perf_counter()
    step = epoch = 0
    epoch_losses: list[float] = []

    def end_epoch() -> None:
        nonlocal epoch, epoch_losses
        epoch += 1
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(epoch_losses)) if epoch_losses else None,
            "val_f1": None,
            "val_iou": None,
            "val_objects": history.data.val_objects if scored else 0,
            "val_note": history.data.val_note,
        }
        if scored:
            model.eval()
            record.update(_validate(model, datasets, dev))
            model.train()
        record["elapsed"] = time.perf_counter() - start
        history.epochs.append(record)
        epoch_losses = []
        if callback is not None:
            callback({"kind": "epoch", **record})

    try:
        if callback is not None:
            callback({"kind": "start", "summary": history.data, **history.data.to_dict()})
        if total_steps == 0:
            raise _Stop
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.99)
        while True:
            if is_cancelled(cancel):
                history.cancelled = True
                raise _Stop
            if seconds is not None and time.perf_counter() - start >= seconds:
                raise _Stop
            if total_steps is not None and step >= total_steps:
                raise _Stop
            data = datasets[int(torch.randint(len(datasets), (1,), generator=gen))]
            x, t, ign, wgt = sample_batch(data, batch_size, patch, gen)
            if aug is not None:
                x, t, ign, wgt = aug(x, t, ign, wgt)
            x, t, ign, wgt = (
                v if v is None else v.to(dev, non_blocking=True) for v in (x, t, ign, wgt)
            )
            with torch.autocast(dev.type, dtype=prec.dtype, enabled=prec.autocast):
                value = compute_loss(model, x, t, wgt, ign, loss=preset)
            loss_value = float(value.detach())
            if not math.isfinite(loss_value):
                history.diverged = True
                warnings.warn(
                    "training loss is not finite; keeping the last good weights",
                    RuntimeWarning,
                    stacklevel=3,
                )
                raise _Stop
            opt.zero_grad(set_to_none=True)
            value.backward()
            if schedule == "cosine" and total_steps:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            opt.step()
            step += 1
            history.losses.append(loss_value)
            epoch_losses.append(loss_value)
            if callback is not None:
                elapsed = time.perf_counter() - start
                fraction = step / total_steps if total_steps else 0.0
                if seconds is not None:
                    fraction = max(fraction, min(1.0, elapsed / seconds)) if seconds else 1.0
                callback(
                    {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_value,
                        "elapsed": elapsed,
                        "fraction": fraction,
                        "total_steps": total_steps,
                    }
                )
            if step % steps_per_epoch == 0 or step == total_steps:
                end_epoch()
                good = copy.deepcopy(model.state_dict())
    except _Stop:
        if history.cancelled or history.diverged:
            model.load_state_dict(good)
        elif epoch_losses:  # time budget ended mid-epoch: these steps completed normally
            end_epoch()
    except BaseException as exc:  # callback error, KeyboardInterrupt: never half-updated
        model.load_state_dict(good)
        history.error = f"{type(exc).__name__}: {exc}"
        history.seconds = time.perf_counter() - start
        model.eval().to(home)
        raise
    history.seconds = time.perf_counter() - start
    model.eval().to(home)
