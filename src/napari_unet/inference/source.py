"""Reading the input: a plane's mirrored windows, normalised like the model's training data.

:class:`PlaneSource` is the one input path of a prediction — layout (axes, channels),
normalisation statistics of the whole plane, windows read lazily at mirrored indices —
used by the single-process tiler and the dask workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .layout import Layout
from .normalize import normalization_stats, normalize_block, sample_plane


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices (no edge repeat) into [0, n), as repeated ``np.pad(mode="reflect")``."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def read_window(plane: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Read the (C, len(rows), len(cols)) block of a lazy (C, Y, X) plane at mirrored indices."""
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    block = np.asarray(plane[:, r0:r1, c0:c1])
    if r1 - r0 != len(rows) or not np.array_equal(rows, np.arange(r0, r1)):
        block = block[:, rows - r0]
    if c1 - c0 != len(cols) or not np.array_equal(cols, np.arange(c0, c1)):
        block = block[:, :, cols - c0]
    return block


@dataclass
class PlaneSource:
    """One (Y, X) plane of an input, read window by window.

    Args:
        plane: lazy (Cin_file, Y, X) view of the plane (numpy, dask or zarr).
        layout: the input's :class:`~.layout.Layout` (channel conversion to the model's
            ``in_channels``).
        stats: normalisation statistics (Cin, 2) of the whole plane (see
            :func:`~.normalize.normalization_stats`).
    """

    plane: Any
    layout: Layout
    stats: np.ndarray

    @classmethod
    def open(cls, layout: Layout, index: int, norm: dict[str, Any]) -> PlaneSource:
        """Plane ``index`` of ``layout`` with statistics from a sample of the whole plane."""
        plane = layout.plane(index)
        sample = sample_plane(plane, native=layout.channel_mode != "luminance")
        return cls(plane, layout, normalization_stats(layout.convert(sample), norm))

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X) in pixels."""
        return tuple(int(n) for n in self.plane.shape[-2:])

    @property
    def raw_ok(self) -> bool:
        """True when :meth:`read_raw` blocks may be normalised later, on the device, with
        the same result: 8/16-bit integers (always finite after normalisation) whose
        channels are picked or kept, not mixed into luminance."""
        dtype = np.dtype(self.plane.dtype)
        small_int = dtype.kind in "iu" and dtype.itemsize <= 2
        return small_int and self.layout.channel_mode != "luminance"

    def read_raw(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The block of :meth:`read` before normalisation, in the image's dtype (a half or
        a quarter of float32's bytes to send to a GPU); see :attr:`raw_ok`."""
        h, w = self.shape
        return self.layout.convert(
            read_window(self.plane, reflect_index(rows, h), reflect_index(cols, w))
        )

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Normalised float32 block (Cin, len(rows), len(cols)) at mirrored indices
        (rows/cols may run outside the plane: they are reflected without edge repeat)."""
        return normalize_block(self.read_raw(rows, cols), self.stats)
