"""``napari-unet demo``: the sample nuclei, the default model and every widget, one prediction.

* With a display: opens napari with the sample image + labels, the default model
  (the bundled one, or a clearly labelled UNTRAINED fallback when it is missing), the
  napari-unet panel (Model / Predict / Train / Inspect tabs) docked, and runs a prediction.
* ``--headless``, or no display (``QT_QPA_PLATFORM=offscreen`` / no ``DISPLAY``): the same
  pipeline without a window — a hidden napari viewer when a display (or Xvfb) exists,
  the engine alone otherwise — writing ``labels.tif``, ``probabilities.tif`` and, with a
  display, ``screenshot.png`` to the output folder (default ``./demo-output``).

This module is the engine side and the dispatch: the model, the engine-only run and the
output files. The viewer (napari, Qt) lives in :mod:`napari_unet._widgets._app`, imported
only when a viewer is opened.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .pipeline import FALLBACK_CLASSES, FALLBACK_CONFIG, FALLBACK_VARIANT, default_or_fallback

__all__ = [
    "FALLBACK_CLASSES",
    "FALLBACK_CONFIG",
    "FALLBACK_VARIANT",
    "default_or_fallback",
    "display_available",
    "resolve_demo_model",
    "run_demo",
    "run_engine_only",
]

DEFAULT_OUTPUT = "demo-output"
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


def resolve_demo_model(model: Any = None) -> tuple[Any, str, bool]:
    """A model object, a checkpoint path / variant name, or None (default or fallback)."""
    if model is None:
        return default_or_fallback()
    if isinstance(model, (str, Path)):
        from .inference.resolve import resolve_model

        resolved, trained = resolve_model(model)
        if Path(model).suffix or Path(model).exists():
            return resolved, f"checkpoint {Path(model).name}", False
        return (
            resolved,
            (f"bundled {model}" if trained else f"untrained {resolved.name}"),
            not trained,
        )
    return model, "given model", False


def write_outputs(folder: Path, labels: Any, probabilities: Any) -> list[Path]:
    """``labels.tif`` and ``probabilities.tif`` in ``folder`` (created)."""
    from .io import write_array

    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_array(folder / "labels.tif", labels, overwrite=True),
        write_array(folder / "probabilities.tif", probabilities, overwrite=True),
    ]


def say(text: str) -> None:
    """One line of the demo's report on stdout."""
    print(f"napari-unet demo: {text}", flush=True)


def run_engine_only(output: Path, model: Any = None) -> dict[str, Any]:
    """No display at all: predict the sample with the engine and write the TIFFs."""
    from ._sample_data import nuclei_image
    from .pipeline import segment_image
    from .runtime import select_device

    model, source, untrained = resolve_demo_model(model)
    _, why = select_device("auto")
    say(f"no display: engine only; model {model.name} ({source}) on {why}")
    if untrained:
        say("WARNING: " + UNTRAINED_NOTE)
    t0 = time.perf_counter()
    result = segment_image(model, nuclei_image())
    labels, probs = result.labels, result.probabilities
    seconds = time.perf_counter() - t0
    written = write_outputs(output, labels, probs)
    for path in written:
        say(f"wrote {path}")
    say("no screenshot: there is no display (run under Xvfb for one)")
    return {
        "mode": "engine",
        "written": written,
        "objects": int(labels.max()),
        "seconds": seconds,
        "untrained": untrained,
    }


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
            say(f"{wanted} holds an earlier demo's results: writing to {folder}")
        if has_display:
            return _run_viewer(folder, model, show=False)
        return run_engine_only(folder, model)
    return _run_viewer(Path(output) if output else None, model, show=True)


def _run_viewer(output: Path | None, model: Any, *, show: bool) -> dict[str, Any]:
    """The viewer part (napari, Qt: in the GUI layer), with the model resolved here."""
    from ._widgets._app import run_viewer

    loaded = resolve_demo_model(model)
    if loaded[2]:
        say("WARNING: " + UNTRAINED_NOTE)
    return run_viewer(output, loaded, show=show, say=say, write=write_outputs)
