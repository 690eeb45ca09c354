"""Z-stacks: one nucleus, one label (3-D seeds + watershed, or stitching across Z)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet.checkpoint import load_default_model
from napari_unet.inference.predict import predict
from napari_unet.metrics import object_metrics
from napari_unet.postprocess import segment
from napari_unet.synthetic import synthetic_nuclei_3d
from napari_unet.volume import segment_stack, segment_volume, stitch_planes


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.mark.parametrize("method", ["3d", "stitch"])
def test_identical_planes_give_the_2d_objects_spanning_all_planes(model, nuclei, method):
    image = nuclei[0]
    n_2d = int(segment(predict(model, image, device="cpu"), class_names=model.class_names).max())
    stack = np.stack([image] * 4)
    labels = segment_stack(model, stack, method=method, device="cpu")
    assert labels.shape == stack.shape and labels.dtype == np.uint32
    assert int(labels.max()) == n_2d  # not 4 × n_2d, as plane-by-plane labelling gave
    ids = [set(np.unique(labels[z])) - {0} for z in range(4)]
    assert ids[0] == ids[1] == ids[2] == ids[3] and len(ids[0]) == n_2d
    assert (labels == labels[:1]).all()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0)])
def test_synthetic_ellipsoids_f1_in_3d(model, spacing):
    shape = (int(40 / spacing[0]), 112, 112)
    image, truth = synthetic_nuclei_3d(shape, spacing=spacing, seed=7)
    labels = segment_stack(model, image, method="3d", spacing=spacing, device="cpu")
    scores = object_metrics(truth, labels)
    assert scores["f1"] >= 0.9, scores
    # the plane-by-plane labelling this replaces is far off in 3-D
    flat = segment(predict(model, image, device="cpu"), class_names=model.class_names)
    assert object_metrics(truth, flat)["f1"] < 0.5


def test_anisotropy_matters():
    """Two spheres touching along z: the anisotropic distance transform separates them
    only when it knows the z spacing."""
    probs = np.zeros((3, 12, 40, 40), np.float32)
    zz, yy, xx = np.mgrid[0:12, 0:40, 0:40]
    for cz in (3, 8):  # 5 planes apart at spacing 4 = 20 px apart in-plane units
        ball = ((zz - cz) * 4.0) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 11.5**2
        probs[1][ball] = 1.0
    probs[0] = 1.0 - probs[1]
    names = ["background", "interior", "boundary"]
    assert segment_volume(probs, class_names=names, spacing=(4, 1, 1)).max() == 2
    assert segment_volume(probs, class_names=names, spacing=(1, 1, 1)).max() == 1


def test_stitch_planes_joins_by_iou():
    planes = np.zeros((3, 20, 20), np.int32)
    planes[0, 2:8, 2:8] = 5
    planes[1, 3:9, 3:9] = 1  # IoU 25/47 with the object above
    planes[1, 12:18, 12:18] = 2  # new
    planes[2, 12:18, 14:20] = 9  # IoU 24/48 with object 2
    out = stitch_planes(planes, iou_threshold=0.25)
    assert out.max() == 2
    assert out[0, 5, 5] == out[1, 5, 5] and out[1, 15, 15] == out[2, 15, 15]
    assert stitch_planes(planes, iou_threshold=0.6).max() == 4


@pytest.mark.parametrize("method", ["3d", "stitch"])
def test_slabs_keep_ids_across_borders_and_write_zarr(model, method, tmp_path):
    spacing = (2.0, 1.0, 1.0)
    image, truth = synthetic_nuclei_3d((30, 96, 96), spacing=spacing, seed=3)
    whole = segment_stack(model, image, method=method, spacing=spacing, device="cpu")
    out = zarr.create_array(
        str(tmp_path / "labels.zarr"), shape=image.shape, chunks=(4, 96, 96), dtype="uint32"
    )
    seen = []
    slabbed = segment_stack(
        model,
        image,
        method=method,
        spacing=spacing,
        device="cpu",
        slab=5,
        halo=2,
        out=out,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert slabbed is out and seen[-1] == (30, 30)
    result = np.asarray(out[:])
    assert result.max() == len(np.unique(result)) - 1  # numbered 1..N
    # objects crossing the five slab borders keep one id: the slabbed result matches the
    # whole-stack one object for object
    assert object_metrics(whole, result)["f1"] >= 0.97
    crossing = [
        i for i in np.unique(whole[4:6]) if i and (whole[4] == i).any() and (whole[5] == i).any()
    ]
    assert crossing
    for i in crossing:
        ids, counts = np.unique(result[whole == i], return_counts=True)
        assert counts.max() >= 0.9 * counts.sum(), (i, ids, counts)


def test_orthogonal_planes_and_errors(model):
    image, truth = synthetic_nuclei_3d((12, 64, 64), spacing=(2.0, 1.0, 1.0), seed=5)
    labels = segment_stack(model, image, spacing=(2.0, 1.0, 1.0), orthogonal=True, device="cpu")
    assert labels.shape == image.shape
    assert object_metrics(truth, labels)["f1"] >= 0.8
    with pytest.raises(ValueError, match="spacing"):
        segment_stack(model, image, spacing=(0, 1, 1), device="cpu")
    with pytest.raises(ValueError, match="method"):
        segment_stack(model, image, method="cubes", device="cpu")
    with pytest.raises(ValueError, match="does not match"):
        segment_stack(model, image[0], device="cpu")


def test_dask_slabs_equal_the_single_process_slabs(tmp_path, model):
    """One dask task per slab (2 worker processes): the same labels as the single-process
    slab run, ids consistent across the borders; and through the CLI (--3d --dask)."""
    from napari_unet.cli import main
    from napari_unet.volume_dask import segment_stack_distributed

    spacing = (2.0, 1.0, 1.0)
    image, truth = synthetic_nuclei_3d((30, 96, 96), spacing=spacing, seed=3)
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, chunks=(1, 96, 96),
                            dtype=image.dtype)  # fmt: skip
    src[...] = image
    single = segment_stack(model, image, spacing=spacing, slab=5, halo=2, device="cpu")
    out = segment_stack_distributed(
        None, tmp_path / "in.zarr", tmp_path / "out.zarr", scheduler="local:2",
        spacing=spacing, slab=5, halo=2,
    )  # fmt: skip
    assert np.array_equal(np.asarray(out[:]), single)
    assert object_metrics(truth, single)["f1"] >= 0.9
    assert main(["predict", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "cli.zarr"),
                 "--3d", "--scale", "2,1,1", "--dask", "local:1"]) == 0  # fmt: skip
    cli = np.asarray(zarr.open_group(str(tmp_path / "cli.zarr"), mode="r")["labels"])
    whole = segment_stack(model, image, spacing=spacing, slab=16, halo=4, device="cpu")
    assert np.array_equal(cli, whole)
