"""The one planner: where each network window goes and which pixels of it are kept.

Geometry (per axis, in pixels):

* **Padded nets** compute on a virtual image reflect-padded at the bottom/right to a
  multiple of ``size_divisor`` ``g`` — exactly what the whole-image ``model(x)`` does.
  Windows of size ``S`` (multiple of ``g``) start at multiples of ``g``, so every window
  sees the same pooling grid as the whole image. Each window trusts its output except a
  ``halo`` next to its interior edges; the trusted parts are cut into disjoint *cores*
  that tile the output (cropping, no blending). With ``halo ≥`` the measured receptive
  field radius the result equals the whole-image output.
* **The valid U-Net** (the paper's overlap-tile) mirrors the image by ``model.border``
  on every side; a window of legal size ``S`` gives ``output_size(S)`` pixels, all of
  them exact. Windows step by a multiple of ``g = 2**depth`` (a 572 window gives a 388
  output tile and steps by 384) so their pooling grid matches the whole-image run.
* **Blended mode** (models that cannot be tiled exactly: GroupNorm, attention, global
  pooling) overlaps windows by ``2·halo`` and averages them with Gaussian weights
  (σ = window/8, as nnU-Net and MONAI).

Used by the single-process tiler and by the dask workers alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..models.base import SegmentationModel, round_up

DEFAULT_TILE = {"cpu": 768, "cuda": 1024}
"""Largest default network window (px). On the CPU, 768 keeps the activations of a
U-Net (base 32) tile near 0.5 GB, so peak memory stays bounded at any image size."""
DEFAULT_BATCH = {"cpu": 1, "cuda": 4}
FAST_HALO_FRACTION = 0.5
"""Default (non-exact) mode: halo = this fraction of the receptive-field radius."""
MIN_FAST_HALO = 32
MAX_FAST_HALO_SHARE = 0.25
"""Default mode: halo ≤ this share of the window, so each window's core is ≥ half of it.
Without it, U²-Net (receptive-field radius 3296 px) got 3360² windows with 32² cores —
10⁴× the work on large images. U²-Net† at 768 / 192 (CPU) and 1024 / 256 (CUDA) gives
labels F1 0.981 / 0.988 against its whole-image output (1536×2048 tiled development
image); U-Net, UNet++ and UNet 3+ halos (≤ 64 px) are unchanged."""


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis.

    ``starts``: window starts in padded-input coordinates; ``window``: input size;
    ``out_window``: output size of one window; ``cores``: per window ``(a, b, o)`` —
    output pixels ``[a, b)`` come from window output offset ``o``; ``pad_before``: mirror
    padding before pixel 0 (valid nets); ``padded``: length of the padded input.
    """

    starts: tuple[int, ...]
    window: int
    out_window: int
    cores: tuple[tuple[int, int, int], ...]
    pad_before: int
    padded: int
    length: int


def _starts(total: int, window: int, step: int, grid: int) -> list[int]:
    if step < 1:  # a zero step would append window starts forever
        raise ValueError(f"tile plan with a step of {step} px (window {window} px): a bug")
    starts = [0]
    while starts[-1] + window < total:
        starts.append(starts[-1] + step)
    last = total - window
    starts[-1] = min(starts[-1], last)
    assert last % grid == 0
    return sorted(set(starts))


def plan_axis(
    model: SegmentationModel, length: int, max_window: int, halo: int, blended: bool = False
) -> AxisPlan:
    """Plan one axis of ``length`` output pixels with windows ≤ ``max_window`` input pixels.

    ``blended``: windows overlap by about 25 % (at least ``2·halo``) and are averaged,
    so ``cores`` only bound each window's output.
    """
    g = model.size_divisor
    if blended:
        padded = round_up(length, g)
        window = min(round_up(max_window, g), padded)
        step = max(1, min(window - 2 * halo, (3 * window) // 4))
        starts = _starts(padded, window, step, g)
        cores = tuple((s, min(s + window, length), 0) for s in starts)
        return AxisPlan(tuple(starts), window, window, cores, 0, padded, length)
    if model.border > 0:  # valid convolutions: every output pixel of a window is exact
        padded = model.valid_input_size(length)
        # windows step by a positive multiple of g, so a window's output must be ≥ g
        # pixels; a smaller requested window is raised to the smallest such legal size
        window = max(_smallest_stepping(model), _legal_at_most(model, min(max_window, padded)))
        window = min(window, padded)
        out_window = model.output_size(window)
        step = max((out_window // g) * g, g)
        starts = _starts(padded, window, step, g)
        trusted = [(s, s + out_window) for s in starts]
        pad_before = model.border
    else:
        padded = round_up(length, g)
        halo = round_up(halo, g)
        if max_window >= padded:
            window = padded
        else:
            s_max = max((max_window // g) * g, 2 * halo + g)
            n = math.ceil((padded - 2 * halo) / (s_max - 2 * halo))
            window = min(round_up(math.ceil((padded - 2 * halo) / n), g) + 2 * halo, padded)
        out_window = window
        starts = _starts(padded, window, max(window - 2 * halo, g), g)
        trusted = [
            (s + (halo if s > 0 else 0), s + window - (halo if s + window < padded else 0))
            for s in starts
        ]
        pad_before = 0
    cores = []
    end = 0
    for s, (a, b) in zip(starts, trusted):
        if a > end:
            raise AssertionError(f"tile plan leaves a gap at {end}..{a}")  # pragma: no cover
        a, b = end, min(b, length)
        cores.append((a, b, a - s))
        end = b
        if end >= length:
            break
    starts = starts[: len(cores)]
    return AxisPlan(tuple(starts), window, out_window, tuple(cores), pad_before, padded, length)


def _smallest_stepping(model: SegmentationModel) -> int:
    """Smallest legal window of a valid net whose output covers ``size_divisor`` pixels."""
    m = model.legal_size(1)
    while model.output_size(m) < model.size_divisor:
        m = model.legal_size(m + 1)
    return m


def _legal_at_most(model: SegmentationModel, n: int) -> int:
    m = model.legal_size(1)
    while model.legal_size(m + 1) <= n:
        m = model.legal_size(m + 1)
    return m


@dataclass(frozen=True)
class TilePlan:
    """Where every window of a (Y, X) plane goes and which of its pixels are kept.

    Args:
        rows: the windows along Y (:class:`AxisPlan`, pixels).
        cols: the windows along X.
        blended: True when windows are averaged with Gaussian weights instead of cropped
            to disjoint cores (models that cannot be tiled exactly).
    """

    rows: AxisPlan
    cols: AxisPlan
    blended: bool

    @property
    def n_tiles(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.rows.window, self.cols.window

    def tiles(self) -> Iterator[tuple[int, int]]:
        for i in range(len(self.rows.starts)):
            for j in range(len(self.cols.starts)):
                yield i, j

    def computed_fraction(self) -> float:
        """Pixels pushed through the network per output pixel."""
        return (
            self.n_tiles
            * self.rows.window
            * self.cols.window
            / (self.rows.length * self.cols.length)
        )


def plan_tiles(
    model: SegmentationModel,
    shape: tuple[int, int],
    tile_size: int | tuple[int, int],
    halo: int,
    blended: bool = False,
) -> TilePlan:
    """Plan windows of ``tile_size`` over a plane of ``shape``.

    Args:
        model: the network (its size divisor, valid-convolution ``border`` and legal sizes
            decide the grid).
        shape: (Y, X) of the plane in pixels.
        tile_size: network input window in pixels, one int or (Y, X); rounded to the
            model's legal sizes.
        halo: context in pixels kept around each window's core and discarded (0 for the
            valid U-Net, whose windows are exact by construction).
        blended: Gaussian-blended windows overlapping by ``2·halo`` instead of cores.

    Returns:
        The :class:`TilePlan`; ``plan.n_tiles`` windows of ``plan.window_shape`` pixels.
    """
    ts = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    return TilePlan(
        plan_axis(model, shape[0], ts[0], halo, blended),
        plan_axis(model, shape[1], ts[1], halo, blended),
        blended,
    )


# ----------------------------------------------------------------------- reading


def tile_plan_for(
    model: SegmentationModel,
    shape: tuple[int, int],
    *,
    tile_size: int | None = None,
    exact: bool = False,
    device: torch.device | None = None,
    halo: int | None = None,
) -> TilePlan:
    """The tiling ``predict`` uses for a (Y, X) plane of ``shape``.

    * tile-exact models: cropped windows with a halo of the measured receptive-field
      radius (``exact=True``) or of ``max(32, radius/2)``, at most a quarter of the window
      (default, faster; differences from the whole-image output are far below what is
      visible, see bench/tiling.py; U²-Net's 3296 px radius is the one the cap shortens);
    * other models: Gaussian-blended windows overlapping by 25 %.
    """
    dev = device or torch.device("cpu")
    tile = DEFAULT_TILE[dev.type] if tile_size is None else int(tile_size)
    if tile < 2:
        raise ValueError(f"tile_size must be ≥ 2, got {tile}")
    window, halo, blended = window_rules(model, tile, exact=exact, halo=halo)
    return plan_tiles(model, shape, window, halo, blended=blended)


def window_rules(
    model: SegmentationModel, tile: int, *, exact: bool = False, halo: int | None = None
) -> tuple[int, int, bool]:
    """(largest window, halo, blended): the rules of :func:`tile_plan_for` for a requested
    window of ``tile`` pixels (also used by the dask run to size each chunk's context)."""
    g = model.size_divisor
    if model.border > 0:  # valid U-Net: overlap-tile is always exact
        return tile, 0, False
    if model.info.tile_exact:
        rf = model.receptive_field
        if halo is None:
            fast = max(MIN_FAST_HALO, int(rf * FAST_HALO_FRACTION))
            halo = (
                rf if exact else min(rf, fast, max(MIN_FAST_HALO, int(tile * MAX_FAST_HALO_SHARE)))
            )
        elif exact and halo < rf:
            raise ValueError(f"exact tiling needs halo ≥ the receptive field radius {rf}")
        return max(round_up(tile, g), 2 * round_up(halo, g) + g), halo, False
    if exact:
        raise ValueError(
            f"{model.name} cannot be tiled exactly (normalisation, attention or global pooling "
            "spans the whole input); use exact=False for Gaussian-blended tiles"
        )
    # windows ≥ 2 divisors so that neighbours can overlap
    tile = max(round_up(tile, g), 2 * g)
    return tile, (halo if halo is not None else tile // 8), True
