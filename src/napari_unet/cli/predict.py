"""``napari-unet predict``: an image → labels (and probabilities) in memory, or with
``--3d``/``--stitch`` 3-D labels of Z-stacks; ``--dask`` goes to :mod:`.predict_dask`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from .common import STOP, ProgressBar, check_stop, cli_model, model_path
from .predict_checks import check_memory, check_targets, spacing_of, volume_method


def _write_labels(target, labels: np.ndarray, letters: str, image) -> None:
    """Labels to a TIFF, or to a zarr store laid out as ``--dask`` writes it: a group whose
    ``labels`` array is an NGFF image with the source's scale and translation."""
    from ..ngff import create_image, labels_axes
    from ..outputs import write_data

    if target.kind != "zarr" or len(letters) != labels.ndim:
        write_data(target, labels)
        return
    scale, translation, units = labels_axes(letters, image.ngff)
    array = create_image(
        target.begin(), labels.shape, labels.dtype, letters, scale=scale,
        translation=translation, units=units, name="labels", dataset="labels",
    )  # fmt: skip
    array[...] = labels


def _labels_into_image(args: argparse.Namespace, image, labels: np.ndarray, letters: str) -> str:
    """``--labels-into-image NAME``: a new NGFF label image inside the input OME-Zarr; on any
    failure (disk full, Ctrl-C) the image's store is left as it was."""
    import shutil

    import zarr

    from ..ngff import create_labels, labels_axes, remove_labels

    scale, translation, units = labels_axes(letters, image.ngff)
    root = image.path  # the NGFF image group itself (open_image found its multiscales)
    group = root / "labels"
    existed = group.exists()
    listed = list(zarr.open_group(str(group), mode="r").attrs.get("labels", [])) if existed else []
    try:
        array = create_labels(
            root, args.labels_into_image, labels.shape, labels.dtype, letters, scale=scale,
            translation=translation, units=units,
        )  # fmt: skip
        array[...] = labels
    except BaseException:
        if existed:
            remove_labels(root, args.labels_into_image, listed)
        else:
            shutil.rmtree(group, ignore_errors=True)
        raise
    return f"{root}/labels/{args.labels_into_image}"


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict IMAGE -o OUT``: labels (and ``--probabilities``) of an image; 0 when written."""
    from ..io import open_image
    from ..outputs import commit_all, writing
    from ..runtime import select_device

    if args.dask:
        from .predict_dask import predict_dask

        image = open_image(args.image, series=args.series)
        check_targets(args, image.ngff is not None)
        return predict_dask(args, image)
    if args.halo is not None:
        raise ValueError("--halo sets the context of --dask chunks; without --dask use --tile")
    check_targets(args, None)
    labels_to, probs_to = _plan_outputs(args)
    image = open_image(args.image, series=args.series)
    check_targets(args, image.ngff is not None)
    model = cli_model(args.model, args.untrained)
    layout = _layout(args, image, model)
    letters = layout.leading_axes + "YX"
    device, why = select_device(args.device)
    print(f"model {model.name} ({model.info.parameters:,} parameters) on {why}", file=sys.stderr)
    with writing([labels_to, probs_to]):
        labels = _compute(args, image, model, layout, device, probs_to)
        if labels_to is not None:
            _write_labels(labels_to, labels, letters, image)
        check_stop()  # a stop requested while segmenting or writing: commit nothing
        commit_all([probs_to, labels_to])
    where = args.output
    if args.labels_into_image is not None:
        where = _labels_into_image(args, image, labels, letters)
    n = int(labels.max())
    print(
        f"wrote {where} ({args.mode} labels, {n} {'objects' if args.mode == 'instance' else 'classes'})",
        file=sys.stderr,
    )
    return 0


def _plan_outputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(labels target, probabilities target): format, never an input, never each other,
    writable — checked before anything is computed."""
    from ..outputs import plan_outputs

    return plan_outputs(
        [
            (args.output, ("tiff", "zarr"), "labels output"),
            (args.probabilities, ("tiff", "zarr"), "probabilities output"),
        ],
        overwrite=args.overwrite,
        inputs=[args.image, model_path(args.model)],
    )


def _layout(args: argparse.Namespace, image: Any, model: Any) -> Any:
    """The image's layout for the model, after the memory and ``--3d`` checks."""
    from ..inference.layout import resolve_layout

    axes = args.axes or image.axes
    check_memory(image, model, axes, args.channel)
    layout = resolve_layout(image.data, model.in_channels, axes, args.channel)
    if volume_method(args) and "Z" not in layout.leading_axes:
        raise ValueError(f"--3d/--stitch need a Z axis; {args.image} has axes {layout.axes}")
    return layout


def _compute(args: argparse.Namespace, image, model, layout, device, probs_to) -> np.ndarray:
    """The labels (``--3d``/``--stitch``: of every Z-stack); the probabilities go to
    ``probs_to`` (a zarr store is written while predicting)."""
    from ..outputs import write_data
    from ..pipeline import segment_image

    bar = ProgressBar("predict")
    method = volume_method(args)
    if method:
        if probs_to is not None:
            raise ValueError("--probabilities is not written with --3d/--stitch")
        return _predict_volume(args, image, model, layout, device, bar, method)
    stream = probs_to is not None and probs_to.kind == "zarr"
    try:
        result = segment_image(
            model, image.data, axes=args.axes or image.axes, channel=args.channel,
            device=device, tile_size=args.tile, batch_size=args.batch, exact=args.exact,
            level=args.level, runtime=args.runtime, mode=args.mode, min_size=args.min_size,
            progress=bar, cancel=STOP, out=probs_to.begin() if stream else None,
            stage=_say_slow_step,
        )  # fmt: skip
    finally:
        bar.close()
    if probs_to is not None and not stream:
        write_data(probs_to, result.probabilities)
    return result.labels


def _say_slow_step(text: str) -> None:
    """Print the slow one-off steps (OpenVINO export and compilation) on stderr."""
    if getattr(text, "kind", None) in ("export", "compile"):
        print(f"napari-unet: {text}…", file=sys.stderr)


def _predict_volume(args, image, model, layout, device, bar, method: str) -> np.ndarray:
    """--3d / --stitch: 3-D labels of every Z-stack of the image (each time point)."""
    from ..volume import segment_stack

    spacing = spacing_of(args, image)
    stacks = layout.data  # (*leading, C, Y, X) with Z among the leading axes
    z_at = layout.leading_axes.index("Z")
    if layout.leading_axes not in ("Z", "TZ"):
        raise ValueError(f"--3d/--stitch take ZYX or TZYX images, not {layout.axes}")
    out = np.zeros((*layout.leading, *layout.spatial), np.uint32)
    offset = 0
    outer = layout.leading[:z_at]
    for idx in np.ndindex(*outer) if outer else [()]:
        stack = stacks[idx]  # (Z, C, Y, X)
        labels = segment_stack(
            model, stack, method=method, axes="ZCYX", spacing=spacing,
            stitch_iou=args.stitch_iou, min_size=args.min_size, device=device,
            tile_size=args.tile, batch_size=args.batch, progress=bar, runtime=args.runtime,
        )  # fmt: skip
        out[idx] = np.where(labels > 0, labels + offset, 0)
        offset += int(labels.max())
    bar.close()
    return out
