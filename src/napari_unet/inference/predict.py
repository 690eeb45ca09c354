"""Python API of tiled prediction: ``predict`` (probabilities) used by widgets, CLI and users."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.base import SegmentationModel
from ..outputs import Target, commit_all, plan_output
from ..runtime import amp_dtype, device_lock, select_device
from .layout import Layout, resolve_layout
from .normalize import get_normalization
from .plan import DEFAULT_BATCH, DEFAULT_TILE, tile_plan_for
from .resolve import resolve_model
from .source import PlaneSource
from .tiler import RunOptions, run_plane

__all__ = ["predict"]


class _PlaneSink:
    """Writes (C, h, w) blocks of one plane into a (C, *leading, H, W) array (numpy or zarr)."""

    def __init__(self, array: Any, index: tuple[int, ...]) -> None:
        self.array, self.index = array, index
        self.shape = (array.shape[0], *array.shape[-2:])

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        if key is Ellipsis:
            key = (slice(None),) * 3
        c, rows, cols = key
        self.array[(c, *self.index, rows, cols)] = value


def _allocate(
    out: Any,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    image: Any,
    created: list[Target],
    kind: str | None = None,
) -> Any:
    """numpy array, a given array, or a new zarr store at ``out`` — checked by the
    write-safety module (never an existing path, never the input) and written under a
    partial name (listed in ``created`` before it exists) until :meth:`Target.commit`."""
    if out is None:
        return np.zeros(shape, dtype=np.float32)
    if isinstance(out, (str, Path)):
        import zarr

        target = plan_output(out, ("zarr",), inputs=[image], what="out", kind=kind)
        created.append(target)
        return zarr.open_array(
            str(target.begin()), mode="w-", shape=shape, chunks=chunks, dtype="float32"
        )
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    return out


def predict(
    model: SegmentationModel | str | Path | None,
    image: Any,
    *,
    axes: str | None = None,
    tile_size: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    amp: bool | None = None,
    exact: bool = False,
    outputs: str = "final",
    level: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    channel: int | None = None,
    out: Any = None,
    halo: int | None = None,
    scheduler: Any = None,
    runtime: str | None = None,
) -> Any:
    """Class probabilities of ``image``, float32 ``(C, *leading, Y, X)``.

    ``image``: numpy, dask or zarr array, or a TIFF / zarr / OME-Zarr path (axes read from
    the file; an OME-Zarr image's full resolution), 2-D grey, (C,Y,X), RGB(A) (Y,X,3/4), Z-stacks
    and time series (predicted plane by plane); ``axes`` (letters of TZCYX) when the
    layout is ambiguous. ``C`` is the model's number of classes (one class: the
    foreground probability). ``outputs="all"`` returns ``(final, [every head])``.
    ``tile_size`` is the network's input window in pixels. ``out``: a new zarr path (or
    an array) to write into instead of memory. ``progress(done, total)`` is called after
    each batch of tiles; ``cancel`` (an Event or callable) stops within one batch by
    raising :class:`Cancelled`; a zarr store created here is then removed.

    ``runtime``: ``"auto"`` (``$NAPARI_UNET_RUNTIME``, else OpenVINO on the CPU when
    installed), ``"torch"`` or ``"openvino"`` (see :mod:`napari_unet.backends`): exact mode
    compiles at fp32 (equal to torch to ~1e-5); the default mode at bf16 on CPUs with bf16
    matrix units unless ``amp=False``.

    ``scheduler`` (a ``distributed.Client``, ``"tcp://…"`` or ``"local:N"``): predict on a
    dask cluster instead, chunk by chunk, into the zarr group ``out`` (required), and
    return its arrays ``(probabilities, labels)``; always exact tiling, resumable, see
    :func:`napari_unet.distributed.predict_distributed` for the options.
    """
    if isinstance(image, (str, os.PathLike)):  # a TIFF, zarr or OME-Zarr path: axes from it
        from ..io import open_image

        opened = open_image(image)
        image, axes = opened.data, axes or opened.axes
    if scheduler is not None:
        if outputs != "final":
            raise ValueError("distributed prediction returns the final output only")
        from ..distributed import predict_distributed

        return predict_distributed(
            model, image, scheduler=scheduler, out=out, axes=axes, channel=channel,
            tile_size=tile_size, batch_size=batch_size, device=device, amp=amp,
            exact=exact, halo=halo, level=level, progress=progress, cancel=cancel,
        )  # fmt: skip
    model = resolve_model(model)
    if outputs not in ("final", "all"):
        raise ValueError(f"outputs must be 'final' or 'all', got {outputs!r}")
    if level is not None and not hasattr(model, "level_parameters"):
        raise ValueError(f"level= prunes UNet++ only; {model.name} has no levels")
    layout = resolve_layout(image, model.in_channels, axes, channel)
    dev, _ = select_device(device)
    h, w = layout.spatial
    n_heads = model.num_outputs if outputs == "all" else 0
    out_shape = (model.num_classes, *layout.leading, h, w)
    chunks = (model.num_classes,) + (1,) * len(layout.leading) + (min(h, 1024), min(w, 1024))
    arrays = []
    created: list[Target] = []
    try:
        for k in range(1 + n_heads):
            dest = (
                out
                if k == 0
                else (None if out is None or not isinstance(out, (str, Path)) else f"{out}.head{k}")
            )
            arrays.append(
                _allocate(dest, out_shape, chunks, image, created, None if k == 0 else "zarr")
            )
        tile = tile_size or DEFAULT_TILE[dev.type]
        batch = batch_size or DEFAULT_BATCH[dev.type]
        while True:
            try:
                _predict_into(
                    model,
                    layout,
                    arrays,
                    dev,
                    tile,
                    batch,
                    amp,
                    exact,
                    outputs,
                    level,
                    progress,
                    cancel,
                    halo,
                    runtime,
                )
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                why = _cuda_step_down_reason(exc, dev)
                if why is None:
                    raise
                torch.cuda.empty_cache()
                if batch > 1:
                    batch //= 2
                    msg = f"{why}: retrying with batch size {batch}"
                elif tile > 2 * model.size_divisor and tile > 256:
                    tile //= 2
                    msg = f"{why}: retrying with tile size {tile}"
                else:
                    dev = torch.device("cpu")
                    msg = f"{why} at the smallest tile: falling back to the CPU"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if created:
            import zarr

            commit_all(created)
            arrays = [zarr.open_array(str(t.path), mode="r+") for t in created]
    except BaseException:
        for target in created:
            target.abort()
        raise
    if outputs == "all":
        return arrays[0], arrays[1:]
    return arrays[0]


def _cuda_step_down_reason(exc: BaseException, dev: torch.device) -> str | None:
    """Why a CUDA batch must be made smaller, or None when ``exc`` is another error.

    Out of memory, and kernels that index with 32 bits (e.g. bilinear upsampling in
    channels-last refuses outputs of 2³¹ elements or more: U²-Net's 64-channel full-resolution
    stages at a 3360² window and batch 4).
    """
    if dev.type != "cuda":
        return None
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "CUDA out of memory"
    text = str(exc)
    if "INT_MAX" in text or "32-bit index" in text or "canUse32BitIndexMath" in text:
        return "CUDA kernel limit (a tensor of 2³¹ elements or more)"
    return None


def _compiled_backend(model, layout, plan, dev, runtime, exact, amp, opts) -> Any:
    """The OpenVINO backend for this plan's window, or None (torch): see
    :func:`napari_unet.backends.resolve_runtime`; a model that cannot be converted stays on
    torch with a one-line warning."""
    from ..runtime import cpu_has_bf16
    from .backends import (
        AUTO_MIN_WINDOWS,
        AUTO_SKIP,
        RUNTIME_ENV,
        export_key,
        is_exported,
        openvino_backend,
        resolve_runtime,
    )

    name, _ = resolve_runtime(dev, runtime)
    if name != "openvino":
        return None
    fast = not exact and amp is not False and cpu_has_bf16()
    window = (model.in_channels, *plan.window_shape)
    chosen = runtime or os.environ.get(RUNTIME_ENV) or "auto"
    if chosen == "auto" and model.name in AUTO_SKIP:
        return None
    windows = plan.n_tiles * layout.n_planes
    if chosen == "auto" and windows < AUTO_MIN_WINDOWS:
        # a small job on weights never exported (e.g. just trained): the one-off export
        # would cost more than running the few windows on torch
        if not is_exported(export_key(model, window, opts.outputs, opts.level)):
            return None
    backend = openvino_backend(
        model, window, outputs=opts.outputs, level=opts.level, precision="bf16" if fast else "f32"
    )
    if isinstance(backend, str):
        warnings.warn(f"napari-unet: running on torch: {backend}", stacklevel=4)
        return None
    return backend


def _predict_into(
    model: SegmentationModel,
    layout: Layout,
    arrays: list[Any],
    dev: torch.device,
    tile: int,
    batch: int,
    amp: bool | None,
    exact: bool,
    outputs: str,
    level: int | None,
    progress: Callable[[int, int], None] | None,
    cancel: Any,
    halo: int | None,
    runtime: str | None = None,
) -> None:
    plan = tile_plan_for(model, layout.spatial, tile_size=tile, exact=exact, device=dev, halo=halo)
    opts = RunOptions(
        device=dev,
        batch_size=batch,
        amp_dtype=amp_dtype(dev, amp),
        channels_last=dev.type == "cuda",
        outputs=outputs,
        level=level,
    )
    norm = get_normalization(model)
    total = plan.n_tiles * layout.n_planes
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    was_training = model.training
    old_device = next(model.parameters()).device
    with device_lock():
        model.eval().to(dev)
        if opts.channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            opts.backend = _compiled_backend(model, layout, plan, dev, runtime, exact, amp, opts)
            for p in range(layout.n_planes):
                read = PlaneSource.open(layout, p, norm).read
                index = np.unravel_index(p, layout.leading) if layout.leading else ()
                sinks = [_PlaneSink(a, tuple(int(i) for i in index)) for a in arrays]
                run_plane(model, read, plan, sinks, opts, on_batch=on_batch, cancel=cancel)
        finally:
            model.to(old_device).train(was_training)
            if opts.channels_last:
                model.to(memory_format=torch.contiguous_format)
