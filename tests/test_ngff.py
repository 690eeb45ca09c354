"""OME-Zarr (NGFF) metadata: written groups read back with ome-zarr-py, same scale."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet import ngff


def _reader_nodes(path):
    ome_io = pytest.importorskip("ome_zarr.io")
    reader = pytest.importorskip("ome_zarr.reader")
    return list(reader.Reader(ome_io.parse_url(str(path)))())


def test_image_and_labels_read_back_with_ome_zarr(tmp_path):
    root = tmp_path / "img.zarr"
    image = ngff.create_image(
        root,
        (2, 3, 40, 48),
        "uint16",
        "CZYX",
        scale=(1.0, 2.0, 0.5, 0.25),
        translation=(0.0, 10.0, 3.0, 4.0),
        units={"Z": "micrometer", "Y": "micrometer", "X": "micrometer"},
    )
    image[:] = np.arange(np.prod(image.shape), dtype=np.uint16).reshape(image.shape)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    labels = ngff.create_labels(
        root,
        "nuclei",
        (3, 40, 48),
        "uint32",
        "ZYX",
        scale=(2.0, 0.5, 0.25),
        translation=(10.0, 3.0, 4.0),
    )
    labels[:] = 7
    # nothing of the image itself changed; only labels/ was added
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != "labels"} == before

    nodes = _reader_nodes(root)
    by_name = {str(n.zarr.path).rstrip("/").split("/")[-1]: n for n in nodes}
    img, lab = by_name["img.zarr"], by_name["nuclei"]
    assert img.data[0].shape == (2, 3, 40, 48)
    assert img.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 2.0, 0.5, 0.25]
    assert lab.data[0].shape == (3, 40, 48)
    assert np.asarray(lab.data[0]).max() == 7
    transforms = lab.metadata["coordinateTransformations"][0]
    assert transforms[0]["scale"] == [2.0, 0.5, 0.25]
    assert transforms[1]["translation"] == [10.0, 3.0, 4.0]

    group = zarr.open_group(str(root), mode="r")
    path, axes = ngff.read_axes(dict(group.attrs), 4)
    assert path == "0" and axes.axes == "CZYX"
    assert axes.spatial("ZYX") == ((2.0, 0.5, 0.25), (10.0, 3.0, 4.0))
    assert axes.units == {"Z": "micrometer", "Y": "micrometer", "X": "micrometer"}


def test_existing_label_image_is_never_replaced(tmp_path):
    root = tmp_path / "img.zarr"
    ngff.create_image(root, (16, 16), "uint8", "YX")
    first = ngff.create_labels(root, "cells", (16, 16), "uint32", "YX")
    first[:] = 1
    with pytest.raises(FileExistsError, match="cells"):
        ngff.create_labels(root, "cells", (16, 16), "uint32", "YX")
    assert zarr.open_array(str(root / "labels" / "cells" / "0"), mode="r")[:].min() == 1
    with pytest.raises(ValueError, match="plain name"):
        ngff.create_labels(root, "../evil", (16, 16), "uint32", "YX")
    with pytest.raises(FileExistsError):  # a new image never replaces a store
        ngff.create_image(root, (16, 16), "uint8", "YX")


def test_read_axes_composes_transformations_and_rejects_non_ngff():
    attrs = {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [
                        {
                            "path": "s0",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [0.5, 0.25]},
                                {"type": "translation", "translation": [1.0, 2.0]},
                            ],
                        }
                    ],
                    "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0]}],
                }
            ],
        }
    }
    path, axes = ngff.read_axes(attrs, 2)
    assert path == "s0" and axes.version == "0.5"
    assert axes.scale == (1.0, 0.5) and axes.translation == (2.0, 4.0)
    assert ngff.read_axes({"multiscales": []}, 2) is None
    assert ngff.read_axes({}, 2) is None
    bad = {"multiscales": [{"axes": ["q", "x"], "datasets": [{"path": "0"}]}]}
    assert ngff.read_axes(bad, 2) is None
