"""napari_unet.pipeline.segment_image: predict → labels in one call (CLI, demo, widgets)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_unet.inference.predict import predict
from napari_unet.models import build_model
from napari_unet.pipeline import SegmentationResult, segment_image, segment_planes
from napari_unet.postprocess import segment
from napari_unet.runtime import Cancelled


@pytest.fixture(scope="module")
def model():
    from napari_unet.checkpoint import default_model_path, load_default_model

    if default_model_path().is_file():
        return load_default_model()
    return build_model("unet", 1, 3, base_channels=8, depth=2).eval()


def test_segment_image_equals_predict_then_segment(model, nuclei):
    image = nuclei[0]
    probs = predict(model, image, device="cpu")
    names = model.class_names
    labels = segment(probs, class_names=names)
    result = segment_image(model, image, device="cpu")
    assert isinstance(result, SegmentationResult)
    np.testing.assert_array_equal(result.probabilities, probs)
    np.testing.assert_array_equal(result.labels, labels)
    assert result.labels.dtype == np.uint32 and result.labels.shape == image.shape
    assert result.objects == int(labels.max())
    assert result.mode == "instance" and result.class_names == list(names)
    assert result.device.startswith("CPU") and result.runtime in ("torch", "openvino")
    assert 0 < result.seconds <= result.total_seconds


def test_semantic_and_no_labels(model, nuclei):
    image = nuclei[0][:64, :96]
    probs = predict(model, image, device="cpu")
    sem = segment_image(model, image, device="cpu", mode="semantic")
    np.testing.assert_array_equal(sem.labels, segment(probs, mode="semantic"))
    none = segment_image(model, image, device="cpu", mode=None)
    assert none.labels is None and none.objects == 0
    np.testing.assert_array_equal(none.probabilities, probs)


def test_stack_planes_equal_segment(model, nuclei):
    stack = np.stack([nuclei[0][:64, :96], nuclei[0][64:128, :96]])
    result = segment_image(model, stack, axes="ZYX", device="cpu")
    names = model.class_names
    np.testing.assert_array_equal(
        result.labels, segment(np.asarray(result.probabilities), class_names=names)
    )
    assert result.labels.shape == stack.shape


def test_progress_and_stages_are_reported(model, nuclei):
    stack = np.stack([nuclei[0][:64, :96]] * 3)
    tiles, planes, stages = [], [], []
    segment_image(
        model, stack, axes="ZYX", device="cpu", tile_size=64, progress=lambda d, t: tiles.append((d, t)),
        post_progress=lambda d, t: planes.append((d, t)), stage=stages.append,
    )  # fmt: skip
    assert tiles and tiles[-1][0] == tiles[-1][1]
    assert planes == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert stages[0].startswith("predicting on CPU") and stages[-1] == "segmenting"


def test_cancel_stops_prediction_and_segmentation(model, nuclei):
    image = nuclei[0]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        segment_image(model, image, device="cpu", cancel=stop)
    # a stop requested during the prediction's last batch: segmenting does not start
    calls = []

    def cancel() -> bool:
        return len(calls) > 0

    with pytest.raises(Cancelled):
        segment_image(
            model, image, device="cpu", cancel=cancel, progress=lambda d, t: calls.append(d),
            post_progress=lambda d, t: pytest.fail("segmented after a stop"),
        )  # fmt: skip


def test_segment_planes_checks_cancel_between_planes():
    probs = np.zeros((3, 4, 16, 16), np.float32)
    probs[0] = 1.0
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)

    with pytest.raises(Cancelled):
        segment_planes(probs, progress=progress, cancel=lambda: len(seen) > 2)
    assert seen == [0, 1, 2]


def test_segment_image_reports_the_runtime_the_windows_ran_on(model, nuclei, tmp_path, monkeypatch):
    """``result.runtime`` is what ran, not what the device resolves to: with "auto", a small
    job on weights never exported runs on torch; asked for OpenVINO, it runs there."""
    pytest.importorskip("openvino")
    from napari_unet.inference import backends

    monkeypatch.delenv(backends.RUNTIME_ENV, raising=False)
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    backends.clear_compiled()
    image = nuclei[0][:64, :96]
    notes: list[str] = []
    small = segment_image(model, image, device="cpu", stage=notes.append)
    assert small.runtime == "torch" and any("on torch" in n for n in notes), notes
    forced = segment_image(model, image, device="cpu", runtime="openvino")
    assert forced.runtime == "openvino"
    backends.clear_compiled()


def test_side_outputs_are_named_as_in_compare():
    """Inspect's rows and Compare's rows name U²-Net's and UNet 3+'s outputs alike
    (side1..side6, fuse; d1..d5), the final one marked."""
    from napari_unet.compare import head_names
    from napari_unet.models import build_model
    from napari_unet.pipeline import side_outputs

    image = np.random.default_rng(0).random((64, 64), np.float32)
    for name, cfg in (("u2netp", {}), ("unet3p", {"deep_supervision": True})):
        model = build_model(name, 1, 3, **cfg).eval()
        rows = side_outputs(model, image, device="cpu").rows
        names = [r["output"] for r in rows]
        final = model.final_index % model.num_outputs
        expected = list(head_names(model))
        expected[final] += " (final)"
        assert names == expected
    assert head_names(build_model("u2netp", 1, 3))[-2:] == ["side6", "fuse"]
