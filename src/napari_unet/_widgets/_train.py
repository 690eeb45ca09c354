"""Train widget: fine-tune (a copy of) the current model on annotated layers, live plot.

Training data is a list of (image, annotation, regions) entries: every rectangle of the
regions Shapes layer is a training region (no layer: the annotated area), several
images can be added. Validation is the user's choice (none / held-out objects / a
region of its own). The budget is a number of steps (time optional). The trained model
joins the model list; its prediction is added as new layers.
"""

from __future__ import annotations

import time
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._common import (
    ChannelPicker,
    LayerCombo,
    Panel,
    RunControls,
    alive,
    is_output,
    set_status,
    status_label,
    term,
)
from ._events import Epoch, PostProgress, Stage, Step, TrainStarted, unexpected
from ._geometry import make_request
from ._jobs import Job, error_text, start_job
from ._plot import LossPlot
from ._prediction import write_results
from ._state import get_state, model_line
from ._train_data import DataEntry, engine_entries, rectangle_roi, rectangle_rois, training_arrays
from ._train_job import TrainPlan, fresh_config, setup_work, train_work
from ._train_text import model_summary, result_text, summary_line, val_name

__all__ = ["DataEntry", "TrainWidget", "rectangle_roi", "rectangle_rois", "training_arrays"]

CURRENT = "current model (fine-tune a copy)"
FRESH_PREFIX = "new "
LOSSES = ("ce_dice", "ce", "unet3p_hybrid", "u2net_sides")
"""Shown before the engine is imported; replaced by ``list_losses()`` once it is."""
BUDGETS = ("steps", "epochs", "seconds")
BUDGET_DEFAULTS = {"steps": 100, "epochs": 5, "seconds": 60}
VALIDATION = {
    "none": "none",
    "held-out objects": "objects",
    "a region of its own": "regions",
}
PRECISIONS = ("auto", "fp32", "bf16")


class TrainWidget(Panel):
    """Train the model on (image, annotation, regions) entries."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self.history: Any = None
        self.summary: Any = None
        self.trained_model: Any = None
        self.trained_entry: Any = None
        self.timings: dict[str, float] = {}
        self.last_roi: tuple[int, int, int, int] | None = None
        self.last_rois: list[list[tuple[int, int, int, int]] | None] = []
        self.last_layers: dict[str, Any] = {}
        self.entries: list[DataEntry] = []
        self._defaults: dict[str, dict[str, Any]] = {}

        self.model_label = status_label()
        # --- data
        self.image = LayerCombo(napari_viewer, ["image"], predicate=lambda lyr: not is_output(lyr))
        self.channels = ChannelPicker()
        self.labels = LayerCombo(napari_viewer, ["labels"])
        self.labels.setToolTip(
            "Your annotation: a Labels layer with one id per object. Inside a training "
            "region every object must be painted (unpainted pixels are background)."
        )
        self.region = LayerCombo(napari_viewer, ["shapes"], optional=True)
        self.region.setToolTip(
            "A Shapes layer: every rectangle in it is a training region (annotate all "
            "objects inside each). (none) = the annotated area (bounding box of the "
            "annotation + 16 px). Outside the regions nothing is learned."
        )
        self.add_entry = QPushButton("Add to the list")
        self.add_entry.setToolTip(
            "Keep this image + annotation + regions and add another (other images, other "
            "annotations). With an empty list the selection above is trained on."
        )
        self.remove_entry = QPushButton("Remove")
        self.entry_list = QListWidget()
        self.entry_list.setMaximumHeight(80)
        self.entry_list.setVisible(False)
        # --- validation
        self.validation = QComboBox()
        self.validation.addItems(list(VALIDATION))
        self.validation.setCurrentText("held-out objects")
        self.validation.setToolTip(
            "How the training is checked on objects it never learns from:\n"
            "none — no score;\n"
            "held-out objects — a fraction of the annotated objects is set aside;\n"
            "a region of its own — the rectangles of another Shapes layer (annotate all "
            "objects inside). No score is shown for fewer than 5 objects."
        )
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.05, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.val_fraction.setToolTip("Share of the annotated objects set aside for validation")
        self.val_region = LayerCombo(napari_viewer, ["shapes"], optional=True)
        self.val_region.setToolTip(
            "Shapes layer whose rectangles are validation regions (never trained on)"
        )
        # --- model and budget
        self.start_from = QComboBox()
        self.start_from.addItem(CURRENT)
        self.start_from.setToolTip(
            "Fine-tune: start from the selected model (it stays unchanged in the list; "
            "the result is added as a new model). new …: start from scratch."
        )
        self.width = QSpinBox()
        self.width.setRange(1, 1024)
        self.width.setValue(16)
        self.width.setToolTip("Base width of a new network (feature channels of the first level)")
        self.depth = QSpinBox()
        self.depth.setRange(1, 8)
        self.depth.setValue(3)
        self.depth.setToolTip("Depth of a new network (how many times it halves the image)")
        self.loss = QComboBox()
        self.loss.addItems(LOSSES)
        self.loss.setToolTip("What training minimises; ce_dice suits most nuclei/cell data")
        self.budget_kind = QComboBox()
        self.budget_kind.addItems(list(BUDGETS))
        self.budget_kind.setToolTip(
            "steps (default): a fixed amount of work, the same result on a busy or idle "
            "computer; epochs: 20 steps each; seconds: a time limit (depends on the load)"
        )
        self.budget = QSpinBox()
        self.budget.setRange(1, 1_000_000)
        self.budget.setValue(BUDGET_DEFAULTS["steps"])
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.lr.setToolTip("Learning rate: how big each training step is (1e-3 is a safe start)")
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(4)
        self.batch.setToolTip("Patches per training step")
        self.patch = QSpinBox()
        self.patch.setRange(16, 2048)
        self.patch.setSingleStep(16)
        self.patch.setValue(128)
        self.patch.setSuffix(" px")
        self.patch.setToolTip("Size of the square image pieces the network learns from")
        self.precision = QComboBox()
        self.precision.addItems(list(PRECISIONS))
        self.precision.setToolTip(
            "Number format: auto = bf16 (faster, same quality) where the GPU or CPU has "
            "bf16 units, else fp32"
        )
        self.augment = QCheckBox("augmentation")
        self.augment.setChecked(True)
        self.augment.setToolTip(
            "Show the network varied copies of the patches: flips, rotations, elastic "
            "deformation, intensity changes (recommended)"
        )
        self.predict_after = QCheckBox("predict the image when done")
        self.predict_after.setChecked(True)
        self.plot = LossPlot()
        self.controls = RunControls("Train")
        self.status = status_label()

        data_box = QGroupBox("Training data")
        dform = QFormLayout(data_box)
        dform.addRow("image", self.image)
        dform.addRow("", self.channels)
        dform.addRow(term("annotation", self.labels.toolTip()), self.labels)
        dform.addRow(term("regions", self.region.toolTip()), self.region)
        entry_buttons = QHBoxLayout()
        entry_buttons.addWidget(self.add_entry)
        entry_buttons.addWidget(self.remove_entry)
        dform.addRow(entry_buttons)
        dform.addRow(self.entry_list)
        val_row = QHBoxLayout()
        val_row.addWidget(self.validation, 1)
        val_row.addWidget(self.val_fraction)
        val_row.addWidget(self.val_region, 1)
        dform.addRow(term("validation", self.validation.toolTip()), val_row)

        train_box = QGroupBox("Training")
        form = QFormLayout(train_box)
        form.addRow(term("start from", self.start_from.toolTip()), self.start_from)
        size_row = QHBoxLayout()
        size_row.addWidget(self.width)
        size_row.addWidget(term("depth", self.depth.toolTip()))
        size_row.addWidget(self.depth)
        form.addRow(term("base width", self.width.toolTip()), size_row)
        form.addRow(term("loss", self.loss.toolTip()), self.loss)
        budget = QHBoxLayout()
        budget.addWidget(self.budget)
        budget.addWidget(self.budget_kind)
        form.addRow(term("train for", self.budget_kind.toolTip()), budget)
        rates = QHBoxLayout()
        rates.addWidget(self.lr)
        rates.addWidget(term("batch", self.batch.toolTip()))
        rates.addWidget(self.batch)
        form.addRow(term("learning rate", self.lr.toolTip()), rates)
        patch_row = QHBoxLayout()
        patch_row.addWidget(self.patch)
        patch_row.addWidget(term("precision", self.precision.toolTip()))
        patch_row.addWidget(self.precision)
        form.addRow(term("patch size", self.patch.toolTip()), patch_row)
        checks = QHBoxLayout()
        checks.addWidget(self.augment)
        checks.addWidget(self.predict_after)
        form.addRow("", checks)

        buttons = QHBoxLayout()
        buttons.addWidget(self.controls.run)
        buttons.addWidget(self.controls.cancel)
        layout: QVBoxLayout = self.body_layout
        layout.addWidget(self.model_label)
        layout.addWidget(data_box)
        layout.addWidget(train_box)
        layout.addLayout(buttons)
        layout.addWidget(self.controls.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addStretch(1)

        self.controls.run.clicked.connect(self.run)
        self.controls.cancel.clicked.connect(self.cancel)
        self.add_entry.clicked.connect(self.add_current_entry)
        self.remove_entry.clicked.connect(self._remove_entry)
        self.start_from.currentTextChanged.connect(self._on_start_from)
        self.budget_kind.currentTextChanged.connect(self._on_budget_kind)
        self.validation.currentTextChanged.connect(self._on_validation)
        self.image.currentIndexChanged.connect(self._update_channels)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self._on_start_from(CURRENT)
        self._on_validation(self.validation.currentText())
        self._on_model_changed()
        self._update_entries()
        self._start_engine()
        self.state.ensure_model()

    # ------------------------------------------------------------------ setup
    def _start_engine(self) -> None:
        def done(result: tuple[list[str], list[tuple[str, str]], dict]) -> None:
            if not alive(self):
                return
            names, losses, self._defaults = result
            for n in names:
                self.start_from.addItem(FRESH_PREFIX + n)
            current = self.loss.currentText()
            self.loss.clear()
            for i, (name, description) in enumerate(losses):
                self.loss.addItem(name)
                self.loss.setItemData(i, description, 3)  # Qt.ToolTipRole
            self.loss.setCurrentText(current)

        start_job(
            lambda report, cancel: setup_work(),
            owner=self,
            on_done=done,
            on_error=self._on_error,
            name="train setup",
        )

    def _fresh_defaults(self, name: str) -> dict[str, Any]:
        from ._model_info import new_model_defaults

        return new_model_defaults(self.state, self._defaults.get(name, {}), name)

    def _on_start_from(self, text: str) -> None:
        fresh = text.startswith(FRESH_PREFIX)
        defaults = self._fresh_defaults(text[len(FRESH_PREFIX) :]) if fresh else {}
        width_key = next((k for k in ("base_channels", "embed_dim") if k in defaults), None)
        self.width.setEnabled(fresh and width_key is not None)
        self.depth.setEnabled(fresh and "depth" in defaults)
        if width_key:
            self.width.setValue(int(defaults[width_key]))
        if "depth" in defaults:
            self.depth.setValue(int(defaults["depth"]))

    def _on_budget_kind(self, kind: str) -> None:
        self.budget.setValue(BUDGET_DEFAULTS[kind])

    def _on_validation(self, text: str) -> None:
        mode = VALIDATION[text]
        self.val_fraction.setVisible(mode == "objects")
        self.val_region.setVisible(mode == "regions")

    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state)
        set_status(self.model_label, text, kind)
        self._update_channels()

    def _in_channels(self) -> int:
        model = self.state.model
        fresh = self.start_from.currentText().startswith(FRESH_PREFIX)
        return model.in_channels if model is not None and not fresh else 1

    def _update_channels(self, *_: Any) -> None:
        if alive(self):
            self.channels.update_for(self.image.layer(), self._in_channels())

    # ---------------------------------------------------------------- entries
    def current_entry(self) -> DataEntry | None:
        image, labels = self.image.layer(), self.labels.layer()
        if image is None or labels is None:
            return None
        self._update_channels()
        mode = VALIDATION[self.validation.currentText()]
        return DataEntry(
            image=image,
            labels=labels,
            regions=self.region.layer(),
            val_regions=self.val_region.layer() if mode == "regions" else None,
            channels=self.channels.channels(),
            channel=self.channels.channel_index(),
        )

    def add_current_entry(self) -> DataEntry | None:
        """Add the selected image + annotation + regions to the training list."""
        entry = self.current_entry()
        if entry is None:
            set_status(self.status, "Choose an image and an annotation first.", "warn")
            return None
        self.entries.append(entry)
        self._update_entries()
        return entry

    def _remove_entry(self) -> None:
        row = self.entry_list.currentRow()
        if 0 <= row < len(self.entries):
            del self.entries[row]
        elif self.entries:
            self.entries.pop()
        self._update_entries()

    def _update_entries(self) -> None:
        self.entry_list.clear()
        for e in self.entries:
            self.entry_list.addItem(e.describe())
        self.entry_list.setVisible(bool(self.entries))
        self.remove_entry.setEnabled(bool(self.entries))

    # -------------------------------------------------------------------- run
    def settings(self) -> dict[str, Any]:
        budget, kind = self.budget.value(), self.budget_kind.currentText()
        mode = VALIDATION[self.validation.currentText()]
        return {
            "loss": self.loss.currentText(),
            "steps": budget if kind == "steps" else None,
            "epochs": budget if kind == "epochs" else None,
            "seconds": float(budget) if kind == "seconds" else None,
            "lr": self.lr.value(),
            "batch_size": self.batch.value(),
            "patch_size": self.patch.value(),
            "augment": self.augment.isChecked(),
            "validation": mode,
            "val_fraction": self.val_fraction.value() if mode == "objects" else 0.2,
            "precision": self.precision.currentText(),
        }

    def _entries_to_train(self) -> list[DataEntry] | None:
        """The training list (or the selection above it), None with the reason shown."""
        entries = list(self.entries)
        if not entries:
            current = self.current_entry()
            if current is None:
                set_status(self.status, "Choose an image and an annotation layer.", "warn")
                return None
            entries = [current]
        if VALIDATION[self.validation.currentText()] == "regions" and not any(
            e.val_regions is not None for e in entries
        ):
            set_status(
                self.status,
                "Validation 'a region of its own': choose the Shapes layer with the "
                "validation rectangle(s).",
                "warn",
            )
            return None
        return entries

    def _plan(self, entries: list[DataEntry]) -> tuple[TrainPlan, str] | None:
        """What to train (read from the controls and layers now), and a note; None with
        the reason shown."""
        start = self.start_from.currentText()
        base = self.state.model
        if start == CURRENT and base is None:
            set_status(self.status, "The model is still loading; try again in a moment.", "warn")
            return None
        fresh = start[len(FRESH_PREFIX) :] if start.startswith(FRESH_PREFIX) else None
        in_ch = base.in_channels if base is not None and fresh is None else 1
        try:
            data, self.last_rois, note = engine_entries(self.viewer, entries, in_ch)
            target = entries[0]
            request = (
                make_request(
                    self.viewer,
                    target.image,
                    in_ch,
                    current_slice=True,
                    channels=target.channels,
                    channel=target.channel,
                )
                if self.predict_after.isChecked()
                else None
            )
        except ValueError as exc:
            set_status(self.status, str(exc), "error")
            return None
        self.last_roi = (self.last_rois[0] or [None])[0] if self.last_rois else None
        defaults = self._defaults.get(fresh, {}) if fresh is not None else {}
        plan = TrainPlan(
            data=data,
            settings=self.settings(),
            device=self.state.device,
            base=base if fresh is None else None,
            fresh=fresh,
            fresh_config=fresh_config(defaults, self.width.value(), self.depth.value()),
            classes=base.num_classes if base is not None else 3,
            request=request,
        )
        return plan, note

    def run(self) -> Job | None:
        """Start training a copy of the current (or a new) model; returns the job."""
        if self.job is not None and self.job.running:
            return None
        self.timings = {"clicked": time.perf_counter()}
        entries = self._entries_to_train()
        planned = self._plan(entries) if entries is not None else None
        if planned is None:
            return None
        plan, note = planned
        base_entry = self.state.current
        self.plot.clear()
        self.history = self.summary = None
        self.controls.busy(True)
        self.controls.fraction(0.0, "preparing…")
        names = ", ".join(dict.fromkeys(e.image.name for e in entries))
        set_status(self.status, f"Preparing {names}{' (' + note + ')' if note else ''}…")
        self.job = start_job(
            lambda report, cancel: train_work(plan, report, cancel),
            owner=self,
            on_progress=self._on_progress,
            on_done=lambda res: self._on_done(plan.request, plan.fresh, base_entry, *res),
            on_error=self._on_error,
            on_cancelled=self._on_cancelled,
            on_finished=self._on_finished,
            interval=0.25,
            name="train",
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
        last_step = None
        for event in items:
            match event:
                case Stage(text):
                    set_status(
                        self.status, self._summary_line() + text[:1].upper() + text[1:] + "…"
                    )
                    self.controls.fraction(1.0)
                    self.controls.note(text)
                case PostProgress():
                    self.controls.fraction(1.0, "separating objects…")
                case TrainStarted(summary):
                    self.summary = summary
                    self.plot.set_validation(self._val_name(), summary.scored)
                    set_status(self.status, "Training on " + summary.describe())
                case Step():
                    self.timings.setdefault("first_step", time.perf_counter())
                    self.plot.add_loss(event.step, event.loss)
                    last_step = event
                case Epoch():
                    self._show_epoch(event)
                case _:
                    raise unexpected(event, "Train")
        if last_step is not None:
            of = f"/{last_step.total_steps}" if last_step.total_steps else ""
            self.controls.fraction(
                last_step.fraction, f"step {last_step.step}{of}, {last_step.elapsed:.0f} s"
            )
        self.plot.update()

    def _show_epoch(self, ev: Epoch) -> None:
        step = ev.step if ev.step is not None else (self.plot.steps[-1] if self.plot.steps else 0)
        self.plot.add_val(step, ev.val_f1)
        score = f", {self._val_name()} {ev.val_f1:.2f}" if ev.val_f1 is not None else ""
        loss_text = f"loss {ev.loss:.3f}" if ev.loss is not None else ""
        set_status(self.status, self._summary_line() + f"Epoch {ev.epoch}: {loss_text}{score}")

    def _val_name(self) -> str:
        return val_name(self.summary)

    def _summary_line(self) -> str:
        return summary_line(self.summary)

    def _on_done(
        self,
        request: Any,
        fresh: str | None,
        base_entry: Any,
        model: Any,
        history: Any,
        prediction: Any,
    ) -> None:
        self.history, self.trained_model = history, model
        self.summary = getattr(history, "data", self.summary)
        self.timings["trained"] = time.perf_counter()
        steps, secs = len(history.losses), history.seconds
        origin = f"new {fresh}" if fresh else f"fine-tuned from {base_entry.label}"
        entry = self.state.add_model(
            model,
            f"trained here ({origin}, {steps} steps, {secs:.0f} s)",
            kind="trained",
            summary=model_summary(model, self.summary),
        )
        self.trained_entry = entry
        text = result_text(entry.label, history, self.summary)
        self.last_layers = {}
        if prediction is not None and request is not None and request.source in self.viewer.layers:
            self.last_layers = write_results(
                self.viewer, request, model, prediction, "instance", label=entry.label
            )
            self.timings["predicted"] = time.perf_counter()
            text += f"; predicted {prediction['n_labels']} objects into a new layer"
        set_status(self.status, text + ". Predict now uses this model.", "ok")
        self.controls.fraction(1.0, "done")

    def _on_cancelled(self, result: Any) -> None:
        if alive(self):
            set_status(
                self.status, "Cancelled: the model list and the layers are unchanged.", "warn"
            )
            self.controls.fraction(0.0, "cancelled")

    def _on_error(self, exc: BaseException) -> None:
        if alive(self):
            set_status(self.status, f"Training failed: {error_text(exc)}", "error")

    def _on_finished(self) -> None:
        if alive(self):
            self.controls.busy(False)
