"""A biologist's journey through every napari-unet dock, in a real viewer, with checks.

    OMP_NUM_THREADS=1 NAPARI_UNET_THREADS=1 \
    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python scripts/gui_journey.py

Opens napari with the plugin's sample ``nuclei``, docks "All tools (one panel)" and
drives the real widgets the way clicks would (``button.click()``, then the Qt event loop
until the job ends). After every step the whole window is saved to ``--out``
(``/tmp/journey/NN_step.png``), with what each widget said in ``journey.json``:

1. Predict with the default model (CPU) → a labels layer;
2. Inspect: the border weight map of that labels layer; the per-depth outputs of the
   bundled UNet++ and U²-Net† (picked in the Model tab);
3. annotate: "Use as annotation", erase a cell (fill with 0), paint one (brush), draw a
   rectangle in a new Shapes layer;
4. Train a few steps, Predict again, correct the labels (second rectangle), Train again:
   the status must count the second region and the new object;
5. Compare every model on the sample against its labels;
6. Cancel a prediction and a training mid-way, close a Predict dock and a Train dock
   while their jobs run: the layers must stay as they were;
7. ``NAPARI_UNET_RUNTIME=openvino`` with a fresh ``NAPARI_UNET_CACHE``: a prediction,
   photographed while the bar says "exporting … to OpenVINO".

Everything napari, Qt or Python writes to stderr goes to ``stderr.log``; exceptions in Qt
callbacks are counted. Exits 1 when a check failed (each printed as ``FAIL``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = (1600, 1000)
RECT_1 = (0, 96, 0, 128)  # (y0, y1, x0, x1): the first corrected region
RECT_2 = (128, 224, 320, 448)  # the second, added after the first training


class Journey:
    """The viewer, the panel and the record of what happened."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.n = 0
        self.record: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.errors: list[str] = []

    # ------------------------------------------------------------------ helpers
    def settle(self, seconds: float = 0.3) -> None:
        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.005)

    def until(self, condition: Any, timeout: float = 300, what: str = "") -> bool:
        end = time.monotonic() + timeout
        while not condition():
            self.settle(0.03)
            if time.monotonic() > end:
                self.check(False, f"timed out after {timeout:.0f} s waiting for {what}")
                return False
        return True

    def wait(self, job: Any, timeout: float = 900, what: str = "the job") -> None:
        self.check(job is not None, f"{what} started")
        if job is not None:
            self.until(lambda: not job.running, timeout, what)
        self.settle(0.3)

    def check(self, ok: bool, text: str) -> bool:
        print(("ok   " if ok else "FAIL ") + text, flush=True)
        if not ok:
            self.failures.append(text)
        return ok

    def shot(self, name: str, **said: Any) -> Path:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for popup in self.window.findChildren(NapariQtNotification):
            popup.close()
        self.settle(0.6)
        self.n += 1
        path = self.out / f"{self.n:02d}_{name}.png"
        self.viewer.screenshot(str(path), canvas_only=False, flash=False)
        layers = [
            f"{'*' if lyr in self.viewer.layers.selection else ' '}"
            f"{'v' if lyr.visible else ' '} {type(lyr).__name__}: {lyr.name}"
            for lyr in self.viewer.layers
        ]
        clipped = self.clipped()
        for text in clipped:
            self.check(False, f"{path.name}: text cut off: {text}")
        entry = {"shot": str(path), "layers": layers, **{k: str(v) for k, v in said.items()}}
        self.record.append(entry)
        print(f"--- {path.name}: " + "; ".join(f"{k}={v}" for k, v in said.items()), flush=True)
        return path

    def clipped(self) -> list[str]:
        """Visible labels of the plugin's docks whose text does not fit (wrapped labels
        shorter than their text needs, one-line labels and bar texts narrower)."""
        from qtpy.QtWidgets import QDockWidget, QLabel, QProgressBar

        out = []
        for dock in self.window.findChildren(QDockWidget):
            if "napari-unet" not in dock.windowTitle() or not dock.isVisible():
                continue
            for label in dock.findChildren(QLabel):
                text = label.text()
                if not text or not label.isVisible() or label.width() < 10:
                    continue
                if label.wordWrap():
                    if label.height() + 2 < label.heightForWidth(label.width()):
                        out.append(
                            f"{text[:70]!r} ({label.height()} px of {label.heightForWidth(label.width())})"
                        )
                elif label.fontMetrics().horizontalAdvance(text) > label.width() + 2:
                    out.append(f"{text[:70]!r} (one line, {label.width()} px wide)")
            for bar in dock.findChildren(QProgressBar):
                text = bar.text()
                if bar.isVisible() and bar.fontMetrics().horizontalAdvance(text) > bar.width() - 8:
                    out.append(f"bar {text!r} ({bar.width()} px wide)")
        return out

    def snapshot(self) -> dict[str, tuple[str, str]]:
        """Every layer: name → (type, hash of its data)."""
        out = {}
        for layer in self.viewer.layers:
            data = np.asarray(layer.data) if type(layer).__name__ != "Shapes" else layer.data
            digest = hashlib.sha1(
                np.ascontiguousarray(data).tobytes()
                if isinstance(data, np.ndarray)
                else repr([np.asarray(d).tolist() for d in data]).encode()
            ).hexdigest()[:12]
            out[layer.name] = (type(layer).__name__, digest)
        return out

    def bar(self, controls: Any) -> str:
        return f"{controls.progress.value()}% {controls.progress.format()!r}"

    def select_model(self, model_tab: Any, name: str) -> None:
        """Click the model list row of the bundled ``name`` and wait until it is current."""
        state = self.state
        self.until(
            lambda: any(e.bundled_name == name for e in state.entries), 120, f"{name} listed"
        )
        row = next(i for i, e in enumerate(state.entries) if e.bundled_name == name)
        model_tab.models.setCurrentRow(row)
        self.until(
            lambda: state.current is not None and state.current.bundled_name == name,
            300,
            f"{name} loaded",
        )
        self.settle(0.3)

    # -------------------------------------------------------------------- setup
    def open(self) -> None:
        os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "settings.yaml"))
        import napari
        from napari.settings import get_settings

        from napari_unet._widgets import get_state

        get_settings().application.gui_notification_level = "none"
        self.viewer = napari.Viewer(title="napari-unet journey", show=True)
        self.window = self.viewer.window._qt_window
        self.window.resize(*WINDOW)
        hook = sys.excepthook

        def record_error(kind: Any, value: Any, tb: Any) -> None:
            self.errors.append("".join(traceback.format_exception(kind, value, tb)))
            print("EXCEPTION in a Qt callback:", self.errors[-1], file=sys.stderr, flush=True)
            if hook not in (sys.__excepthook__, record_error):
                hook(kind, value, tb)

        sys.excepthook = record_error
        from napari.utils.notifications import notification_manager

        notification_manager.notification_ready.connect(self._notified)
        self.viewer.open_sample("napari-unet", "nuclei")
        _, self.panel = self.viewer.window.add_plugin_dock_widget(
            "napari-unet", "All tools (one panel)"
        )
        self.state = get_state(self.viewer)
        self.until(lambda: self.state.model is not None, 300, "the default model")

    def _notified(self, note: Any) -> None:
        level = str(getattr(note, "severity", ""))
        if "error" in level.lower() or "warn" in level.lower():
            self.errors.append(f"napari notification [{level}]: {note.message}")
            print(self.errors[-1], file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- steps
def step1_predict(j: Journey) -> Any:
    predict = j.panel.show_tab("Predict")
    j.check(predict.image.layer() is j.viewer.layers["nuclei"], "Predict offers 'nuclei'")
    predict.controls.run.click()
    j.wait(predict.job, what="the first prediction")
    labels = predict.last_layers.get("labels")
    j.check(labels is not None, "the prediction added a labels layer")
    j.check(
        predict.controls.progress.format() == "done" and predict.controls.progress.value() == 100,
        f"Predict bar ends at 'done' ({j.bar(predict.controls)})",
    )
    if labels is not None:
        j.check(labels.visible and j.viewer.layers.selection.active is labels, "result shown")
    j.shot("predict", status=predict.status.text(), bar=j.bar(predict.controls))
    return labels


def step2_inspect(j: Journey, labels: Any) -> None:
    inspect = j.panel.show_tab("Inspect")
    inspect.labels.set_layer(labels)
    inspect.weight_button.click()
    j.wait(inspect.weight_job, what="the weight map")
    j.check(inspect.weight_layer is not None, "a weight map layer")
    j.shot("weight_map", status=inspect.weight_status.text())
    model_tab = j.panel.widgets["Model"]
    for name in ("unetpp", "u2netp"):
        j.panel.show_tab("Model")
        j.select_model(model_tab, name)
        j.shot(f"model_{name}", header=model_tab.header.text(), status=model_tab.status.text())
        inspect = j.panel.show_tab("Inspect")
        inspect.image.set_layer(j.viewer.layers["nuclei"])
        inspect.side_controls.run.click()
        j.wait(inspect.side_job, what=f"{name} side outputs")
        rows = [r["output"] for r in inspect.rows]
        j.check(len(rows) > 1, f"{name}: one row per depth ({rows})")
        j.check(
            inspect.side_controls.progress.format() == "done",
            f"{name} side-output bar ends at 'done' ({j.bar(inspect.side_controls)})",
        )
        side = inspect.side_layer
        for layer in j.viewer.layers:
            layer.visible = layer.name == "nuclei" or layer is side
        j.viewer.layers.selection.active = side
        j.shot(f"side_outputs_{name}", status=inspect.side_status.text(), rows=rows)
    j.panel.show_tab("Model")
    j.select_model(model_tab, "unet")


def step3_annotate(j: Journey, labels: Any) -> tuple[Any, Any]:
    predict = j.panel.show_tab("Predict")
    for layer in j.viewer.layers:
        layer.visible = layer.name == "nuclei" or layer is labels
    j.viewer.layers.selection.active = labels
    predict.annotate.click()
    annotation = j.viewer.layers.selection.active
    j.check(
        annotation is not labels and type(annotation).__name__ == "Labels",
        f"'Use as annotation' made a new labels layer ({annotation.name!r})",
    )
    j.check(np.array_equal(annotation.data, labels.data), "the copy equals the prediction")
    truth = np.asarray(j.viewer.layers["nuclei labels"].data)
    y0, y1, x0, x1 = RECT_1
    # erase one predicted cell in the rectangle with the fill bucket (label 0)
    ids = [i for i in np.unique(annotation.data[y0:y1, x0:x1]) if i]
    if ids:
        ys, xs = np.nonzero(annotation.data == ids[0])
        annotation.fill((int(ys[0]), int(xs[0])), 0)
    # paint one cell with the brush where the truth has one
    new_id = int(annotation.data.max()) + 1
    annotation.selected_label = new_id
    annotation.brush_size = 9
    tids = [i for i in np.unique(truth[y0:y1, x0:x1]) if i]
    ty, tx = (int(v.mean()) for v in np.nonzero(truth == tids[-1]))
    annotation.paint((ty, tx), new_id)
    j.check(int((annotation.data == new_id).sum()) > 0, "the brush painted a new cell")
    # then copy the truth into the rectangle, as a careful annotator would
    patch = np.asarray(annotation.data)[y0:y1, x0:x1]
    t = truth[y0:y1, x0:x1]
    patch[...] = np.where(t > 0, t.astype(np.uint32) + 10_000, 0)
    annotation.refresh()
    annotation.mode = "pan_zoom"
    shapes = j.viewer.add_shapes(ndim=2)
    shapes.add_rectangles(np.array([[y0, x0], [y1, x1]], float), edge_color="yellow")
    shapes.face_color = "transparent"
    j.shot("annotated", status=predict.status.text(), shapes=shapes.name)
    return annotation, shapes


def step4_train(j: Journey, annotation: Any, shapes: Any) -> None:
    train = j.panel.show_tab("Train")
    train.image.set_layer(j.viewer.layers["nuclei"])
    train.labels.set_layer(annotation)
    train.region.set_layer(shapes)
    train.budget_kind.setCurrentText("steps")
    train.budget.setValue(12)
    train.controls.run.click()
    j.until(lambda: "step" in train.controls.progress.format(), 300, "the first training step")
    j.shot("training", status=train.status.text(), bar=j.bar(train.controls))
    j.wait(train.job, what="training 1")
    first = train.summary
    j.check(
        train.controls.progress.format() == "done", f"Train bar 'done' ({j.bar(train.controls)})"
    )
    j.check(train.last_layers.get("labels") is not None, "training predicted into a new layer")
    j.shot("trained", status=train.status.text(), bar=j.bar(train.controls))
    predict = j.panel.show_tab("Predict")
    predict.image.set_layer(j.viewer.layers["nuclei"])
    predict.controls.run.click()
    j.wait(predict.job, what="predict with the trained model")
    j.shot("predict_trained", status=predict.status.text(), bar=j.bar(predict.controls))
    # correct: a second rectangle, copied from the truth
    truth = np.asarray(j.viewer.layers["nuclei labels"].data)
    y0, y1, x0, x1 = RECT_2
    t = truth[y0:y1, x0:x1]
    annotation.data[y0:y1, x0:x1] = np.where(t > 0, t.astype(np.uint32) + 20_000, 0)
    annotation.refresh()
    shapes.add_rectangles(
        np.array([[y0, x0], [y1, x1]], float), edge_color="yellow", face_color="transparent"
    )
    train = j.panel.show_tab("Train")
    train.controls.run.click()
    j.wait(train.job, what="training 2")
    second = train.summary
    if first is not None and second is not None:
        j.check(
            second.regions == first.regions + 1 and second.objects > first.objects,
            f"the corrections went in: {first.regions}→{second.regions} regions, "
            f"{first.objects}→{second.objects} objects",
        )
    j.shot("trained_again", status=train.status.text(), bar=j.bar(train.controls))


def step5_compare(j: Journey) -> None:
    compare = j.panel.show_tab("Compare")
    compare.image_combo.set_layer(j.viewer.layers["nuclei"])
    compare.labels_combo.set_layer(j.viewer.layers["nuclei labels"])
    j.until(lambda: compare.model_list.count() >= 6, 120, "the bundled models listed")
    compare.run_button.click()
    j.wait(compare._job, timeout=1200, what="compare")
    j.check(len(compare.rows) > 0, f"Compare scored {len(compare.rows)} rows")
    j.shot("compare", status=compare.status.text())


def step6_cancel(j: Journey) -> None:
    big = np.tile(np.asarray(j.viewer.layers["nuclei"].data), (6, 3))  # 1536²
    j.viewer.add_image(big, name="big nuclei", colormap="gray")
    before = j.snapshot()
    entries = len(j.state.entries)
    predict = j.panel.show_tab("Predict")
    predict.image.set_layer(j.viewer.layers["big nuclei"])
    predict.controls.run.click()
    j.until(lambda: "tiles" in predict.controls.progress.format(), 600, "the first tiles")
    predict.controls.cancel.click()
    j.wait(predict.job, what="the cancelled prediction")
    j.check(j.snapshot() == before, "cancelled prediction: layers unchanged")
    j.shot("predict_cancelled", status=predict.status.text(), bar=j.bar(predict.controls))

    train = j.panel.show_tab("Train")
    train.budget.setValue(400)
    train.controls.run.click()
    j.until(lambda: "step" in train.controls.progress.format(), 300, "a training step")
    j.settle(1.0)
    train.controls.cancel.click()
    j.wait(train.job, what="the cancelled training")
    j.check(j.snapshot() == before, "cancelled training: layers unchanged")
    j.check(len(j.state.entries) == entries, "cancelled training: model list unchanged")
    j.shot("train_cancelled", status=train.status.text(), bar=j.bar(train.controls))

    # a Predict dock of its own, under the panel: its status must fit
    dock, widget = j.viewer.window.add_plugin_dock_widget("napari-unet", "Predict")
    widget.image.set_layer(j.viewer.layers["big nuclei"])
    widget.controls.run.click()
    j.wait(widget.job, what="prediction in a Predict dock")
    j.shot("predict_dock_done", bar=j.bar(widget.controls), status=widget.status.text())
    j.viewer.layers.remove(widget.last_layers["labels"])
    j.viewer.window.remove_dock_widget(dock)
    j.settle(0.5)

    for name in ("Predict", "Train"):
        dock, widget = j.viewer.window.add_plugin_dock_widget("napari-unet", name)
        j.settle(0.5)
        if name == "Predict":
            widget.image.set_layer(j.viewer.layers["big nuclei"])
        else:
            widget.image.set_layer(j.viewer.layers["nuclei"])
            widget.labels.set_layer(j.viewer.layers["nuclei labels"])
            widget.budget.setValue(400)
        before = j.snapshot()
        widget.controls.run.click()
        job = widget.job
        j.until(
            lambda w=widget: any(k in w.controls.progress.format() for k in ("tiles", "step")),
            300,
            "a busy bar",
        )
        j.shot(f"{name.lower()}_dock_busy", bar=j.bar(widget.controls), status=widget.status.text())
        j.viewer.window.remove_dock_widget(dock)
        j.check(job is not None and job.join(60), f"{name} dock closed: its job stopped")
        j.settle(1.0)
        j.check(j.snapshot() == before, f"{name} dock closed mid-job: layers unchanged")
        j.check(len(j.state.entries) == entries, f"{name} dock closed: model list unchanged")
    j.shot("docks_closed")


def step7_openvino(j: Journey) -> None:
    os.environ["NAPARI_UNET_RUNTIME"] = "openvino"
    os.environ["NAPARI_UNET_CACHE"] = tempfile.mkdtemp(prefix="napari-unet-cache-")
    predict = j.panel.show_tab("Predict")
    predict.image.set_layer(j.viewer.layers["nuclei"])
    predict.controls.run.click()
    seen = j.until(
        lambda: "export" in predict.controls.progress.format().lower() or not predict.job.running,
        300,
        "the export note",
    )
    bar = predict.controls.progress.format()
    j.check(seen and "OpenVINO" in bar, f"the bar says what is slow: {bar!r}")
    j.shot("openvino_exporting", bar=j.bar(predict.controls), status=predict.status.text())
    j.wait(predict.job, what="the OpenVINO prediction")
    j.check(
        predict.controls.progress.format() == "done",
        f"OpenVINO Predict bar ends at 'done' ({j.bar(predict.controls)})",
    )
    j.shot("openvino_done", bar=j.bar(predict.controls), status=predict.status.text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/journey"))
    parser.add_argument("--steps", default="1234567", help="which steps to run (1 and 3 always)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    log = open(args.out / "stderr.log", "w")  # noqa: SIM115 - fd 2 for the whole run
    os.dup2(log.fileno(), 2)
    # the journey's own export cache (step 7 makes another fresh one)
    os.environ.setdefault("NAPARI_UNET_CACHE", tempfile.mkdtemp(prefix="napari-unet-cache-"))
    j = Journey(args.out)
    j.open()
    labels = step1_predict(j)
    if "2" in args.steps:
        step2_inspect(j, labels)
    annotation, shapes = step3_annotate(j, labels)
    if "4" in args.steps:
        step4_train(j, annotation, shapes)
    if "5" in args.steps:
        step5_compare(j)
    if "6" in args.steps:
        step6_cancel(j)
    if "7" in args.steps:
        step7_openvino(j)
    j.viewer.close()
    j.settle(0.5)
    (args.out / "journey.json").write_text(json.dumps(j.record, indent=1, ensure_ascii=False))
    sys.stderr.flush()
    stderr = (args.out / "stderr.log").read_text()
    j.check(not j.errors, f"{len(j.errors)} exceptions/error notifications")
    print(f"stderr.log: {len(stderr.splitlines())} lines; failures: {len(j.failures)}")
    for text in j.failures:
        print("  FAIL", text)
    return 1 if j.failures else 0


if __name__ == "__main__":
    sys.exit(main())
