"""The one tiler: run a plan's windows in batches on a device (or a compiled runtime) and
stitch their outputs — cropped cores, or Gaussian-blended windows (see :mod:`.plan`).

A pipeline: loader threads read and normalise the next batches while the device runs
this one, and writer threads stitch the finished ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.base import SegmentationModel
from ..runtime import Cancelled, is_cancelled
from .plan import TilePlan


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
    stats: np.ndarray | None = None,
) -> None:
    """Predict one (Y, X) plane tile by tile into ``sinks``.

    ``read(rows, cols)`` returns a normalised float32 block (Cin, h, w) of the mirrored
    plane — or, with ``stats`` (Cin, 2) (offset, scale), the raw 8/16-bit block that the
    tiler normalises on the device after the transfer (the same float32 arithmetic as
    :func:`~.normalize.apply_normalization`; torch runtime only). ``sinks[k]`` are (C, H, W)
    arrays (numpy or zarr) receiving output ``k`` (the final probabilities first; then
    every head with ``outputs="all"``).

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
    if stats is not None and opts.backend is not None:
        raise ValueError("raw blocks are normalised on the device by the torch runtime only")
    on_device = _device_normalizer(stats, opts.device)

    load = _loader(read, rows, cols, cuda)

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
            x = on_device(x.to(opts.device, non_blocking=True))
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


def _loader(read: Callable, rows: Any, cols: Any, cuda: bool) -> Callable:
    """``load(batch)``: the batch's windows read and stacked into one (B, Cin, h, w) tensor
    (page-locked on CUDA, for an asynchronous transfer)."""

    def load(batch: list[tuple[int, int]]) -> torch.Tensor:
        blocks = []
        for i, j in batch:
            r = np.arange(rows.starts[i], rows.starts[i] + rows.window) - rows.pad_before
            c = np.arange(cols.starts[j], cols.starts[j] + cols.window) - cols.pad_before
            blocks.append(read(r, c))
        if not cuda:
            return torch.from_numpy(np.stack(blocks))
        # stacked straight into page-locked memory (one copy, and an asynchronous transfer)
        dtype = torch.from_numpy(blocks[0][:0]).dtype
        x = torch.empty((len(blocks), *blocks[0].shape), dtype=dtype, pin_memory=True)
        np.stack(blocks, out=x.numpy())
        return x

    return load


def _device_normalizer(
    stats: np.ndarray | None, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Identity, or ``(x.float() - offset) * scale`` per channel with float32 (offset,
    scale) on ``device``: two rounded float32 operations, bit-identical to numpy's.

    uint16 (a "bare-bones" torch dtype whose conversions CUDA may lack) is read as int16
    bits and widened to int32 first (exact)."""
    if stats is None:
        return lambda x: x
    lo = torch.from_numpy(stats[:, 0].astype(np.float32)).to(device).view(1, -1, 1, 1)
    scale = torch.from_numpy(stats[:, 1].astype(np.float32)).to(device).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint16:
            x = x.view(torch.int16).int() & 0xFFFF
        return (x.float() - lo) * scale

    return normalize


def _accumulate(outs, n, rows, cols, i, j, acc, wsum, weights) -> None:
    r0 = rows.starts[i] - rows.pad_before
    c0 = cols.starts[j] - cols.pad_before
    r1 = min(r0 + rows.out_window, rows.length)
    c1 = min(c0 + cols.out_window, cols.length)
    w = weights[: r1 - r0, : c1 - c0]
    for a, out in zip(acc, outs):
        a[:, r0:r1, c0:c1] += out[n, :, : r1 - r0, : c1 - c0] * w
    wsum[r0:r1, c0:c1] += w


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
