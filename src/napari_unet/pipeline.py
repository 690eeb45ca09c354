"""Image → probabilities → labels: the one prediction pipeline of the CLI, demo and widgets.

:func:`segment_image` runs :func:`napari_unet.inference.predict.predict` and then the
post-processing (:func:`napari_unet.postprocess.segment` plane by plane, or
:func:`napari_unet.volume.segment_volume` for 3-D objects of a Z-stack), with progress and
cancelling in both stages, and returns a :class:`SegmentationResult` holding the arrays and
what the callers print or show (object count, device, runtime, seconds).

Nothing here imports napari or Qt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SegmentationResult", "segment_image"]

Progress = Callable[[int, int], None]


# --------------------------------------------------------------- segment_image (CLI, demo)
@dataclass
class SegmentationResult:
    """What :func:`segment_image` computed.

    Attributes:
        probabilities: float32 ``(C, *leading, Y, X)`` class probabilities in [0, 1] (C = the
            model's classes; ``leading`` = the image's Z/T axes, none for a 2-D image): a
            numpy array, or the zarr array written when ``out=`` was given.
        labels: uint32 ``(*leading, Y, X)`` labels (instance ids 1..N unique over the whole
            image, or class indices for ``mode="semantic"``); None for ``mode=None``.
        mode: ``"instance"``, ``"semantic"`` or None (no labels).
        objects: the largest label: the number of objects (instance), the highest class
            index (semantic), 0 without labels.
        class_names: the C class names (the model's, else the conventional ones).
        device: the device in words (``"CPU (requested)"``, ``"CUDA: NVIDIA H200"``).
        runtime: the inference runtime the windows ran on (``"torch"`` or ``"openvino"``;
            ``"auto"`` runs a small job with weights never exported on torch).
        seconds: wall-clock seconds of the network (tiled prediction).
        total_seconds: wall-clock seconds of prediction and post-processing.
    """

    probabilities: Any
    labels: np.ndarray | None
    mode: str | None
    objects: int
    class_names: list[str] = field(default_factory=list)
    device: str = ""
    runtime: str = ""
    seconds: float = 0.0
    total_seconds: float = 0.0


def _threads(dev: Any, threads: int | str | None) -> Any:
    """``torch_threads`` for CPU work when asked (``"auto"``: the engine's choice)."""
    if threads is None or getattr(dev, "type", str(dev)) != "cpu":
        return contextlib.nullcontext()
    from .runtime import torch_threads

    return torch_threads(None if threads == "auto" else int(threads))


def _check_cancel(cancel: Any) -> None:
    from .runtime import Cancelled, is_cancelled

    if is_cancelled(cancel):
        raise Cancelled("cancelled")


def segment_planes(
    probabilities: Any,
    *,
    mode: str = "instance",
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    min_size: int = 15,
    seed_h: float = 1.0,
    progress: Progress | None = None,
    cancel: Any = None,
) -> np.ndarray:
    """Labels of ``(C, *leading, Y, X)`` probabilities, plane by plane with progress.

    Equal to :func:`napari_unet.postprocess.segment` (instance ids unique over the stack),
    with ``progress(done_planes, total_planes)`` after each plane and ``cancel`` (an Event
    or a callable) checked before each plane (:class:`napari_unet.runtime.Cancelled`).

    Returns:
        uint32 ``(*leading, Y, X)`` labels.
    """
    from .postprocess import segment

    probs = probabilities
    lead = tuple(probs.shape[1:-2])
    planes = list(np.ndindex(*lead)) if lead else [()]
    opts = {"mode": mode, "class_names": class_names, "threshold": threshold}
    opts.update(min_size=min_size, seed_h=seed_h)
    if progress is not None:
        progress(0, len(planes))
    out = np.zeros(tuple(probs.shape[1:]), np.uint32)
    top = 0
    for i, idx in enumerate(planes):
        _check_cancel(cancel)
        plane = segment(np.asarray(probs[(slice(None), *idx)]), **opts)
        if mode == "instance":  # ids unique over the stack, as segment() numbers them
            plane = np.where(plane > 0, plane + top, 0).astype(np.uint32)
            top = max(top, int(plane.max(initial=0)))
        out[idx] = plane
        if progress is not None:
            progress(i + 1, len(planes))
    return out


def _labels(
    probs: Any,
    mode: str | None,
    names: list[str],
    post: dict[str, Any],
    objects_3d: bool,
    spacing: Sequence[float] | None,
    post_progress: Progress | None,
    cancel: Any,
) -> np.ndarray | None:
    if mode is None:
        return None
    if mode not in ("instance", "semantic"):
        raise ValueError(f"mode must be 'instance', 'semantic' or None, got {mode!r}")
    if not (objects_3d and mode == "instance"):
        return segment_planes(
            probs, mode=mode, class_names=names, progress=post_progress, cancel=cancel, **post
        )
    from .volume import segment_volume

    if probs.ndim != 4:
        raise ValueError(
            f"3-D objects need a (Z, Y, X) stack; this image gives {probs.ndim - 1}-D probabilities"
        )
    if post_progress is not None:
        post_progress(0, 1)
    labels = segment_volume(np.asarray(probs), class_names=names, spacing=spacing, **post)
    if post_progress is not None:
        post_progress(1, 1)
    return labels


def segment_image(
    model: Any, image: Any, *, axes: str | None = None, channel: int | None = None,
    device: Any = "auto", tile_size: int | None = None, batch_size: int | None = None,
    exact: bool = False, level: int | None = None, runtime: str | None = None,
    mode: str | None = "instance", threshold: float = 0.5, min_size: int = 15,
    seed_h: float = 1.0, objects_3d: bool = False, spacing: Sequence[float] | None = None,
    progress: Progress | None = None, post_progress: Progress | None = None,
    stage: Callable[[str], None] | None = None, cancel: Any = None, out: Any = None,
    threads: int | str | None = None,
) -> SegmentationResult:  # fmt: skip
    """Predict ``image`` with ``model`` and turn the probabilities into labels.

    Args:
        model: a napari-unet model, a checkpoint / bioimage.io package path, a bundled
            variant name, or None (the bundled default U-Net).
        image: numpy / dask / zarr array or an image path: 2-D grey ``(Y, X)``, ``(C, Y, X)``,
            RGB ``(Y, X, 3)``, Z-stacks and time series (predicted plane by plane).
        axes: the image's axes (letters of TZCYX) when the layout is ambiguous.
        channel: the channel a one-channel model reads from a multi-channel image.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or a torch device.
        tile_size: the network's input window in pixels (default: per device).
        batch_size: tiles per batch (default: per device).
        exact: exact tiling (halo = the receptive field; equal to one whole-image pass).
        level: UNet++ pruning level 1..depth (None: the full network).
        runtime: ``"auto"``, ``"torch"`` or ``"openvino"`` (see ``predict``).
        mode: ``"instance"`` (objects 1..N), ``"semantic"`` (class index per pixel) or None
            (probabilities only).
        threshold: probability above which a pixel is core / foreground.
        min_size: smallest object in pixels (voxels with ``objects_3d``).
        seed_h: h of the h-maxima seeds, in pixels of distance.
        objects_3d: instance labels of a ``(Z, Y, X)`` stack made in 3-D (one object per
            nucleus across planes) instead of plane by plane.
        spacing: voxel size ``(z, y, x)`` for ``objects_3d`` (any one unit; default isotropic).
        progress: ``progress(done_tiles, total_tiles)`` after each batch of tiles.
        post_progress: ``post_progress(done_planes, total_planes)`` while segmenting.
        stage: ``stage(text)`` when a stage starts (``"predicting on CPU (requested)"``,
            the one-off OpenVINO export of new weights, ``"segmenting"``; see ``predict``).
        cancel: a ``threading.Event`` or a callable; when set, stops within one batch or
            plane by raising :class:`napari_unet.runtime.Cancelled`.
        out: a new zarr path (or an array) that receives the probabilities instead of memory.
        threads: torch's CPU threads while predicting: None leaves torch's setting,
            ``"auto"``: :func:`napari_unet.runtime.choose_threads`, or a number.

    Returns:
        A :class:`SegmentationResult`: probabilities float32 ``(C, *leading, Y, X)``, labels
        uint32 ``(*leading, Y, X)`` (None when ``mode`` is None), the object count, the
        device and runtime in words and the seconds taken.
    """
    from .inference.predict import predict
    from .inference.resolve import resolve_model
    from .runtime import RunClock, select_device

    model, _ = resolve_model(model)
    dev, why = select_device(device)
    noted = RunClock(stage, forward_run=True)  # keeps the runtime the windows ran on
    if stage is not None:
        stage(f"predicting on {why}")
    t0 = time.perf_counter()
    with _threads(dev, threads):
        probs = predict(
            model, image, axes=axes, channel=channel, tile_size=tile_size,
            batch_size=batch_size, device=dev, exact=exact, level=level, progress=progress,
            cancel=cancel, out=out, runtime=runtime, stage=noted,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    _check_cancel(cancel)  # a stop during the last batch: no segmenting
    names = model.class_names
    if stage is not None and mode is not None:
        stage("segmenting")
    post = {"threshold": threshold, "min_size": min_size, "seed_h": seed_h}
    labels = _labels(probs, mode, names, post, objects_3d, spacing, post_progress, cancel)
    _check_cancel(cancel)
    objects = int(labels.max(initial=0)) if labels is not None else 0
    total = time.perf_counter() - t0
    ran = noted.runtime
    return SegmentationResult(probs, labels, mode, objects, names, why, ran, seconds, total)


# ------------------------------------------------- side outputs, weight-map stacks (widgets)
# The Inspect widget's engine: what training emphasises (border weight maps of a labels
# layer, plane by plane) and what each depth of a network predicts (every deep-supervision
# / side output, with a Dice against the final output and its parameters and time).


def weight_map_stack(
    labels: Any, *, w0: float = 10.0, sigma: float = 5.0, class_weights: Any = "balanced"
) -> np.ndarray:
    """The U-Net border weight map of 2-D labels, plane by plane for stacks.

    Args:
        labels: ``(*leading, Y, X)`` integer labels (0 = background).
        w0, sigma, class_weights: as :func:`napari_unet.weightmap.border_weight_map`.

    Returns:
        float32 ``(*leading, Y, X)`` weights.
    """
    from .weightmap import border_weight_map

    labels = np.asarray(labels)
    opts = {"w0": w0, "sigma": sigma, "class_weights": class_weights}
    if labels.ndim == 2:
        return border_weight_map(labels, **opts)
    out = np.empty(labels.shape, np.float32)
    for idx in np.ndindex(*labels.shape[:-2]):
        out[idx] = border_weight_map(labels[idx], **opts)
    return out


@dataclass
class SideOutputs:
    """What :func:`side_outputs` computed.

    Attributes:
        maps: float32 ``(N, *leading, Y, X)`` foreground probability of each of the N
            outputs (UNet++: levels L1…; U²-Net / UNet 3+: side outputs, the final one
            among them).
        rows: one dict per output with the keys of :data:`SIDE_OUTPUT_COLUMNS` (text).
        seconds: wall-clock seconds of the whole run (timing the UNet++ levels included).
    """

    maps: np.ndarray
    rows: list[dict[str, str]]
    seconds: float


SIDE_OUTPUT_COLUMNS = ("output", "parameters", "time", "Dice vs final")


def side_outputs(
    model: Any,
    image: Any,
    *,
    axes: str | None = None,
    channel: int | None = None,
    device: Any = "auto",
    threads: int | str | None = "auto",
    progress: Progress | None = None,
    stage: Callable[[str], None] | None = None,
    cancel: Any = None,
) -> SideOutputs:
    """Every deep-supervision / side output of ``model`` on ``image`` and its table row.

    Args:
        model: a napari-unet model object.
        image, axes, channel, device, cancel: as :func:`segment_image`.
        threads: CPU threads of torch (as :func:`segment_image`; default the engine's).
        progress: ``progress(done_tiles, total_tiles)`` of the all-outputs prediction.
        stage: ``stage(text)`` when a stage starts (``"all outputs"``, ``"timing level L2"``).

    Returns:
        A :class:`SideOutputs`; "Dice vs final" compares each output's foreground (> 0.5)
        with the final output's.
    """
    from .runtime import select_device

    names = model.class_names
    dev, _ = select_device(device)
    if stage is not None:
        stage("all outputs")
    opts = {"axes": axes, "channel": channel, "device": dev, "cancel": cancel}
    with _threads(dev, threads):
        return _side_outputs(model, image, names, opts, progress, stage)


def _side_outputs(
    model: Any,
    image: Any,
    names: list[str],
    opts: dict[str, Any],
    progress: Progress | None,
    stage: Callable[[str], None] | None,
) -> SideOutputs:
    from .inference.predict import predict
    from .metrics import dice
    from .postprocess import _foreground
    from .runtime import RunClock

    t0 = time.perf_counter()
    clock = RunClock(stage)
    final, heads = predict(model, image, outputs="all", progress=progress, stage=clock, **opts)
    t_all = clock.since_run()
    fg_final = _foreground(final, names) > 0.5
    maps = [_foreground(h, names) for h in heads]
    unetpp = model.supports_levels
    n = len(heads)
    final_index = model.final_index % n
    rows = []
    for i, fg in enumerate(maps):
        if unetpp:
            level = i + 1 if model.deep_supervision else model.depth
            name = f"L{level}" + (" (final)" if i == final_index else "")
            params = model.level_parameters(level)
            if stage is not None:
                stage(f"timing level L{level}")
            clock = RunClock(stage)
            predict(model, image, level=level, stage=clock, **opts)
            seconds = f"{clock.since_run():.2f} s"
        else:
            name = model.output_names[i] + (" (final)" if i == final_index and n > 1 else "")
            if n == 1:
                name = "final (single output)"
            params = model.info.parameters
            seconds = f"{t_all:.2f} s (all)" if i == final_index else "—"
        score = dice(fg > 0.5, fg_final)
        row = (name, f"{params:,}", seconds, f"{score:.3f}")
        rows.append(dict(zip(SIDE_OUTPUT_COLUMNS, row)))
    stack = np.stack(maps).astype(np.float32)
    return SideOutputs(maps=stack, rows=rows, seconds=time.perf_counter() - t0)


# ------------------------------------------------------- the default model (demo, widgets)
FALLBACK_VARIANT = "unet"
FALLBACK_CONFIG: dict[str, Any] = {"base_channels": 16, "depth": 3}
"""Same shape as the bundled default (3-class U-Net), used untrained when it is missing."""
FALLBACK_CLASSES = 3


def default_or_fallback() -> tuple[Any, str, bool]:
    """(model, source, untrained): the bundled model, else an untrained 3-class U-Net.

    Imports torch; also measures the receptive field (``model.info``)."""
    from .checkpoint import load_default_model

    try:
        model = load_default_model()
        source, untrained = "bundled default", False
    except FileNotFoundError:
        from .models import build_model

        model = build_model(FALLBACK_VARIANT, 1, FALLBACK_CLASSES, **FALLBACK_CONFIG)
        source, untrained = "UNTRAINED fallback (bundled model missing)", True
    model.info  # noqa: B018
    return model, source, untrained
