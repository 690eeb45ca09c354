"""Screenshots of the napari-unet widgets in use, for the docs.

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python scripts/screenshots.py

Opens napari with the sample nuclei, docks each widget as its own dock in turn and saves
``docs/images/widgets/{model,train,predict,predict_probabilities,inspect}.png`` (whole
window). The README's pictures of the whole cycle come from ``scripts/journey.py``. Uses the bundled model
when it is installed; otherwise the untrained fallback is trained in the Train widget
first (the screenshots then say so).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1500, 950)


def sample_viewer(size: tuple[int, int] = WINDOW):
    """A shown napari viewer of ``size`` with the sample nuclei, on a throw-away napari
    config (no pop-up notifications over the canvas)."""
    os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "settings.yaml"))
    import napari
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"
    viewer = napari.Viewer(title="napari-unet", show=True)
    viewer.window._qt_window.resize(*size)
    viewer.open_sample("napari-unet", "nuclei")
    return viewer


def settle(seconds: float = 0.3) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def wait(job, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while job is not None and job.running:
        settle(0.05)
        if time.monotonic() > end:
            raise TimeoutError("job did not finish")


def until(condition, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        settle(0.05)
        if time.monotonic() > end:
            raise TimeoutError("condition not met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widgets")
    parser.add_argument("--train-seconds", type=int, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from napari_unet._widgets import get_state
    from napari_unet.demo import default_or_fallback

    viewer = sample_viewer()
    state = get_state(viewer)
    model, source, untrained = default_or_fallback()
    state.set_model(model, source, untrained=untrained)
    docks, widgets = {}, {}
    for name in ("Model", "Train", "Predict", "Inspect"):
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget("napari-unet", name)
        docks[name].setVisible(False)

    def show_only(name: str) -> None:
        for key, dock in docks.items():
            dock.setVisible(key == name)
        settle(0.5)

    def shot(name: str, reset: bool = True) -> None:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for popup in viewer.window._qt_window.findChildren(NapariQtNotification):
            popup.close()  # e.g. the PyQt5 deprecation notice over the canvas
        if reset:
            viewer.reset_view()
        settle(1.0)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}")

    # ---- Model
    show_only("Model")
    until(lambda: widgets["Model"].info["parameters"].text() != "—")
    until(lambda: widgets["Train"].start_from.count() > 1)
    shot("model")

    # ---- Train: a rectangle region on the left half, live plot, prediction when done
    show_only("Train")
    region = viewer.add_shapes(
        [np.array([[0, 0], [0, 256], [256, 256], [256, 0]])],
        shape_type="rectangle",
        edge_color="yellow",
        face_color="transparent",
        edge_width=3,
        name="training region",
    )
    train = widgets["Train"]
    train.image.set_layer(viewer.layers["nuclei"])
    train.labels.set_layer(viewer.layers["nuclei labels"])
    train.region.set_layer(region)
    train.budget_kind.setCurrentText("seconds")
    train.budget.setValue(args.train_seconds or (60 if untrained else 20))
    viewer.layers["nuclei labels"].visible = False
    wait(train.run())
    print(train.status.text())
    viewer.layers.selection.active = region
    shot("train")

    # ---- Predict: instance labels + probabilities
    show_only("Predict")
    region.visible = False
    predict = widgets["Predict"]
    predict.image.set_layer(viewer.layers["nuclei"])
    predict.probabilities.setChecked(True)
    wait(predict.run())
    print(predict.status.text())
    probs = predict.last_layers["probabilities"]
    probs.visible = False
    viewer.layers.selection.active = predict.last_layers["labels"]
    shot("predict")
    probs.visible = True
    viewer.layers.selection.active = probs
    labels_out = predict.last_layers["labels"]
    labels_out.visible = False
    shot("predict_probabilities")
    labels_out.visible = True
    probs.visible = False

    # ---- Inspect: weight map + the side outputs of a small UNet++ trained briefly
    show_only("Inspect")
    inspect = widgets["Inspect"]
    inspect.labels.set_layer(viewer.layers["nuclei labels"])
    wait(inspect.show_weight_map())
    train.start_from.setCurrentText("new unetpp")
    train.width.setValue(8)
    train.depth.setValue(3)
    train.loss.setCurrentText("ce_dice")
    train.region.setCurrentIndex(0)  # (none): the annotations decide
    train.predict_after.setChecked(False)
    train.budget.setValue(args.train_seconds or 45)
    wait(train.run())
    print(train.status.text())
    inspect.image.set_layer(viewer.layers["nuclei"])
    wait(inspect.show_side_outputs())
    print(inspect.side_status.text())
    inspect.side_layer.visible = False
    for layer in viewer.layers:
        layer.visible = layer.name in ("nuclei labels [weight map]",)
    viewer.layers.selection.active = inspect.weight_layer
    shot("inspect")
    viewer.close()


if __name__ == "__main__":
    main()
