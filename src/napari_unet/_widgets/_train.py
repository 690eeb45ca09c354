"""Train widget: fine-tune (a copy of) the current model on annotated layers, live plot."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import LayerCombo, RunControls, alive, is_output, set_status, status_label
from ._geometry import layer_array, leading_count, make_request
from ._jobs import Job, error_text, start_job
from ._plot import LossPlot
from ._predict import model_line, run_prediction, write_results
from ._state import get_state

CURRENT = "current model (fine-tune)"
FRESH_PREFIX = "new "
LOSSES = ("ce_dice", "ce", "unet3p_hybrid", "u2net_sides")
"""Shown before the engine is imported; replaced by ``list_losses()`` once it is."""


def rectangle_roi(shapes: Any, image: Any) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) in ``image`` data pixels of the first rectangle of ``shapes``."""
    types = list(shapes.shape_type)
    if "rectangle" not in types:
        raise ValueError(f"{shapes.name!r} has no rectangle; draw one (the training region)")
    vertices = np.asarray(shapes.data[types.index("rectangle")], dtype=float)
    pts = np.array([image.world_to_data(shapes.data_to_world(v)) for v in vertices])
    ys, xs = pts[:, -2], pts[:, -1]
    shape = layer_array(image).shape
    h, w = shape[-3:-1] if image.rgb else shape[-2:]
    y0, y1 = max(0, int(np.floor(ys.min()))), min(h, int(np.ceil(ys.max())))
    x0, x1 = max(0, int(np.floor(xs.min()))), min(w, int(np.ceil(xs.max())))
    if y1 - y0 < 4 or x1 - x0 < 4:
        raise ValueError("the training rectangle is outside the image or smaller than 4×4 px")
    return y0, y1, x0, x1


def training_arrays(
    viewer: Any, image: Any, labels: Any, in_channels: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (Y,X) or (C,Y,X), labels (Y,X), note) — the displayed plane of stacks."""
    n_lead, channel_axis = leading_count(image, in_channels)
    img = layer_array(image)
    note = ""
    if n_lead:
        point = np.asarray(image.world_to_data(viewer.dims.point))
        index = tuple(int(np.clip(round(point[d]), 0, img.shape[d] - 1)) for d in range(n_lead))
        img = img[index]
        note = f" (slice {index})"
    img = np.asarray(img)
    if image.rgb:
        img = np.moveaxis(img, -1, 0)
    lab = labels.data
    if lab.ndim > 2:
        point = np.asarray(labels.world_to_data(viewer.dims.point))
        index = tuple(
            int(np.clip(round(point[d]), 0, lab.shape[d] - 1)) for d in range(lab.ndim - 2)
        )
        lab = lab[index]
    lab = np.array(lab, copy=True)  # a snapshot: painting during training changes nothing
    if lab.shape != img.shape[-2:]:
        raise ValueError(
            f"labels {labels.name!r} are {lab.shape[0]}×{lab.shape[1]} but the image plane is "
            f"{img.shape[-2]}×{img.shape[-1]}"
        )
    return img, lab, note


def _warm_up_optimizer() -> None:
    """Create a torch optimizer once: the first one imports torch._dynamo (seconds, and
    GIL-heavy), which would otherwise happen on the first click on Train."""
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


class TrainWidget(QWidget):
    """Train the model on an image + instance labels (+ a rectangle region)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self.history: Any = None
        self.trained_model: Any = None
        self.timings: dict[str, float] = {}
        self.last_roi: tuple[int, int, int, int] | None = None
        self._defaults: dict[str, dict[str, Any]] = {}

        self.model_label = status_label()
        self.image = LayerCombo(napari_viewer, ["image"], predicate=lambda lyr: not is_output(lyr))
        self.labels = LayerCombo(napari_viewer, ["labels"])
        self.region = LayerCombo(napari_viewer, ["shapes"], optional=True)
        self.region.setToolTip(
            "Optional: the first rectangle of this Shapes layer is the training region. "
            "Default: the bounding box of the annotations. Annotate every cell inside it."
        )
        self.start_from = QComboBox()
        self.start_from.addItem(CURRENT)
        self.width = QSpinBox()
        self.width.setRange(1, 1024)
        self.width.setValue(16)
        self.depth = QSpinBox()
        self.depth.setRange(1, 8)
        self.depth.setValue(3)
        self.loss = QComboBox()
        self.loss.addItems(LOSSES)
        self.budget_kind = QComboBox()
        self.budget_kind.addItems(["seconds", "epochs"])
        self.budget = QSpinBox()
        self.budget.setRange(1, 1_000_000)
        self.budget.setValue(30)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(4)
        self.patch = QSpinBox()
        self.patch.setRange(16, 2048)
        self.patch.setSingleStep(16)
        self.patch.setValue(128)
        self.patch.setSuffix(" px")
        self.augment = QCheckBox("augmentation (flips, rotations, elastic, intensity)")
        self.augment.setChecked(True)
        self.predict_after = QCheckBox("predict the image when done")
        self.predict_after.setChecked(True)
        self.plot = LossPlot()
        self.controls = RunControls("Train")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("labels", self.labels)
        form.addRow("region", self.region)
        form.addRow("start from", self.start_from)
        form.addRow("base width", self.width)
        form.addRow("depth", self.depth)
        form.addRow("loss", self.loss)
        budget = QHBoxLayout()
        budget.addWidget(self.budget)
        budget.addWidget(self.budget_kind)
        form.addRow("train for", budget)
        form.addRow("learning rate", self.lr)
        form.addRow("batch", self.batch)
        form.addRow("patch size", self.patch)
        form.addRow("", self.augment)
        form.addRow("", self.predict_after)
        buttons = QHBoxLayout()
        buttons.addWidget(self.controls.run)
        buttons.addWidget(self.controls.cancel)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.controls.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.controls.run.clicked.connect(self.run)
        self.controls.cancel.clicked.connect(self.cancel)
        self.start_from.currentTextChanged.connect(self._on_start_from)
        self.budget_kind.currentTextChanged.connect(self._on_budget_kind)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self._on_start_from(CURRENT)
        self._on_model_changed()
        self._start_engine()
        self.state.ensure_model()

    # ------------------------------------------------------------------ setup
    def _start_engine(self) -> None:
        def work(report: Any, cancel: Any) -> tuple[list[str], list[tuple[str, str]], dict]:
            from ..models import list_models
            from ..training.losses import get_loss, list_losses
            from ._model import variant_defaults

            names = list_models()
            losses = [(n, get_loss(n).description) for n in list_losses()]
            _warm_up_optimizer()
            return names, losses, {n: variant_defaults(n) for n in names}

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

        start_job(work, on_done=done, on_error=self._on_error)

    def _on_start_from(self, text: str) -> None:
        fresh = text.startswith(FRESH_PREFIX)
        defaults = self._defaults.get(text[len(FRESH_PREFIX) :], {}) if fresh else {}
        self.width.setEnabled(fresh and ("base_channels" in defaults or "embed_dim" in defaults))
        self.depth.setEnabled(fresh and "depth" in defaults)

    def _on_budget_kind(self, kind: str) -> None:
        self.budget.setValue(30 if kind == "seconds" else 10)

    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state)
        set_status(self.model_label, text, kind)

    # -------------------------------------------------------------------- run
    def settings(self) -> dict[str, Any]:
        budget = self.budget.value()
        return {
            "loss": self.loss.currentText(),
            "epochs": budget if self.budget_kind.currentText() == "epochs" else None,
            "seconds": float(budget) if self.budget_kind.currentText() == "seconds" else None,
            "lr": self.lr.value(),
            "batch_size": self.batch.value(),
            "patch_size": self.patch.value(),
            "augment": self.augment.isChecked(),
        }

    def run(self) -> Job | None:
        """Start training a copy of the current (or a new) model; returns the job."""
        if self.job is not None and self.job.running:
            return None
        self.timings = {"clicked": time.perf_counter()}
        image, labels, shapes = self.image.layer(), self.labels.layer(), self.region.layer()
        if image is None or labels is None:
            set_status(self.status, "Choose an image and a labels layer.", "warn")
            return None
        start = self.start_from.currentText()
        base = self.state.model
        if start == CURRENT and base is None:
            set_status(self.status, "The model is still loading; try again in a moment.", "warn")
            return None
        fresh = start[len(FRESH_PREFIX) :] if start.startswith(FRESH_PREFIX) else None
        in_ch = base.in_channels if base is not None and fresh is None else 1
        try:
            img, lab, note = training_arrays(self.viewer, image, labels, in_ch)
            roi = rectangle_roi(shapes, image) if shapes is not None else None
            request = (
                make_request(self.viewer, image, in_ch, current_slice=True)
                if self.predict_after.isChecked()
                else None
            )
        except ValueError as exc:
            set_status(self.status, str(exc), "error")
            return None
        settings = self.settings()
        self.last_roi = roi
        device = self.state.device
        fresh_cfg: dict[str, Any] = {}
        if fresh is not None:
            defaults = self._defaults.get(fresh, {})
            for key in ("base_channels", "embed_dim"):
                if key in defaults:
                    fresh_cfg[key] = self.width.value()
            if "depth" in defaults:
                fresh_cfg["depth"] = self.depth.value()
        classes = base.num_classes if base is not None else 3

        def work(report: Any, cancel: Any) -> tuple[Any, Any, Any]:
            import copy

            from ..training import train

            if fresh is None:
                model = copy.deepcopy(base)  # Cancel or failure never touch the current model
            else:
                from ..models import build_model

                model = build_model(fresh, 1, classes, **fresh_cfg)
            history = train(
                model,
                img,
                lab,
                roi=roi,
                device=device,
                callback=lambda ev: report(("train", ev)),
                cancel=cancel,
                **settings,
            )
            prediction = None
            if request is not None and not history.cancelled:
                report(("stage", "predicting"))
                prediction = run_prediction(
                    model,
                    request,
                    labels_mode="instance",
                    probabilities=False,
                    device=device,
                    cancel=cancel,
                )
            return model, history, prediction

        self.plot.clear()
        self.history = None
        self.controls.busy(True)
        self.controls.fraction(0.0, "preparing…")
        where = f"region {roi}" if roi else "annotated area"
        set_status(self.status, f"Training on {image.name!r}{note}, {where}…")
        self.job = start_job(
            work,
            on_progress=self._on_progress,
            on_done=lambda res: self._on_done(request, fresh, settings, *res),
            on_error=self._on_error,
            on_cancelled=self._on_cancelled,
            on_finished=self._on_finished,
            interval=0.25,
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
        for item in items:
            if item[0] == "stage":
                set_status(self.status, item[1][:1].upper() + item[1][1:] + "…")
                self.controls.fraction(1.0, item[1])
                continue
            ev = item[1]
            if ev["kind"] == "step":
                self.timings.setdefault("first_step", time.perf_counter())
                self.plot.add_loss(ev["step"], ev["loss"])
                last_step = ev
            elif ev["kind"] == "epoch":
                step = self.plot.steps[-1] if self.plot.steps else 0
                self.plot.add_val(step, ev.get("val_f1"))
                f1 = ev.get("val_f1")
                score = f", validation F1 {f1:.2f}" if f1 is not None else ""
                loss = ev.get("loss")
                loss_text = f"loss {loss:.3f}" if loss is not None else ""
                set_status(self.status, f"Epoch {ev['epoch']}: {loss_text}{score}")
        if last_step is not None:
            self.controls.fraction(
                last_step["fraction"],
                f"epoch {last_step['epoch'] + 1}, step {last_step['step']}, "
                f"{last_step['elapsed']:.0f} s",
            )
        self.plot.update()

    def _on_done(
        self,
        request: Any,
        fresh: str | None,
        settings: dict[str, Any],
        model: Any,
        history: Any,
        prediction: Any,
    ) -> None:
        self.history, self.trained_model = history, model
        self.timings["trained"] = time.perf_counter()
        n_ep, secs = len(history.epochs), history.seconds
        origin = f"new {fresh}" if fresh else "fine-tuned"
        self.state.set_model(
            model, f"trained here ({origin}, {settings['loss']}, {n_ep} epochs, {secs:.0f} s)"
        )
        text = f"Done: {len(history.losses)} steps in {secs:.1f} s"
        last = history.epochs[-1] if history.epochs else {}
        if last.get("val_f1") is not None:
            text += f", validation F1 {last['val_f1']:.2f}"
        if history.diverged:
            text += " (loss diverged: kept the last good weights)"
        if prediction is not None and request is not None and request.source in self.viewer.layers:
            write_results(self.viewer, request, model, prediction, "instance")
            self.timings["predicted"] = time.perf_counter()
            text += f"; predicted {prediction['n_labels']} objects"
        set_status(self.status, text + ". Predict now uses this model.", "ok")
        self.controls.fraction(1.0, "done")

    def _on_cancelled(self, result: Any) -> None:
        if alive(self):
            set_status(
                self.status, "Cancelled: the current model and the layers are unchanged.", "warn"
            )
            self.controls.fraction(0.0, "cancelled")

    def _on_error(self, exc: BaseException) -> None:
        if alive(self):
            set_status(self.status, f"Training failed: {error_text(exc)}", "error")

    def _on_finished(self) -> None:
        if alive(self):
            self.controls.busy(False)
