"""Training engine: data, losses (MS-SSIM in :mod:`.ms_ssim`), augmentation and the trainer
loop (no napari, no Qt)."""

from __future__ import annotations

from .augment import Augmenter, elastic_field, outside_mask, warp
from .data import (
    MIN_VAL_OBJECTS,
    TrainingEntry,
    TrainingSummary,
    as_entries,
    default_roi,
    parse_roi,
)
from .losses import (
    LossPreset,
    ce_dice_loss,
    ce_loss,
    cgm_loss,
    cgm_target,
    compute_loss,
    deep_supervision_loss,
    dice_loss,
    focal_loss,
    get_loss,
    iou_loss,
    list_losses,
    ms_ssim_loss,
    u2net_sides_loss,
    unet3p_hybrid_loss,
)
from .ms_ssim import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales
from .trainer import TrainHistory, train

__all__ = [
    "MIN_VAL_OBJECTS",
    "TrainHistory",
    "TrainingEntry",
    "TrainingSummary",
    "as_entries",
    "default_roi",
    "parse_roi",
    "train",
    "MS_SSIM_WEIGHTS",
    "Augmenter",
    "LossPreset",
    "ce_dice_loss",
    "ce_loss",
    "cgm_loss",
    "cgm_target",
    "compute_loss",
    "deep_supervision_loss",
    "dice_loss",
    "elastic_field",
    "focal_loss",
    "get_loss",
    "iou_loss",
    "list_losses",
    "ms_ssim",
    "ms_ssim_loss",
    "ms_ssim_scales",
    "outside_mask",
    "u2net_sides_loss",
    "unet3p_hybrid_loss",
    "warp",
]
