"""napari widgets through the plugin machinery, on a real viewer (no mocks).

Every test uses a tiny model set explicitly, never the bundled weights.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_unet._widgets import get_state  # noqa: E402
from napari_unet.models import build_model  # noqa: E402

PLUGIN = "napari-unet"
TIMEOUT = 60_000  # ms


def tiny(name: str = "unet", **config):
    config = {"base_channels": 4, "depth": 2, **config}
    return build_model(name, 1, 3, **config)


def snapshot(viewer) -> list[tuple[int, str, str]]:
    """(id, name, data hash) of every layer, in order."""
    out = []
    for layer in viewer.layers:
        data = layer.data
        if isinstance(data, list):  # shapes
            blob = b"".join(np.ascontiguousarray(d).tobytes() for d in data)
        else:
            blob = np.ascontiguousarray(np.asarray(data)).tobytes()
        out.append((id(layer), layer.name, hashlib.sha1(blob).hexdigest()))
    return out


def user_layers_unchanged(before, after) -> bool:
    """Every layer of ``before`` is still there with the same name and data."""
    now = {i: (n, h) for i, n, h in after}
    return all(now.get(i) == (n, h) for i, n, h in before)


def on_cpu(viewer):
    """Pin the viewer's device to the CPU: timings and results do not depend on a GPU."""
    get_state(viewer).set_device("cpu")
    return viewer


@pytest.fixture
def viewer(make_napari_viewer):
    v = on_cpu(make_napari_viewer())
    v.open_sample(PLUGIN, "nuclei")
    get_state(v).set_model(tiny(), "tiny test model", untrained=True)
    return v


def dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def wait_job(qtbot, job, timeout=TIMEOUT):
    assert job is not None
    qtbot.waitUntil(lambda: not job.running, timeout=timeout)


# --------------------------------------------------------------------------- basics
def test_widget_import_does_not_import_torch():
    code = "import napari_unet._widgets, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_manifest_contributions():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution(PLUGIN)
    assert [w.display_name for w in mf.contributions.widgets] == [
        "All tools (one panel)",
        "Model",
        "Predict",
        "Inspect",
        "Train",
        "Compare models",
    ]
    assert [s.key for s in mf.contributions.sample_data] == ["nuclei"]
    items = mf.contributions.menus["napari/layers/segment"]
    assert items[0].command == "napari-unet.segment"


def test_all_widgets_open_and_model_info(viewer, qtbot):
    widgets = {n: dock(viewer, n) for n in ("Model", "Predict", "Inspect", "Train")}
    model_widget = widgets["Model"]
    qtbot.waitUntil(lambda: model_widget.info["parameters"].text() != "—", timeout=TIMEOUT)
    info = model_widget.info_text()
    assert info["parameters"] == f"{get_state(viewer).model.info.parameters:,}"
    assert info["size divisor"] == "4"
    assert info["exact tiling"] == "yes"
    assert "CPU" in info["device"] or "CUDA" in info["device"]
    assert model_widget.warning.isVisible() or not model_widget.isVisible()
    # the Train widget lists the variants once the engine is loaded
    qtbot.waitUntil(lambda: widgets["Train"].start_from.count() > 1, timeout=TIMEOUT)


def test_model_build_save_load(viewer, qtbot, tmp_path):
    w = dock(viewer, "Model")
    state = get_state(viewer)
    qtbot.waitUntil(lambda: w.variant.count() > 0, timeout=TIMEOUT)
    w.variant.setCurrentText("unetpp")
    w.width.setValue(4)
    w.depth.setValue(2)
    w.classes.setValue(2)
    wait_job(qtbot, w.build())
    assert state.model.name == "unetpp" and state.model.num_classes == 2
    assert state.untrained and w.warning.isVisibleTo(w)
    path = tmp_path / "m.safetensors"
    wait_job(qtbot, w.save_checkpoint(path))
    assert path.is_file()
    before = state.model
    wait_job(qtbot, w.load_checkpoint(path))
    assert state.model is not before and state.model.name == "unetpp"
    assert not state.untrained and "m.safetensors" in state.source
    assert w.load_checkpoint(tmp_path / "weights.pt") is None  # only .safetensors
    assert "safetensors" in w.status.text()


# -------------------------------------------------------------------------- predict
def test_predict_labels_and_probabilities(viewer, qtbot):
    image = viewer.layers["nuclei"]
    image.scale = (0.5, 2.0)
    image.translate = (10.0, -4.0)
    # a user layer that happens to have the output's name is never touched
    viewer.add_labels(np.zeros((4, 4), np.uint32), name="nuclei [unet #1]")
    w = dock(viewer, "Predict")
    w.image.set_layer(image)
    w.probabilities.setChecked(True)
    before = snapshot(viewer)

    wait_job(qtbot, w.run())
    after = snapshot(viewer)
    assert user_layers_unchanged(before, after)
    labels, probs = w.last_layers["labels"], w.last_layers["probabilities"]
    assert labels.name == "nuclei [unet #1] (2)"
    assert probs.name == "nuclei [unet #1 probabilities]"
    assert labels.data.dtype == np.uint32 and labels.data.shape == (256, 512)
    assert probs.data.shape == (3, 256, 512) and probs.data.dtype == np.float32
    assert 0.0 <= probs.data.min() and probs.data.max() <= 1.0
    np.testing.assert_allclose(probs.data.sum(0), 1.0, atol=1e-4)
    assert tuple(labels.scale) == (0.5, 2.0) and tuple(labels.translate) == (10.0, -4.0)
    assert tuple(probs.scale)[1:] == (0.5, 2.0) and tuple(probs.translate)[1:] == (10.0, -4.0)
    assert probs.axis_labels[0] == "class"  # the class slider is named
    assert labels.visible and viewer.layers.selection.active is labels


def test_progress_covers_post_processing(viewer, qtbot):
    """Item 8: the bar stops at 90 % for the network and fills while objects are separated."""
    stack = np.stack([viewer.layers["nuclei"].data[:, :128]] * 3)
    layer = viewer.add_image(stack, name="planes")
    w = dock(viewer, "Predict")
    w.image.set_layer(layer)
    w.channels.axis.setCurrentIndex(0)  # Z planes
    values = []
    w.controls.progress.valueChanged.connect(values.append)
    wait_job(qtbot, w.run())
    assert max(v for v in values if v < 100) >= 90  # post-processing reported per plane
    assert values[-1] == 100 and w.controls.progress.format() == "done"
    assert 90 in values and any(90 < v < 100 for v in values)


def test_first_openvino_export_is_shown_in_the_bar(viewer, qtbot, tmp_path, monkeypatch):
    """#12: new weights are exported to OpenVINO once (seconds) before the first tile; the
    Predict widget says so in its bar and status, then names the runtime; a second run
    (cached) does not export again."""
    pytest.importorskip("openvino")
    from napari_unet.inference import backends

    monkeypatch.setenv(backends.RUNTIME_ENV, "openvino")
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    backends.clear_compiled()
    w = dock(viewer, "Predict")
    w.image.set_layer(viewer.layers["nuclei"])
    shown: list[str] = []
    note = w.controls.note
    monkeypatch.setattr(w.controls, "note", lambda text: (shown.append(text), note(text)))
    wait_job(qtbot, w.run())
    exports = [t for t in shown if t.startswith("exporting")]
    assert len(exports) == 1 and "OpenVINO" in exports[0], shown
    assert any(t.startswith("running") and "OpenVINO" in t for t in shown), shown
    assert w.last_layers["labels"].data.shape == (256, 512)
    # the final line names the runtime and says the time includes the export
    assert "s (with the one-off OpenVINO export) on CPU" in w.status.text(), w.status.text()
    assert w.status.text().endswith(", OpenVINO."), w.status.text()
    shown.clear()
    wait_job(qtbot, w.run())
    assert not [t for t in shown if t.startswith("exporting")], shown
    assert "export" not in w.status.text() and "OpenVINO" in w.status.text()
    backends.clear_compiled()


def test_a_slow_stage_is_shown_while_it_runs(viewer, qtbot, monkeypatch):
    """The journey: the bar said "exporting … to OpenVINO" only once the export had ended.
    Events reported within 0.2 s of the previous batch waited for the *next* report, and
    nothing is reported during a slow step. Now a held batch is delivered within 0.2 s."""
    import threading

    from napari_unet._widgets import _predict
    from napari_unet._widgets._events import Stage

    release = threading.Event()
    text = "exporting unet to OpenVINO for 256×512 windows (once for these weights)"

    def slow_export(model, request, *, report, cancel, **_):
        report(Stage("predicting on CPU"))
        report(Stage(text))  # right after the first: held back by the throttle
        while not (release.is_set() or cancel.is_set()):  # the export: nothing reported
            time.sleep(0.01)
        raise RuntimeError("stopped")

    monkeypatch.setattr(_predict, "run_prediction", slow_export)
    w = dock(viewer, "Predict")
    before = snapshot(viewer)
    job = w.run()
    try:
        qtbot.waitUntil(lambda: w.controls.progress.format().startswith("exporting"), timeout=5000)
    finally:
        release.set()
    # cut after a whole word, the aside dropped (was "… (once for th…")
    assert w.controls.progress.format() == "exporting unet to OpenVINO for 256×512 windows…"
    assert w.status.text() == text[:1].upper() + text[1:] + "…"
    wait_job(qtbot, job)
    assert snapshot(viewer) == before and "failed: stopped" in w.status.text()


def test_progress_notes_are_cut_after_a_word(qtbot):
    from napari_unet._widgets._common import NOTE_CHARS, RunControls, shorten

    controls = RunControls("Run")
    controls.note("compiling unet for the CPU (OpenVINO bf16)…")
    assert controls.progress.format() == "compiling unet for the CPU (OpenVINO bf16)…"
    long = "running 12 windows of 768×768 on the CPU with a runtime whose name is long"
    cut = shorten(long, NOTE_CHARS)
    assert len(cut) <= NOTE_CHARS and cut.endswith("…") and long.startswith(cut[:-1])
    assert long[len(cut) - 1] == " "  # the cut falls between words


def test_two_predictions_give_two_layers_first_unchanged(viewer, qtbot):
    """Item 2: results are added, never replaced; replacing is an explicit option."""
    state = get_state(viewer)
    w = dock(viewer, "Predict")
    w.image.set_layer(viewer.layers["nuclei"])
    w.probabilities.setChecked(True)
    wait_job(qtbot, w.run())
    first = dict(w.last_layers)
    first_bytes = {k: layer.data.tobytes() for k, layer in first.items()}
    first["labels"].visible = False  # a hidden result stays hidden and unchanged
    # another model, then the same model again: each run its own layers
    state.set_model(tiny("unetpp"), "tiny UNet++")
    wait_job(qtbot, w.run())
    second = dict(w.last_layers)
    assert second["labels"] is not first["labels"]
    label = state.label  # "unetpp", or "unetpp 2" when a bundled UNet++ is listed
    assert label.startswith("unetpp") and second["labels"].name == f"nuclei [{label} #2]"
    assert second["labels"].visible and viewer.layers.selection.active is second["labels"]
    for k, layer in first.items():
        assert layer in viewer.layers and layer.data.tobytes() == first_bytes[k]
    assert not first["labels"].visible
    # explicit replace: the last run's layers get the new data, nothing is added
    n = len(viewer.layers)
    w.replace.setChecked(True)
    wait_job(qtbot, w.run())
    assert len(viewer.layers) == n and w.last_layers["labels"] is second["labels"]
    assert w.last_layers["labels"].name == f"nuclei [{label} #3]"
    for k, layer in first.items():
        assert layer.data.tobytes() == first_bytes[k]


def test_predict_lands_on_the_layer_it_started_on(viewer, qtbot):
    other = viewer.add_image(np.zeros((64, 64), np.float32), name="other")
    w = dock(viewer, "Predict")
    w.image.set_layer(viewer.layers["nuclei"])
    job = w.run()
    w.image.set_layer(other)  # the user switches while the worker runs
    viewer.layers.selection.active = other
    wait_job(qtbot, job)
    assert w.last_layers["labels"].name == "nuclei [unet #1]"
    assert w.last_layers["labels"].data.shape == (256, 512)


def test_predict_stack_current_slice_and_field_of_view(viewer, qtbot):
    stack = np.stack([viewer.layers["nuclei"].data[:, :256]] * 3)
    layer = viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    w = dock(viewer, "Predict")
    w.image.set_layer(layer)
    # three entries on the first axis could be channels: the picker asks, the user says planes
    assert w.channels.isVisibleTo(w) and w.channels.channels() is True
    w.channels.axis.setCurrentIndex(0)
    assert w.current_slice.isEnabled()
    w.current_slice.setChecked(True)
    wait_job(qtbot, w.run())
    out = w.last_layers["labels"]
    assert out.data.shape == (3, 256, 256)
    assert out.data[0].max() == 0 and out.data[2].max() == 0
    # field of view: zoom in, the output covers only what is visible
    w.current_slice.setChecked(False)
    w.field_of_view.setChecked(True)
    from napari_unet._widgets._geometry import camera

    camera(viewer).center = (1, 128, 128)
    camera(viewer).zoom = 8 * camera(viewer).zoom
    wait_job(qtbot, w.run())
    out = w.last_layers["labels"]
    assert out.data.shape[0] == 3 and out.data.shape[1] < 256 and out.data.shape[2] < 256
    assert out.translate[1] > 0 and out.translate[2] > 0


def test_channel_picker_two_channel_image(viewer, qtbot):
    """Item 8: a (2, Y, X) image is two channels (not two Z-planes); the model reads one."""
    nuclei = viewer.layers["nuclei"].data.astype(np.float32)
    two = np.stack([np.zeros_like(nuclei), nuclei])
    layer = viewer.add_image(two, name="two channels")
    w = dock(viewer, "Predict")
    w.image.set_layer(layer)
    assert w.channels.channels() is True
    assert [w.channels.channel.itemText(i) for i in range(w.channels.channel.count())] == [
        "channel 1",
        "channel 2",
    ]
    w.channels.channel.setCurrentIndex(1)
    wait_job(qtbot, w.run())
    out = w.last_layers["labels"]
    assert out.data.shape == (256, 512)  # one plane, not two
    from napari_unet.inference.predict import predict
    from napari_unet.postprocess import segment

    model = get_state(viewer).model
    expected = segment(predict(model, nuclei, device="cpu"))
    np.testing.assert_array_equal(out.data, expected)
    # planes, if the user says so
    w.channels.axis.setCurrentIndex(0)
    wait_job(qtbot, w.run())
    assert w.last_layers["labels"].data.shape == (2, 256, 512)


def test_predict_cancel_changes_nothing(viewer, qtbot):
    big = np.tile(viewer.layers["nuclei"].data, (4, 2))  # 1024 × 1024
    viewer.add_image(big, name="big")
    w = dock(viewer, "Predict")
    w.image.set_layer(viewer.layers["big"])
    w.probabilities.setChecked(True)
    w.tile.setValue(128)
    before = snapshot(viewer)
    # Cancel from the progress callback (the first tiles shown), not after a wait: the
    # bar moves only on reported progress, which reaches the GUI before the job's end.
    w.controls.progress.valueChanged.connect(lambda value: value > 0 and w.cancel())
    job = w.run()
    wait_job(qtbot, job)
    assert job.cancelled
    assert snapshot(viewer) == before
    assert "Cancelled" in w.status.text()


def test_segment_menu_command(viewer, qtbot):
    from napari._app_model import get_app_model

    app = get_app_model()
    menu_ids = [getattr(i, "command", None) for i in app.menus.get_menu("napari/layers/segment")]
    assert "napari-unet.segment" in [c.id for c in menu_ids if c is not None]
    viewer.layers.selection.active = viewer.layers["nuclei"]
    before = snapshot(viewer)
    # as the menu does: app-model injects the current viewer
    job = app.commands.execute_command("napari-unet.segment").result()
    wait_job(qtbot, job)
    assert user_layers_unchanged(before, snapshot(viewer))
    out = viewer.layers["nuclei [unet #1]"]
    assert out.data.dtype == np.uint32 and out.data.shape == (256, 512)


# -------------------------------------------------------------------------- inspect
def test_inspect_weight_map_follows_edits(viewer, qtbot):
    from napari_unet.weightmap import border_weight_map

    labels = viewer.layers["nuclei labels"]
    w = dock(viewer, "Inspect")
    w.labels.set_layer(labels)
    before = snapshot(viewer)
    wait_job(qtbot, w.show_weight_map())
    assert user_layers_unchanged(before, snapshot(viewer))
    layer = w.weight_layer
    assert layer.name == "nuclei labels [weight map]"
    np.testing.assert_allclose(layer.data, border_weight_map(labels.data), rtol=1e-6)

    edited = labels.data.copy()
    edited[edited == edited.max()] = 0  # the user deletes a nucleus
    labels.data = edited
    qtbot.waitUntil(lambda: w.updates >= 2, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not w.weight_job.running, timeout=TIMEOUT)
    assert w.weight_layer is layer
    np.testing.assert_allclose(layer.data, border_weight_map(edited), rtol=1e-6)


def test_inspect_side_outputs_unetpp(viewer, qtbot):
    get_state(viewer).set_model(tiny("unetpp", depth=4), "tiny UNet++")
    w = dock(viewer, "Inspect")
    w.image.set_layer(viewer.layers["nuclei"])
    before = snapshot(viewer)
    wait_job(qtbot, w.show_side_outputs())
    assert user_layers_unchanged(before, snapshot(viewer))
    assert w.side_layer.data.shape == (4, 256, 512)
    # the slider over the outputs is named (it said "-3"), like the probabilities' "class"
    assert w.side_layer.axis_labels[0] == "output"
    assert w.table.rowCount() == 4
    model = get_state(viewer).model
    rows = w.rows
    assert [r["output"] for r in rows] == ["L1", "L2", "L3", "L4 (final)"]
    assert rows[0]["parameters"] == f"{model.level_parameters(1):,}"
    assert rows[-1]["Dice vs final"] == "1.000"
    assert all(r["time"].endswith(" s") for r in rows)


# ---------------------------------------------------------------------------- train
def _average(x):
    n = max(2, len(x) // 4)
    return float(np.mean(x[:n])), float(np.mean(x[-n:]))


def test_train_lowers_loss_and_predict_uses_it(viewer, qtbot):
    state = get_state(viewer)
    original = state.model
    original_state = copy.deepcopy(original.state_dict())
    predict_widget = dock(viewer, "Predict")
    predict_widget.probabilities.setChecked(True)
    predict_widget.image.set_layer(viewer.layers["nuclei"])
    wait_job(qtbot, predict_widget.run())
    probs_before = predict_widget.last_layers["probabilities"].data.copy()

    w = dock(viewer, "Train")
    w.image.set_layer(viewer.layers["nuclei"])
    w.labels.set_layer(viewer.layers["nuclei labels"])
    assert w.budget_kind.currentText() == "steps"  # the default budget: load-independent
    w.budget.setValue(16)
    w.patch.setValue(64)
    w.predict_after.setChecked(False)
    before = snapshot(viewer)
    wait_job(qtbot, w.run())
    assert user_layers_unchanged(before, snapshot(viewer))
    history = w.history
    assert history is not None and not history.cancelled and len(history.losses) == 16
    first, last = _average(history.losses)
    assert last < first, history.losses
    assert w.plot.losses == history.losses  # every step reached the plot
    # the trained model joins the list and is current; the original was never modified
    assert state.model is w.trained_model and state.model is not original
    assert "trained here" in state.source and not state.untrained
    assert state.entry_of(original) is not None  # still selectable
    assert state.current.label == "unet (trained 1)" and state.current.summary["images"] == 1
    for k, v in original.state_dict().items():
        assert torch.equal(v, original_state[k])
    # Predict uses the new weights
    wait_job(qtbot, predict_widget.run())
    probs_after = predict_widget.last_layers["probabilities"].data
    assert not np.allclose(probs_before, probs_after)
    from napari_unet.inference.predict import predict

    expected = predict(state.model, viewer.layers["nuclei"].data, device="cpu")
    np.testing.assert_allclose(probs_after, expected, atol=1e-5)
    # Compare on the image it was trained on says its score is no test
    assert state.current.summary["trained_on"] == [{"name": "nuclei", "shape": [256, 512]}]
    cmp = dock(viewer, "Compare models")
    qtbot.waitUntil(lambda: "unet (trained 1)" in cmp._models, timeout=TIMEOUT)
    for i in range(cmp.model_list.count()):
        item = cmp.model_list.item(i)
        keep = item.text() == "unet (trained 1)"
        item.setCheckState(item.checkState().__class__(2 if keep else 0))
    assert list(cmp.selected_models()) == ["unet (trained 1)"]
    cmp.labels_combo.set_layer(viewer.layers["nuclei labels"])
    cmp.run()
    qtbot.waitUntil(lambda: cmp._job is None, timeout=TIMEOUT)
    text = cmp.status.text()
    assert "unet (trained 1) trained on this image" in text and "not a test" in text


def test_train_with_region_and_prediction(viewer, qtbot):
    shapes = viewer.add_shapes(
        [np.array([[20, 30], [20, 200], [180, 200], [180, 30]])],
        shape_type="rectangle",
        name="region",
    )
    w = dock(viewer, "Train")
    w.image.set_layer(viewer.layers["nuclei"])
    w.labels.set_layer(viewer.layers["nuclei labels"])
    w.region.set_layer(shapes)
    w.budget_kind.setCurrentText("epochs")
    w.budget.setValue(1)
    w.patch.setValue(64)
    before = snapshot(viewer)
    wait_job(qtbot, w.run())
    assert w.last_roi == (20, 180, 30, 200)
    assert len(w.history.epochs) == 1
    assert user_layers_unchanged(before, snapshot(viewer))
    out = viewer.layers["nuclei [unet (trained 1) #1]"]
    assert out.data.dtype == np.uint32 and out.data.shape == (256, 512)
    assert w.last_layers["labels"] is out


def test_validation_note_counts_one_object_in_the_singular():
    from types import SimpleNamespace

    from napari_unet._widgets._train_text import val_name

    one = SimpleNamespace(validation="objects", scored=False, val_objects=1)
    assert val_name(one).startswith("no validation score: 1 object, fewer than")
    two = SimpleNamespace(validation="objects", scored=False, val_objects=2)
    assert "2 objects," in val_name(two)


def test_rectangle_roi_in_image_pixels(viewer):
    from napari_unet._widgets._train import rectangle_roi

    image = viewer.layers["nuclei"]
    image.scale = (2.0, 2.0)
    shapes = viewer.add_shapes(  # drawn in world coordinates: twice the pixel coordinates
        [np.array([[40, 60], [40, 400], [360, 400], [360, 60]])], shape_type="rectangle"
    )
    assert rectangle_roi(shapes, image) == (20, 180, 30, 200)
    lines = viewer.add_shapes([np.array([[0, 0], [5, 5]])], shape_type="line")
    with pytest.raises(ValueError, match="no rectangle"):
        rectangle_roi(lines, image)


def test_train_cancel_keeps_model_and_layers(viewer, qtbot):
    state = get_state(viewer)
    original = state.model
    original_state = copy.deepcopy(original.state_dict())
    w = dock(viewer, "Train")
    w.budget_kind.setCurrentText("seconds")
    w.budget.setValue(60)
    w.patch.setValue(64)
    before = snapshot(viewer)
    job = w.run()
    # cancel from the progress callback once two steps are plotted (no wait, no sleep)
    job.when_reported(lambda events: len(w.plot.losses) >= 2 and w.cancel())
    wait_job(qtbot, job)
    assert job.cancelled and len(w.plot.losses) >= 2
    assert snapshot(viewer) == before
    assert state.model is original
    for k, v in original.state_dict().items():
        assert torch.equal(v, original_state[k])
    assert "Cancelled" in w.status.text()


# ------------------------------------------------------------------ one place to work
def test_all_tools_fit_a_1600x1000_window(make_napari_viewer, qtbot):
    """Item 1: the panel and every single tool open from the Plugins menu fit the window."""
    viewer = on_cpu(make_napari_viewer(show=True))
    viewer.open_sample(PLUGIN, "nuclei")
    get_state(viewer).set_model(tiny(), "tiny test model", untrained=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "All tools (one panel)")
    for name in ("Model", "Predict", "Inspect", "Train", "Compare models"):
        dock(viewer, name)
    qtbot.wait(200)
    hint = window.minimumSizeHint()
    assert hint.width() <= 1600 and hint.height() <= 1000, (hint.width(), hint.height())
    assert window.height() <= 1000 and window.width() <= 1600
    # the Train button of the panel is reachable: inside the window once scrolled to
    train = panel.show_tab("Train")
    train.scroll.ensureWidgetVisible(train.controls.run)
    qtbot.wait(50)
    top_left = train.controls.run.mapTo(window, train.controls.run.rect().topLeft())
    assert 0 <= top_left.y() < window.height() - train.controls.run.height()
    assert train.controls.run.visibleRegion().boundingRect().height() > 0
    assert train.controls.run.toolTip() or train.budget_kind.toolTip()  # words explained


# --------------------------------------------------------------------------- models
def test_model_list_keeps_every_model_and_bundled_output(viewer, qtbot):
    """Item 3: bundled + built + trained stay selectable; switching back gives the same output."""
    from napari_unet.checkpoint import load_default_model
    from napari_unet.inference.predict import predict

    state = get_state(viewer)
    w = dock(viewer, "Model")
    qtbot.waitUntil(lambda: any(e.kind == "bundled" for e in state.entries), timeout=TIMEOUT)
    bundled = next(e for e in state.entries if e.kind == "bundled")
    w.select(bundled)
    qtbot.waitUntil(lambda: state.current is bundled and bundled.model is not None, timeout=TIMEOUT)
    assert not w.warning.isVisibleTo(w)
    # "New model" defaults for U-Net are the bundled net's shape
    qtbot.waitUntil(lambda: w.variant.count() > 0, timeout=TIMEOUT)
    w.variant.setCurrentText("unet")
    assert (w.width.value(), w.depth.value()) == (
        bundled.model.config["base_channels"],
        bundled.model.config["depth"],
    )
    # building a variant adds it; nothing is discarded; the warning is true
    w.variant.setCurrentText("unetpp")
    w.width.setValue(4)
    w.depth.setValue(2)
    n = len(state.entries)
    wait_job(qtbot, w.build())
    assert len(state.entries) == n + 1 and state.current.kind == "built"
    assert bundled in state.entries and bundled.model is not None
    assert "UNTRAINED" in w.warning.text() and "missing" not in w.warning.text()
    assert w.models.count() == len(state.entries)
    # switching back is instant and predicts exactly what the bundled model predicts
    p = dock(viewer, "Predict")
    p.image.set_layer(viewer.layers["nuclei"])
    p.probabilities.setChecked(True)
    w.models.setCurrentRow(state.entries.index(bundled))
    assert state.current is bundled
    wait_job(qtbot, p.run())
    reference = predict(load_default_model(), viewer.layers["nuclei"].data, device="cpu")
    np.testing.assert_allclose(p.last_layers["probabilities"].data, reference, atol=1e-5)
    assert p.last_layers["labels"].name.startswith(f"nuclei [{bundled.label} #")


def test_use_as_annotation_copies_into_an_editable_layer(viewer, qtbot):
    """Item 4: a prediction becomes a new Labels layer; the prediction stays as it was."""
    w = dock(viewer, "Predict")
    w.image.set_layer(viewer.layers["nuclei"])
    wait_job(qtbot, w.run())
    result = w.last_layers["labels"]
    before = result.data.tobytes()
    layer = w.use_as_annotation()
    assert layer is not result and layer.name == "nuclei annotation"
    assert layer.data.dtype == np.uint32 and np.array_equal(layer.data, result.data)
    assert viewer.layers.selection.active is layer and layer.mode == "paint"
    layer.paint((100, 100), 7)
    assert result.data.tobytes() == before
    assert layer.data[100, 100] == 7


# ---------------------------------------------------------------------------- train
def _rect(y0, y1, x0, x1):
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)


def test_train_uses_every_rectangle(viewer, qtbot):
    """Item 4: both rectangles are trained on; labels only in the second change the result."""
    full = viewer.layers["nuclei labels"].data
    annotation = np.zeros_like(full)
    annotation[128:256, 256:384] = full[128:256, 256:384]  # only in the second rectangle
    ann = viewer.add_labels(annotation, name="annotation")
    shapes = viewer.add_shapes(
        [_rect(0, 96, 0, 96), _rect(128, 256, 256, 384)], shape_type="rectangle", name="regions"
    )
    w = dock(viewer, "Train")
    w.image.set_layer(viewer.layers["nuclei"])
    w.labels.set_layer(ann)
    w.region.set_layer(shapes)
    w.validation.setCurrentText("none")
    w.budget.setValue(6)
    w.patch.setValue(64)
    w.predict_after.setChecked(False)
    wait_job(qtbot, w.run())
    s = w.summary
    assert (s.images, s.regions) == (1, 2)
    ids = np.unique(annotation[128:256, 256:384])
    assert s.objects == len(ids[ids > 0])
    assert s.pixels == 96 * 96 + 128 * 128
    assert "1 image, 2 regions" in w.status.text() and f"{s.objects} objects" in w.status.text()
    assert w.last_rois == [[(0, 96, 0, 96), (128, 256, 256, 384)]]
    trained = {k: v.clone() for k, v in w.trained_model.state_dict().items()}

    def differs(a, b):
        return any(not torch.equal(v, b[k]) for k, v in a.items())

    # fewer objects in the second rectangle only: the result changes (it was trained on)
    fewer = annotation.copy()
    fewer[fewer == ids[ids > 0][0]] = 0
    ann.data = fewer
    wait_job(qtbot, w.run())
    assert w.summary.objects == s.objects - 1
    assert differs(trained, w.trained_model.state_dict())
    # control: with the first rectangle alone, the same edit changes nothing
    first_only = viewer.add_shapes([_rect(0, 96, 0, 96)], shape_type="rectangle", name="first")
    w.region.set_layer(first_only)
    results = []
    for data in (annotation, fewer):
        ann.data = data
        wait_job(qtbot, w.run())
        results.append({k: v.clone() for k, v in w.trained_model.state_dict().items()})
    assert not differs(*results)


def test_train_several_entries_and_validation_choice(viewer, qtbot):
    """Items 4–6: two (image, annotation) entries; validation modes; thread policy."""
    from napari_unet.runtime import choose_threads

    nuclei, labels = viewer.layers["nuclei"], viewer.layers["nuclei labels"]
    flipped = viewer.add_image(nuclei.data[:, ::-1].copy(), name="flipped")
    flipped_labels = viewer.add_labels(labels.data[:, ::-1].copy(), name="flipped labels")
    w = dock(viewer, "Train")
    w.budget.setValue(4)
    w.patch.setValue(64)
    w.predict_after.setChecked(False)
    w.image.set_layer(nuclei)
    w.labels.set_layer(labels)
    w.add_current_entry()
    w.image.set_layer(flipped)
    w.labels.set_layer(flipped_labels)
    w.add_current_entry()
    assert w.entry_list.count() == 2
    # held-out objects: a fraction of whole objects, the plot says on how many
    w.validation.setCurrentText("held-out objects")
    wait_job(qtbot, w.run())
    s = w.summary
    assert s.images == 2 and s.validation == "objects" and s.scored
    assert w.plot.val_name == f"F1@0.5 on {s.val_objects} held-out objects"
    assert w.history.epochs[-1]["val_f1"] is not None
    assert s.threads == choose_threads()  # the engine's thread policy (GUI running)
    # none: no score, and the plot says so
    w.validation.setCurrentText("none")
    wait_job(qtbot, w.run())
    assert w.summary.validation == "none" and w.plot.val_name.startswith("no validation")
    assert w.plot.val_scores == []
    # a region of its own with too few objects: no score, with the reason
    w.entries.clear()
    w._update_entries()
    w.image.set_layer(nuclei)
    w.labels.set_layer(labels)
    val = viewer.add_shapes([_rect(0, 24, 0, 24)], shape_type="rectangle", name="validation")
    w.validation.setCurrentText("a region of its own")
    w.val_region.set_layer(val)
    wait_job(qtbot, w.run())
    assert w.summary.validation == "regions" and not w.summary.scored
    assert "fewer than 5" in w.plot.val_name and w.plot.val_scores == []


# ---------------------------------------------------------------- jobs and closing
def test_closing_the_dock_mid_training_drops_the_job(viewer, qtbot, capfd):
    """Item 7: no layer and no model from a closed dock; nothing on stderr."""
    state = get_state(viewer)
    original = state.model
    dock_widget, w = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    w.image.set_layer(viewer.layers["nuclei"])
    w.labels.set_layer(viewer.layers["nuclei labels"])
    w.budget.setValue(100_000)
    w.patch.setValue(64)
    before = snapshot(viewer)
    job = w.run()
    qtbot.waitUntil(lambda: len(w.plot.losses) >= 2, timeout=TIMEOUT)
    viewer.window.remove_dock_widget(dock_widget)  # the dock's × does this
    assert job.dropped
    assert job.join(10)  # stops within a step
    qtbot.wait(300)
    assert snapshot(viewer) == before
    assert (
        state.model is original
        and len(state.entries) == 1
        or all(e.kind != "trained" for e in state.entries)
    )
    assert capfd.readouterr().err == ""


CLOSE_SCRIPT = r"""
import sys, time
import napari
from qtpy.QtWidgets import QApplication
from napari_unet._widgets import get_state
from napari_unet.models import build_model

mode = sys.argv[1]
v = napari.Viewer()
get_state(v).set_device("cpu")
if mode == "dock-and-close":   # issue #16 item 4: the default-model loader still running
    v.window.add_plugin_dock_widget("napari-unet", "Predict")
    v.close()
    print("T_CLOSE", time.time(), flush=True)
    sys.exit(0)
v.open_sample("napari-unet", "nuclei")
get_state(v).set_model(build_model("unet", 1, 3, base_channels=4, depth=2), "tiny")
_, w = v.window.add_plugin_dock_widget("napari-unet", "All tools (one panel)")
t = w["Train"]
t.image.set_layer(v.layers["nuclei"])
t.labels.set_layer(v.layers["nuclei labels"])
t.budget.setValue(100000)
t.patch.setValue(64)
job = t.run()
end = time.monotonic() + 120
while len(t.plot.losses) < 2 and time.monotonic() < end:
    QApplication.processEvents()
    time.sleep(0.01)
n = len(v.layers)
v.close()
print("T_CLOSE", time.time(), flush=True)
for _ in range(50):
    QApplication.processEvents()
    time.sleep(0.01)
print("dropped", job.dropped, "steps", len(t.plot.losses) >= 2, flush=True)
"""


@pytest.mark.parametrize("mode", ["dock-and-close", "close-mid-training"])
def test_closing_the_viewer_ends_the_process_quietly(mode, tmp_path):
    """Item 7 / #16 item 4: exit 0, nothing on stderr, no wait for the training budget."""
    import os
    import time

    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, timeout=180, env=env
    )
    ended = time.time()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    closed = float(
        next(line for line in proc.stdout.splitlines() if line.startswith("T_CLOSE")).split()[1]
    )
    # the script itself waits 0.5 s after closing in the mid-training case
    assert ended - closed < (2.5 if mode == "close-mid-training" else 2.0), ended - closed
    if mode == "close-mid-training":
        assert "dropped True steps True" in proc.stdout


# ------------------------------------------------------------------------ job events
def test_job_messages_are_typed(viewer, qtbot):
    """A worker reports typed events; a bare tuple fails at once (no silent skip), an event a
    widget does not handle raises, and the engine's training dicts are converted."""
    from napari_unet._widgets._events import (
        Epoch,
        Progress,
        Stage,
        Step,
        TrainStarted,
        UnknownEvent,
        train_event,
    )
    from napari_unet._widgets._jobs import start_job

    errors, seen = [], []
    job = start_job(
        lambda report, cancel: report(("progress", 1, 2)),
        on_progress=seen.extend,
        on_done=lambda _: errors.append("done"),
        on_error=errors.append,
    )
    wait_job(qtbot, job)
    assert len(errors) == 1 and isinstance(errors[0], UnknownEvent) and seen == []

    def work(report, cancel):
        report(Stage("one"))
        report(Progress(1, 2), flush=True)
        return "result"

    done = []
    wait_job(qtbot, start_job(work, on_progress=seen.extend, on_done=done.append))
    assert seen == [Stage("one"), Progress(1, 2)] and done == ["result"]
    with pytest.raises(AttributeError):
        Progress(1, 2).done = 3  # frozen
    w = dock(viewer, "Predict")
    with pytest.raises(UnknownEvent, match="Predict"):
        w._on_progress([Step(1, 0.5, 0.1, 0.2)])
    assert train_event({"kind": "start", "summary": "s"}) == TrainStarted("s")
    step = {"kind": "step", "step": 3, "epoch": 0, "loss": 0.5, "elapsed": 1.0}
    assert train_event({**step, "fraction": 0.3, "total_steps": 10}) == Step(
        3, 0.5, 0.3, 1.0, 10, 0
    )
    assert train_event({"kind": "epoch", "epoch": 1, "val_f1": None}) == Epoch(1)
    with pytest.raises(UnknownEvent, match="stepp"):
        train_event({"kind": "stepp"})


def test_cancel_after_the_engine_returned_still_cancels(qtbot):
    """Cancel pressed while the result is on its way to the GUI: on_cancelled, not on_done."""
    import threading

    from napari_unet._widgets._events import Progress
    from napari_unet._widgets._jobs import start_job

    returned = threading.Event()
    outcome = []

    def work(report, cancel):
        report(Progress(1, 1))
        returned.set()
        return "result"

    job = start_job(
        work,
        on_progress=lambda events: (returned.wait(10), job.cancel()),
        on_done=lambda r: outcome.append(("done", r)),
        on_cancelled=lambda r: outcome.append(("cancelled", r)),
    )
    wait_job(qtbot, job)
    assert job.cancelled and outcome == [("cancelled", "result")]


# -------------------------------------------------------------------------- inspect
def test_inspect_alone_loads_a_model_and_follows_undo(make_napari_viewer, qtbot):
    """Item 8: Inspect opened alone loads the bundled model; the weight map follows undo."""
    from napari_unet.weightmap import border_weight_map

    viewer = on_cpu(make_napari_viewer())
    viewer.open_sample(PLUGIN, "nuclei")
    w = dock(viewer, "Inspect")
    qtbot.waitUntil(lambda: get_state(viewer).model is not None, timeout=TIMEOUT)
    labels = viewer.layers["nuclei labels"]
    w.labels.set_layer(labels)
    wait_job(qtbot, w.show_weight_map())
    original = labels.data.copy()
    labels.selected_label = int(original.max()) + 1
    labels.paint((60, 60), labels.selected_label)  # one brush stroke (undoable)
    qtbot.waitUntil(lambda: w.updates >= 2, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not w.weight_job.running, timeout=TIMEOUT)
    np.testing.assert_allclose(w.weight_layer.data, border_weight_map(labels.data), rtol=1e-6)
    labels.undo()
    assert np.array_equal(labels.data, original)
    qtbot.waitUntil(lambda: w.updates >= 3, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not w.weight_job.running, timeout=TIMEOUT)
    np.testing.assert_allclose(w.weight_layer.data, border_weight_map(original), rtol=1e-6)
    labels.redo()
    qtbot.waitUntil(lambda: w.updates >= 4, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not w.weight_job.running, timeout=TIMEOUT)
    np.testing.assert_allclose(w.weight_layer.data, border_weight_map(labels.data), rtol=1e-6)
    # side outputs with the model it loaded itself
    w.image.set_layer(viewer.layers["nuclei"])
    wait_job(qtbot, w.show_side_outputs())
    assert w.table.rowCount() >= 1


def test_model_widget_exports_and_loads_a_bioimageio_package(make_napari_viewer, qtbot, tmp_path):
    """Export the bundled model from the Model widget, load the package back through the same
    widget: it joins the model list and predicts like the original."""
    pytest.importorskip("bioimageio.spec")
    from napari_unet._widgets import ModelWidget
    from napari_unet.checkpoint import load_default_model
    from napari_unet.inference.predict import predict

    viewer = on_cpu(make_napari_viewer())
    widget = ModelWidget(viewer)
    qtbot.waitUntil(lambda: widget.state.model is not None, timeout=60000)
    original = widget.state.model
    job = widget.export_package(tmp_path / "nuclei")
    qtbot.waitUntil(lambda: not job.running, timeout=180000)
    assert (tmp_path / "nuclei.zip").is_file(), widget.status.text()
    assert "Exported" in widget.status.text()
    before = len(widget.state.entries)
    job = widget.load_checkpoint(tmp_path / "nuclei.zip")
    qtbot.waitUntil(lambda: not job.running, timeout=60000)
    assert len(widget.state.entries) == before + 1
    loaded = widget.state.entries[-1].model
    image = np.random.default_rng(0).random((64, 64), np.float32)
    ref = predict(load_default_model(), image, device="cpu")
    assert np.abs(predict(loaded, image, device="cpu") - ref).max() <= 1e-6
    assert original is not loaded
    assert "runtime" in widget.info and widget.info["runtime"].text() != "—"


def test_predict_widget_makes_3d_objects_with_the_layer_scale(make_napari_viewer, qtbot):
    from napari_unet._widgets import PredictWidget
    from napari_unet.synthetic import synthetic_nuclei_3d

    viewer = on_cpu(make_napari_viewer())
    image, truth = synthetic_nuclei_3d((8, 96, 96), spacing=(4.0, 1.0, 1.0), seed=2)
    layer = viewer.add_image(image, name="stack", scale=(4.0, 1.0, 1.0))
    widget = PredictWidget(viewer)
    qtbot.waitUntil(lambda: widget.state.model is not None, timeout=60000)
    widget.image.setCurrentIndex(widget.image.findText(layer.name))
    widget._update_enabled()
    assert widget.objects_3d.isEnabled()
    widget.objects_3d.setChecked(True)
    job = widget.run()
    qtbot.waitUntil(lambda: not job.running, timeout=120000)
    result = widget.last_layers["labels"]
    assert tuple(result.scale) == (4.0, 1.0, 1.0)
    ids = [set(np.unique(result.data[z])) - {0} for z in range(8)]
    spanning = [i for i in set().union(*ids) if sum(i in s for s in ids) >= 2]
    assert spanning, "objects continue across planes"
    assert result.data.max() < 0.5 * sum(len(s) for s in ids)


def test_train_on_a_z_stack_uses_every_annotated_plane(viewer, qtbot):
    """#14: a Z-stack annotated on two planes trains on both planes (2-D, per plane), whatever
    plane is displayed."""
    from napari_unet.synthetic import synthetic_nuclei_3d

    image, truth = synthetic_nuclei_3d((5, 96, 96), seed=3)
    annotation = np.zeros_like(truth)
    annotation[1], annotation[3] = truth[1], truth[3]
    img = viewer.add_image(image, name="stack")
    ann = viewer.add_labels(annotation, name="stack annotation")
    viewer.dims.set_current_step(0, 0)  # an unannotated plane is displayed
    w = dock(viewer, "Train")
    w.image.set_layer(img)
    w.labels.set_layer(ann)
    w.validation.setCurrentText("none")
    w.budget.setValue(2)
    w.patch.setValue(64)
    w.predict_after.setChecked(False)
    wait_job(qtbot, w.run())
    assert w.summary.images == 2, w.status.text()
    expected = sum(len(np.unique(truth[z])) - 1 for z in (1, 3))
    assert w.summary.objects == expected
