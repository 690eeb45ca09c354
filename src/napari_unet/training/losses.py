"""Segmentation losses on logits, with pixel weights and an "unknown pixel" mask.

Conventions shared by every loss here:

* ``logits (N, C, H, W)``: raw network outputs (never probabilities). ``C == 1`` is a
  binary problem (sigmoid); ``C ≥ 2`` is multi-class (softmax).
* ``target (N, H, W)`` int64 class indices. For ``C == 1`` any non-zero value counts as
  foreground. Values at ignored pixels are never read (they may be out of range).
* ``weight (N, H, W)`` float pixel weights, optional (default 1).
* ``ignore (N, H, W)`` bool, optional: ``True`` marks an unknown pixel. Ignored pixels
  contribute nothing to any numerator *or* normaliser; their logits are replaced by 0
  before anything is computed, so their gradient is exactly 0 and changing their
  logits or targets changes nothing.
* Every loss returns a float32 scalar. Losses run in float32 with autocast disabled
  (safe under mixed precision). A batch whose pixels are all ignored gives a finite 0
  that is still connected to the graph (``backward`` works, gradients are 0).

Rules chosen (see each function):

* **Cross-entropy / focal**: mean over *known* pixels of ``w · loss``:
  ``Σ_known w·CE / #known``. Scaling all weights by ``k`` scales the loss by ``k``.
  (The U-Net paper's energy is the plain sum ``Σ w·log p``; the mean only rescales it
  and keeps the learning rate independent of the patch size.)
* **Dice / IoU**: soft scores per foreground class with sums over the whole batch and
  all known pixels (a "batch Dice"), weighted by ``w``, smoothed by ``smooth = 1``
  (pixel units) in numerator and denominator, averaged over foreground classes
  (``C == 1``: the one channel; ``C ≥ 2``: classes ``1..C-1``).
* **MS-SSIM**: see :func:`~.ms_ssim.ms_ssim` (module :mod:`.ms_ssim`).
* **Deep supervision**: per-output weights, default equal, normalised to sum 1
  (U²-Net's side loss is the exception: a plain sum, as in the paper).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .ms_ssim import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales

if TYPE_CHECKING:
    from ..models.base import SegmentationModel

__all__ = [
    "MS_SSIM_WEIGHTS",
    "LossPreset",
    "ce_dice_loss",
    "ce_loss",
    "cgm_loss",
    "cgm_target",
    "compute_loss",
    "deep_supervision_loss",
    "dice_loss",
    "focal_loss",
    "get_loss",
    "iou_loss",
    "list_losses",
    "ms_ssim",
    "ms_ssim_loss",
    "ms_ssim_scales",
    "u2net_sides_loss",
    "unet3p_hybrid_loss",
]

DEFAULT_SMOOTH = 1.0
_TINY = 1e-12

LossFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------- helpers
def _float32(fn: LossFn) -> LossFn:
    """Run ``fn(logits, ...)`` in float32 with autocast off."""

    @functools.wraps(fn)
    def wrapper(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return fn(logits.float(), *args, **kwargs)

    return wrapper


def _prepare(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes; return ``(logits, target, w, known)``.

    ``logits`` (N, C, H, W) are 0 at ignored pixels, ``target`` (N, H, W) int64 is 0
    there (and binarised for C == 1), ``w`` (N, H, W) float32 is ``weight`` on known
    pixels and 0 elsewhere, ``known`` (N, H, W) bool.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, c, h, w = logits.shape
    for name, t in (("target", target), ("weight", weight), ("ignore", ignore)):
        if t is not None and tuple(t.shape) != (n, h, w):
            raise ValueError(
                f"{name} must have shape {(n, h, w)} to match logits {tuple(logits.shape)}, "
                f"got {tuple(t.shape)}"
            )
    if ignore is None:
        known = torch.ones((n, h, w), dtype=torch.bool, device=logits.device)
    else:
        known = ~ignore.to(device=logits.device, dtype=torch.bool)
    target = torch.where(known, target.to(logits.device).long(), 0)
    if c == 1:
        target = (target > 0).long()
    logits = torch.where(known[:, None], logits, 0.0)
    if weight is None:
        w_map = known.float()
    else:
        w_map = torch.where(known, weight.to(logits.device).float(), 0.0)
    return logits, target, w_map, known


def _known_mean(values: torch.Tensor, w: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``Σ w·values / #known`` (0 when nothing is known); all (N, H, W)."""
    total = torch.where(known, values * w, 0.0).sum()
    return total / known.sum().clamp_min(1)


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy (N, H, W) from logits (N, C, H, W); BCE when C == 1."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
    return F.cross_entropy(logits, target, reduction="none")


def _foreground(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground probabilities and one-hot targets, both (N, K, H, W).

    ``K = 1`` (sigmoid) for C == 1, else ``K = C - 1`` (softmax classes 1..C-1).
    """
    c = logits.shape[1]
    if c == 1:
        return torch.sigmoid(logits), target[:, None].float()
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, c).permute(0, 3, 1, 2)[:, 1:].float()
    return probs, onehot


def _overlap_sums(
    logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-class ``(Σ p·g, Σ p, Σ g)`` over batch and pixels, each (K,)."""
    p, g = _foreground(logits, target)
    wp = w[:, None] * p
    dims = (0, 2, 3)
    return (wp * g).sum(dims), wp.sum(dims), (w[:, None] * g).sum(dims)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0/0 := 1 (empty prediction of an empty class is perfect)."""
    return torch.where(den > 0, num / den.clamp_min(_TINY), 1.0)


# ------------------------------------------------------------------ pixel losses
@_float32
def ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted pixel-wise cross-entropy (softmax CE; BCE-with-logits for C == 1).

    ``Σ_known w·CE / #known`` for logits (N, C, H, W), target (N, H, W).
    """
    logits, target, w, known = _prepare(logits, target, weight, ignore)
    return _known_mean(_pixel_ce(logits, target), w, known)


@_float32
def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    smooth: float = DEFAULT_SMOOTH,
) -> torch.Tensor:
    """``1 − mean_k (2Σwpg + ε) / (Σwp + Σwg + ε)`` over foreground classes ``k``.

    Sums run over the batch and the known pixels; ``ε = smooth`` (default 1).
    """
    logits, target, w, _ = _prepare(logits, target, weight, ignore)
    inter, psum, gsum = _overlap_sums(logits, target, w)
    return 1.0 - _ratio(2 * inter + smooth, psum + gsum + smooth).mean()


@_float32
def iou_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    smooth: float = DEFAULT_SMOOTH,
) -> torch.Tensor:
    """Soft Jaccard loss ``1 − mean_k (I + ε) / (Σwp + Σwg − I + ε)``, ``I = Σwpg``.

    As the IoU loss of UNet 3+, but with batch-wide sums and smoothing ``ε = smooth``.
    """
    logits, target, w, _ = _prepare(logits, target, weight, ignore)
    inter, psum, gsum = _overlap_sums(logits, target, w)
    return 1.0 - _ratio(inter + smooth, psum + gsum - inter + smooth).mean()


def _alpha_t(
    alpha: float | Sequence[float], target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-pixel class balance (N, H, W): ``α`` for foreground, ``1 − α`` for background,
    or ``alpha[target]`` for a per-class sequence (length 2 when C == 1)."""
    if isinstance(alpha, (int, float)):
        return torch.where(target > 0, float(alpha), 1.0 - float(alpha))
    table = torch.as_tensor(alpha, dtype=torch.float32, device=target.device)
    if table.numel() != max(num_classes, 2):
        raise ValueError(f"alpha needs {max(num_classes, 2)} values, got {table.numel()}")
    return table[target]


@_float32
def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Focal loss (Lin 2017) ``−α_t (1 − p_t)^γ log p_t``, mean of ``w·FL`` over known pixels.

    ``p_t`` is the probability of the target class; ``alpha=None`` means no balancing.
    ``gamma=0, alpha=None`` is :func:`ce_loss`.
    """
    logits, target, w, known = _prepare(logits, target, weight, ignore)
    ce = _pixel_ce(logits, target)
    pt = torch.exp(-ce)
    fl = (1.0 - pt).clamp_min(0.0).pow(gamma) * ce
    if alpha is not None:
        fl = fl * _alpha_t(alpha, target, logits.shape[1])
    return _known_mean(fl, w, known)


@_float32
def ce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """UNet++ loss (Zhou 2018): ``½·CE + Dice loss``."""
    return 0.5 * ce_loss(logits, target, weight, ignore) + dice_loss(logits, target, weight, ignore)


@_float32
def ms_ssim_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 − MS-SSIM`` of foreground probabilities vs one-hot targets (UNet 3+).

    Averaged over images (with a known pixel) and foreground classes. Pixel weights act
    as the confidences of :func:`ms_ssim`.
    """
    logits, target, w, _ = _prepare(logits, target, weight, ignore)
    p, g = _foreground(logits, target)
    score = ms_ssim(p, g, w)
    valid = (w.flatten(1).sum(1) > 0)[:, None].expand_as(score).float()
    return ((1.0 - score) * valid).sum() / valid.sum().clamp_min(1)


@_float32
def unet3p_hybrid_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """UNet 3+ hybrid loss: focal (γ = 2) + (1 − MS-SSIM) + IoU loss, equal weights."""
    return (
        focal_loss(logits, target, weight, ignore)
        + ms_ssim_loss(logits, target, weight, ignore)
        + iou_loss(logits, target, weight, ignore)
    )


# ------------------------------------------------------------- multi-output losses
def _ds_weights(n: int, weights: Sequence[float] | None, normalize: bool) -> list[float]:
    if weights is None:
        weights = [1.0] * n
    weights = [float(v) for v in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} deep-supervision weights for {n} outputs")
    if any(v < 0 for v in weights) or sum(weights) <= 0:
        raise ValueError(f"deep-supervision weights must be ≥ 0 with a positive sum: {weights}")
    if normalize:
        total = sum(weights)
        weights = [v / total for v in weights]
    return weights


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    loss_fn: LossFn,
    weights: Sequence[float] | None = None,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """``Σ_k a_k · loss_fn(outputs[k], target, weight, ignore)``.

    ``weights`` ``a_k`` follow the order of ``outputs`` (``forward_all`` order); default
    equal. With ``normalize`` (default) they are divided by their sum, so the result
    is a weighted mean and comparable to a single-output loss.
    """
    if len(outputs) == 0:
        raise ValueError("deep_supervision_loss needs at least one output")
    coeffs = _ds_weights(len(outputs), weights, normalize)
    losses = [a * loss_fn(out, target, weight, ignore) for a, out in zip(coeffs, outputs)]
    return torch.stack(losses).sum()


def u2net_sides_loss(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """U²-Net loss: the plain sum of per-output (B)CE over side outputs and the fusion.

    Computed from logits (``binary_cross_entropy_with_logits`` / ``cross_entropy``).
    """
    return deep_supervision_loss(outputs, target, ce_loss, None, weight, ignore, normalize=False)


# --------------------------------------------------------------------------- CGM
def cgm_target(
    target: torch.Tensor, ignore: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level "contains foreground" labels for the UNet 3+ CGM.

    ``target (N, H, W)`` → ``(labels (N,) int64, valid (N,) bool)``: 1 when a known
    pixel is foreground (class > 0); 0 when every pixel is known and none is
    foreground; not valid (unknown) when there is no known foreground but some pixel
    is unknown, since that pixel could be foreground.
    """
    known = torch.ones_like(target, dtype=torch.bool) if ignore is None else ~ignore.bool()
    fg = ((target > 0) & known).flatten(1).any(1)
    complete = known.flatten(1).all(1)
    return fg.long(), fg | complete


@_float32
def cgm_loss(
    cls_logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Classification loss of the CGM: mean CE of ``cls_logits (N, 2)`` (or BCE for
    ``(N, 1)``) against :func:`cgm_target` over images with a valid label."""
    if ignore is not None:
        ignore = ignore.to(cls_logits.device)
    labels, valid = cgm_target(target.to(cls_logits.device), ignore)
    cls_logits = torch.where(valid[:, None], cls_logits, 0.0)
    if cls_logits.shape[1] == 1:
        per = F.binary_cross_entropy_with_logits(cls_logits[:, 0], labels.float(), reduction="none")
    else:
        per = F.cross_entropy(cls_logits, labels, reduction="none")
    return torch.where(valid, per, 0.0).sum() / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------- presets
@dataclass(frozen=True)
class LossPreset:
    """A named loss. Call it on one logits tensor or on a list of outputs.

    For a list, outputs are combined by :func:`deep_supervision_loss` with
    ``ds_weights`` (normalised to sum 1), or summed when ``sum_outputs`` (U²-Net; given
    ``ds_weights`` are then used as they are).
    """

    name: str
    fn: LossFn
    description: str
    sum_outputs: bool = False

    def __call__(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        ds_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.fn(outputs, target, weight, ignore)
        return deep_supervision_loss(
            outputs, target, self.fn, ds_weights, weight, ignore, normalize=not self.sum_outputs
        )


_PRESETS: dict[str, LossPreset] = {
    p.name: p
    for p in (
        LossPreset("ce", ce_loss, "weighted pixel-wise cross-entropy (U-Net)"),
        LossPreset("ce_dice", ce_dice_loss, "½·cross-entropy + Dice loss (UNet++)"),
        LossPreset("dice", dice_loss, "soft Dice loss"),
        LossPreset("focal", focal_loss, "focal loss, γ = 2"),
        LossPreset("iou", iou_loss, "soft Jaccard (IoU) loss"),
        LossPreset("ms_ssim", ms_ssim_loss, "1 − MS-SSIM of the foreground probability"),
        LossPreset("unet3p_hybrid", unet3p_hybrid_loss, "focal + MS-SSIM + IoU losses (UNet 3+)"),
        LossPreset("u2net_sides", ce_loss, "sum of (B)CE over all side outputs (U²-Net)", True),
    )
}
_ALIASES = {
    "bce": "ce",
    "cross_entropy": "ce",
    "bce_dice": "ce_dice",
    "jaccard": "iou",
    "msssim": "ms_ssim",
    "hybrid": "unet3p_hybrid",
    "unet3p": "unet3p_hybrid",
    "u2net": "u2net_sides",
}


def list_losses() -> list[str]:
    """Names of the loss presets."""
    return list(_PRESETS)


def get_loss(name: str | LossPreset) -> LossPreset:
    """Loss preset by name (case-insensitive; ``-`` and spaces count as ``_``)."""
    if isinstance(name, LossPreset):
        return name
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in _PRESETS:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(_PRESETS)}")
    return _PRESETS[key]


def default_loss_for(model: Any) -> str:
    """The loss preset each paper prescribes for ``model`` (a model or a variant name).

    U-Net with the paper's valid convolutions: weighted cross-entropy (``ce``, border
    weight map); the padded U-Net: ``ce_dice`` (how the bundled one is trained); UNet++
    and the wide U-Net: ½·CE + Dice on every head (``ce_dice``, deep supervision
    averages the heads); UNet 3+: the hybrid focal + MS-SSIM + IoU loss on every side
    output (``unet3p_hybrid``, plus the CGM term when the model has one); U²-Net(†):
    the plain sum of CE over the six sides and the fusion (``u2net_sides``); Swin-UNet:
    CE + Dice (``ce_dice``).
    """
    name = model if isinstance(model, str) else getattr(model, "name", "")
    name = str(name).lower()
    if name in ("unet3p", "unet3plus", "unet3+"):
        return "unet3p_hybrid"
    if name in ("u2net", "u2netp"):
        return "u2net_sides"
    if name == "unet" and getattr(model, "padding", "same") == "valid":
        return "ce"
    return "ce_dice"


def _center_crop(t: torch.Tensor | None, h: int, w: int) -> torch.Tensor | None:
    """Centre crop of (N, H, W) to (N, h, w) (valid-convolution outputs)."""
    if t is None:
        return None
    top, left = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
    if top < 0 or left < 0:
        raise ValueError(f"model output {h}×{w} is larger than the target {tuple(t.shape[-2:])}")
    return t[..., top : top + h, left : left + w]


def _run_model(
    model: SegmentationModel, x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """All outputs and, for a model with an image classifier (UNet 3+ with CGM), the
    classifier logits (N, 2)."""
    if model.has_classifier:
        outputs, cls_logits = model.forward_all_with_cls(x)
        return list(outputs), cls_logits
    return list(model.forward_all(x)), None


def compute_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    loss: str | LossPreset = "ce_dice",
    ds_weights: Sequence[float] | None = None,
    cls_weight: float = 1.0,
) -> torch.Tensor:
    """Training loss of ``model`` on ``x (N, C_in, H, W)`` against ``target (N, H, W)``.

    Runs ``model.forward_all`` (or ``forward_all_with_cls`` when ``model.has_classifier``:
    a UNet 3+ with CGM),
    combines every output with the preset (see :class:`LossPreset`; ``ds_weights`` in
    ``forward_all`` order) and adds ``cls_weight ·`` :func:`cgm_loss` when the model
    has a CGM. Targets, weights and mask are centre-cropped to the output size when the
    model's output is smaller (valid U-Net).
    """
    preset = get_loss(loss)
    outputs, cls_logits = _run_model(model, x)
    h, w = outputs[0].shape[-2:]
    target, weight, ignore = (_center_crop(t, h, w) for t in (target, weight, ignore))
    total = preset(outputs, target, weight, ignore, ds_weights)
    if cls_logits is not None and cls_weight:
        total = total + cls_weight * cgm_loss(cls_logits, target, ignore)
    return total
