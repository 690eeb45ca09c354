"""The demo's viewer: napari with the sample nuclei, a model and every widget docked.

:func:`napari_unet.demo.run_demo` calls :func:`run_viewer` when there is a display (a
real one, or Xvfb with ``--headless``); everything that needs napari or Qt for the demo
is here, the engine side (model, files, engine-only run) stays in :mod:`napari_unet.demo`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._state import get_state

WINDOW = (1500, 950)
TIMEOUT = 600
"""Seconds a hidden viewer waits for the demo prediction."""


def open_viewer(loaded: tuple[Any, str, bool], *, show: bool = True) -> tuple[Any, dict[str, Any]]:
    """A napari viewer with the sample data, ``loaded`` = (model, source, untrained) as the
    current model and every widget docked (one panel, the Predict tab shown)."""
    import napari

    model, source, untrained = loaded
    viewer = napari.Viewer(title="napari-unet demo", show=show)
    viewer.open_sample("napari-unet", "nuclei")
    get_state(viewer).set_model(model, source, untrained=untrained)
    _, panel = viewer.window.add_plugin_dock_widget("napari-unet", "All tools (one panel)")
    widgets = dict(panel.widgets)
    panel.show_tab("Predict")
    qt_window = getattr(viewer.window, "_qt_window", None)
    if qt_window is not None:
        qt_window.resize(*WINDOW)
    predict_widget = widgets["Predict"]
    predict_widget.image.set_layer(viewer.layers["nuclei"])
    predict_widget.probabilities.setChecked(True)
    return viewer, widgets


def run_viewer(
    output: Path | None,
    loaded: tuple[Any, str, bool],
    *,
    show: bool = True,
    say: Callable[[str], None] = print,
    write: Callable[[Path, Any, Any], list[Path]] | None = None,
) -> dict[str, Any]:
    """Open napari (hidden when ``show`` is False), predict, write files, screenshot.

    ``write(folder, labels, probabilities)`` writes the arrays (the demo's TIFFs) when
    ``output`` is given; the screenshot is written next to them."""
    viewer, widgets = open_viewer(loaded, show=show)
    predict_widget = widgets["Predict"]
    t0 = time.perf_counter()
    job = predict_widget.run()
    result: dict[str, Any] = {"mode": "viewer" if show else "hidden viewer", "written": []}

    def finish() -> None:
        res = predict_widget.last_result
        if res is None:
            say(f"prediction failed: {predict_widget.status.text()}")
            return
        result["objects"] = res.get("n_labels", 0)
        result["seconds"] = time.perf_counter() - t0
        say(predict_widget.status.text())
        if output is not None:
            written = write(output, res["labels"], res["probabilities"]) if write else []
            written.append(screenshot(viewer, output / "screenshot.png"))
            result["written"] = written
            for path in written:
                say(f"wrote {path}")

    if not show:
        if not process_until(lambda: not job.running, timeout=TIMEOUT):
            raise RuntimeError("the demo prediction did not finish within 10 minutes")
        process_until(lambda: False, timeout=0.3)  # let the canvas draw the new layers
        finish()
        viewer.close()
        return result
    job.when_finished(finish)
    import napari

    napari.run()
    return result


def process_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``condition()`` (True) or ``timeout`` seconds (False)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        QApplication.processEvents()
        time.sleep(0.01)
    return True


def screenshot(viewer: Any, path: Path) -> Path:
    """The whole window as a PNG (the canvas alone where a hidden window cannot be grabbed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        viewer.screenshot(str(path), canvas_only=False, flash=False)
    except Exception:  # hidden windows cannot always be grabbed whole: the canvas alone
        viewer.screenshot(str(path), canvas_only=True, flash=False)
    return path
