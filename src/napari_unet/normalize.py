"""The one intensity normalisation routine; its parameters are stored with the model.

A model carries ``model.normalization`` (a JSON-able dict, saved in checkpoints), e.g.
``{"method": "percentile", "low": 1.0, "high": 99.8}``: each channel is mapped so that
its ``low``/``high`` percentiles become 0/1. ``{"method": "none"}`` passes values through
as float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_NORMALIZATION: dict[str, Any] = {"method": "percentile", "low": 1.0, "high": 99.8}
_MAX_SAMPLE = 4_000_000  # pixels per channel used to estimate percentiles of huge images


def get_normalization(model: Any) -> dict[str, Any]:
    """The model's stored normalisation, or the default."""
    norm = getattr(model, "normalization", None)
    return dict(norm) if norm else dict(DEFAULT_NORMALIZATION)


def normalization_stats(sample: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Per-channel (offset, scale) pairs, shape (C, 2), from a (C, ...) sample of an image.

    The statistics are computed once per image plane (see :func:`sample_plane`), so
    every tile is normalised the same way and tiling does not change the result.
    """
    method = norm.get("method", "percentile")
    n_channels = sample.shape[0]
    if method == "none":
        return np.tile(np.array([0.0, 1.0]), (n_channels, 1))
    if method != "percentile":
        raise ValueError(f"unknown normalisation method {method!r}")
    if not np.all(np.isfinite(sample)):
        raise ValueError("image contains NaN or infinite values; clean it before predicting")
    stats = np.zeros((n_channels, 2))
    for c in range(n_channels):
        lo, hi = np.percentile(sample[c], [norm.get("low", 1.0), norm.get("high", 99.8)])
        stats[c] = (lo, 1.0 / (hi - lo) if hi > lo else 1.0)
    return stats


def sample_plane(plane: Any) -> np.ndarray:
    """A regular subsample (C, y, x) of a lazy (C, Y, X) plane, at most ~4 Mpx per channel."""
    h, w = plane.shape[-2:]
    step = max(1, int(np.ceil(np.sqrt(h * w / _MAX_SAMPLE))))
    sub = plane[:, ::step, ::step]
    if hasattr(sub, "compute"):
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float64)


def apply_normalization(tile: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Normalise ``tile`` (C, ...) with per-channel ``stats`` (C, 2) → float32."""
    tile = np.asarray(tile, dtype=np.float32)
    shape = (-1,) + (1,) * (tile.ndim - 1)
    lo = stats[:, 0].astype(np.float32).reshape(shape)
    scale = stats[:, 1].astype(np.float32).reshape(shape)
    return (tile - lo) * scale
