"""Reading images and writing results (TIFF, zarr) for the CLI; never overwrites by accident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

ZARR_SUFFIXES = (".zarr", ".zr")


def is_zarr(path: str | Path) -> bool:
    return str(path).rstrip("/").endswith(ZARR_SUFFIXES)


def read_image(path: str | Path) -> Any:
    """Open a TIFF (lazily through tifffile's zarr view when large) or a zarr array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image: {path}")
    if is_zarr(path):
        import zarr

        node = zarr.open(str(path), mode="r")
        if not hasattr(node, "shape"):  # a group: take its first array
            arrays = list(node.array_keys())
            if not arrays:
                raise ValueError(f"{path} is a zarr group without arrays")
            node = node[arrays[0]]
        return node
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{path}: unsupported image format; use TIFF or zarr")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            nbytes = int(np.prod(series.shape)) * series.dtype.itemsize
            if nbytes <= 2**30:
                return series.asarray()
        import zarr

        return zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except tifffile.TiffFileError as exc:
        raise ValueError(f"{path} is not a readable TIFF: {exc}") from None


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass --overwrite")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    return path


def write_array(path: str | Path, data: Any, overwrite: bool = False) -> Path:
    """Write ``data`` to a TIFF (zlib-compressed) or a new zarr array."""
    path = check_writable(path, overwrite)
    if is_zarr(path):
        import shutil

        import zarr

        if path.exists():
            shutil.rmtree(path)
        z = zarr.create_array(store=str(path), shape=data.shape, dtype=data.dtype, chunks="auto")
        z[...] = np.asarray(data)
        return path
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{path}: unsupported output format; use .tif or .zarr")
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, np.asarray(data), compression="zlib", bigtiff=data.nbytes > 2**31)
    tmp.replace(path)
    return path
