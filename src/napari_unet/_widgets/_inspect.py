"""Inspect widget: the U-Net border weight map of a labels layer (live) and the
deep-supervision / side outputs of the current model, with a per-output table."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ._common import (
    ChannelPicker,
    LayerCombo,
    Panel,
    RunControls,
    alive,
    is_output,
    output_key,
    set_status,
    status_label,
    term,
    write_output,
)
from ._events import Progress, Stage, unexpected
from ._geometry import make_request, place
from ._jobs import Job, error_text, start_job
from ._state import get_state, model_line

DEBOUNCE_MS = 300
WATCHED_EVENTS = ("data", "paint", "set_data")
TABLE_COLUMNS = ("output", "parameters", "time", "Dice vs final")
"""The columns of :func:`napari_unet.pipeline.side_outputs`' rows."""
COLUMN_TIPS = {
    "output": "Where in the network the prediction comes from (UNet++: level L1…L4, a "
    "smaller sub-network each; U²-Net / UNet 3+: side outputs of each decoder stage)",
    "parameters": "Weights that this output needs",
    "time": "Time to predict this image with only this output",
    "Dice vs final": "Overlap of this output's foreground with the final output's "
    "(1.000 = the same pixels; 0 = none in common)",
}


def side_outputs(model: Any, request: Any, device: str, report: Any, cancel: Any) -> Any:
    """:func:`napari_unet.pipeline.side_outputs` of a request, reporting typed events."""
    from ..pipeline import side_outputs

    return side_outputs(
        model, request.data, axes=request.axes, channel=request.channel, device=device,
        progress=lambda done, total: report(Progress(done, total)),
        stage=lambda text: report(Stage(text)), cancel=cancel,
    )  # fmt: skip


def output_axis(source: Any, ndim: int) -> dict[str, Any]:
    """``axis_labels`` for a side-outputs layer: its first axis is named "output" (the
    slider then says what it moves through), the others as in ``source``."""
    dims = tuple(source.axis_labels)[-(ndim - 1) :] if ndim > 1 else ()
    return {"axis_labels": ("output", *dims)} if len(dims) == ndim - 1 else {}


class InspectWidget(Panel):
    """See what the network is trained on and what each depth of it predicts."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.weight_job: Job | None = None
        self.side_job: Job | None = None
        self.weight_layer: Any = None
        self.side_layer: Any = None
        self.rows: list[dict[str, str]] = []
        self._watched: Any = None
        self._dirty = False
        self._computed: tuple[Any, np.ndarray, tuple] | None = None
        """(layer, labels, parameters) of the last weight map: to skip unchanged redraws."""
        self.updates = 0

        # --- border weight map
        self.labels = LayerCombo(napari_viewer, ["labels"])
        self.w0 = QDoubleSpinBox()
        self.w0.setRange(0.0, 1000.0)
        self.w0.setValue(10.0)
        self.w0.setToolTip(
            "How much more the pixels between touching objects count in training (U-Net paper: 10)"
        )
        self.sigma = QDoubleSpinBox()
        self.sigma.setRange(0.1, 200.0)
        self.sigma.setValue(5.0)
        self.sigma.setSuffix(" px")
        self.sigma.setToolTip(
            "How far from the gap between objects that extra weight reaches, in pixels "
            "(U-Net paper: ≈5)"
        )
        self.balance = QComboBox()
        self.balance.addItems(["balanced", "none"])
        self.balance.setToolTip(
            "balanced: rare classes (e.g. thin boundaries) count as much as common ones in "
            "total; none: every pixel counts 1"
        )
        self.live = QCheckBox("update while editing labels")
        self.live.setChecked(True)
        self.weight_button = QPushButton("Show weight map")
        self.weight_status = status_label()
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.show_weight_map)

        self.live.setToolTip("Recompute after every brush stroke, fill, undo and redo")
        wbox = QGroupBox("Border weight map (U-Net eq. 2)")
        wbox.setToolTip(
            "Which pixels training emphasises: the thin gaps between touching objects get "
            "a high weight so the network learns to separate them"
        )
        wform = QFormLayout(wbox)
        wform.addRow("labels", self.labels)
        wform.addRow(term("w0", self.w0.toolTip()), self.w0)
        wform.addRow(term("σ", self.sigma.toolTip()), self.sigma)
        wform.addRow(term("class weights", self.balance.toolTip()), self.balance)
        wform.addRow("", self.live)
        wform.addRow(self.weight_button)
        wform.addRow(self.weight_status)

        # --- side outputs
        self.model_label = status_label()
        self.image = LayerCombo(napari_viewer, ["image"], predicate=lambda lyr: not is_output(lyr))
        self.channels = ChannelPicker()
        self.side_controls = RunControls("Show side outputs")
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(TABLE_COLUMNS))
        for c, key in enumerate(TABLE_COLUMNS):
            self.table.horizontalHeaderItem(c).setToolTip(COLUMN_TIPS[key])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(120)
        self.table.setSizeAdjustPolicy(QTableWidget.SizeAdjustPolicy.AdjustToContents)
        self.side_status = status_label()

        sbox = QGroupBox("Deep-supervision / side outputs")
        sbox.setToolTip(
            "Predictions taken from inside the network (deep supervision): how much each "
            "depth contributes and how close a smaller, faster part comes to the final one"
        )
        slayout = QVBoxLayout(sbox)
        slayout.addWidget(self.model_label)
        sform = QFormLayout()
        sform.addRow("image", self.image)
        sform.addRow("", self.channels)
        slayout.addLayout(sform)
        buttons = QHBoxLayout()
        buttons.addWidget(self.side_controls.run)
        buttons.addWidget(self.side_controls.cancel)
        slayout.addLayout(buttons)
        slayout.addWidget(self.side_controls.progress)
        slayout.addWidget(self.side_status)
        slayout.addWidget(self.table)

        layout: QVBoxLayout = self.body_layout
        layout.addWidget(wbox)
        layout.addWidget(sbox)
        layout.addStretch(1)

        self.weight_button.clicked.connect(self.show_weight_map)
        for spin in (self.w0, self.sigma):
            spin.valueChanged.connect(self._parameters_changed)
        self.balance.currentTextChanged.connect(self._parameters_changed)
        self.labels.currentIndexChanged.connect(self._watch)
        self.live.toggled.connect(self._watch)
        self.side_controls.run.clicked.connect(self.show_side_outputs)
        self.side_controls.cancel.clicked.connect(self.cancel_side_outputs)
        self.image.currentIndexChanged.connect(self._update_channels)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self._on_model_changed()
        self._watch()
        self.state.ensure_model()  # opened alone: load the bundled model itself

    def _update_channels(self, *_: Any) -> None:
        if alive(self):
            model = self.state.model
            self.channels.update_for(self.image.layer(), model.in_channels if model else 1)

    # ------------------------------------------------------------ weight map
    def _watch(self, *_: Any) -> None:
        """Follow edits of the selected labels layer while "update while editing" is on."""
        if not alive(self):
            return
        layer = self.labels.layer() if self.live.isChecked() else None
        if layer is self._watched:
            return
        if self._watched is not None:
            for name in WATCHED_EVENTS:
                getattr(self._watched.events, name).disconnect(self._labels_edited)
        self._watched = layer
        if layer is not None:
            # undo/redo write into the array and refresh (set_data), with no data/paint event
            for name in WATCHED_EVENTS:
                getattr(layer.events, name).connect(self._labels_edited)
            if self.weight_layer is not None:
                self._debounce.start()

    def _labels_edited(self, *_: Any) -> None:
        if alive(self) and self.weight_layer is not None:
            self._debounce.start()

    def _parameters_changed(self, *_: Any) -> None:
        if self.weight_layer is not None:
            self._debounce.start()

    def show_weight_map(self) -> Job | None:
        """Compute the weight map of the selected labels (worker) into the plugin's layer."""
        if not alive(self):
            return None
        layer = self.labels.layer()
        if layer is None:
            set_status(self.weight_status, "Add or select a labels layer.", "warn")
            return None
        if self.weight_job is not None and self.weight_job.running:
            self._dirty = True  # run again with the newest labels when this one ends
            return self.weight_job
        labels = np.array(layer.data, copy=True)
        w0, sigma, balance = self.w0.value(), self.sigma.value(), self.balance.currentText()
        params = (w0, sigma, balance)
        last = self._computed
        if (
            last is not None
            and last[0] is layer
            and last[2] == params
            and self.weight_layer is not None
            and self.weight_layer in self.viewer.layers
            and np.array_equal(last[1], labels)
        ):
            return None  # nothing changed (a refresh, a slice change)
        self._computed = (layer, labels, params)
        self._dirty = False
        set_status(self.weight_status, f"Computing the weight map of {layer.name!r}…")

        def work(report: Any, cancel: Any) -> tuple[np.ndarray, float]:
            from ..pipeline import weight_map_stack

            t = time.perf_counter()
            wmap = weight_map_stack(labels, w0=w0, sigma=sigma, class_weights=balance)
            return wmap, time.perf_counter() - t

        def done(result: tuple[np.ndarray, float]) -> None:
            wmap, seconds = result
            if layer not in self.viewer.layers:
                return
            top = float(wmap.max()) if wmap.size else 1.0
            self.weight_layer = write_output(
                self.viewer,
                output_key(layer, "weight map"),
                "image",
                wmap,
                name=f"{layer.name} [weight map]",
                scale=layer.scale,
                translate=layer.translate,
                metadata={
                    "napari_unet_weight_map": {"w0": w0, "sigma": sigma, "class_weights": balance}
                },
                colormap="viridis",
                contrast_limits=(0.0, max(top, 1e-6)),
            )
            self.updates += 1
            if alive(self):
                set_status(
                    self.weight_status,
                    f"Weight map of {layer.name!r}: {wmap.min():.2f}–{top:.2f} "
                    f"({seconds * 1000:.0f} ms).",
                    "ok",
                )

        def finished() -> None:
            if self._dirty and alive(self):
                self._debounce.start()

        self.weight_job = start_job(
            work,
            owner=self,
            on_done=done,
            on_error=self._weight_error,
            on_finished=finished,
            name="weight map",
        )
        return self.weight_job

    def _weight_error(self, exc: BaseException) -> None:
        self._computed = None
        if alive(self):
            set_status(self.weight_status, error_text(exc), "error")

    # ---------------------------------------------------------- side outputs
    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state)
        model = self.state.model
        if model is not None:
            n = model.num_outputs
            text += f" — {n} output{'s' if n != 1 else ''}"
        set_status(self.model_label, text, kind)
        self._update_channels()

    def show_side_outputs(self) -> Job | None:
        """Predict every output of the current model on the selected image (worker)."""
        if self.side_job is not None and self.side_job.running:
            return None
        layer, model = self.image.layer(), self.state.model
        if layer is None or model is None:
            set_status(self.side_status, "Need an image layer and a model.", "warn")
            return None
        self.channels.update_for(layer, model.in_channels)
        try:
            request = make_request(
                self.viewer,
                layer,
                model.in_channels,
                current_slice=True,
                channels=self.channels.channels(),
                channel=self.channels.channel_index(),
            )
        except ValueError as exc:
            set_status(self.side_status, str(exc), "error")
            return None
        device = self.state.device
        self.side_controls.busy(True)
        self.side_controls.fraction(0.0, "starting…")
        set_status(self.side_status, f"Predicting every output of {model.name}…")
        self.side_job = start_job(
            lambda report, cancel: side_outputs(model, request, device, report, cancel),
            on_progress=self._side_progress,
            on_done=lambda res: self._side_done(request, model, res),
            on_error=self._side_error,
            on_cancelled=self._side_cancelled,
            on_finished=self._side_finished,
            owner=self,
            name="side outputs",
        )
        return self.side_job

    def cancel_side_outputs(self) -> None:
        if self.side_job is not None and self.side_job.running:
            self.side_job.cancel()

    def _side_progress(self, items: list[Any]) -> None:
        if not alive(self):
            return
        for event in items:
            match event:
                case Progress(done, total):
                    self.side_controls.fraction(done / max(total, 1), f"{done}/{total} tiles")
                case Stage(text):
                    self.side_controls.note(text)
                case _:
                    raise unexpected(event, "Inspect")

    def _label(self, model: Any) -> str:
        entry = self.state.entry_of(model)
        return entry.label if entry is not None else model.name

    def _side_done(self, request: Any, model: Any, result: Any) -> None:
        src = request.source
        if src not in self.viewer.layers:
            return
        self.side_layer = write_output(
            self.viewer,
            output_key(src, "side outputs"),
            "image",
            place(request, result.maps, channels=True),
            name=f"{src.name} [{self._label(model)} side outputs]",
            scale=(1.0, *request.scale),
            translate=(0.0, *request.translate),
            metadata={"napari_unet_outputs": [r["output"] for r in result.rows]},
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            **output_axis(src, result.maps.ndim),
        )
        self.rows = result.rows
        if not alive(self):
            return
        self.table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            for c, key in enumerate(TABLE_COLUMNS):
                self.table.setItem(r, c, QTableWidgetItem(row[key]))
        set_status(
            self.side_status,
            f"{len(self.rows)} output{'s' if len(self.rows) != 1 else ''} (foreground "
            "probability, first axis of "
            f"{self.side_layer.name!r}) in {result.seconds:.1f} s.",
            "ok",
        )
        self.side_controls.fraction(1.0, "done")

    def _side_error(self, exc: BaseException) -> None:
        if alive(self):
            set_status(self.side_status, error_text(exc), "error")

    def _side_cancelled(self, _: Any) -> None:
        if alive(self):
            set_status(self.side_status, "Cancelled; no layer was changed.", "warn")
            self.side_controls.fraction(0.0, "cancelled")

    def _side_finished(self) -> None:
        if alive(self):
            self.side_controls.busy(False)
