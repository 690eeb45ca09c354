"""Image layouts: resolve axes, move channels first, pick/convert channels for a model.

Every layout becomes a lazy view ``(planes..., C, Y, X)``: the leading axes (T, Z) are
predicted plane by plane, C is matched to the model's input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

AXES_LETTERS = "TZCYX"
LUMINANCE = (0.299, 0.587, 0.114)


def is_lazy(arr: Any) -> bool:
    return not isinstance(arr, np.ndarray)


def infer_axes(shape: tuple[int, ...], in_channels: int) -> str:
    """Guess the axes of an array as napari users lay them out.

    2-D: YX. 3-D: YXC when the last axis has 3/4 samples (RGB/RGBA), CYX when the first
    axis equals a multi-channel model's input channels, ZYX otherwise. 4-D: ZYXC (RGB
    stack), ZCYX, or TZYX. Anything else needs explicit ``axes``.
    """
    nd = len(shape)
    if nd == 2:
        return "YX"
    if nd == 3:
        if shape[-1] in (3, 4) and shape[0] > 4:
            return "YXC"
        if in_channels > 1 and shape[0] == in_channels:
            return "CYX"
        return "ZYX"
    if nd == 4:
        if shape[-1] in (3, 4) and shape[1] > 4:
            return "ZYXC"
        if in_channels > 1 and shape[1] == in_channels:
            return "ZCYX"
        return "TZYX"
    raise ValueError(
        f"cannot guess the axes of a {nd}-D image of shape {shape}; supported without "
        "axes=...: 2-D (YX), 3-D (YXC, CYX, ZYX), 4-D (ZYXC, ZCYX, TZYX). Pass axes, "
        "e.g. axes='TZCYX'"
    )


def check_dtype(dtype: Any, what: str = "image") -> np.dtype:
    """Refuse complex, object, string and structured images with a message."""
    dt = np.dtype(dtype)
    if dt.kind == "c":
        raise ValueError(
            f"the {what} is complex-valued ({dt}); napari-unet segments real intensities — "
            "convert it first (e.g. its magnitude, np.abs, or its real part)"
        )
    if dt.kind not in "biuf":
        raise ValueError(f"the {what} has data type {dt}, not numbers; cannot segment it")
    return dt


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ValueError(
            f"axes {axes!r} has {len(axes)} letters but the image is {len(shape)}-D {shape}"
        )
    bad = set(axes) - set(AXES_LETTERS)
    if bad or len(set(axes)) != len(axes) or "Y" not in axes or "X" not in axes:
        raise ValueError(
            f"invalid axes {axes!r}: use each of {AXES_LETTERS} at most once, with Y and X"
        )
    return axes


@dataclass
class Layout:
    """A lazy ``(planes..., C, Y, X)`` view of an image and how channels map to the model."""

    data: Any
    """Array of shape (*leading, C, Y, X) (numpy view or dask array)."""
    axes: str
    """Axes of the original image."""
    leading: tuple[int, ...]
    leading_axes: str
    channels: int
    channel_mode: str
    """"same", "luminance" or "pick"."""
    channel: int | None = None

    @property
    def spatial(self) -> tuple[int, int]:
        return tuple(self.data.shape[-2:])  # type: ignore[return-value]

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.leading)) if self.leading else 1

    def plane(self, index: int) -> Any:
        """Lazy (C, Y, X) view of plane ``index`` (row-major over the leading axes)."""
        if not self.leading:
            return self.data
        return self.data[np.unravel_index(index, self.leading)]

    def convert(self, block: np.ndarray) -> np.ndarray:
        """Map the image channels of a (C, h, w) block to the model's input channels."""
        if self.channel_mode == "same":
            return block
        if self.channel_mode == "pick":
            return block[self.channel : self.channel + 1]
        weights = np.asarray(LUMINANCE, dtype=np.float32).reshape(3, 1, 1)
        return (block[:3].astype(np.float32) * weights).sum(axis=0, keepdims=True)


def resolve_layout(
    image: Any, in_channels: int, axes: str | None = None, channel: int | None = None
) -> Layout:
    """Check an image against a model and build its :class:`Layout`.

    ``channel`` picks one channel for a one-channel model; an RGB(A) image on a
    one-channel model otherwise becomes luminance.
    """
    check_dtype(image.dtype)
    shape = tuple(int(s) for s in image.shape)
    if any(s == 0 for s in shape):
        raise ValueError(f"image is empty (shape {shape})")
    axes = check_axes(axes, shape) if axes else infer_axes(shape, in_channels)
    data = image
    if is_lazy(data) and not hasattr(data, "dask"):
        import dask.array as da

        data = da.from_array(data, chunks=_dask_chunks(data))
    full = axes if "C" in axes else axes + "C"
    if "C" not in axes:
        data = data[..., None]
    order = [full.index(a) for a in full if a not in "CYX"] + [full.index(a) for a in "CYX"]
    data = _transpose(data, order)
    leading_axes = "".join(a for a in axes if a not in "CYX")
    leading = tuple(data.shape[:-3])
    channels = int(data.shape[-3])
    h, w = data.shape[-2:]
    if min(h, w) < 2:
        raise ValueError(f"image is {h}×{w} pixels; need at least 2×2")
    if channel is not None:
        if not 0 <= channel < channels:
            raise ValueError(
                f"channel {channel} does not exist; the image has {channels} channel(s)"
            )
        if in_channels != 1:
            raise ValueError("channel= picks one channel for a one-channel model only")
        mode = "pick"
    elif channels == in_channels:
        mode = "same"
    elif (
        in_channels == 1 and channels in (3, 4) and "C" in axes and axes.index("C") == len(axes) - 1
    ):
        mode = "luminance"
    else:
        raise ValueError(
            f"the image has {channels} channel(s) (axes {axes}) but the model expects "
            f"{in_channels}; pick one with channel=... or pass the right axes"
        )
    return Layout(data, axes, leading, leading_axes, channels, mode, channel)


def _dask_chunks(arr: Any) -> Any:
    """Dask chunks for a lazy array: its own chunks, grown along its two longest axes to
    at least ``MIN_CHUNK`` pixels (a TIFF tiled in 16² tiles would otherwise make millions
    of dask chunks — a memory bomb of its own — while one window reads a few chunks)."""
    native = getattr(arr, "chunks", None)
    shape = tuple(int(n) for n in arr.shape)
    if native is None or len(native) != len(shape):
        return "auto"
    chunks = [max(1, int(c)) for c in native]
    for axis in sorted(range(len(shape)), key=lambda a: shape[a])[-2:]:
        c = chunks[axis]
        chunks[axis] = min(shape[axis], -(-MIN_CHUNK // c) * c)
    return tuple(chunks)


MIN_CHUNK = 512


def _transpose(data: Any, order: list[int]) -> Any:
    if order == list(range(len(order))):
        return data
    return data.transpose(order)
