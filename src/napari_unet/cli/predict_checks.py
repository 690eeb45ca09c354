"""``predict``'s argument checks, made before anything is computed or written."""

from __future__ import annotations

import argparse
from pathlib import Path


def check_memory(image, model, axes: str | None, channel: int | None) -> None:
    """Refuse, with the sizes, an in-memory prediction that cannot fit (before computing)."""
    from ..inference.layout import resolve_layout
    from ..io import format_bytes, memory_budget

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


def volume_method(args: argparse.Namespace) -> str | None:
    return "3d" if args.volume_3d else ("stitch" if args.stitch else None)


def spacing_of(args: argparse.Namespace, image) -> tuple[float, float, float] | None:
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


def check_targets(args: argparse.Namespace, image_ngff: bool | None) -> None:
    """Refuse impossible output requests; ``image_ngff`` None: the image is not open yet."""
    if args.output is None and args.labels_into_image is None:
        raise ValueError("give the labels output: -o OUT.tif|OUT.zarr, or --labels-into-image NAME")
    if args.scale and not volume_method(args):
        raise ValueError("--scale is the voxel size of --3d/--stitch; add --3d or drop --scale")
    if volume_method(args) and args.mode != "instance":
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
