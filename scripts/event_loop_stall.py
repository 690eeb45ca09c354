"""How long does the napari event loop stall while the widgets predict and train?

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python scripts/event_loop_stall.py

A QTimer ticks every 10 ms on the GUI thread; the stall is the longest gap between two
ticks minus 10 ms, measured while the Predict and Train widgets run their thread workers
on a 1024 × 1024 image (the sample nuclei tiled 4 × 2) with a tiny U-Net, and while
the Train widget runs with its defaults (30 s, the default model) on the sample image,
which also gives the time from clicking Train to the first prediction.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


class StallMeter:
    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self.last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.append((now, now - self.last))
        self.last = now

    def start(self) -> None:
        self.gaps, self.last = [], None
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        return self.window()

    def window(self, t0: float = -np.inf, t1: float = np.inf) -> dict[str, float]:
        """Stalls of the ticks that ended in [t0, t1]."""
        gaps = np.array([g for t, g in self.gaps if t0 <= t <= t1] or [0.0])
        stall = np.maximum(gaps - self.interval, 0) * 1000
        return {
            "max_stall_ms": round(float(stall.max()), 1),
            "p99_stall_ms": round(float(np.percentile(stall, 99)), 1),
            "ticks": len(gaps),
        }


def wait(job, timeout: float = 600) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while job.running:
        QApplication.processEvents()
        time.sleep(0.001)
        if time.monotonic() > end:
            raise TimeoutError("job did not finish")


def settle(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=10.0)
    parser.add_argument("--skip-default", action="store_true", help="skip the 30 s default run")
    parser.add_argument(
        "--hidden",
        action="store_true",
        help="napari.Viewer(show=False): no painting, only the plugin's own GUI-thread cost",
    )
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()

    import napari
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from napari_unet._sample_data import nuclei_image, nuclei_labels
    from napari_unet._widgets import get_state
    from napari_unet.models import build_model

    viewer = napari.Viewer(show=not args.hidden)
    viewer.window._qt_window.resize(1400, 900)
    big = viewer.add_image(np.tile(nuclei_image(), (4, 2)), name="big")
    big_labels = viewer.add_labels(np.tile(nuclei_labels(), (4, 2)), name="big labels")
    state = get_state(viewer)
    tiny = build_model("unet", 1, 3, base_channels=4, depth=2)
    state.set_model(tiny, "tiny benchmark model", untrained=True)
    _, predict_w = viewer.window.add_plugin_dock_widget("napari-unet", "Predict")
    _, train_w = viewer.window.add_plugin_dock_widget("napari-unet", "Train", tabify=True)
    settle(1.0)
    while train_w.start_from.count() < 2:  # engine loaded, optimiser warmed up
        settle(0.1)
    meter = StallMeter()
    results: dict = {
        "torch_threads": torch.get_num_threads(),
        "window": "hidden" if args.hidden else "shown",
        "image": [1024, 1024],
    }

    # predict (tiny model, 1024², probabilities + instance labels, default tiles)
    predict_w.image.set_layer(big)
    predict_w.probabilities.setChecked(True)
    wait(predict_w.run())  # warm-up
    for name, tile in (("predict_tiny_1024", 0), ("predict_tiny_1024_tile256", 256)):
        predict_w.tile.setValue(tile)  # 256: many small tiles, many progress events
        meter.start()
        wait(predict_w.run())
        settle(0.5)  # the canvas draws the new layers
        meter.timer.stop()
        t = predict_w.timings
        results[name] = {
            "worker_running": meter.window(t["started"], t["returned"]),
            "adding_layers_and_drawing": meter.window(t["returned"], t["written"] + 0.5),
            "seconds": round(t["returned"] - t["started"], 2),
            "write_layers_ms": round(1000 * (t["written"] - t["returned"]), 1),
        }
    predict_w.tile.setValue(0)

    # train (tiny model, 1024², live plot)
    train_w.image.set_layer(big)
    train_w.labels.set_layer(big_labels)
    train_w.budget_kind.setCurrentText("seconds")
    train_w.budget.setValue(int(args.train_seconds))
    train_w.predict_after.setChecked(False)
    for name in ("train_tiny_1024_first", "train_tiny_1024"):
        meter.start()
        wait(train_w.run())
        meter.timer.stop()
        t = train_w.timings
        results[name] = {
            "start_to_first_step": meter.window(t["clicked"], t["first_step"]),
            "training": meter.window(t["first_step"], t["trained"]),
            "seconds": round(t["trained"] - t["clicked"], 2),
            "steps": len(train_w.history.losses),
        }

    if not args.skip_default:
        # the default flow: sample image, default model, Train with the widget defaults
        from napari_unet.demo import default_or_fallback

        model, source, untrained = default_or_fallback()
        state.set_model(model, source, untrained=untrained)
        image = viewer.add_image(nuclei_image(), name="nuclei")
        labels = viewer.add_labels(nuclei_labels(), name="nuclei labels")
        train_w.image.set_layer(image)
        train_w.labels.set_layer(labels)
        train_w.budget_kind.setCurrentText("seconds")
        train_w.budget.setValue(30)
        train_w.predict_after.setChecked(True)
        meter.start()
        wait(train_w.run())
        meter.timer.stop()
        t = train_w.timings
        results["train_default_sample"] = {
            "start_to_first_step": meter.window(t["clicked"], t["first_step"]),
            "training": meter.window(t["first_step"], t["trained"]),
            "predicting_and_writing": meter.window(t["trained"], t["predicted"]),
            "model": f"{model.name} ({source})",
            "budget_s": 30,
            "click_to_first_step_s": round(t["first_step"] - t["clicked"], 2),
            "click_to_trained_s": round(t["trained"] - t["clicked"], 2),
            "click_to_first_prediction_s": round(t["predicted"] - t["clicked"], 2),
            "val_f1": train_w.history.epochs[-1].get("val_f1") if train_w.history.epochs else None,
            "objects": int(viewer.layers["nuclei [unet labels]"].data.max()),
        }
    print(json.dumps(results, indent=1))
    viewer.close()


if __name__ == "__main__":
    main()
