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
from ..postprocess import segment
from ..runtime import (
    Precision,
    choose_precision,
    is_cancelled,
    openmp_passive,
    select_device,
    torch_threads,
)
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
from .losses import LossPreset, compute_loss, default_loss_for, get_loss

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

    def summary(self, trained_on: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """Compact record stored in checkpoints (``trained_on``: of earlier runs)."""
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
            "trained_on": d.trained_on(trained_on),
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
    if held < MIN_VAL_OBJECTS:  # too few to score: holding them out would only waste them
        return (
            "none",
            0.0,
            False,
            f"No validation: {val_fraction:.0%} of {total} annotated objects is {held}, "
            f"fewer than {MIN_VAL_OBJECTS}; all objects are used for training "
            "(annotate more cells or draw a validation region).",
        )
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

    names = model.class_names
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


@dataclass(frozen=True)
class _Options:
    """How a run optimises (see :func:`train`): device, precision, loss, budget, optimizer."""

    dev: torch.device
    prec: Precision
    preset: LossPreset
    total_steps: int | None
    seconds: float | None
    steps_per_epoch: int
    lr: float
    optimizer: str
    schedule: str


@dataclass(frozen=True)
class _Sampling:
    """What each step sees: ``batch_size`` patches of ``patch``² pixels, seeded, augmented."""

    batch_size: int
    patch: int
    seed: int
    augment: bool | dict[str, Any]


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
    """Fine-tune ``model`` in place; it ends on the device it started on, in eval mode, with
    the last good weights (module docstring). Deterministic on the CPU for a given ``seed``
    and thread count with a step budget.

    Args:
        model: the network; its ``normalization`` is pinned (the default when unset) and
            its ``training_summary`` set at the end.
        image: a :class:`TrainingEntry` or a list of them, or (as before) ``(Y, X)`` /
            ``(C, Y, X)`` array(s) with ``C = model.in_channels`` (:func:`~.data.as_entries`).
        labels, roi: with arrays: ``(Y, X)`` integer instance labels (0 = unlabelled) and
            rectangle(s) ``(y0, y1, x0, x1)`` in pixels (default: the annotations' bounding
            box + 16 px); the loss ignores pixels outside every rectangle.
        loss: a :func:`~.losses.get_loss` preset; None: :func:`~.losses.default_loss_for`.
        epochs, steps, seconds: the budget: ``steps``, or ``epochs`` × ``steps_per_epoch``
            (default 10 × 20; 0 trains nothing); ``seconds`` (wall time) adds a limit.
        lr, batch_size, patch_size: peak learning rate; patches per step; patch side in
            pixels, rounded up to a size the model takes whole (a valid U-Net: the side
            of its output; the input adds ``2·model.border`` of mirrored context).
        validation, val_fraction: "auto" (validation regions, else ``val_fraction`` in
            [0, 1) of the objects when that is ≥ 5, else none), "none", "objects",
            "regions" or a fraction; no score on fewer than 5 objects.
        seed: seeds the patch sampling, the augmentation and torch's RNG.
        device, precision, threads: see :func:`napari_unet.runtime.select_device`;
            "auto" (bf16 on CUDA and bf16-capable CPUs), "bf16" or "fp32"; CPU threads
            (None: :func:`napari_unet.runtime.choose_threads`), restored afterwards.
        optimizer, schedule: "adamw" or "sgd"; "cosine" (``lr`` → 0 along a half cosine
            over a step budget) or "constant" (also for a time-only budget).
        augment, steps_per_epoch: True, False or :class:`~.augment.Augmenter` keywords;
            steps per epoch (validation, "epoch" event, last good weights).
        callback, cancel: receives the "start", "step" and "epoch" events; an Event or a
            callable that stops the run within one step, keeping the last good weights.

    Returns:
        The :class:`TrainHistory`: ``losses`` (one per step), ``epochs`` (per epoch:
        ``loss``, ``val_f1`` / ``val_iou`` in [0, 1] or None, ``elapsed`` in seconds),
        ``seconds``, ``rois`` ``(y0, y1, x0, x1)`` in pixels per image and ``data``.
    """
    total_steps = _resolve_budget(epochs, steps, seconds, steps_per_epoch)
    _check_choices(schedule, optimizer)
    preset = get_loss(default_loss_for(model) if loss is None else loss)
    dev, dev_why = select_device(device)
    prec = choose_precision(dev, precision)
    entries = planes_of_stacks(as_entries(image, labels, roi), model.in_channels)
    datasets, summary = _prepare_data(model, entries, validation, val_fraction, preset, dev, seed)
    summary.steps, summary.seconds = total_steps, seconds
    summary.precision, summary.device = prec.name, dev_why
    options = _Options(
        dev, prec, preset, total_steps, seconds, steps_per_epoch, lr, optimizer, schedule
    )
    sampling = _Sampling(batch_size, _patch_size(model, patch_size), seed, augment)
    history = _new_history(datasets, summary, options, sampling)
    _Run(model, datasets, history, options, sampling, callback, cancel).run(threads)
    model.training_summary = history.summary((model.training_summary or {}).get("trained_on", []))
    return history


def _check_choices(schedule: str, optimizer: str) -> None:
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")


def _prepare_data(
    model: SegmentationModel,
    entries: list[TrainingEntry],
    validation: Any,
    val_fraction: float,
    preset: LossPreset,
    dev: torch.device,
    seed: int,
) -> tuple[list[TrainingData], TrainingSummary]:
    """The validation plan, each entry's normalised training data and their summary."""
    if not entries:
        raise ValueError("no training data given")
    mode, fraction, use_regions, note = _plan_validation(entries, validation, val_fraction)
    if not model.normalization:
        model.normalization = get_normalization(model)
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
    )
    summary.val_note = _val_note(summary)
    if not all(len(d.known) for d in datasets):
        raise ValueError("a training image has no trainable pixel left after validation")
    return datasets, summary


def _patch_size(model: SegmentationModel, patch_size: int) -> int:
    """``patch_size`` rounded up to the model's divisor; for a valid U-Net the smallest legal
    input whose output covers ``patch_size``² (the loss sees the output, not the input)."""
    if model.border > 0:
        return model.valid_input_size(patch_size)
    return round_up(max(patch_size, model.size_divisor), model.size_divisor)


def _new_history(
    datasets: list[TrainingData], summary: TrainingSummary, o: _Options, s: _Sampling
) -> TrainHistory:
    history = TrainHistory(
        settings={
            "loss": o.preset.name,
            "lr": o.lr,
            "batch_size": s.batch_size,
            "patch_size": s.patch,
            "optimizer": o.optimizer,
            "schedule": o.schedule if o.total_steps else "constant",
            "seed": s.seed,
            "images": len(datasets),
            "precision": o.prec.name,
        },
        data=summary,
    )
    history.rois = [d.roi for d in datasets]
    return history


class _Run:
    """One training run: the loop's state (step, epoch, last good weights) and its steps."""

    def __init__(
        self,
        model: SegmentationModel,
        datasets: list[TrainingData],
        history: TrainHistory,
        options: _Options,
        sampling: _Sampling,
        callback: Callable[[dict[str, Any]], None] | None,
        cancel: Any,
    ) -> None:
        self.model, self.datasets, self.history = model, datasets, history
        self.o, self.s = options, sampling
        self.callback, self.cancel = callback, cancel
        self.step = self.epoch = 0
        self.epoch_losses: list[float] = []
        self.start = time.perf_counter()
        self.good: dict[str, torch.Tensor] = {}

    def run(self, threads: int | None) -> None:
        """The loop with ``threads`` torch CPU threads (on the CPU), recorded in the history."""
        cpu = self.o.dev.type == "cpu"
        with torch_threads(threads if cpu else torch.get_num_threads()) as n:
            self.history.data.threads = n if cpu else None
            self.history.settings["threads"] = self.history.data.threads
            self.history.settings["openmp_wait"] = "passive" if openmp_passive() else "default"
            self._loop()

    def _loop(self) -> None:
        model, o, history = self.model, self.o, self.history
        torch.manual_seed(self.s.seed)
        gen = torch.Generator().manual_seed(self.s.seed)
        aug = self._augmenter()
        home = next(model.parameters()).device
        model.to(o.dev)
        self.good = copy.deepcopy(model.state_dict())
        self.start = time.perf_counter()
        try:
            self._emit({"kind": "start", "summary": history.data, **history.data.to_dict()})
            if o.total_steps == 0:
                raise _Stop
            self._train_mode()
            opt = self._optimizer()
            while True:
                self._check_stop()
                self._one_step(opt, gen, aug)
                if self.step % o.steps_per_epoch == 0 or self.step == o.total_steps:
                    self._end_epoch()
                    self.good = copy.deepcopy(model.state_dict())
        except _Stop:
            if history.cancelled or history.diverged:
                model.load_state_dict(self.good)
            elif self.epoch_losses:  # time budget ended mid-epoch: these steps completed
                self._end_epoch()
        except BaseException as exc:  # callback error, KeyboardInterrupt: never half-updated
            model.load_state_dict(self.good)
            history.error = f"{type(exc).__name__}: {exc}"
            history.seconds = time.perf_counter() - self.start
            model.eval().to(home)
            raise
        history.seconds = time.perf_counter() - self.start
        model.eval().to(home)

    def _train_mode(self) -> None:
        """Train mode; a trained U²-Net(†) keeps its BatchNorm running statistics (learnt on
        whole images; re-estimated on small patches they spoil whole-image predictions)."""
        model = self.model.train()
        if getattr(model, "name", "") in ("u2net", "u2netp") and model.training_summary:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _augmenter(self) -> Augmenter | None:
        if not self.s.augment:
            return None
        kwargs = self.s.augment if isinstance(self.s.augment, dict) else {}
        return Augmenter(generator=torch.Generator().manual_seed(self.s.seed + 1), **kwargs)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.o.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.o.lr, weight_decay=1e-4)
        return torch.optim.SGD(params, lr=self.o.lr, momentum=0.99)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(event)

    def _check_stop(self) -> None:
        """Raise :class:`_Stop` when cancelled or when the budget is spent."""
        if is_cancelled(self.cancel):
            self.history.cancelled = True
            raise _Stop
        if self.o.seconds is not None and time.perf_counter() - self.start >= self.o.seconds:
            raise _Stop
        if self.o.total_steps is not None and self.step >= self.o.total_steps:
            raise _Stop

    def _one_step(
        self, opt: torch.optim.Optimizer, gen: torch.Generator, aug: Augmenter | None
    ) -> None:
        """Sample a batch, take one optimizer step and report it (``_Stop`` on divergence)."""
        o, s = self.o, self.s
        data = self.datasets[int(torch.randint(len(self.datasets), (1,), generator=gen))]
        x, t, ign, wgt = sample_batch(data, s.batch_size, s.patch, gen, self.model.border)
        if aug is not None:
            x, t, ign, wgt = aug(x, t, ign, wgt)
        x, t, ign, wgt = (
            v if v is None else v.to(o.dev, non_blocking=True) for v in (x, t, ign, wgt)
        )
        with torch.autocast(o.dev.type, dtype=o.prec.dtype, enabled=o.prec.autocast):
            value = compute_loss(self.model, x, t, wgt, ign, loss=o.preset)
        loss_value = float(value.detach())
        if not math.isfinite(loss_value):
            self.history.diverged = True
            warnings.warn(  # stack: _one_step, _loop, run, train, train's caller
                "training loss is not finite; keeping the last good weights",
                RuntimeWarning,
                stacklevel=5,
            )
            raise _Stop
        opt.zero_grad(set_to_none=True)
        value.backward()
        if o.schedule == "cosine" and o.total_steps:
            for group in opt.param_groups:
                group["lr"] = o.lr * 0.5 * (1.0 + math.cos(math.pi * self.step / o.total_steps))
        opt.step()
        self.step += 1
        self.history.losses.append(loss_value)
        self.epoch_losses.append(loss_value)
        self._report_step(loss_value)

    def _report_step(self, loss_value: float) -> None:
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        total, seconds = self.o.total_steps, self.o.seconds
        fraction = self.step / total if total else 0.0
        if seconds is not None:
            fraction = max(fraction, min(1.0, elapsed / seconds)) if seconds else 1.0
        self.callback(
            {
                "kind": "step",
                "step": self.step,
                "epoch": self.epoch,
                "loss": loss_value,
                "elapsed": elapsed,
                "fraction": fraction,
                "total_steps": total,
            }
        )

    def _end_epoch(self) -> None:
        """Record the epoch (mean loss, validation score) and report it."""
        history, scored = self.history, self.history.data.scored
        self.epoch += 1
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else None,
            "val_f1": None,
            "val_iou": None,
            "val_objects": history.data.val_objects if scored else 0,
            "val_note": history.data.val_note,
        }
        if scored:
            self.model.eval()
            record.update(_validate(self.model, self.datasets, self.o.dev))
            self._train_mode()
        record["elapsed"] = time.perf_counter() - self.start
        history.epochs.append(record)
        self.epoch_losses = []
        self._emit({"kind": "epoch", **record})
