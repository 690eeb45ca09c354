"""``napari-unet`` command line: argument parsing only; the engine does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def _cmd_predict(args: argparse.Namespace) -> int:
    import warnings

    from .io import check_writable, is_zarr, read_image, write_array
    from .postprocess import default_class_names, segment
    from .predict import predict, resolve_model, select_device

    for path in (args.output, args.probabilities):
        if path is not None:
            check_writable(path, args.overwrite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = resolve_model(args.model)
    if args.model is not None and not str(args.model).endswith(".safetensors"):
        print(
            f"warning: {args.model!r} is an untrained {model.name}; pass a checkpoint",
            file=sys.stderr,
        )
    image = read_image(args.image)
    device, why = select_device(args.device)
    print(f"model {model.name} ({model.info.parameters:,} parameters) on {why}", file=sys.stderr)
    bar = _ProgressBar("predict")
    out = args.probabilities if args.probabilities and is_zarr(args.probabilities) else None
    try:
        probs = predict(
            model,
            image,
            axes=args.axes,
            tile_size=args.tile,
            batch_size=args.batch,
            device=device,
            exact=args.exact,
            level=args.level,
            channel=args.channel,
            progress=bar,
            out=out,
        )
    finally:
        bar.close()
    if args.probabilities and out is None:
        write_array(args.probabilities, probs, args.overwrite)
    names = getattr(model, "class_names", None) or default_class_names(model.num_classes)
    labels = segment(probs, mode=args.mode, class_names=names, min_size=args.min_size)
    write_array(args.output, labels, args.overwrite)
    n = int(labels.max())
    print(
        f"wrote {args.output} ({args.mode} labels, {n} {'objects' if args.mode == 'instance' else 'classes'})",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-unet", description="U-Net family segmentation (napari plugin and CLI)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
        help="checkpoint (.safetensors) or variant name; default: the bundled model",
    )
    p.add_argument("-o", "--output", required=True, help="labels output (.tif or .zarr)")
    p.add_argument(
        "--probabilities", default=None, help="also write class probabilities (.tif or .zarr)"
    )
    p.add_argument(
        "--tile", type=int, default=None, help="tile (network input window) size in pixels"
    )
    p.add_argument("--batch", type=int, default=None, help="tiles per batch")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--level", type=int, default=None, help="UNet++ pruning level 1..4")
    p.add_argument("--axes", default=None, help="image axes, e.g. YX, CYX, YXC, ZYX, TZYX")
    p.add_argument("--channel", type=int, default=None, help="channel for a one-channel model")
    p.add_argument("--exact", action="store_true", help="exact tiling (halo = receptive field)")
    p.add_argument("--mode", choices=("instance", "semantic"), default="instance")
    p.add_argument("--min-size", type=int, default=15, help="smallest object in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"napari-unet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-unet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
