"""The ``models``, ``export``, ``compare``, ``train`` and ``demo`` commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .common import cli_model, model_path


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.summary import format_table, model_rows

    print(format_table(model_rows(args.in_channels, args.classes)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``export MODEL -o NAME.zip``: a bioimage.io model package of any model."""
    import os

    try:
        from ..bioimageio import export_bioimageio
    except ImportError:  # pragma: no cover - the extra is part of the README set-up
        raise ValueError(
            'exporting needs the bioimageio extra: pip install "napari-unet[bioimageio]"'
        ) from None
    out = Path(args.output)
    if args.model and os.path.realpath(args.model) == os.path.realpath(out):
        raise ValueError(f"{out} is the model being exported; choose another output name")
    model = cli_model(args.model, False)
    written = export_bioimageio(
        model, out, name=args.name, authors=args.author or None, license=args.license,
        overwrite=args.overwrite,
    )  # fmt: skip
    size = written.stat().st_size / 1e6
    print(f"wrote {written} (bioimage.io model package, {size:.1f} MB)", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..compare import compare_models, format_rows
    from ..io import read_image
    from ..training import parse_roi

    image = np.asarray(read_image(args.image))
    labels = np.asarray(read_image(args.labels))
    rois = [parse_roi(r) for r in args.roi] if args.roi else None
    models = None
    if args.models:
        models = {
            m: (m if str(m).endswith(".safetensors") else cli_model(m, False)) for m in args.models
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


def cmd_train(args: argparse.Namespace) -> int:
    """``train IMAGE LABELS -o OUT.safetensors``: fine-tune (or train) and save a model."""
    from ..checkpoint import save_model
    from ..models import build_model
    from ..outputs import plan_output
    from ..runtime import select_device
    from ..training import parse_roi, train

    out = plan_output(
        args.output, ("safetensors",), overwrite=args.overwrite, what="model output",
        inputs=[args.image, args.labels, model_path(args.init)],
    ).path  # fmt: skip
    image, labels = _read_training_data(args)
    if args.model:
        model = build_model(args.model, 1 if image.ndim == 2 else image.shape[0], args.classes)
    else:
        model = cli_model(args.init, False)
    device, why = select_device(args.device)
    print(f"training {model.name} ({model.info.parameters:,} parameters) on {why}", file=sys.stderr)
    roi = parse_roi(args.roi) if args.roi else None
    report = _TrainReport()
    try:
        history = train(
            model, image, labels, roi=roi, loss=args.loss, epochs=args.epochs,
            seconds=args.seconds, lr=args.lr, seed=args.seed, device=device,
            val_fraction=args.val_fraction, callback=report,
        )  # fmt: skip
    finally:
        report.close()
    save_model(model, out, overwrite=args.overwrite)  # with model.training_summary
    print(
        f"wrote {out} after {len(history.losses)} steps in {history.seconds:.0f} s", file=sys.stderr
    )
    return 0


def _read_training_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) read whole, refused with the sizes when they cannot fit in memory."""
    from ..io import format_bytes, memory_budget, open_image

    opened = [open_image(args.image), open_image(args.labels)]
    need = 8 * sum(im.nbytes // im.dtype.itemsize for im in opened)  # float32/int64 copies
    if need > memory_budget():
        raise ValueError(
            f"{opened[0].describe()}; training reads it whole and needs about "
            f"{format_bytes(need)} but about {format_bytes(memory_budget())} is available "
            "— crop the annotated region first"
        )
    image, labels = (np.asarray(im.data) for im in opened)
    return image, labels


class _TrainReport:
    """The trainer's callback: a tqdm bar of the progress (%) and one line per epoch."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=100, desc="train", unit="%", file=sys.stderr,
                bar_format="{l_bar}{bar}| {elapsed}",
            )  # fmt: skip
        if event["kind"] == "step":
            self.bar.n = round(100 * event["fraction"])
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=True)
        elif event["kind"] == "epoch":
            f1 = "-" if event.get("val_f1") is None else f"{event['val_f1']:.3f}"
            iou = "-" if event.get("val_iou") is None else f"{event['val_iou']:.3f}"
            self.bar.write(
                f"epoch {event['epoch']:3d}  loss {event['loss']:.4f}  val F1@0.5 {f1}  val IoU {iou}  {event['elapsed']:.0f} s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.output, headless=args.headless, model=args.model)
    return 0
