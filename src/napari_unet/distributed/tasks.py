"""The chunk task, run on the workers: probabilities and per-chunk labels of one chunk.

The input is read around the chunk (its block, see :mod:`.spec`) through the one input
path, :class:`~napari_unet.inference.source.PlaneSource` (layout, the plane's
normalisation statistics from the client, mirrored windows at the true image borders
only), and runs through the one tiler with the block's plan — on the runtime the client
chose (:mod:`.compiled`) — so the chunk's probabilities equal the whole-image output, and
the single-process ``predict(..., exact=True)``, to float rounding. The chunk plus
``margin`` pixels is then segmented (:func:`napari_unet.postprocess.segment`) and only the
chunk's core is kept, so an object smaller than the margin is segmented exactly as in the
whole image. The task writes its data, then its completion mark
(:func:`~.store.mark_chunk`), so a chunk lost between the two is simply computed again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import RunSpec, block_plan
from .stitch import face_strips, relabel_core
from .store import WORK, mark_chunk, owner
from .worker import report, worker_model

STALE = {"stale": True}
"""The report of a task whose run no longer owns the store (nothing written)."""


@dataclass
class LazyImage:
    """Wraps a lazy image so that dask ships it as an object, never as a collection."""

    data: Any


def chunk_probabilities(
    model: Any,
    source: Any,
    spec: RunSpec,
    i: int,
    j: int,
    device: Any,
    backend: Any = None,
) -> tuple[np.ndarray, int, int]:
    """Probabilities (C, h, w) of the block of chunk (i, j) and its origin (A, Ac).

    ``source``: the chunk's plane (:class:`~napari_unet.inference.source.PlaneSource`);
    ``backend``: a compiled runtime (None: torch). The block's rows are ``[A, A + h)`` of
    the image (it may run into the bottom/right padding); every pixel of the chunk +
    ``margin`` equals the whole-image output.
    """
    import dask

    from ..inference.plan import DEFAULT_BATCH
    from ..inference.tiler import RunOptions, run_plane
    from ..runtime import amp_dtype, device_lock

    a, b, c, d = spec.core(i, j)
    r0, r1 = spec.block(a, b, spec.height)
    c0, c1 = spec.block(c, d, spec.width)
    opts = RunOptions(
        device=device,
        batch_size=spec.batch or DEFAULT_BATCH[device.type],
        amp_dtype=amp_dtype(device, spec.amp),
        channels_last=device.type == "cuda",
        level=spec.level,
        backend=backend,
    )

    def read(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return source.read(rows + r0, cols + c0)

    sink = np.zeros((spec.num_classes, r1 - r0, c1 - c0), np.float32)
    with dask.config.set(scheduler="synchronous"), device_lock():
        model.eval().to(device)
        if opts.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        run_plane(model, read, block_plan(model, spec), [sink], opts)
    return sink, r0, c0


def plane_source(spec: RunSpec, image: Any, p: int, stats: np.ndarray) -> Any:
    """Plane ``p`` of the run's input, with the client's normalisation statistics."""
    from ..inference.layout import resolve_layout
    from ..inference.source import PlaneSource

    data = image.data if isinstance(image, LazyImage) else image
    layout = resolve_layout(data, spec.in_channels, spec.axes, spec.channel)
    return PlaneSource(layout.plane(p), layout, stats)


def _instance(
    spec: RunSpec, group: Any, probs: np.ndarray, origin: tuple[int, int], lin: int
) -> int:
    """Per-chunk instance labels of the chunk's core and its face strips; the core's
    number of objects. ``probs`` is the block from row/column ``origin``."""
    from ..postprocess import segment

    p, i, j = spec.locate(lin)
    a, b, c, d = spec.core(i, j)
    r0, c0 = origin
    s0, s1 = max(a - spec.margin, 0), min(b + spec.margin, spec.height)
    sc0, sc1 = max(c - spec.margin, 0), min(d + spec.margin, spec.width)
    seg = segment(
        probs[:, s0 - r0 : s1 - r0, sc0 - c0 : sc1 - c0],
        mode="instance",
        class_names=spec.class_names,
        threshold=spec.threshold,
        min_size=spec.min_size,
        seed_h=spec.seed_h,
    )
    core = (slice(a - s0, b - s0), slice(c - sc0, d - sc0))
    seg, n = relabel_core(seg, core)
    work = group[WORK]
    work["scratch/labels"][(*spec.plane_index(p), slice(a, b), slice(c, d))] = seg[core]
    work["strips"][lin] = face_strips(spec, seg, s0, sc0, i, j)
    return n


def task_chunk(spec: RunSpec, image: Any, lin: int, stats: np.ndarray) -> dict[str, Any]:
    """Chunk ``lin``: probabilities, labels (semantic) or per-chunk labels and face
    strips (instance), then the completion mark; returns a small report."""
    start = time.perf_counter()
    held = worker_model(spec.key)
    p, i, j = spec.locate(lin)
    a, b, c, d = spec.core(i, j)
    source = plane_source(spec, image, p, stats)
    probs, r0, c0 = chunk_probabilities(held.model, source, spec, i, j, held.device, held.backend)
    group = owner(spec)
    if group is None:
        return STALE
    region = (*spec.plane_index(p), slice(a, b), slice(c, d))
    core = probs[:, a - r0 : b - r0, c - c0 : d - c0]
    group["probabilities"][(slice(None), *region)] = core
    if spec.mode == "semantic":
        from ..postprocess import segment

        group["labels"][region] = segment(
            core, mode="semantic", class_names=spec.class_names, threshold=spec.threshold
        )
        n = 0
    else:
        n = _instance(spec, group, probs, (r0, c0), lin)
    if not mark_chunk(spec, lin, n):
        return STALE
    return report(start, n, held.runtime)
