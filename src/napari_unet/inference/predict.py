"""Python API of tiled prediction: ``predict`` (probabilities) used by widgets, CLI and users."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.base import SegmentationModel
from ..outputs import Target, commit_all, plan_output
from ..runtime import StageNote, amp_dtype, device_lock, select_device
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
    stage: Callable[[str], None] | None = None,
) -> Any:
    """Class probabilities of ``image``, predicted window by window.

    Args:
        model: a network, a checkpoint / bioimage.io package path, a bundled variant's
            name (``"unetpp"``) or None (the bundled default U-Net); see
            :func:`~.resolve.resolve_model`.
        image: numpy, dask or zarr array, or a TIFF / zarr / OME-Zarr path (axes read from
            the file; an OME-Zarr image's full resolution): 2-D grey (Y, X), (C, Y, X),
            RGB(A) (Y, X, 3|4), Z-stacks and time series (predicted plane by plane).
        axes: letters of TZCYX when the layout is ambiguous; ``channel`` picks one channel.
        tile_size: the network's input window in pixels (default 768 on the CPU, 1024 on
            CUDA); ``batch_size`` windows per forward pass (1 / 4).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``amp``: bf16/fp16
            autocast (default: on CUDA only).
        exact: windows with a halo of the whole receptive-field radius, so the result
            equals the whole-image output (fp32: ≤ 1e-4); default: a shorter halo (see
            :mod:`.plan`), differences far below what is visible. ``halo`` overrides it
            (pixels).
        outputs: ``"final"`` or ``"all"`` (also every deep-supervision head); ``level``
            prunes UNet++ to that depth.
        progress: ``progress(done, total)`` after each batch of windows; ``cancel`` (an
            Event or a callable) stops within one batch by raising
            :class:`~napari_unet.runtime.Cancelled` (a zarr store created here is removed).
        out: a new zarr path (or an array) to write into instead of memory.
        scheduler: a ``distributed.Client``, ``"tcp://…"`` or ``"local:N"``: predict on a
            dask cluster instead, chunk by chunk, into the zarr group ``out`` (required);
            always exact, resumable (:func:`napari_unet.distributed.predict_distributed`).
        runtime: ``"auto"`` (``$NAPARI_UNET_RUNTIME``, else OpenVINO on the CPU when
            installed), ``"torch"`` or ``"openvino"`` (:mod:`.backends`): exact mode
            compiles at fp32 (equal to torch to ~1e-5); the default mode at bf16 on CPUs
            with bf16 matrix units unless ``amp=False``.
        stage: ``stage(text)`` when a slow step starts before the first window: the one-off
            OpenVINO export of new weights (a few seconds) and its compilation; then the
            runtime the windows run on (``"running 12 windows on OpenVINO bf16"``).

    Returns:
        float32 ``(C, *leading, Y, X)`` probabilities in [0, 1] (``C`` = the model's
        classes; one class: the foreground probability), a numpy array or the zarr array
        at ``out``; with ``outputs="all"`` ``(final, [one per head])``; with
        ``scheduler`` the zarr arrays ``(probabilities, labels)``.
    """
    if isinstance(image, (str, os.PathLike)):  # a TIFF, zarr or OME-Zarr path: axes from it
        from ..io import open_image

        opened = open_image(image)
        image, axes = opened.data, axes or opened.axes
    if scheduler is not None:  # the one hand-off to the cluster code (it never calls back)
        return _on_cluster(model, image, scheduler, outputs, locals())
    model = _trained_or_warned(model)
    if outputs not in ("final", "all"):
        raise ValueError(f"outputs must be 'final' or 'all', got {outputs!r}")
    model.check_level(level)
    layout = resolve_layout(image, model.in_channels, axes, channel)
    dev, _ = select_device(device)
    tile, batch = _tile_and_batch(dev, tile_size, batch_size)
    run = _Run(tile, batch, amp, exact, outputs, level, progress, cancel, halo, runtime, stage)
    arrays = _predict_all(model, layout, out, image, dev, run)
    return (arrays[0], arrays[1:]) if outputs == "all" else arrays[0]


def _tile_and_batch(dev: torch.device, tile_size: Any, batch_size: Any) -> tuple[int, int]:
    """The device's defaults for None; 0 or less is refused (never silently the default)."""
    tile = DEFAULT_TILE[dev.type] if tile_size is None else int(tile_size)
    batch = DEFAULT_BATCH[dev.type] if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return tile, batch


_CLUSTER_ARGS = ("out", "axes", "channel", "tile_size", "batch_size", "device", "amp", "exact",
                 "halo", "level", "progress", "cancel", "runtime")  # fmt: skip
# ``stage`` is not passed on: the dask client reports its own progress


def _on_cluster(model: Any, image: Any, scheduler: Any, outputs: str, args: dict) -> Any:
    """``predict(scheduler=...)``: the whole run on dask (final output only)."""
    if outputs != "final":
        raise ValueError("distributed prediction returns the final output only")
    from ..distributed import predict_distributed

    kwargs = {k: args[k] for k in _CLUSTER_ARGS}
    return predict_distributed(model, image, scheduler=scheduler, **kwargs)


def _trained_or_warned(spec: Any) -> SegmentationModel:
    """The network of ``spec``; a variant name without bundled weights is built untrained,
    with a warning (the API's one place to say so; the CLI and widgets show it instead)."""
    model, trained = resolve_model(spec)
    if not trained:
        warnings.warn(f"{spec!r} is a variant name: its weights are untrained", stacklevel=3)
    return model


def _predict_all(model, layout: Layout, out, image, dev: torch.device, run: _Run) -> list:
    """Allocate the outputs, predict into them, and commit (or remove) created stores."""
    created: list[Target] = []
    try:
        arrays = _allocate_all(model, layout, out, image, run.outputs, created)
        _run_stepping_down(model, layout, arrays, dev, run)
        if created:
            import zarr

            commit_all(created)
            arrays = [zarr.open_array(str(t.path), mode="r+") for t in created]
    except BaseException:
        for target in created:
            target.abort()
        raise
    return arrays


@dataclass
class _Run:
    """Settings of one prediction (see :func:`predict`); tile and batch may step down."""

    tile: int
    batch: int
    amp: bool | None
    exact: bool
    outputs: str
    level: int | None
    progress: Callable[[int, int], None] | None
    cancel: Any
    halo: int | None
    runtime: str | None
    stage: Callable[[str], None] | None = None


def _allocate_all(model, layout: Layout, out, image, outputs: str, created) -> list[Any]:
    """The final output's array, then one per head with ``outputs="all"``."""
    h, w = layout.spatial
    shape = (model.num_classes, *layout.leading, h, w)
    chunks = (model.num_classes,) + (1,) * len(layout.leading) + (min(h, 1024), min(w, 1024))
    n_heads = model.num_outputs if outputs == "all" else 0
    arrays = [_allocate(out, shape, chunks, image, created)]
    for k in range(1, 1 + n_heads):
        dest = f"{out}.head{k}" if isinstance(out, (str, Path)) else None
        arrays.append(_allocate(dest, shape, chunks, image, created, "zarr"))
    return arrays


def _run_stepping_down(model, layout: Layout, arrays, dev: torch.device, run: _Run) -> None:
    """Predict into ``arrays``; on CUDA out-of-memory (or a 32-bit kernel limit) retry with
    half the batch, then half the tile, then on the CPU, each with a warning; a bf16
    OpenVINO run with NaN / inf output is run again at f32, with a warning."""
    from .backends import NonFiniteOutput

    while True:
        try:
            _predict_into(model, layout, arrays, dev, run)
            return
        except NonFiniteOutput:
            if run.amp is False:  # f32 never raises it
                raise
            run.amp = False
            msg = f"{model.name} gave non-finite values at bf16 on OpenVINO: predicting at f32"
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            why = _cuda_step_down_reason(exc, dev)
            if why is None:
                raise
            torch.cuda.empty_cache()
            if run.batch > 1:
                run.batch //= 2
                msg = f"{why}: retrying with batch size {run.batch}"
            elif run.tile > 2 * model.size_divisor and run.tile > 256:
                run.tile //= 2
                msg = f"{why}: retrying with tile size {run.tile}"
            else:
                dev = torch.device("cpu")
                msg = f"{why} at the smallest tile: falling back to the CPU"
            warnings.warn(msg, RuntimeWarning, stacklevel=4)


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


def _compiled_backend(model, layout, plan, dev, run: _Run, opts) -> Any:
    """The OpenVINO backend for this plan's window, or None (torch): the rule of
    :func:`~.backends.compiled_precision` (shared with the dask run); a model that cannot
    be converted stays on torch with a one-line warning."""
    from .backends import compiled_precision, openvino_backend

    window = (model.in_channels, *plan.window_shape)
    precision = compiled_precision(
        model, window, windows=plan.n_tiles * layout.n_planes, device=dev,
        runtime=run.runtime, exact=run.exact, amp=run.amp, outputs=opts.outputs,
        level=opts.level,
    )  # fmt: skip
    if precision is None:
        return None
    backend = openvino_backend(
        model, window, outputs=opts.outputs, level=opts.level, precision=precision,
        stage=run.stage,
    )  # fmt: skip
    if isinstance(backend, str):
        warnings.warn(f"napari-unet: running on torch: {backend}", stacklevel=4)
        return None
    return backend


def _predict_into(
    model: SegmentationModel, layout: Layout, arrays: list[Any], dev: torch.device, run: _Run
) -> None:
    """Source → planner → tiler → runtime, plane by plane, into ``arrays``."""
    plan = tile_plan_for(
        model, layout.spatial, tile_size=run.tile, exact=run.exact, device=dev, halo=run.halo
    )
    opts = RunOptions(
        device=dev,
        batch_size=run.batch,
        amp_dtype=amp_dtype(dev, run.amp),
        channels_last=dev.type == "cuda",
        outputs=run.outputs,
        level=run.level,
    )
    norm = get_normalization(model)
    total = plan.n_tiles * layout.n_planes
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if run.progress is not None:
            run.progress(done, total)

    was_training = model.training
    old_device = next(model.parameters()).device
    with device_lock():
        model.eval().to(dev)
        if opts.channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            opts.backend = _compiled_backend(model, layout, plan, dev, run, opts)
            if run.stage is not None:
                on = f"OpenVINO {opts.backend.precision}" if opts.backend else f"torch ({dev})"
                size = "×".join(map(str, plan.window_shape))
                ran = "openvino" if opts.backend else "torch"
                windows = f"{total} window{'s' if total != 1 else ''}"
                run.stage(StageNote("run", f"running {windows} of {size} on {on}", ran))
            for p in range(layout.n_planes):
                source = PlaneSource.open(layout, p, norm)
                raw = opts.backend is None and source.raw_ok  # normalised on the device
                index = np.unravel_index(p, layout.leading) if layout.leading else ()
                sinks = [_PlaneSink(a, tuple(int(i) for i in index)) for a in arrays]
                run_plane(
                    model, source.read_raw if raw else source.read, plan, sinks, opts,
                    on_batch=on_batch, cancel=run.cancel, stats=source.stats if raw else None,
                )  # fmt: skip
        finally:
            model.to(old_device).train(was_training)
            if opts.channels_last:
                model.to(memory_format=torch.contiguous_format)
