"""The one tiler: plan windows, read them lazily, run batches on a device, stitch.

Geometry (per axis, in pixels):

* **Padded nets** compute on a virtual image reflect-padded at the bottom/right to a
  multiple of ``size_divisor`` ``g`` — exactly what the whole-image ``model(x)`` does.
  Windows of size ``S`` (multiple of ``g``) start at multiples of ``g``, so every window
  sees the same pooling grid as the whole image. Each window trusts its output except a
  ``halo`` next to its interior edges; the trusted parts are cut into disjoint *cores*
  that tile the output (cropping, no blending). With ``halo ≥`` the measured receptive
  field radius the result equals the whole-image output.
* **The valid U-Net** (the paper's overlap-tile) mirrors the image by ``model.halo`` on
  every side; a window of legal size ``S`` gives ``output_size(S)`` pixels, all of them
  exact. Windows step by a multiple of ``g = 2**depth`` (a 572 window gives a 388 output
  tile and steps by 384) so their pooling grid matches the whole-image run.
* **Blended mode** (models that cannot be tiled exactly: GroupNorm, attention, global
  pooling) overlaps windows by ``2·halo`` and averages them with Gaussian weights
  (σ = window/8, as nnU-Net and MONAI).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .models.base import SegmentationModel, round_up


class Cancelled(Exception):
    """Raised when a cancel token fires; no partial result is returned."""


def is_cancelled(cancel: Any) -> bool:
    """A cancel token is a ``threading.Event``-like object or a zero-argument callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


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
    if model.halo > 0:  # valid convolutions: every output pixel of a window is exact
        padded = model.valid_input_size(length)
        # windows step by a positive multiple of g, so a window's output must be ≥ g
        # pixels; a smaller requested window is raised to the smallest such legal size
        window = max(_smallest_stepping(model), _legal_at_most(model, min(max_window, padded)))
        window = min(window, padded)
        out_window = model.output_size(window)
        step = max((out_window // g) * g, g)
        starts = _starts(padded, window, step, g)
        trusted = [(s, s + out_window) for s in starts]
        pad_before = model.halo
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
    ts = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    return TilePlan(
        plan_axis(model, shape[0], ts[0], halo, blended),
        plan_axis(model, shape[1], ts[1], halo, blended),
        blended,
    )


# ----------------------------------------------------------------------- reading
def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices (no edge repeat) into [0, n), as repeated ``np.pad(mode="reflect")``."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def read_window(plane: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Read the (C, len(rows), len(cols)) block of a lazy (C, Y, X) plane at mirrored indices."""
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    block = np.asarray(plane[:, r0:r1, c0:c1])
    if r1 - r0 != len(rows) or not np.array_equal(rows, np.arange(r0, r1)):
        block = block[:, rows - r0]
    if c1 - c0 != len(cols) or not np.array_equal(cols, np.arange(c0, c1)):
        block = block[:, :, cols - c0]
    return block


def gaussian_weights(shape: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian importance map (centre 1, floor 1e-6) for blended tiling.

    The floor only avoids division by zero: MONAI's 1e-3 lets a window edge with poor
    context weigh as much as good pixels near image borders (max error 0.39 vs 0.011
    with 1e-6 on bench/tiling.py's model)."""
    axes = []
    for n in shape:
        x = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-(x**2) / (2 * (n * sigma_scale) ** 2)))
    w = np.outer(*axes).astype(np.float32)
    return np.maximum(w / w.max(), 1e-6)


# ----------------------------------------------------------------------- running
@dataclass
class RunOptions:
    device: torch.device
    batch_size: int
    amp_dtype: torch.dtype | None
    channels_last: bool
    outputs: str = "final"  # "final" or "all"
    level: int | None = None
    backend: Callable[[np.ndarray], list[np.ndarray]] | None = None
    """A compiled runtime (:mod:`napari_unet.backends`) used instead of the torch model."""


def activation(logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, C, ...) → probabilities: sigmoid for one class, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _forward(model: SegmentationModel, x: torch.Tensor, opts: RunOptions) -> list[torch.Tensor]:
    if opts.backend is not None:
        return [torch.from_numpy(o) for o in opts.backend(x.numpy())]
    kwargs = {"level": opts.level} if opts.level is not None else {}
    with torch.inference_mode():
        with torch.autocast(
            opts.device.type,
            dtype=opts.amp_dtype or torch.float32,
            enabled=opts.amp_dtype is not None,
        ):
            if opts.outputs == "all":
                heads = model.forward_all(x)
                final = model(x, **kwargs) if kwargs else heads[model.final_index]
                return [activation(final)] + [activation(h) for h in heads]
            return [activation(model(x, **kwargs))]


def _writers(sinks: list[Any], opts: RunOptions, blended: bool) -> int:
    """Threads that stitch outputs: several for in-memory numpy outputs (disjoint cores,
    numpy copies release the GIL), one for stores (two cores can share a zarr chunk) and for
    blended accumulation (windows overlap)."""
    in_memory = all(isinstance(getattr(s, "array", s), np.ndarray) for s in sinks)
    if blended or not in_memory or opts.device.type != "cuda":
        return 1
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _to_host(outs: list[torch.Tensor], device: torch.device) -> Callable[[], list[np.ndarray]]:
    """Start copying ``outs`` to the host; the returned call waits for the copy.

    On CUDA the copy is asynchronous (pinned memory, an event), so the next batch runs on
    the GPU while this one is stitched on the CPU."""
    if device.type != "cuda":
        arrays = [o.numpy() if o.device.type == "cpu" else o.cpu().numpy() for o in outs]
        return lambda: arrays
    host = [o.contiguous().to("cpu", non_blocking=True) for o in outs]
    done = torch.cuda.Event()
    done.record()

    def wait() -> list[np.ndarray]:
        done.synchronize()
        return [h.numpy() for h in host]

    return wait


def run_plane(
    model: SegmentationModel,
    read: Callable[[np.ndarray, np.ndarray], np.ndarray],
    plan: TilePlan,
    sinks: list[Any],
    opts: RunOptions,
    *,
    on_batch: Callable[[int], None] | None = None,
    cancel: Any = None,
) -> None:
    """Predict one (Y, X) plane tile by tile into ``sinks``.

    ``read(rows, cols)`` returns a normalised float32 block (Cin, h, w) of the mirrored
    plane; ``sinks[k]`` are (C, H, W) arrays (numpy or zarr) receiving output ``k``
    (the final probabilities first; then every head with ``outputs="all"``).

    A pipeline: loader threads read and normalise the next batches while the device runs
    this one, and writer threads stitch finished batches (see :func:`_writers`); at most
    a few batches are in flight, so memory stays bounded.
    """
    rows, cols = plan.rows, plan.cols
    tiles = list(plan.tiles())
    batches = [tiles[i : i + opts.batch_size] for i in range(0, len(tiles), opts.batch_size)]
    weights = gaussian_weights(plan.window_shape) if plan.blended else None
    acc = wsum = None
    if plan.blended:
        acc = [np.zeros(s.shape, np.float32) for s in sinks]
        wsum = np.zeros(sinks[0].shape[-2:], np.float32)
    cuda = opts.device.type == "cuda"
    n_load, n_write = (2 if cuda else 1), _writers(sinks, opts, plan.blended)

    def load(batch: list[tuple[int, int]]) -> torch.Tensor:
        blocks = []
        for i, j in batch:
            r = np.arange(rows.starts[i], rows.starts[i] + rows.window) - rows.pad_before
            c = np.arange(cols.starts[j], cols.starts[j] + cols.window) - cols.pad_before
            blocks.append(read(r, c))
        x = torch.from_numpy(np.stack(blocks))
        return x.pin_memory() if cuda else x

    def write(batch: list[tuple[int, int]], fetch: Callable[[], list[np.ndarray]]) -> None:
        outs = fetch()
        for n, (i, j) in enumerate(batch):
            if plan.blended:
                _accumulate(outs, n, rows, cols, i, j, acc, wsum, weights)
                continue
            ra, rb, ro = rows.cores[i]
            ca, cb, co = cols.cores[j]
            for sink, out in zip(sinks, outs):
                sink[:, ra:rb, ca:cb] = out[n, :, ro : ro + rb - ra, co : co + cb - ca]

    with ThreadPoolExecutor(n_load) as loader, ThreadPoolExecutor(n_write) as writer:
        loads = [loader.submit(load, b) for b in batches[:n_load]]
        writes: list[Any] = []
        for b, batch in enumerate(batches):
            if is_cancelled(cancel):
                raise Cancelled()
            x = loads[b].result()
            loads[b] = None  # type: ignore[call-overload]  # release the batch once sent
            if b + n_load < len(batches):
                loads.append(loader.submit(load, batches[b + n_load]))
            x = x.to(opts.device, non_blocking=True)
            if opts.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            fetch = _to_host(_forward(model, x, opts), opts.device)
            writes.append(writer.submit(write, batch, fetch))
            while len(writes) > n_write + 1:  # bounded: finished outputs wait for a writer
                writes.pop(0).result()
            if on_batch is not None:
                on_batch(len(batch))
        for w in writes:
            w.result()
    if plan.blended:
        for sink, a in zip(sinks, acc):
            sink[...] = a / wsum


def _accumulate(outs, n, rows, cols, i, j, acc, wsum, weights) -> None:
    r0 = rows.starts[i] - rows.pad_before
    c0 = cols.starts[j] - cols.pad_before
    r1 = min(r0 + rows.out_window, rows.length)
    c1 = min(c0 + cols.out_window, cols.length)
    w = weights[: r1 - r0, : c1 - c0]
    for a, out in zip(acc, outs):
        a[:, r0:r1, c0:c1] += out[n, :, : r1 - r0, : c1 - c0] * w
    wsum[r0:r1, c0:c1] += w


def device_lock() -> threading.Lock:
    """Serialises GPU use between concurrent predictions in one process."""
    return _LOCK


_LOCK = threading.Lock()


def seam_score(probabilities: np.ndarray, plan: TilePlan) -> float:
    """Seam measure of a tiled prediction: 1.0 means no seam.

    The mean absolute difference between neighbouring pixels across the plan's tile
    boundaries (core hand-overs, or window edges when blended), divided by the same mean over all other neighbouring pairs
    (per axis, all classes). A hard seam makes it large; Gaussian blending keeps it ≈ 1.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    scores = []
    for axis, ap in ((-2, plan.rows), (-1, plan.cols)):
        diff = np.abs(np.diff(p, axis=axis))
        if plan.blended:  # where a window's contribution starts or stops
            edges = {s for s in ap.starts} | {s + ap.window for s in ap.starts}
        else:  # where one core hands over to the next
            edges = {a for a, _, _ in ap.cores}
        cuts = sorted(e - 1 for e in edges if 0 < e < ap.length)
        if not cuts:
            continue
        at = np.take(diff, cuts, axis=axis).mean()
        mask = np.ones(diff.shape[axis], bool)
        mask[cuts] = False
        rest = np.compress(mask, diff, axis=axis).mean()
        scores.append(at / max(rest, 1e-12))
    return float(max(scores)) if scores else 1.0
