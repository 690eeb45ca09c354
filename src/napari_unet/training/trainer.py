"""The training loop shared by the Train widget, the CLI and scripts.

``train`` fine-tunes a model in place on one or more annotated images (see
:mod:`napari_unet.training.data` for the region rule), reports progress through a
callback, stops on a time or epoch budget or a cancel token, and keeps the last good
weights (end of the last completed epoch) when cancelled or when the loss diverges.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..metrics import object_metrics, pixel_iou
from ..models.base import SegmentationModel, round_up
from ..normalize import get_normalization
from ..postprocess import default_class_names, segment
from ..tiling import is_cancelled
from .augment import Augmenter
from .data import TrainingData, prepare, sample_batch
from .losses import compute_loss, get_loss

DEFAULT_STEPS_PER_EPOCH = 20


@dataclass
class TrainHistory:
    """What happened: per-step losses, per-epoch summaries, time, whether cancelled."""

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False
    diverged: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    rois: list[tuple[int, int, int, int]] = field(default_factory=list)
    """Training region actually used per image (y0, y1, x0, x1)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Compact record stored in checkpoints."""
        last = self.epochs[-1] if self.epochs else {}
        return {
            "steps": len(self.losses),
            "epochs": len(self.epochs),
            "seconds": round(self.seconds, 2),
            "final_loss": last.get("loss"),
            "val_f1": last.get("val_f1"),
            "val_iou": last.get("val_iou"),
            "cancelled": self.cancelled,
            **self.settings,
        }


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _validate(
    model: SegmentationModel, data: TrainingData, device: torch.device
) -> tuple[float, float]:
    """F1@IoU0.5 and pixel IoU on the held-back part of the region (with image context)."""
    from ..predict import predict

    vy0, vy1, vx0, vx1 = data.val_roi
    ctx = 32
    h, w = data.labels.shape
    cy0, cy1, cx0, cx1 = max(0, vy0 - ctx), min(h, vy1 + ctx), max(0, vx0 - ctx), min(w, vx1 + ctx)
    crop = data.image_np[:, cy0:cy1, cx0:cx1]
    probs = predict(model, crop, axes="CYX", device=device, tile_size=1024)
    names = getattr(model, "class_names", None) or default_class_names(model.num_classes)
    pred = segment(probs, class_names=names)[vy0 - cy0 : vy1 - cy0, vx0 - cx0 : vx1 - cx0]
    gt = data.labels[vy0:vy1, vx0:vx1]
    return object_metrics(gt, pred)["f1"], pixel_iou(gt, pred)


def train(
    model: SegmentationModel,
    image: Any,
    labels: Any,
    *,
    roi: tuple[int, int, int, int] | Sequence[tuple[int, int, int, int] | None] | None = None,
    loss: str = "ce_dice",
    epochs: int | None = None,
    seconds: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 4,
    patch_size: int = 128,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "auto",
    optimizer: str = "adamw",
    augment: bool | dict[str, Any] = True,
    steps_per_epoch: int = DEFAULT_STEPS_PER_EPOCH,
    callback: Callable[[dict[str, Any]], None] | None = None,
    cancel: Any = None,
) -> TrainHistory:
    """Train ``model`` in place on annotated image(s) and return the history.

    ``image``: (Y, X) or (C, Y, X) array, or a list of them; ``labels``: instance labels
    (0 = unlabelled) of the same size (or a list). ``roi`` (y0, y1, x0, x1): training
    region, default the annotations' bounding box + 16 px. ``loss``: a preset of
    :func:`napari_unet.training.get_loss` ("ce" uses the U-Net border weight map).
    Budget: ``epochs`` of ``steps_per_epoch`` steps and/or ``seconds`` (default 10
    epochs). ``optimizer``: "adamw" or "sgd" (the paper's, momentum 0.99).
    ``callback(event)`` gets ``{"kind": "step", ...}`` after each step and
    ``{"kind": "epoch", ...}`` after each epoch; ``cancel`` stops within one step.
    Deterministic on the CPU for a given ``seed``.
    """
    from ..predict import select_device

    if epochs is None and seconds is None:
        epochs = 10
    preset = get_loss(loss)
    dev, _ = select_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if not getattr(model, "normalization", None):
        model.normalization = get_normalization(model)
    if not getattr(model, "class_names", None):
        model.class_names = default_class_names(model.num_classes)

    images, label_list = _as_list(image), _as_list(labels)
    rois = _as_list(roi) if isinstance(roi, list) else [roi] * len(images)
    if len(images) != len(label_list) or len(rois) != len(images):
        raise ValueError(
            f"{len(images)} image(s) but {len(label_list)} label image(s) / {len(rois)} ROI(s)"
        )
    datasets = [
        prepare(
            im,
            lab,
            num_classes=model.num_classes,
            in_channels=model.in_channels,
            norm=model.normalization,
            roi=r,
            val_fraction=val_fraction,
            weight_map=preset.name == "ce",
            device=dev,
        )
        for im, lab, r in zip(images, label_list, rois)
    ]
    patch = round_up(max(patch_size, model.size_divisor), model.size_divisor)
    if model.halo > 0:
        patch = model.legal_size(patch)
    aug = None
    if augment:
        kwargs = augment if isinstance(augment, dict) else {}
        aug = Augmenter(generator=torch.Generator().manual_seed(seed + 1), **kwargs)

    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.99)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    amp = torch.bfloat16 if dev.type == "cuda" else None

    history = TrainHistory(
        settings={
            "loss": preset.name,
            "lr": lr,
            "batch_size": batch_size,
            "patch_size": patch,
            "optimizer": optimizer,
            "seed": seed,
            "images": len(datasets),
        }
    )
    history.rois = [d.roi for d in datasets]
    good = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    total_steps = epochs * steps_per_epoch if epochs is not None else None
    step = 0
    epoch = 0
    try:
        while True:
            epoch_losses = []
            for _ in range(steps_per_epoch):
                elapsed = time.perf_counter() - start
                if is_cancelled(cancel):
                    history.cancelled = True
                    raise _Stop
                if seconds is not None and elapsed >= seconds:
                    raise _Stop
                data = datasets[int(torch.randint(len(datasets), (1,), generator=gen))]
                x, t, ign, wgt = sample_batch(data, batch_size, patch, gen)
                if aug is not None:
                    x, t, ign, wgt = aug(x, t, ign, wgt)
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    value = compute_loss(model, x, t, wgt, ign, loss=preset)
                if not math.isfinite(float(value.detach())):
                    history.diverged = True
                    warnings.warn(
                        "training loss is not finite; keeping the last good weights",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    raise _Stop
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                step += 1
                loss_value = float(value.detach())
                history.losses.append(loss_value)
                epoch_losses.append(loss_value)
                if callback is not None:
                    elapsed = time.perf_counter() - start
                    fraction = step / total_steps if total_steps else 0.0
                    if seconds is not None:
                        fraction = max(fraction, min(1.0, elapsed / seconds))
                    callback(
                        {
                            "kind": "step",
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_value,
                            "elapsed": elapsed,
                            "fraction": fraction,
                        }
                    )
            epoch += 1
            record = _end_epoch(model, datasets, dev, epoch, epoch_losses, start)
            history.epochs.append(record)
            good = copy.deepcopy(model.state_dict())
            model.train()
            if callback is not None:
                callback({"kind": "epoch", **record})
            if epochs is not None and epoch >= epochs:
                break
    except _Stop:
        if history.cancelled or history.diverged or not history.epochs:
            pass
        if history.cancelled or history.diverged:
            model.load_state_dict(good)
        elif epoch_losses:  # time budget ended mid-epoch: summarise the partial epoch
            epoch += 1
            record = _end_epoch(model, datasets, dev, epoch, epoch_losses, start)
            history.epochs.append(record)
            if callback is not None:
                callback({"kind": "epoch", **record})
    history.seconds = time.perf_counter() - start
    model.eval()
    model.training_summary = history.summary()
    return history


class _Stop(Exception):
    pass


def _end_epoch(model, datasets, dev, epoch, epoch_losses, start) -> dict[str, Any]:
    model.eval()
    f1s, ious = [], []
    for d in datasets:
        if d.val_roi is not None:
            f1, iou = _validate(model, d, dev)
            f1s.append(f1)
            ious.append(iou)
    return {
        "epoch": epoch,
        "loss": float(np.mean(epoch_losses)) if epoch_losses else None,
        "val_f1": float(np.mean(f1s)) if f1s else None,
        "val_iou": float(np.mean(ious)) if ious else None,
        "elapsed": time.perf_counter() - start,
    }
