"""The ``napari-unet`` argument parser: one builder per subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from .commands import cmd_compare, cmd_demo, cmd_export, cmd_models, cmd_train
from .predict import cmd_predict


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number ≥ ``low`` (``--tile 0`` is refused, not taken as auto)."""

    def parse(text: str) -> int:
        value = int(text)  # ValueError: argparse says "invalid int value: 'big'"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a time budget, a learning rate)."""
    value = float(text)  # ValueError: argparse says "invalid float value: 'soon'"
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


positive_float.__name__ = "float"


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-unet`` parser with its subcommands (each sets ``func``)."""
    parser = Parser(
        prog="napari-unet", description="U-Net family segmentation (napari plugin and CLI)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_models, _add_predict, _add_export, _add_train, _add_compare, _add_demo):
        add(sub)
    return parser


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="print the table of model variants")
    p.add_argument("--in-channels", type=at_least(1), default=1, help="input channels (default 1)")
    p.add_argument("--classes", type=at_least(1), default=2, help="output classes (default 2)")
    p.set_defaults(func=cmd_models)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="segment an image (TIFF or zarr) with tiled inference")
    p.add_argument("image", help="input image: .tif/.tiff or .zarr")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="bundled trained variant (unet, unet_valid, unetpp, unet3p, u2netp, swin_unet), "
        "a checkpoint (.safetensors) or a bioimage.io package (.zip); default: the bundled "
        "U-Net",
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
    _add_predict_volume(p)
    _add_predict_engine(p)
    p.set_defaults(func=cmd_predict)


def _add_predict_volume(p: argparse.ArgumentParser) -> None:
    """``--3d``/``--stitch`` and their settings."""
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
        "--scale", default=None, metavar="Z,Y,X", help="voxel size for --3d/--stitch "
        "(default: from the OME-Zarr metadata, else isotropic)",
    )  # fmt: skip


def _add_predict_engine(p: argparse.ArgumentParser) -> None:
    """Tiling, device, runtime, image layout and post-processing options."""
    p.add_argument(
        "--tile",
        type=at_least(2),
        default=None,
        help="tile (network input window) size in pixels (default: chosen per model)",
    )
    p.add_argument("--batch", type=at_least(1), default=None, help="tiles per batch")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--level", type=at_least(1), default=None, help="UNet++ pruning level 1..4")
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
        "--series",
        type=at_least(0),
        default=None,
        help="image series of a multi-image TIFF (0, 1, ...)",
    )
    p.add_argument(
        "--channel", type=at_least(0), default=None, help="channel for a one-channel model"
    )
    p.add_argument("--exact", action="store_true", help="exact tiling (halo = receptive field)")
    p.add_argument(
        "--halo",
        type=at_least(0),
        default=None,
        help="with --dask: pixels of context around each chunk instead of the receptive "
        "field (faster for U²-Net, whose field is 3296 px)",
    )
    p.add_argument("--mode", choices=("instance", "semantic"), default="instance")
    p.add_argument(
        "--min-size", type=at_least(0), default=15, help="smallest object in pixels (default 15)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS|local:N",
        help="predict on a dask cluster (scheduler address, or local:N worker processes) "
        "into the zarr store -o (probabilities + labels); a rerun resumes",
    )


def _add_export(sub: Any) -> None:
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
    p.set_defaults(func=cmd_export)


def _add_train(sub: Any) -> None:
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
    p.add_argument(
        "--classes", type=at_least(1), default=3, help="classes of a fresh variant (default 3)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=positive_float, default=None, help="time budget")
    budget.add_argument(
        "--epochs", type=at_least(1), default=None, help="epochs of 20 steps (default 10)"
    )
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
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of the annotated objects held out for validation (default 0.2; 0: none)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.set_defaults(func=cmd_train)


def _add_compare(sub: Any) -> None:
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
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=cmd_compare)


def _add_demo(sub: Any) -> None:
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
    p.set_defaults(func=cmd_demo)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``napari-unet: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"napari-unet: error: {message} (see {self.prog} --help)\n")
