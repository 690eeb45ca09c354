"""``napari-unet predict --dask``: chunked prediction on a dask cluster into one zarr store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import STOP, ProgressBar, cli_model, model_path
from .predict_checks import spacing_of, volume_method


def predict_dask(args: argparse.Namespace, image) -> int:
    """``predict --dask``: chunked prediction on a dask cluster into one zarr store."""
    from ..distributed import check_scheduler, predict_distributed
    from ..ngff import add_labels_metadata
    from ..outputs import plan_output

    if args.probabilities is not None:
        raise ValueError(
            "--dask writes the probabilities into the output store; drop --probabilities"
        )
    check_scheduler(args.dask)
    if volume_method(args):
        return predict_volume_dask(args, image)
    plan_output(
        args.output, ("zarr",), overwrite=args.overwrite, resume=not args.overwrite,
        inputs=[args.image, model_path(args.model)], what="output store",
    )  # fmt: skip
    bar = ProgressBar("predict (chunks)")
    try:
        _, labels = predict_distributed(
            None if args.model is None else cli_model(args.model, args.untrained),
            image.data,
            scheduler=args.dask,
            out=args.output,
            axes=args.axes or image.axes,
            channel=args.channel,
            tile_size=args.tile,
            batch_size=args.batch,
            device=args.device,
            runtime=args.runtime,
            level=args.level,
            exact=args.halo is None,
            halo=args.halo,
            mode=args.mode,
            min_size=args.min_size,
            progress=bar,
            cancel=STOP,
            overwrite=args.overwrite,
        )
    finally:
        bar.close()
    letters = _labels_letters(args.axes or image.axes, labels.ndim)
    if letters:
        add_labels_metadata(args.output, letters, image.ngff)
    if bar.bar is None:  # no chunk reported: the store was complete before this run
        print(
            f"{args.output} is already complete (nothing computed; --overwrite recomputes it)",
            file=sys.stderr,
        )
        return 0
    print(
        f"wrote {args.output} (probabilities, {args.mode} labels {labels.shape}); "
        "an interrupted run resumes when started again with the same output",
        file=sys.stderr,
    )
    return 0


def predict_volume_dask(args: argparse.Namespace, image) -> int:
    """``--3d/--stitch --dask``: 3-D labels slab by slab on the cluster into OUT.zarr/labels
    (an NGFF group, the layout of the 2-D ``--dask`` output without probabilities)."""
    import shutil

    import zarr

    from ..ngff import add_labels_metadata
    from ..outputs import plan_output
    from ..volume_dask import segment_stack_distributed

    store = getattr(image.data, "store", None)
    root = getattr(store, "root", None)
    if root is None or image.data.ndim != 3 or (args.axes or image.axes or "ZYX") != "ZYX":
        raise ValueError(
            "--3d/--stitch with --dask read a (Z, Y, X) zarr stack that the workers can open; "
            f"{args.image} is not one (convert it to zarr, or drop --dask)"
        )
    if args.overwrite:
        raise ValueError("--3d/--stitch with --dask write a new store; drop --overwrite")
    plan_output(
        args.output, ("zarr",), inputs=[args.image, model_path(args.model)],
        what="output store",
    )  # fmt: skip
    source = str(Path(root) / image.data.path)
    bar = ProgressBar("predict (slabs)")
    zarr.open_group(args.output, mode="w-")  # fails, touching nothing, if it appeared meanwhile
    try:
        labels = segment_stack_distributed(
            None if args.model is None else cli_model(args.model, args.untrained),
            source, f"{args.output}/labels", scheduler=args.dask,
            method=volume_method(args), spacing=spacing_of(args, image),
            stitch_iou=args.stitch_iou, min_size=args.min_size, device=args.device,
            progress=bar, tile_size=args.tile, batch_size=args.batch, runtime=args.runtime,
        )  # fmt: skip
        add_labels_metadata(args.output, "ZYX", image.ngff)
    except BaseException:
        shutil.rmtree(args.output, ignore_errors=True)
        raise
    finally:
        bar.close()
    print(f"wrote {args.output} (3-D labels {labels.shape})", file=sys.stderr)
    return 0


def _labels_letters(axes: str | None, ndim: int) -> str | None:
    """Axes of the labels (the image's without C), when known."""
    letters = "".join(a for a in (axes or "") if a != "C")
    if not axes and ndim <= 3:
        letters = "ZYX"[-ndim:] if ndim >= 2 else ""
    return letters if len(letters) == ndim else None
