"""``napari-unet demo``: the sample nuclei, the default model and every widget, one prediction.

* With a display: opens napari with the sample image + labels, the default model
  (the bundled one, or a clearly labelled UNTRAINED fallback when it is missing), the
  napari-unet panel (Model / Predict / Train / Inspect tabs) docked, and runs a prediction.
* ``--headless``, or no display (``QT_QPA_PLATFORM=offscreen`` / no ``DISPLAY``): the same
  pipeline without a window — a hidden napari viewer when a display (or Xvfb) exists,
  the engine alone otherwise — writing ``labels.tif``, ``probabilities.tif`` and, with a
  display, ``screenshot.png`` to the output folder (default ``./demo-output``).

Nothing here imports napari or Qt unless a viewer is opened.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = "demo-output"
FALLBACK_VARIANT = "unet"
FALLBACK_CONFIG: dict[str, Any] = {"base_channels": 16, "depth": 3}
"""Same shape as the bundled default (3-class U-Net), used untrained when it is missing."""
FALLBACK_CLASSES = 3
UNTRAINED_NOTE = (
    "the bundled model is missing: using an UNTRAINED U-Net, so the labels are not meaningful"
)


def display_available() -> bool:
    """False for ``QT_QPA_PLATFORM=offscreen``/``minimal`` or Linux without X11/Wayland."""
    platform = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0].lower()
    if platform in ("offscreen", "minimal"):
        return False
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False
    return True


def default_or_fallback() -> tuple[Any, str, bool]:
    """(model, source, untrained): the bundled model, else an untrained 3-class U-Net.

    Engine only (imports torch); also measures the receptive field (``model.info``)."""
    from .checkpoint import load_default_model

    try:
        model = load_default_model()
        source, untrained = "bundled default", False
    except FileNotFoundError:
        from .models import build_model

        model = build_model(FALLBACK_VARIANT, 1, FALLBACK_CLASSES, **FALLBACK_CONFIG)
        source, untrained = "UNTRAINED fallback (bundled model missing)", True
    model.info  # noqa: B018
    return model, source, untrained


def resolve_demo_model(model: Any = None) -> tuple[Any, str, bool]:
    """A model object, a checkpoint path / variant name, or None (default or fallback)."""
    if model is None:
        return default_or_fallback()
    if isinstance(model, (str, Path)):
        import warnings

        from .inference.resolve import resolve_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolved = resolve_model(model)
        is_checkpoint = str(model).endswith(".safetensors")
        return (
            resolved,
            (f"checkpoint {Path(model).name}" if is_checkpoint else f"untrained {resolved.name}"),
            not is_checkpoint,
        )
    return model, "given model", False


def _write_outputs(folder: Path, labels: Any, probabilities: Any) -> list[Path]:
    from .io import write_array

    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_array(folder / "labels.tif", labels, overwrite=True),
        write_array(folder / "probabilities.tif", probabilities, overwrite=True),
    ]


def _say(text: str) -> None:
    print(f"napari-unet demo: {text}", flush=True)


def run_engine_only(output: Path, model: Any = None) -> dict[str, Any]:
    """No display at all: predict the sample with the engine and write the TIFFs."""
    from ._sample_data import nuclei_image
    from .inference.predict import predict
    from .postprocess import default_class_names, segment
    from .runtime import select_device

    model, source, untrained = resolve_demo_model(model)
    _, why = select_device("auto")
    _say(f"no display: engine only; model {model.name} ({source}) on {why}")
    if untrained:
        _say("WARNING: " + UNTRAINED_NOTE)
    t0 = time.perf_counter()
    probs = predict(model, nuclei_image())
    names = getattr(model, "class_names", None) or default_class_names(model.num_classes)
    labels = segment(probs, class_names=names)
    seconds = time.perf_counter() - t0
    written = _write_outputs(output, labels, probs)
    for path in written:
        _say(f"wrote {path}")
    _say("no screenshot: there is no display (run under Xvfb for one)")
    return {
        "mode": "engine",
        "written": written,
        "objects": int(labels.max()),
        "seconds": seconds,
        "untrained": untrained,
    }


def _process_until(condition: Any, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        QApplication.processEvents()
        time.sleep(0.01)
    return True


def open_viewer(model: Any = None, *, show: bool = True) -> tuple[Any, dict[str, Any]]:
    """A napari viewer with the sample data, the model and every widget docked."""
    import napari

    from ._widgets import get_state

    viewer = napari.Viewer(title="napari-unet demo", show=show)
    viewer.open_sample("napari-unet", "nuclei")
    model, source, untrained = resolve_demo_model(model)
    get_state(viewer).set_model(model, source, untrained=untrained)
    _, panel = viewer.window.add_plugin_dock_widget("napari-unet", "All tools (one panel)")
    widgets = dict(panel.widgets)
    panel.show_tab("Predict")
    qt_window = getattr(viewer.window, "_qt_window", None)
    if qt_window is not None:
        qt_window.resize(1500, 950)
    predict_widget = widgets["Predict"]
    predict_widget.image.set_layer(viewer.layers["nuclei"])
    predict_widget.probabilities.setChecked(True)
    if untrained:
        _say("WARNING: " + UNTRAINED_NOTE)
    return viewer, widgets


def run_viewer(output: Path | None, model: Any = None, *, show: bool = True) -> dict[str, Any]:
    """Open napari (hidden when ``show`` is False), predict, write files, screenshot."""
    viewer, widgets = open_viewer(model, show=show)
    predict_widget = widgets["Predict"]
    t0 = time.perf_counter()
    job = predict_widget.run()
    result: dict[str, Any] = {"mode": "viewer" if show else "hidden viewer", "written": []}

    def finish() -> None:
        res = predict_widget.last_result
        if res is None:
            _say(f"prediction failed: {predict_widget.status.text()}")
            return
        result["objects"] = res.get("n_labels", 0)
        result["seconds"] = time.perf_counter() - t0
        _say(predict_widget.status.text())
        if output is not None:
            written = _write_outputs(output, res["labels"], res["probabilities"])
            written.append(_screenshot(viewer, output / "screenshot.png"))
            result["written"] = written
            for path in written:
                _say(f"wrote {path}")

    if not show:
        if not _process_until(lambda: not job.running, timeout=600):
            raise RuntimeError("the demo prediction did not finish within 10 minutes")
        _process_until(lambda: False, timeout=0.3)  # let the canvas draw the new layers
        finish()
        viewer.close()
        return result
    job.when_finished(finish)
    import napari

    napari.run()
    return result


def _screenshot(viewer: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        viewer.screenshot(str(path), canvas_only=False, flash=False)
    except Exception:  # hidden windows cannot always be grabbed whole: the canvas alone
        viewer.screenshot(str(path), canvas_only=True, flash=False)
    return path


def run_demo(
    output: str | Path | None = None, *, headless: bool = False, model: Any = None
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns what was done and written."""
    has_display = display_available()
    if headless or not has_display:
        from .outputs import fresh_folder

        wanted = Path(output or DEFAULT_OUTPUT)  # an earlier run's files are never replaced
        folder = fresh_folder(wanted, ("labels.tif", "probabilities.tif", "screenshot.png"))
        if folder != wanted:
            _say(f"{wanted} holds an earlier demo's results: writing to {folder}")
        if has_display:
            return run_viewer(folder, model, show=False)
        return run_engine_only(folder, model)
    return run_viewer(Path(output) if output else None, model, show=True)
