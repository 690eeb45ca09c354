"""Sample data shipped in the package (no download): DSB 2018 fluorescence nuclei."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import tifffile

_DATA = files("napari_unet") / "data"


def nuclei_image() -> np.ndarray:
    """Fluorescence nuclei image, uint16 (256, 512)."""
    with (_DATA / "nuclei_dev_image.tif").open("rb") as fh:
        return tifffile.imread(fh)


def nuclei_labels() -> np.ndarray:
    """Instance labels of :func:`nuclei_image`, uint16 (256, 512), 64 nuclei, 0 = background."""
    with (_DATA / "nuclei_dev_labels.tif").open("rb") as fh:
        return tifffile.imread(fh)


def nuclei_sample() -> list[tuple]:
    """napari sample-data contribution: the image and its labels as two layers."""
    return [
        (nuclei_image(), {"name": "nuclei", "colormap": "gray"}, "image"),
        (nuclei_labels(), {"name": "nuclei labels"}, "labels"),
    ]
