"""Reading images (TIFF, zarr) for the CLI and the demo — lazily, with their axes.

* TIFF: the header is read first; an image of at most :data:`EAGER_LIMIT` bytes is read
  into memory, a larger one is opened lazily through tifffile's zarr view (memory is then
  bounded by what is read, as for zarr inputs). Axes recorded in the file (OME-TIFF,
  ImageJ, tifffile's shaped metadata: ``CYX``, ``CZYX``, ``TZCYX`` …) are honoured.
  A file with several image series of different shapes is refused with the list of
  series, unless one is chosen (``series=``).
* zarr: an array, or an array inside a store (``proj.zarr/raw``); a group with one array
  uses it, an OME-Zarr multiscale group its full resolution, a group with several arrays
  is refused with their names.
* Only regular files and folders are opened (a FIFO or a device is refused without being
  opened); complex, object and string images are refused with a message.

Writing goes through :mod:`napari_unet.outputs` (the write-safety module);
:func:`write_array` is kept for callers that write one finished array.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inference.layout import check_dtype
from .outputs import ZARR_SUFFIXES, is_zarr, plan_output, write_data

__all__ = [
    "EAGER_LIMIT",
    "ImageInput",
    "check_dtype",
    "format_bytes",
    "is_zarr",
    "memory_budget",
    "open_image",
    "read_image",
    "write_array",
]

EAGER_LIMIT = 256 * 2**20
"""TIFF images up to this many bytes are read into memory; larger ones are read lazily."""
TIFF_SUFFIXES = (".tif", ".tiff")
_AXIS_MAP = {"T": "T", "Z": "Z", "C": "C", "Y": "Y", "X": "X"}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def memory_budget() -> int:
    """Bytes a process may still allocate: the smaller of 3/4 of the physical memory and
    what the address-space limit (``ulimit -v``) leaves."""
    try:
        budget = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        budget = 8 * 2**30
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as fh:
                used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            budget = min(budget, max(soft - used, 0))
    except (ImportError, OSError, ValueError):  # pragma: no cover
        pass
    return budget


@dataclass
class ImageInput:
    """An opened image: its (possibly lazy) array, the axes recorded in the file (None when
    unknown) and where it lives."""

    data: Any
    axes: str | None
    path: Path
    ngff: Any = None
    """:class:`napari_unet.ngff.NgffAxes` (axes, scale, translation) of an OME-Zarr image."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize

    def describe(self) -> str:
        dims = "×".join(str(s) for s in self.shape)
        return f"{self.path} is {dims} {self.dtype} ({format_bytes(self.nbytes)})"


def _split_zarr_path(path: Path) -> tuple[Path, str]:
    """``proj.zarr/raw/0`` → (``proj.zarr``, ``raw/0``)."""
    parts = path.parts
    for k in range(len(parts), 0, -1):
        if parts[k - 1].lower().endswith(ZARR_SUFFIXES):
            return Path(*parts[:k]), "/".join(parts[k:])
    return path, ""


def _check_exists(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err.strerror}") from None
    return st


def open_image(path: str | os.PathLike[str], *, series: int | None = None) -> ImageInput:
    """Open a TIFF or zarr image (see the module docstring); nothing large is read."""
    path = Path(os.fspath(path))
    if is_zarr(path) or any(p.lower().endswith(ZARR_SUFFIXES) for p in path.parts):
        return _open_zarr(path)
    st = _check_exists(path)
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a folder, not an image; give a .tif file or a .zarr store")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a pipe or a device?); refusing to read it")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"{path}: unsupported image format; use TIFF (.tif) or zarr (.zarr)")
    return _open_tiff(path, series)


def _tiff_axes(series: Any) -> str | None:
    """The series' axes in TZCYX letters when the file records them, else None."""
    axes = str(getattr(series, "axes", "") or "").upper()
    if axes.endswith("S"):  # interleaved samples (RGB): channels last
        axes = axes[:-1] + "C"
    if not axes or any(a not in _AXIS_MAP for a in axes) or len(set(axes)) != len(axes):
        return None
    if "Y" not in axes or "X" not in axes or len(axes) != len(series.shape):
        return None
    return axes


def _open_tiff(path: Path, series: int | None) -> ImageInput:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable TIFF: {exc}") from None
    try:
        all_series = list(tif.series)
        if not all_series:
            raise ValueError(f"{path} holds no image")
        if series is None:
            if len(all_series) > 1:
                listing = "; ".join(
                    f"{k}: {'×'.join(map(str, s.shape))} {s.dtype} {s.axes}"
                    for k, s in enumerate(all_series[:8])
                )
                more = f" (and {len(all_series) - 8} more)" if len(all_series) > 8 else ""
                raise ValueError(
                    f"{path} holds {len(all_series)} different images ({listing}{more}); "
                    "choose one with --series N"
                )
            series = 0
        if not 0 <= series < len(all_series):
            raise ValueError(
                f"{path} has {len(all_series)} image series; --series {series} does not exist"
            )
        s = all_series[series]
        check_dtype(s.dtype)
        axes = _tiff_axes(s)
        nbytes = int(np.prod(s.shape, dtype=np.float64)) * np.dtype(s.dtype).itemsize
        if nbytes <= EAGER_LIMIT:
            data = s.asarray()
            tif.close()
            return ImageInput(data, axes, path)
        import zarr

        store = s.aszarr()
        data = zarr.open_array(store, mode="r")
        return ImageInput(data, axes, path)
    except ValueError:
        tif.close()
        raise
    except (tifffile.TiffFileError, struct.error, KeyError, IndexError) as exc:
        tif.close()
        raise ValueError(f"{path} is not a readable TIFF: {exc}") from None


def _open_zarr(path: Path) -> ImageInput:
    import zarr

    root, inner = _split_zarr_path(path)
    st = _check_exists(root)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{root} is not a zarr store (not a folder)")
    if inner:
        _check_exists(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many kinds for a non-store
        raise ValueError(f"{path} is not a readable zarr array or group: {exc}") from None
    axes = None
    ngff = None
    if not hasattr(node, "shape"):  # a group
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        arrays = sorted(node.array_keys())
        if multiscales:  # OME-Zarr: its first dataset is the full resolution
            from .ngff import read_axes

            name = multiscales[0]["datasets"][0]["path"]
            node = node[name]
            found = read_axes(attrs, node.ndim)
            if found is not None:
                ngff = found[1]
                axes = ngff.axes
        elif len(arrays) == 1:
            node = node[arrays[0]]
        elif not arrays:
            groups = sorted(node.group_keys())
            hint = f"; it holds groups {', '.join(groups)}" if groups else ""
            raise ValueError(f"{path} is a zarr group without arrays{hint}")
        else:
            shown = ", ".join(
                f"{path}/{a} ({'×'.join(map(str, node[a].shape))} {node[a].dtype})"
                for a in arrays[:8]
            )
            raise ValueError(
                f"{path} is a zarr group with {len(arrays)} arrays; give one of them as the "
                f"image: {shown}"
            )
    check_dtype(node.dtype)
    return ImageInput(node, axes, path, ngff)


def read_image(path: str | os.PathLike[str], *, series: int | None = None) -> Any:
    """The image array of a TIFF or zarr path (lazy when large); see :func:`open_image`."""
    return open_image(path, series=series).data


def write_array(path: str | Path, data: Any, overwrite: bool = False) -> Path:
    """Write one finished array to a TIFF (zlib) or a new zarr array, through a partial
    file moved into place (see :mod:`napari_unet.outputs`)."""
    target = plan_output(path, overwrite=overwrite)
    write_data(target, data)
    try:
        return target.commit()
    except BaseException:
        target.abort()
        raise
