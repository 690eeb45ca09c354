"""OME-Zarr through the CLI and the API (scale kept, NGFF labels, same layout with --dask),
and the CLI's 3-D options (--3d / --stitch)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet import ngff
from napari_unet.checkpoint import load_default_model
from napari_unet.cli import main
from napari_unet.inference.predict import predict
from napari_unet.postprocess import segment
from napari_unet.synthetic import synthetic_nuclei_3d
from napari_unet.volume import segment_stack


def _ome_nodes(path):
    ome_io = pytest.importorskip("ome_zarr.io")
    reader = pytest.importorskip("ome_zarr.reader")
    return {
        str(n.zarr.path).rstrip("/").split("/")[-1]: n
        for n in reader.Reader(ome_io.parse_url(str(path)))()
    }


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture()
def ome_image(tmp_path, nuclei):
    image = nuclei[0][:128, :256]
    path = tmp_path / "cells.zarr"
    arr = ngff.create_image(path, image.shape, image.dtype, "YX", scale=(0.65, 0.65),
                            translation=(10.0, 20.0), units={"Y": "micrometer", "X": "micrometer"})  # fmt: skip
    arr[...] = image
    return path, image


def test_ome_zarr_in_labels_out_with_the_same_scale(ome_image, tmp_path, model, capsys):
    path, image = ome_image
    before = _snapshot(path)
    out = tmp_path / "labels.zarr"
    assert main(["predict", str(path), "-o", str(out)]) == 0
    assert _snapshot(path) == before  # the input is untouched
    node = _ome_nodes(out)["labels.zarr"]
    transforms = node.metadata["coordinateTransformations"][0]
    assert transforms[0]["scale"] == [0.65, 0.65]
    assert transforms[1]["translation"] == [10.0, 20.0]
    expected = segment(predict(model, image, device="cpu"), class_names=model.class_names)
    assert np.array_equal(np.asarray(node.data[0]), expected)
    # the API reads the same path, axes from the metadata
    assert np.array_equal(
        predict(model, str(path), device="cpu"), predict(model, image, device="cpu")
    )


def test_same_layout_with_and_without_dask(ome_image, tmp_path):
    path, _ = ome_image
    single, dist = tmp_path / "single.zarr", tmp_path / "dist.zarr"
    assert main(["predict", str(path), "-o", str(single)]) == 0
    assert main(["predict", str(path), "-o", str(dist), "--dask", "local:1"]) == 0
    a, b = _ome_nodes(single)[single.name], _ome_nodes(dist)[dist.name]
    for node in (a, b):
        ms = node.metadata
        assert ms["coordinateTransformations"][0][0]["scale"] == [0.65, 0.65]
    groups = [zarr.open_group(str(p), mode="r") for p in (single, dist)]
    paths = [ngff.multiscales_of(dict(g.attrs))[0]["datasets"][0]["path"] for g in groups]
    assert paths == ["labels", "labels"]
    la, lb = (np.asarray(g["labels"]) for g in groups)
    assert la.shape == lb.shape
    assert la.max() == lb.max()  # the same objects (ids may be numbered differently)


def test_labels_into_the_image_touch_nothing_else(ome_image, tmp_path, capsys):
    path, _ = ome_image
    before = _snapshot(path)
    assert main(["predict", str(path), "--labels-into-image", "nuclei"]) == 0
    after = _snapshot(path)
    assert {k: v for k, v in after.items() if k.parts[0] != "labels"} == before
    nodes = _ome_nodes(path)
    assert nodes["nuclei"].metadata["coordinateTransformations"][0][0]["scale"] == [0.65, 0.65]
    assert zarr.open_group(str(path / "labels"), mode="r").attrs["labels"] == ["nuclei"]
    capsys.readouterr()
    assert main(["predict", str(path), "--labels-into-image", "nuclei"]) == 2  # never replaced
    assert "never replaced" in capsys.readouterr().err
    assert _snapshot(path) == after
    tif = tmp_path / "plain.tif"
    import tifffile

    tifffile.imwrite(tif, np.zeros((64, 64), np.uint16))
    assert main(["predict", str(tif), "--labels-into-image", "x"]) == 2
    assert "not an OME-Zarr image" in capsys.readouterr().err


def test_cli_3d_uses_the_metadata_scale(tmp_path, model, capsys):
    spacing = (4.0, 1.0, 1.0)
    image, truth = synthetic_nuclei_3d((10, 96, 96), spacing=spacing, seed=11)
    path = tmp_path / "stack.zarr"
    arr = ngff.create_image(path, image.shape, image.dtype, "ZYX", scale=(2.0, 0.5, 0.5))
    arr[...] = image
    out = tmp_path / "objects.tif"
    assert main(["predict", str(path), "-o", str(out), "--3d"]) == 0
    import tifffile

    got = tifffile.imread(out)
    expected = segment_stack(model, image, spacing=(2.0, 0.5, 0.5), device="cpu")
    assert np.array_equal(got, expected)
    assert (
        got.max()
        < 0.5 * segment(predict(model, image, device="cpu"), class_names=model.class_names).max()
    )
    out2 = tmp_path / "stitched.zarr"
    assert main(["predict", str(path), "-o", str(out2), "--stitch"]) == 0
    node = _ome_nodes(out2)[out2.name]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [2.0, 0.5, 0.5]
    capsys.readouterr()
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, image[0])
    assert main(["predict", str(flat), "-o", str(tmp_path / "x.tif"), "--3d"]) == 2
    assert "Z axis" in capsys.readouterr().err
    stack_tif = tmp_path / "stack.tif"
    tifffile.imwrite(stack_tif, image)
    assert main(["predict", str(stack_tif), "-o", str(tmp_path / "y.zarr"), "--3d", "--dask",
                 "local:1"]) == 2  # fmt: skip
    assert "zarr stack" in capsys.readouterr().err
    assert (
        main(["predict", str(path), "-o", str(tmp_path / "z.tif"), "--3d", "--scale", "1,0"]) == 2
    )
    assert "--scale" in capsys.readouterr().err


def test_labels_into_image_leaves_the_image_as_it_was_when_writing_fails(ome_image, tmp_path):
    """Disk full (a file-size limit in a subprocess) while writing the label image: exit 2,
    one line, and the image's store is byte for byte what it was (no labels/ left)."""
    import resource
    import subprocess
    import sys

    path, _ = ome_image
    before = _snapshot(path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # chunks are larger than this

    run = subprocess.run(
        [sys.executable, "-m", "napari_unet.cli", "predict", str(path),
         "--labels-into-image", "nuclei"],
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("napari-unet: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert _snapshot(path) == before
    assert not (path / "labels").exists()
