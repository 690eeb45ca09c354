"""Predict widget: segment an image layer with the current model, in a thread worker."""

from __future__ import annotations

import sys
import time
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
)

from ._common import (
    ChannelPicker,
    LayerCombo,
    Panel,
    RunControls,
    alive,
    copy_as_annotation,
    find_output,
    is_output,
    output_key,
    set_status,
    status_label,
    term,
)
from ._events import ModelLoaded, PostProgress, Progress, Stage, unexpected
from ._geometry import Request, is_stack, make_request
from ._jobs import Job, error_text, start_job
from ._prediction import run_prediction, write_results
from ._state import get_state, model_line

LABEL_MODES = {"instance labels": "instance", "semantic labels": "semantic", "no labels": None}
DEVICES = ("auto", "cpu", "cuda")
TILES_SHARE = 0.9
"""Share of the progress bar for the network (tiles); post-processing takes the rest."""


class PredictWidget(Panel):
    """Image layer → probabilities / semantic / instance labels with the current model.

    Each run adds new layers (``nuclei [unet #2]``); "replace the last result" reuses the
    previous run's layers instead. "Use as annotation" copies a result into a new Labels
    layer to correct and train on.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_layers: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        """perf_counter() of "started", "returned" (worker done), "written" (layers added)."""
        self.exported = False
        """The running prediction exported the model to OpenVINO first (it said so)."""

        self.model_label = status_label()
        self.image = LayerCombo(napari_viewer, ["image"], predicate=lambda lyr: not is_output(lyr))
        self.channels = ChannelPicker()
        self.labels_mode = QComboBox()
        self.labels_mode.addItems(list(LABEL_MODES))
        self.labels_mode.setToolTip(
            "instance: one id per object (nuclei, cells); semantic: one value per class"
        )
        self.probabilities = QCheckBox("probabilities layer")
        self.probabilities.setToolTip(
            "Also add the network's per-class probability (0–1) as an image layer; the "
            "class is chosen with the 'class' slider"
        )
        self.replace = QCheckBox("replace the last result")
        self.replace.setToolTip(
            "Off (default): every run adds new layers and earlier results stay as they "
            "are. On: the previous run's layers of this image get the new data."
        )
        self.tile = QSpinBox()
        self.tile.setRange(0, 16384)
        self.tile.setSingleStep(64)
        self.tile.setSpecialValueText("auto")
        self.tile.setSuffix(" px")
        self.tile.setToolTip(
            "Large images are cut into overlapping square pieces (tiles) of this size; "
            "the overlap hides the seams. Bigger tiles: faster, more memory. auto = the "
            "engine default for the device"
        )
        self.batch = QSpinBox()
        self.batch.setRange(0, 256)
        self.batch.setSpecialValueText("auto")
        self.batch.setToolTip("Tiles computed together; auto = the engine default for the device")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setCurrentText(self.state.device)
        self.device.setToolTip("Where the network runs; auto = the GPU when there is one")
        self.level = QSpinBox()
        self.level.setRange(0, 0)
        self.level.setSpecialValueText("final")
        self.level.setToolTip(
            "UNet++ only: use a smaller part of the network (level L of its nested "
            "decoders): faster, usually a little less accurate"
        )
        self.objects_3d = QCheckBox("3-D objects (Z-stack)")
        self.objects_3d.setToolTip(
            "For Z-stacks: one label per nucleus across planes (3-D seeds and watershed on "
            "the stacked probabilities, voxel size from the layer's scale) instead of "
            "labelling every plane on its own"
        )
        self.current_slice = QCheckBox("current slice only")
        self.current_slice.setToolTip("For stacks and time series: predict the displayed plane")
        self.field_of_view = QCheckBox("visible field of view only")
        self.field_of_view.setToolTip("Predict only the part of the image shown in the canvas")
        self.controls = RunControls("Predict")
        self.annotate = QPushButton("Use as annotation")
        self.annotate.setToolTip(
            "Copy the selected result (or the last one) into a new Labels layer you can "
            "correct with the brush/eraser and then train on (Train section)"
        )
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("", self.channels)
        form.addRow("labels", self.labels_mode)
        form.addRow("", self.probabilities)
        form.addRow("", self.replace)
        form.addRow(term("tile size", self.tile.toolTip()), self.tile)
        form.addRow(term("batch", self.batch.toolTip()), self.batch)
        form.addRow(term("device", self.device.toolTip()), self.device)
        form.addRow(term("UNet++ level", self.level.toolTip()), self.level)
        form.addRow("", self.objects_3d)
        form.addRow("", self.current_slice)
        form.addRow("", self.field_of_view)
        buttons = QHBoxLayout()
        buttons.addWidget(self.controls.run)
        buttons.addWidget(self.controls.cancel)
        layout = self.body_layout
        layout.addWidget(self.model_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.controls.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.annotate)
        layout.addStretch(1)

        self.controls.run.clicked.connect(self.run)
        self.controls.cancel.clicked.connect(self.cancel)
        self.annotate.clicked.connect(self.use_as_annotation)
        self.device.currentTextChanged.connect(self.state.set_device)
        self.image.currentIndexChanged.connect(self._update_enabled)
        self.channels.axis.currentIndexChanged.connect(self._update_enabled)
        self.current_slice.toggled.connect(self._update_enabled)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.device_changed.connect(self._on_device_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        napari_viewer.layers.selection.events.active.connect(self._update_enabled)
        self._on_model_changed()
        self.state.ensure_model()

    # ----------------------------------------------------------------- state
    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state)
        set_status(self.model_label, text, kind)
        model = self.state.model
        depth = model.levels if model is not None else 0
        self.level.setRange(0, depth)
        if model is not None:  # the engine is loaded: show its defaults
            from ..inference.plan import DEFAULT_BATCH, DEFAULT_TILE

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
        self.level.setEnabled(model is not None and model.supports_levels)
        layer = self.image.layer()
        in_ch = model.in_channels if model is not None else 1
        self.channels.update_for(layer, in_ch)
        stack = layer is not None and is_stack(layer, in_ch, self.channels.channels())
        self.current_slice.setEnabled(stack)
        self.objects_3d.setEnabled(stack and not self.current_slice.isChecked())
        busy = self.job is not None and self.job.running
        self.controls.run.setEnabled(not busy and layer is not None)
        self.annotate.setEnabled(self._annotation_source() is not None)

    def _annotation_source(self) -> Any:
        """The selected labels layer of ours, else the last labels result still present."""
        active = self.viewer.layers.selection.active
        if (
            active is not None
            and type(active).__name__ == "Labels"
            and "napari_unet_run" in (active.metadata)
        ):
            return active
        last = self.last_layers.get("labels")
        return last if last is not None and last in self.viewer.layers else None

    def use_as_annotation(self) -> Any:
        """Copy a prediction into a new editable Labels layer (returns it, or None)."""
        source = self._annotation_source()
        if source is None:
            set_status(self.status, "Predict first (or select a result layer).", "warn")
            return None
        layer = copy_as_annotation(self.viewer, source)
        set_status(
            self.status,
            f"{layer.name!r}: a copy of {source.name!r} to correct (paint mode is on). Draw a "
            "rectangle around what you corrected in a Shapes layer and train on it.",
            "ok",
        )
        return layer

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
        label = state.label or None
        labels_mode = LABEL_MODES[self.labels_mode.currentText()]
        want_probs = self.probabilities.isChecked()
        replace = self.replace.isChecked()
        if labels_mode is None and not want_probs:
            set_status(self.status, "Choose labels and/or the probabilities layer.", "warn")
            return None
        in_ch = model.in_channels if model is not None else 1
        self.channels.update_for(layer, in_ch)
        try:
            request = make_request(
                self.viewer,
                layer,
                in_ch,
                current_slice=self.current_slice.isChecked() and self.current_slice.isEnabled(),
                field_of_view=self.field_of_view.isChecked(),
                channels=self.channels.channels(),
                channel=self.channels.channel_index(),
            )
        except ValueError as exc:
            set_status(self.status, str(exc), "error")
            return None
        previous = {}
        if request.index and replace:  # slice mode: keep the other slices of the last result
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
            "objects_3d": self.objects_3d.isChecked() and self.objects_3d.isEnabled(),
        }

        def work(report: Any, cancel: Any) -> tuple[Any, dict[str, Any]]:
            m = model
            if m is None:  # default model still loading: load it here, off the GUI thread
                from ._state import load_default_or_fallback

                m, source, untrained = load_default_or_fallback()
                report(ModelLoaded(m, source, untrained))
            return m, run_prediction(
                m, request, previous=previous, report=report, cancel=cancel, **options
            )

        self.timings = {"started": time.perf_counter()}
        self.exported = False
        self.controls.busy(True)
        self.controls.fraction(0.0, "starting…")
        set_status(self.status, f"Predicting {layer.name!r}…")
        self.job = start_job(
            work,
            owner=self,
            on_progress=self._on_progress,
            on_done=lambda res: self._on_done(request, labels_mode, label, replace, *res),
            on_error=self._on_error,
            on_cancelled=self._on_cancelled,
            on_finished=self._on_finished,
            name="predict",
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
        for event in items:
            match event:
                case Progress(done, total):
                    self.controls.fraction(
                        TILES_SHARE * done / max(total, 1), f"network: {done}/{total} tiles"
                    )
                case PostProgress(done, total):
                    plane = f" {done}/{total}" if total > 1 else ""
                    self.controls.fraction(
                        TILES_SHARE + (1 - TILES_SHARE) * done / max(total, 1),
                        f"separating objects{plane}…" if done < total else "adding layers…",
                    )
                case Stage(text):
                    self.exported |= getattr(text, "kind", "") == "export"
                    set_status(self.status, text[:1].upper() + text[1:] + "…")
                    self.controls.note(text + "…")
                case ModelLoaded(model, source, untrained):
                    if self.state.model is None:
                        self.state.set_model(model, source, untrained=untrained)
                case _:
                    raise unexpected(event, "Predict")

    def _on_done(
        self,
        request: Request,
        labels_mode: str | None,
        label: str | None,
        replace: bool,
        model: Any,
        result: dict[str, Any],
    ) -> None:
        self.last_result = result
        self.timings["returned"] = time.perf_counter()
        if request.source not in self.viewer.layers:
            self._finish_status(f"{request.source.name!r} was removed; result discarded.", "warn")
            return
        if label is None:
            entry = self.state.entry_of(model)
            label = entry.label if entry is not None else model.name
        self.last_layers = write_results(
            self.viewer, request, model, result, labels_mode, label=label, replace=replace
        )
        self.timings["written"] = time.perf_counter()
        what = []
        if "n_labels" in result:
            what.append(
                f"{result['n_labels']} objects" if labels_mode == "instance" else "semantic labels"
            )
        if "probabilities" in result:
            what.append("probabilities")
        notes = f" ({'; '.join(request.notes)})" if request.notes else ""
        runtime = ", OpenVINO" if result.get("runtime") == "openvino" else ""
        export = " (with the one-off OpenVINO export)" if self.exported else ""
        # name the labels layer when there is one (the objects counted are its)
        first = self.last_layers.get("labels") or next(iter(self.last_layers.values()))
        self._finish_status(
            f"{first.name}: {', '.join(what)} in {result['total_seconds']:.1f} s{export} on "
            f"{result['device']}{runtime}{notes}.",
            "ok",
        )
        self.controls.fraction(1.0, "done")
        self._update_enabled()

    def _on_error(self, exc: BaseException) -> None:
        self._finish_status(f"Prediction failed: {error_text(exc)}", "error")

    def _on_cancelled(self, _: Any) -> None:
        self._finish_status("Cancelled; no layer was changed.", "warn")
        if alive(self):
            self.controls.fraction(0.0, "cancelled")

    def _on_finished(self) -> None:
        if alive(self):
            self.controls.busy(False)
            self._update_enabled()

    def _finish_status(self, text: str, kind: str) -> None:
        if alive(self):
            set_status(self.status, text, kind)
