"""``napari-unet`` command line: argument parsing only; the engine does the work."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np


def _cmd_models(args: argparse.Namespace) -> int:
    from .models.summary import format_table, model_rows

    print(format_table(model_rows(args.in_channels, args.classes)))
    return 0


class _ProgressBar:
    """tqdm progress bar fed by the engine's ``progress(done, total)`` callback."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="tile", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cli_model(spec: str | None, untrained: bool):
    """``-m``: None → the bundled default; a bundled name → its trained weights
    (``unetpp``, ``unet3p``, ``u2netp``, ``swin_unet``, ``unet_valid``, ``unet``); a
    ``.safetensors`` path → that checkpoint; ``--untrained`` → a fresh 3-class network."""
    import warnings

    from .inference.resolve import resolve_model
    from .models import build_model
    from .models.pretrained import is_pretrained, load_pretrained

    if untrained:
        if spec is None or str(spec).endswith(".safetensors"):
            raise ValueError("--untrained needs a variant name: -m unetpp --untrained")
        model = build_model(str(spec), 1, 3)
        print(f"warning: {spec!r}: a fresh, untrained {model.name}", file=sys.stderr)
        return model
    if spec is not None and is_pretrained(spec):
        return load_pretrained(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = resolve_model(spec)
    if spec is not None and not Path(spec).suffix and not Path(spec).exists():
        print(
            f"warning: {spec!r} has no bundled weights: an untrained {model.name}; "
            "pass a checkpoint",
            file=sys.stderr,
        )
    return model


def _cmd_export(args: argparse.Namespace) -> int:
    """``export MODEL -o NAME.zip``: a bioimage.io model package of any model."""
    import os

    try:
        from .bioimageio import export_bioimageio
    except ImportError:  # pragma: no cover - the extra is part of the README set-up
        raise ValueError(
            'exporting needs the bioimageio extra: pip install "napari-unet[bioimageio]"'
        ) from None
    out = Path(args.output)
    if args.model and os.path.realpath(args.model) == os.path.realpath(out):
        raise ValueError(f"{out} is the model being exported; choose another output name")
    model = _cli_model(args.model, False)
    written = export_bioimageio(
        model, out, name=args.name, authors=args.author or None, license=args.license,
        overwrite=args.overwrite,
    )  # fmt: skip
    size = written.stat().st_size / 1e6
    print(f"wrote {written} (bioimage.io model package, {size:.1f} MB)", file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_models, format_rows
    from .io import read_image
    from .training import parse_roi

    image = np.asarray(read_image(args.image))
    labels = np.asarray(read_image(args.labels))
    rois = [parse_roi(r) for r in args.roi] if args.roi else None
    models = None
    if args.models:
        models = {
            m: (m if str(m).endswith(".safetensors") else _cli_model(m, False)) for m in args.models
        }

    def progress(done: int, total: int, name: str) -> None:
        print(f"[{done}/{total}] {name}", file=sys.stderr)

    rows = compare_models(
        models, image, labels, rois=rois, heads=not args.no_heads, ap=not args.no_ap,
        device=args.device, progress=progress,
    )  # fmt: skip
    if args.json:
        import json

        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(format_rows(rows))
    return 0


def _model_path(spec: str | None) -> str | None:
    """``-m`` when it names a file (an input the outputs must not touch)."""
    return (
        spec if spec is not None and (str(spec).endswith(".safetensors") or "/" in spec) else None
    )


def _check_memory(image, model, axes: str | None, channel: int | None) -> None:
    """Refuse, with the sizes, an in-memory prediction that cannot fit (before computing)."""
    from .inference.layout import resolve_layout
    from .io import format_bytes, memory_budget

    layout = resolve_layout(image.data, model.in_channels, axes, channel)
    h, w = layout.spatial
    pixels = float(layout.n_planes) * h * w
    # probabilities (float32 per class) + labels (uint32) + segmentation work space
    need = pixels * (4 * model.num_classes + 4 + 24)
    budget = memory_budget()
    if need > budget:
        raise ValueError(
            f"{image.describe()}; predicting it in memory needs about {format_bytes(need)} "
            f"but about {format_bytes(budget)} is available — predict it into a zarr store "
            "in bounded memory instead: -o OUT.zarr --dask local:N"
        )


def _volume_method(args: argparse.Namespace) -> str | None:
    return "3d" if args.volume_3d else ("stitch" if args.stitch else None)


def _spacing(args: argparse.Namespace, image) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x): --scale, else the OME-Zarr metadata, else None (isotropic)."""
    if args.scale:
        try:
            values = tuple(float(v) for v in args.scale.split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or not all(v > 0 for v in values):
            raise ValueError(f"--scale takes three positive numbers Z,Y,X, got {args.scale!r}")
        return values  # type: ignore[return-value]
    if image.ngff is not None and "Z" in image.ngff.axes:
        return image.ngff.spatial("ZYX")[0]  # type: ignore[return-value]
    return None


def _write_labels(target, labels: np.ndarray, letters: str, image) -> None:
    """Labels to a TIFF, or to a zarr store laid out as ``--dask`` writes it: a group whose
    ``labels`` array is an NGFF image with the source's scale and translation."""
    from .ngff import create_image, labels_axes
    from .outputs import write_data

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

    from .ngff import create_labels, labels_axes, remove_labels

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


def _check_targets(args: argparse.Namespace, image_ngff: bool | None) -> None:
    """Refuse impossible output requests; ``image_ngff`` None: the image is not open yet."""
    if args.output is None and args.labels_into_image is None:
        raise ValueError("give the labels output: -o OUT.tif|OUT.zarr, or --labels-into-image NAME")
    if _volume_method(args) and args.mode != "instance":
        raise ValueError("--3d/--stitch make instance labels; drop --mode")
    if args.labels_into_image is not None and image_ngff is not None:
        if args.dask:
            raise ValueError("--labels-into-image is not available with --dask; use -o OUT.zarr")
        if not image_ngff:
            raise ValueError(
                "--labels-into-image NAME writes into an OME-Zarr image's labels/ group; "
                f"{args.image} is not an OME-Zarr image — use -o OUT.zarr"
            )
        name = args.labels_into_image
        if (
            not name
            or "/" in name
            or name.startswith(".")
            or (Path(args.image) / "labels" / name).exists()
        ):
            raise ValueError(
                f"--labels-into-image {name!r}: not a plain name, or {args.image}/labels/{name} "
                "exists (a label image is never replaced); choose another name"
            )


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference.layout import resolve_layout
    from .io import open_image
    from .outputs import commit_all, plan_outputs, write_data, writing
    from .pipeline import segment_image
    from .runtime import select_device

    if args.dask:
        image = open_image(args.image, series=args.series)
        _check_targets(args, image.ngff is not None)
        return _predict_dask(args, image)
    _check_targets(args, None)
    # outputs first: format, never an input, never each other, writable — nothing computed yet
    labels_to, probs_to = plan_outputs(
        [
            (args.output, ("tiff", "zarr"), "labels output"),
            (args.probabilities, ("tiff", "zarr"), "probabilities output"),
        ],
        overwrite=args.overwrite,
        inputs=[args.image, _model_path(args.model)],
    )
    image = open_image(args.image, series=args.series)
    _check_targets(args, image.ngff is not None)
    model = _cli_model(args.model, args.untrained)
    axes = args.axes or image.axes
    _check_memory(image, model, axes, args.channel)
    layout = resolve_layout(image.data, model.in_channels, axes, args.channel)
    letters = layout.leading_axes + "YX"
    method = _volume_method(args)
    if method and "Z" not in letters:
        raise ValueError(f"--3d/--stitch need a Z axis; {args.image} has axes {layout.axes}")
    device, why = select_device(args.device)
    print(f"model {model.name} ({model.info.parameters:,} parameters) on {why}", file=sys.stderr)
    bar = _ProgressBar("predict")
    with writing([labels_to, probs_to]):
        if method:
            labels = _predict_volume(args, image, model, layout, device, bar, method)
            probs = None
        else:
            stream = probs_to is not None and probs_to.kind == "zarr"
            try:
                result = segment_image(
                    model, image.data, axes=axes, channel=args.channel, device=device,
                    tile_size=args.tile, batch_size=args.batch, exact=args.exact,
                    level=args.level, runtime=args.runtime, mode=args.mode,
                    min_size=args.min_size, progress=bar, cancel=_STOP,
                    out=probs_to.begin() if stream else None,
                )  # fmt: skip
            finally:
                bar.close()
            probs, labels = result.probabilities, result.labels
            if probs_to is not None and not stream:
                write_data(probs_to, probs)
        if probs_to is not None and probs is None:
            raise ValueError("--probabilities is not written with --3d/--stitch")
        if labels_to is not None:
            _write_labels(labels_to, labels, letters, image)
        _check_stop()  # a stop requested while segmenting or writing: commit nothing
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


def _predict_volume(args, image, model, layout, device, bar, method: str) -> np.ndarray:
    """--3d / --stitch: 3-D labels of every Z-stack of the image (each time point)."""
    from .volume import segment_stack

    spacing = _spacing(args, image)
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


def _predict_dask(args: argparse.Namespace, image) -> int:
    """``predict --dask``: chunked prediction on a dask cluster into one zarr store."""
    from .distributed import check_scheduler, predict_distributed
    from .ngff import add_labels_metadata
    from .outputs import plan_output

    if args.probabilities is not None:
        raise ValueError(
            "--dask writes the probabilities into the output store; drop --probabilities"
        )
    check_scheduler(args.dask)
    if _volume_method(args):
        return _predict_volume_dask(args, image)
    plan_output(
        args.output, ("zarr",), overwrite=args.overwrite, resume=not args.overwrite,
        inputs=[args.image, _model_path(args.model)], what="output store",
    )  # fmt: skip
    bar = _ProgressBar("predict (chunks)")
    try:
        _, labels = predict_distributed(
            None if args.model is None else _cli_model(args.model, args.untrained),
            image.data,
            scheduler=args.dask,
            out=args.output,
            axes=args.axes or image.axes,
            channel=args.channel,
            tile_size=args.tile,
            batch_size=args.batch,
            device=args.device,
            level=args.level,
            mode=args.mode,
            min_size=args.min_size,
            progress=bar,
            cancel=_STOP,
            overwrite=args.overwrite,
        )
    finally:
        bar.close()
    letters = _labels_letters(args.axes or image.axes, labels.ndim)
    if letters:
        add_labels_metadata(args.output, letters, image.ngff)
    print(
        f"wrote {args.output} (probabilities, {args.mode} labels {labels.shape}); "
        "an interrupted run resumes when started again with the same output",
        file=sys.stderr,
    )
    return 0


def _predict_volume_dask(args: argparse.Namespace, image) -> int:
    """``--3d/--stitch --dask``: 3-D labels slab by slab on the cluster into OUT.zarr/labels
    (an NGFF group, the layout of the 2-D ``--dask`` output without probabilities)."""
    import shutil

    import zarr

    from .ngff import add_labels_metadata
    from .outputs import plan_output
    from .volume_dask import segment_stack_distributed

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
        args.output, ("zarr",), inputs=[args.image, _model_path(args.model)],
        what="output store",
    )  # fmt: skip
    source = str(Path(root) / image.data.path)
    bar = _ProgressBar("predict (slabs)")
    zarr.open_group(args.output, mode="w-")  # fails, touching nothing, if it appeared meanwhile
    try:
        labels = segment_stack_distributed(
            None if args.model is None else _cli_model(args.model, args.untrained),
            source, f"{args.output}/labels", scheduler=args.dask,
            method=_volume_method(args), spacing=_spacing(args, image),
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


def _cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import save_model
    from .io import format_bytes, memory_budget, open_image
    from .models import build_model
    from .outputs import plan_output
    from .runtime import select_device
    from .training import parse_roi, train

    out = plan_output(
        args.output, ("safetensors",), overwrite=args.overwrite, what="model output",
        inputs=[args.image, args.labels, _model_path(args.init)],
    ).path  # fmt: skip
    opened = [open_image(args.image), open_image(args.labels)]
    need = 8 * sum(im.nbytes // im.dtype.itemsize for im in opened)  # float32/int64 copies
    if need > memory_budget():
        raise ValueError(
            f"{opened[0].describe()}; training reads it whole and needs about "
            f"{format_bytes(need)} but about {format_bytes(memory_budget())} is available "
            "— crop the annotated region first"
        )
    image, labels = (np.asarray(im.data) for im in opened)
    if args.model:
        model = build_model(args.model, 1 if image.ndim == 2 else image.shape[0], args.classes)
    else:
        model = _cli_model(args.init, False)
    device, why = select_device(args.device)
    print(f"training {model.name} ({model.info.parameters:,} parameters) on {why}", file=sys.stderr)
    roi = parse_roi(args.roi) if args.roi else None
    bar = None

    def report(event: dict) -> None:
        nonlocal bar
        from tqdm import tqdm

        if bar is None:
            bar = tqdm(
                total=100,
                desc="train",
                unit="%",
                file=sys.stderr,
                bar_format="{l_bar}{bar}| {elapsed}",
            )
        if event["kind"] == "step":
            bar.n = round(100 * event["fraction"])
            bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=True)
        elif event["kind"] == "epoch":
            f1 = "-" if event.get("val_f1") is None else f"{event['val_f1']:.3f}"
            iou = "-" if event.get("val_iou") is None else f"{event['val_iou']:.3f}"
            bar.write(
                f"epoch {event['epoch']:3d}  loss {event['loss']:.4f}  val F1@0.5 {f1}  val IoU {iou}  {event['elapsed']:.0f} s",
                file=sys.stderr,
            )

    try:
        history = train(
            model,
            image,
            labels,
            roi=roi,
            loss=args.loss,
            epochs=args.epochs,
            seconds=args.seconds,
            lr=args.lr,
            seed=args.seed,
            device=device,
            val_fraction=args.val_fraction,
            callback=report,
        )
    finally:
        if bar is not None:
            bar.close()
    save_model(model, out, training=history.summary(), overwrite=args.overwrite)
    print(
        f"wrote {out} after {len(history.losses)} steps in {history.seconds:.0f} s", file=sys.stderr
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, headless=args.headless, model=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="napari-unet", description="U-Net family segmentation (napari plugin and CLI)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="print the table of model variants")
    p.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    p.add_argument("--classes", type=int, default=2, help="output classes (default 2)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("predict", help="segment an image (TIFF or zarr) with tiled inference")
    p.add_argument("image", help="input image: .tif/.tiff or .zarr")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="bundled trained variant (unet, unet_valid, unetpp, unet3p, u2netp, swin_unet) "
        "or a checkpoint (.safetensors); default: the bundled U-Net",
    )
    p.add_argument(
        "--untrained", action="store_true", help="build a fresh, untrained network of -m NAME"
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="labels output (.tif, or .zarr: an OME-Zarr group whose 'labels' image has the "
        "input's scale, as --dask writes it)",
    )
    p.add_argument(
        "--labels-into-image",
        default=None,
        metavar="NAME",
        help="write the labels as NGFF label image NAME into the input OME-Zarr's labels/ "
        "group (nothing else in it is touched; an existing NAME is never replaced)",
    )
    p.add_argument(
        "--probabilities", default=None, help="also write class probabilities (.tif or .zarr)"
    )
    vol = p.add_mutually_exclusive_group()
    vol.add_argument(
        "--3d",
        dest="volume_3d",
        action="store_true",
        help="Z-stacks: one 3-D object per nucleus (3-D seeds and watershed on the stacked "
        "probabilities, voxel size from --scale or the OME-Zarr metadata)",
    )
    vol.add_argument(
        "--stitch",
        action="store_true",
        help="Z-stacks: join per-plane objects across Z by overlap (IoU ≥ --stitch-iou)",
    )
    p.add_argument("--stitch-iou", type=float, default=0.25, help="IoU to join (default 0.25)")
    p.add_argument(
        "--scale", default=None, metavar="Z,Y,X", help="voxel size for --3d (default: from "
        "the OME-Zarr metadata, else isotropic)",
    )  # fmt: skip
    p.add_argument(
        "--tile", type=int, default=None, help="tile (network input window) size in pixels"
    )
    p.add_argument("--batch", type=int, default=None, help="tiles per batch")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--level", type=int, default=None, help="UNet++ pruning level 1..4")
    p.add_argument(
        "--runtime",
        choices=("auto", "torch", "openvino"),
        default=None,
        help="inference runtime (default auto: OpenVINO on the CPU when installed, cached "
        "per model; torch on CUDA)",
    )
    p.add_argument(
        "--axes",
        default=None,
        help="image axes, e.g. YX, CYX, YXC, ZYX, TZYX (default: as recorded in the file, "
        "else guessed)",
    )
    p.add_argument(
        "--series", type=int, default=None, help="image series of a multi-image TIFF (0, 1, ...)"
    )
    p.add_argument("--channel", type=int, default=None, help="channel for a one-channel model")
    p.add_argument("--exact", action="store_true", help="exact tiling (halo = receptive field)")
    p.add_argument("--mode", choices=("instance", "semantic"), default="instance")
    p.add_argument("--min-size", type=int, default=15, help="smallest object in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS|local:N",
        help="predict on a dask cluster (scheduler address, or local:N worker processes) "
        "into the zarr store -o (probabilities + labels); a rerun resumes",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export", help="write a bioimage.io model package (.zip) for Fiji, QuPath, ilastik, ..."
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="bundled variant (unet, unetpp, ...), checkpoint (.safetensors) or bioimage.io "
        "package; default: the bundled U-Net",
    )
    p.add_argument("-o", "--output", required=True, help="package to write (NAME.zip)")
    p.add_argument("--name", default=None, help="the model's name in the package")
    p.add_argument("--author", action="append", default=None, help="author (repeatable)")
    p.add_argument("--license", default="BSD-3-Clause", help="SPDX licence of the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="fine-tune (or train) a model on an annotated image")
    p.add_argument("image", help="image (.tif or .zarr), 2-D or (C, Y, X)")
    p.add_argument("labels", help="instance labels (.tif), 0 = not annotated")
    p.add_argument("-o", "--output", required=True, help="model to write (.safetensors)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--init",
        default=None,
        help="start from a bundled variant (unetpp, unet3p, ...) or a checkpoint "
        "(default: the bundled U-Net)",
    )
    start.add_argument(
        "--model", default=None, help="start from a fresh variant instead (e.g. unet, unetpp)"
    )
    p.add_argument("--classes", type=int, default=3, help="classes of a fresh variant (default 3)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, help="time budget")
    budget.add_argument("--epochs", type=int, default=None, help="epochs of 20 steps (default 10)")
    p.add_argument(
        "--roi",
        default=None,
        help="training region Y0:Y1,X0:X1 (default: annotations' box + 16 px)",
    )
    p.add_argument(
        "--loss",
        default=None,
        help="ce, ce_dice, unet3p_hybrid, u2net_sides, ... (default: the variant's paper loss)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "compare", help="score models on an annotated image: F1, IoU, AP, time; best first"
    )
    p.add_argument("image", help="image (.tif or .zarr)")
    p.add_argument("labels", help="instance labels (.tif), the ground truth")
    p.add_argument(
        "-m", "--models", nargs="+", default=None,
        help="bundled names and/or checkpoints (default: every bundled trained variant)",
    )  # fmt: skip
    p.add_argument(
        "--roi", action="append", default=None,
        help="region Y0:Y1,X0:X1 to score (repeatable; default: the whole image)",
    )  # fmt: skip
    p.add_argument("--no-heads", action="store_true", help="final outputs only, no per-depth rows")
    p.add_argument("--no-ap", action="store_true", help="skip AP@0.5:0.95")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "demo", help="open napari with sample nuclei, the default model and every widget"
    )
    p.add_argument(
        "--headless",
        action="store_true",
        help="no window: predict and write labels.tif, probabilities.tif, screenshot.png",
    )
    p.add_argument(
        "--output", default=None, help="output folder (default ./demo-output when headless)"
    )
    p.add_argument(
        "-m", "--model", default=None, help="checkpoint (.safetensors); default: the bundled model"
    )
    p.set_defaults(func=_cmd_demo)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``napari-unet: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"napari-unet: error: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (OS errors: 'cannot ...: reason')."""
    from .outputs import describe_os_error

    if isinstance(exc, MemoryError):
        text = "out of memory" + (f" ({exc})" if str(exc) else "")
    elif isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, FileExistsError)):
        text = describe_os_error(exc) if exc.strerror else str(exc)
    elif isinstance(exc, (ValueError, RuntimeError, FileNotFoundError, FileExistsError)):
        text = str(exc) or type(exc).__name__
    else:  # a bug: still one line, with what is needed to report it
        text = f"internal error {type(exc).__name__}: {exc} (NAPARI_UNET_DEBUG=1 shows where)"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; every failure is exit code 2 and one line ``napari-unet: error: ...``
    on stderr (no traceback; ``NAPARI_UNET_DEBUG=1`` re-raises)."""
    import os
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    _STOP.clear()
    old = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / `kill`: stop at the next batch and remove partial outputs; twice: at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _on_stop_signal)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-unet: interrupted (partial outputs removed)", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "Cancelled":  # napari_unet.tiling.Cancelled (a stop signal)
            print("napari-unet: interrupted (partial outputs removed)", file=sys.stderr)
            return 130
        if os.environ.get("NAPARI_UNET_DEBUG"):
            raise
        print(f"napari-unet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


_STOP = threading.Event()
"""Set by the first Ctrl-C / SIGTERM: the engine stops at its next batch (cancel token)."""


def _on_stop_signal(signum: int, frame: object) -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt
    _STOP.set()
    print("napari-unet: stopping (again to force)", file=sys.stderr)


def _check_stop() -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
