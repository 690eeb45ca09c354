"""Predict widget: segment an image layer with the current model, in a thread worker."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import (
    LayerCombo,
    RunControls,
    alive,
    find_output,
    is_output,
    output_key,
    set_status,
    status_label,
    write_output,
)
from ._geometry import Request, is_stack, make_request, place
from ._jobs import Job, error_text, start_job
from ._state import get_state

LABEL_MODES = {"instance labels": "instance", "semantic labels": "semantic", "no labels": None}
DEVICES = ("auto", "cpu", "cuda")


def model_line(state: Any, short: bool = False) -> tuple[str, str]:
    """(text, status kind) describing the state's model for the widgets' headers."""
    if state.model is None:
        return ("Model: loading…" if state.loading else "Model: none", "info")
    text = f"Model: {state.model.name} — {state.source}"
    if not state.untrained:
        return text, "info"
    return (text if short else text + " (untrained: results are not meaningful)"), "warn"


def run_prediction(
    model: Any,
    request: Request,
    *,
    labels_mode: str | None,
    probabilities: bool,
    device: str = "auto",
    tile_size: int | None = None,
    batch_size: int | None = None,
    level: int | None = None,
    previous: dict[str, Any] | None = None,
    report: Any = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Engine part of a prediction (runs in the worker thread): probabilities → labels."""
    from ..postprocess import default_class_names, segment
    from ..predict import predict, select_device
    from ..tiling import Cancelled

    previous = previous or {}
    dev, why = select_device(device)
    if report is not None:
        report(("stage", f"predicting on {why}"))
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if report is not None:
            report(("progress", done, total))

    probs = predict(
        model,
        request.data,
        axes=request.axes,
        tile_size=tile_size,
        batch_size=batch_size,
        device=dev,
        level=level,
        progress=progress,
        cancel=cancel,
    )
    seconds = time.perf_counter() - t0
    names = list(getattr(model, "class_names", None) or default_class_names(model.num_classes))
    out: dict[str, Any] = {"seconds": seconds, "device": why, "class_names": names}
    if labels_mode is not None:
        if report is not None:
            report(("stage", "post-processing"))
        labels = segment(probs, mode=labels_mode, class_names=names)
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        out["labels"] = place(
            request, labels, previous.get("labels"), relabel=labels_mode == "instance"
        )
        out["n_labels"] = int(labels.max()) if labels.size else 0
    if probabilities:
        out["probabilities"] = place(request, probs, previous.get("probabilities"), channels=True)
    out["total_seconds"] = time.perf_counter() - t0
    return out


def write_results(
    viewer: Any, request: Request, model: Any, result: dict[str, Any], labels_mode: str | None
) -> dict[str, Any]:
    """New (or the plugin's own, replaced) layers for a finished prediction, by kind."""
    src = request.source
    written: dict[str, Any] = {}
    info = {"napari_unet_model": model.name, "napari_unet_classes": result["class_names"]}
    if "probabilities" in result:
        probs = result["probabilities"]
        existed = find_output(viewer, output_key(src, "probabilities")) is not None
        written["probabilities"] = write_output(
            viewer,
            output_key(src, "probabilities"),
            "image",
            probs,
            name=f"{src.name} [{model.name} probabilities]",
            scale=(1.0, *request.scale),
            translate=(0.0, *request.translate),
            metadata=info,
            colormap="magma",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            visible=True,
        )
        if not existed and probs.shape[0] > 1:
            # show the first foreground class rather than the background on the class slider
            names = result["class_names"]
            first = next((i for i, n in enumerate(names) if n != "background"), 0)
            axis = viewer.dims.ndim - probs.ndim
            if axis >= 0:
                viewer.dims.set_current_step(axis, first)
    if "labels" in result:
        kind = f"{labels_mode} labels"
        suffix = "labels" if labels_mode == "instance" else "semantic"
        written["labels"] = write_output(
            viewer,
            output_key(src, kind),
            "labels",
            result["labels"].astype(np.uint32, copy=False),
            name=f"{src.name} [{model.name} {suffix}]",
            scale=request.scale,
            translate=request.translate,
            metadata=info,
        )
    return written


class PredictWidget(QWidget):
    """Image layer → probabilities / semantic / instance labels with the current model."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_layers: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        """perf_counter() of "started", "returned" (worker done), "written" (layers added)."""

        self.model_label = status_label()
        self.image = LayerCombo(napari_viewer, ["image"], predicate=lambda lyr: not is_output(lyr))
        self.labels_mode = QComboBox()
        self.labels_mode.addItems(list(LABEL_MODES))
        self.probabilities = QCheckBox("probabilities layer")
        self.tile = QSpinBox()
        self.tile.setRange(0, 16384)
        self.tile.setSingleStep(64)
        self.tile.setSpecialValueText("auto")
        self.tile.setSuffix(" px")
        self.tile.setToolTip(
            "Network input window (tile) size; auto = the engine default for the device"
        )
        self.batch = QSpinBox()
        self.batch.setRange(0, 256)
        self.batch.setSpecialValueText("auto")
        self.batch.setToolTip("Tiles per batch; auto = the engine default for the device")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setCurrentText(self.state.device)
        self.level = QSpinBox()
        self.level.setRange(0, 0)
        self.level.setSpecialValueText("final")
        self.level.setToolTip(
            "UNet++ only: prune the network to level L (faster, fewer parameters)"
        )
        self.current_slice = QCheckBox("current slice only")
        self.current_slice.setToolTip("For stacks and time series: predict the displayed plane")
        self.field_of_view = QCheckBox("visible field of view only")
        self.field_of_view.setToolTip("Predict only the part of the image shown in the canvas")
        self.controls = RunControls("Predict")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("labels", self.labels_mode)
        form.addRow("", self.probabilities)
        form.addRow("tile size", self.tile)
        form.addRow("batch", self.batch)
        form.addRow("device", self.device)
        form.addRow("UNet++ level", self.level)
        form.addRow("", self.current_slice)
        form.addRow("", self.field_of_view)
        buttons = QHBoxLayout()
        buttons.addWidget(self.controls.run)
        buttons.addWidget(self.controls.cancel)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.controls.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.controls.run.clicked.connect(self.run)
        self.controls.cancel.clicked.connect(self.cancel)
        self.device.currentTextChanged.connect(self.state.set_device)
        self.image.currentIndexChanged.connect(self._update_enabled)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.device_changed.connect(self._on_device_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self._on_model_changed()
        self.state.ensure_model()

    # ----------------------------------------------------------------- state
    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state)
        set_status(self.model_label, text, kind)
        model = self.state.model
        depth = getattr(model, "depth", 0) if hasattr(model, "level_parameters") else 0
        self.level.setRange(0, depth)
        if model is not None:  # the engine is loaded: show its defaults
            from ..predict import DEFAULT_BATCH, DEFAULT_TILE

            tiles = sorted(set(DEFAULT_TILE.values()))
            self.tile.setSpecialValueText(f"auto ({'/'.join(map(str, tiles))} px)")
            self.batch.setSpecialValueText(
                f"auto (CPU {DEFAULT_BATCH['cpu']}, GPU {DEFAULT_BATCH['cuda']})"
            )
        torch = sys.modules.get("torch")  # loaded with the model; never imported here
        if model is not None and torch is not None and not torch.cuda.is_available():
            item = self.device.model().item(DEVICES.index("cuda"))
            item.setEnabled(False)
            item.setToolTip("CUDA is not available on this machine")
        self._update_enabled()

    def _on_device_changed(self, device: str) -> None:
        if alive(self) and self.device.currentText() != device:
            self.device.setCurrentText(device)

    def _update_enabled(self, *_: Any) -> None:
        if not alive(self):
            return
        model = self.state.model
        self.level.setEnabled(model is not None and hasattr(model, "level_parameters"))
        layer = self.image.layer()
        in_ch = model.in_channels if model is not None else 1
        self.current_slice.setEnabled(layer is not None and is_stack(layer, in_ch))
        busy = self.job is not None and self.job.running
        self.controls.run.setEnabled(not busy and layer is not None)

    # ------------------------------------------------------------------- run
    def run(self) -> Job | None:
        """Start a prediction of the selected image layer; returns the job (or None)."""
        if self.job is not None and self.job.running:
            return None
        layer = self.image.layer()
        if layer is None:
            set_status(self.status, "Add or select an image layer first.", "warn")
            return None
        state = self.state
        model = state.model
        labels_mode = LABEL_MODES[self.labels_mode.currentText()]
        want_probs = self.probabilities.isChecked()
        if labels_mode is None and not want_probs:
            set_status(self.status, "Choose labels and/or the probabilities layer.", "warn")
            return None
        in_ch = model.in_channels if model is not None else 1
        try:
            request = make_request(
                self.viewer,
                layer,
                in_ch,
                current_slice=self.current_slice.isChecked() and self.current_slice.isEnabled(),
                field_of_view=self.field_of_view.isChecked(),
            )
        except ValueError as exc:
            set_status(self.status, str(exc), "error")
            return None
        previous = {}
        if request.index:  # slice mode: keep the other slices of our earlier result
            for kind, key in (
                ("labels", f"{labels_mode} labels"),
                ("probabilities", "probabilities"),
            ):
                own = find_output(self.viewer, output_key(layer, key))
                if own is not None:
                    previous[kind] = own.data
        options = {
            "labels_mode": labels_mode,
            "probabilities": want_probs,
            "device": self.device.currentText(),
            "tile_size": self.tile.value() or None,
            "batch_size": self.batch.value() or None,
            "level": (self.level.value() or None) if self.level.isEnabled() else None,
        }

        def work(report: Any, cancel: Any) -> tuple[Any, dict[str, Any]]:
            m = model
            if m is None:  # default model still loading: load it here, off the GUI thread
                from ._state import load_default_or_fallback

                m, source, untrained = load_default_or_fallback()
                report(("model", m, source, untrained))
            return m, run_prediction(
                m, request, previous=previous, report=report, cancel=cancel, **options
            )

        self.timings = {"started": time.perf_counter()}
        self.controls.busy(True)
        self.controls.fraction(0.0, "starting…")
        set_status(self.status, f"Predicting {layer.name!r}…")
        self.job = start_job(
            work,
            on_progress=self._on_progress,
            on_done=lambda res: self._on_done(request, labels_mode, *res),
            on_error=self._on_error,
            on_cancelled=self._on_cancelled,
            on_finished=self._on_finished,
        )
        return self.job

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            set_status(self.status, "Cancelling…")

    # -------------------------------------------------------------- callbacks
    def _on_progress(self, items: list[Any]) -> None:
        if not alive(self):
            return
        for item in items:
            if item[0] == "progress":
                done, total = item[1], item[2]
                self.controls.fraction(done / max(total, 1), f"{done}/{total} tiles")
            elif item[0] == "stage":
                set_status(self.status, item[1][:1].upper() + item[1][1:] + "…")
            elif item[0] == "model" and self.state.model is None:
                self.state.set_model(item[1], item[2], untrained=item[3])

    def _on_done(
        self, request: Request, labels_mode: str | None, model: Any, result: dict[str, Any]
    ) -> None:
        self.last_result = result
        self.timings["returned"] = time.perf_counter()
        if request.source not in self.viewer.layers:
            self._finish_status(f"{request.source.name!r} was removed; result discarded.", "warn")
            return
        self.last_layers = write_results(self.viewer, request, model, result, labels_mode)
        self.timings["written"] = time.perf_counter()
        what = []
        if "n_labels" in result:
            what.append(
                f"{result['n_labels']} objects" if labels_mode == "instance" else "semantic labels"
            )
        if "probabilities" in result:
            what.append("probabilities")
        notes = f" ({'; '.join(request.notes)})" if request.notes else ""
        self._finish_status(
            f"{request.source.name}: {', '.join(what)} in {result['total_seconds']:.1f} s on "
            f"{result['device']}{notes}.",
            "ok",
        )
        self.controls.fraction(1.0, "done")

    def _on_error(self, exc: BaseException) -> None:
        self._finish_status(f"Prediction failed: {error_text(exc)}", "error")

    def _on_cancelled(self, _: Any) -> None:
        self._finish_status("Cancelled; no layer was changed.", "warn")
        self.controls.fraction(0.0, "cancelled")

    def _on_finished(self) -> None:
        if alive(self):
            self.controls.busy(False)
            self._update_enabled()

    def _finish_status(self, text: str, kind: str) -> None:
        if alive(self):
            set_status(self.status, text, kind)
