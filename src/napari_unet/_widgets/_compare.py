"""Compare dock widget: every bundled model and every model of this viewer on the
annotated region(s), one table (F1@0.5, mean IoU, AP, seconds, parameters), best
first, one row per depth for deep-supervised models; one click uses the chosen one.

Self-contained (it only reads the shared model list of :mod:`._state`); the engine
(:func:`napari_unet.compare.compare_models`) runs in a thread job.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._common import LayerCombo, alive, set_status, status_label
from ._events import Compared, unexpected
from ._jobs import error_text, start_job
from ._state import get_state

COLUMNS = ("model", "F1@0.5", "mean IoU", "AP@.5:.95", "objects", "s", "params")


def _rois_from_shapes(layer: Any, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (y0, y1, x0, x1) of the shapes of ``layer`` in data pixels."""
    rois = []
    for data in getattr(layer, "data", []) or []:
        pts = np.asarray(data)[:, -2:]
        y0, x0 = np.floor(pts.min(0)).astype(int)
        y1, x1 = np.ceil(pts.max(0)).astype(int)
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(shape[0], y1), min(shape[1], x1)
        if y1 > y0 and x1 > x0:
            rois.append((int(y0), int(y1), int(x0), int(x1)))
    return rois


class CompareWidget(QWidget):
    """Compare models on an image and its instance labels (optionally inside shapes)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.rows: list[Any] = []
        self._models: dict[str, Any] = {}
        self._job: Any = None

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = LayerCombo(napari_viewer, ("image",))
        self.labels_combo = LayerCombo(napari_viewer, ("labels",))
        self.shapes_combo = LayerCombo(napari_viewer, ("shapes",), optional=True)
        form.addRow("image", self.image_combo)
        form.addRow("ground truth", self.labels_combo)
        form.addRow("regions", self.shapes_combo)
        self.shapes_combo.setToolTip(
            "rectangles (a Shapes layer) to score inside; (none): the whole image"
        )
        layout.addLayout(form)

        self.model_list = QListWidget()
        self.model_list.setToolTip("bundled trained variants and the models of this viewer")
        self.model_list.setMaximumHeight(140)
        layout.addWidget(self.model_list)
        self.heads = QCheckBox("one row per depth (UNet++ L1..L4, UNet 3+ d1..d5, U²-Net sides)")
        self.heads.setChecked(True)
        layout.addWidget(self.heads)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Compare models")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()  # one step per model compared
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(True)
        layout.addWidget(self.progress)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(220)
        layout.addWidget(self.table)

        use = QHBoxLayout()
        self.use_button = QPushButton("Use selected model")
        self.show_button = QPushButton("Show its labels")
        self.use_button.setEnabled(False)
        self.show_button.setEnabled(False)
        use.addWidget(self.use_button)
        use.addWidget(self.show_button)
        layout.addLayout(use)
        self.status = status_label()
        layout.addWidget(self.status)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_selected)
        self.show_button.clicked.connect(self.show_selected)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.cellDoubleClicked.connect(lambda *_: self.use_selected())
        self.state.models_changed.connect(self.refresh_models)
        self._bundled: list[str] = []
        self._unchecked: set[str] = set()
        self.model_list.itemChanged.connect(self._item_changed)
        self.refresh_models()
        self._list_bundled()

    def _list_bundled(self) -> None:
        """The bundled names, listed in a thread (the engine imports torch)."""

        def work(report: Any, cancel: Any) -> list[str]:
            from ..models.pretrained import available

            return available()

        def done(names: list[str]) -> None:
            self._bundled = list(names)
            self.refresh_models()

        kwargs = {"owner": self} if "owner" in inspect.signature(start_job).parameters else {}
        start_job(work, on_done=done, on_error=lambda exc: None, **kwargs)

    # ------------------------------------------------------------------ models
    def refresh_models(self, *_: Any) -> None:
        """Bundled names (file listing only, no torch) and this viewer's models."""
        if not alive(self):
            return
        self.model_list.blockSignals(True)
        self.model_list.clear()
        self._models = {}
        for name in self._bundled:
            self._models[name] = name
        for entry in self.state.entries:
            if entry.model is None or entry.untrained or entry.kind == "bundled":
                continue
            self._models[entry.label] = entry.model
        for label in self._models:
            item = QListWidgetItem(label)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = label not in self._unchecked
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.model_list.addItem(item)
        self.model_list.blockSignals(False)

    def _item_changed(self, item: QListWidgetItem) -> None:
        if item.checkState() == Qt.CheckState.Checked:
            self._unchecked.discard(item.text())
        else:
            self._unchecked.add(item.text())

    def selected_models(self) -> dict[str, Any]:
        out = {}
        for i in range(self.model_list.count()):
            item = self.model_list.item(i)
            if item.checkState() == Qt.CheckState.Checked and item.text() in self._models:
                out[item.text()] = self._models[item.text()]
        return out

    # --------------------------------------------------------------------- run
    def run(self) -> None:
        image_layer, labels_layer = self.image_combo.layer(), self.labels_combo.layer()
        if image_layer is None or labels_layer is None:
            set_status(self.status, "choose an image and its ground-truth labels", "warn")
            return
        models = self.selected_models()
        if not models:
            set_status(self.status, "tick at least one model", "warn")
            return
        image = np.asarray(image_layer.data)
        labels = np.asarray(labels_layer.data)
        rois = None
        shapes = self.shapes_combo.layer()
        if shapes is not None:
            rois = _rois_from_shapes(shapes, labels.shape[-2:])
            if not rois:
                set_status(
                    self.status, f"{shapes.name!r} has no rectangle inside the image", "warn"
                )
                return
        heads = self.heads.isChecked()
        self._trained_here = self._trained_on(models, image_layer.name, labels.shape[-2:])
        device = getattr(self.state, "device", "cpu")
        device = "cpu" if device in (None, "", "auto") else device

        def work(report: Any, cancel: Any) -> list[Any]:
            from ..compare import compare_models

            return compare_models(
                models, image, labels, rois=rois, heads=heads, device=device,
                progress=lambda done, total, name: report(Compared(done, total, name)),
                cancel=cancel, keep_labels=True,
            )  # fmt: skip

        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        set_status(self.status, f"comparing {len(models)} model(s)…")
        self._bar(0, f"0/{len(models)} models…")
        kwargs = {}
        if "owner" in inspect.signature(start_job).parameters:
            kwargs["owner"] = self
        self._job = start_job(
            work,
            on_progress=self._progress,
            on_done=self._done,
            on_error=lambda exc: set_status(
                self.status, f"compare failed: {error_text(exc)}", "error"
            ),
            on_cancelled=lambda _: set_status(self.status, "cancelled", "warn"),
            on_finished=self._finished,
            **kwargs,
        )

    def _trained_on(self, models: dict[str, Any], name: str, shape: tuple) -> list[str]:
        """Labels of the compared models fine-tuned on this image (same layer name and
        plane size in their training summary): their scores include their training data."""
        here = []
        for label, model in models.items():
            entry = self.state.entry_of(model)
            images = ((entry.summary or {}).get("trained_on") or []) if entry else []
            if any(
                im.get("name") == name and tuple(im.get("shape", ()))[-2:] == tuple(shape)
                for im in images
            ):
                here.append(label)
        return here

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _progress(self, items: list[Any]) -> None:
        if not alive(self):
            return
        for event in items:
            match event:
                case Compared(done, total, name):
                    set_status(self.status, f"{done}/{total}: {name} done")
                    self._bar(done / max(total, 1), f"{done}/{total}: {name} done")
                case _:
                    raise unexpected(event, "Compare")

    def _bar(self, fraction: float, text: str) -> None:
        self.progress.setValue(int(round(100 * fraction)))
        self.progress.setFormat(text)

    def _finished(self) -> None:
        if alive(self) and self.progress.value() < 100:  # cancelled or failed
            self._bar(0, "stopped")
        if alive(self):
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        self._job = None

    def _done(self, rows: list[Any]) -> None:
        if not alive(self):
            return
        self.rows = rows
        self._bar(1, "done")
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = (
                row.label,
                f"{row.f1:.3f}",
                f"{row.mean_iou:.3f}",
                "-" if row.ap is None else f"{row.ap:.3f}",
                f"{row.n_pred}/{row.n_gt}",
                f"{row.seconds:.2f}",
                f"{row.parameters / 1e6:.2f}M",
            )
            for c, text in enumerate(values):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()
        if rows:
            self.table.selectRow(0)
            best = rows[0]
            text = f"best: {best.label} (F1@0.5 {best.f1:.3f}, {best.n_gt} objects scored)"
            trained = getattr(self, "_trained_here", [])
            if trained:
                text += (
                    f"; {', '.join(trained)} trained on this image: "
                    "scores include training data, not a test"
                )
            set_status(self.status, text, "warn" if trained else "ok")

    # ---------------------------------------------------------------- selection
    def selected_row(self) -> Any:
        idx = self.table.currentRow()
        return self.rows[idx] if 0 <= idx < len(self.rows) else None

    def _selection_changed(self) -> None:
        on = self.selected_row() is not None
        self.use_button.setEnabled(on)
        self.show_button.setEnabled(on and getattr(self.selected_row(), "labels", None) is not None)

    def use_selected(self) -> None:
        """Make the selected row's model the current model of this viewer."""
        row = self.selected_row()
        if row is None:
            return
        model = getattr(row, "model", None)
        if model is None:
            return
        entry = self.state.entry_of(model)
        if entry is not None:
            self.state.select(entry)
        else:
            kind = "bundled" if isinstance(self._models.get(row.name), str) else "given"
            self.state.add_model(
                model, f"{row.name} (chosen in Compare)", kind=kind, label=row.name
            )
        note = (
            f" — UNet++ pruned to {row.output}: set level {row.level} in Predict"
            if (row.level is not None and not row.final)
            else ""
        )
        set_status(self.status, f"current model: {row.name}{note}", "ok")

    def show_selected(self) -> None:
        """Add the selected row's instance labels as a new layer."""
        row = self.selected_row()
        if row is None or getattr(row, "labels", None) is None:
            return
        layer = self.image_combo.layer()
        kwargs = {}
        if layer is not None:
            kwargs = {"scale": layer.scale[-2:], "translate": layer.translate[-2:]}
        self.viewer.add_labels(
            row.labels,
            name=f"compare {row.label} (F1 {row.f1:.2f})",
            metadata={"napari_unet_compare": row.label},
            **kwargs,
        )
