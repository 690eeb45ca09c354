"""Model widget: build a variant, load/save a checkpoint, and show what the model is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._common import Panel, alive, set_status, status_label, term
from ._jobs import Job, error_text, start_job
from ._model_info import TERMS, describe, new_model_defaults, training_text, variant_defaults
from ._state import ModelEntry, get_state, model_line

WIDTH_KEYS = ("base_channels", "embed_dim")
DEPTH_KEYS = ("depth",)
CHECKPOINT_FILTER = "napari-unet checkpoints (*.safetensors)"
LOAD_FILTER = "napari-unet checkpoints or bioimage.io packages (*.safetensors *.zip)"
PACKAGE_FILTER = "bioimage.io model packages (*.zip)"


class ModelWidget(Panel):
    """The model list every napari-unet widget uses: pick, load, save, build."""

    INFO_ROWS = (
        "variant",
        "config",
        "channels in → classes",
        "parameters",
        "halo",
        "size divisor",
        "receptive field",
        "deep-supervision outputs",
        "exact tiling",
        "UNet++ levels",
        "training",
        "device",
        "runtime",
    )

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self._info_job: Job | None = None
        self._defaults: dict[str, dict[str, Any]] = {}

        self.header = status_label()
        self.warning = QLabel("")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #e9a23b; font-weight: bold;")
        self.warning.setVisible(False)

        self.models = QListWidget()
        self.models.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.models.setToolTip(
            "Every model of this viewer: the bundled ones, those trained or built here and "
            "loaded checkpoints. Click one to use it; nothing is discarded."
        )
        self.models.setMinimumHeight(70)
        self.models.setMaximumHeight(130)
        self.models.setWordWrap(True)
        self.models.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip(
            "Add a .safetensors checkpoint or a bioimage.io model package (.zip) to the list"
        )
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the selected model (with its training summary)")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip(
            "Write the selected model as a bioimage.io model package (.zip) that Fiji "
            "(deepImageJ), QuPath, ilastik and bioimageio.core run"
        )
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Take the selected model off the list (bundled ones stay)")

        self.variant = QComboBox()
        self.variant.setToolTip("Network architecture from the napari-unet registry")
        self.width = QSpinBox()
        self.width.setRange(1, 1024)
        self.width.setToolTip(
            "Base width: feature channels of the first level (more = bigger, slower network)"
        )
        self.depth = QSpinBox()
        self.depth.setRange(1, 8)
        self.depth.setToolTip("Depth: how many times the network halves the image")
        self.in_channels = QSpinBox()
        self.in_channels.setRange(1, 16)
        self.in_channels.setValue(1)
        self.in_channels.setToolTip("Image channels the network reads (1 = greyscale)")
        self.classes = QSpinBox()
        self.classes.setRange(1, 64)
        self.classes.setValue(3)
        self.classes.setToolTip(
            "Classes per pixel; 3 = background / interior / boundary, which separates "
            "touching objects (instance segmentation)"
        )
        self.build_button = QPushButton("Build (untrained)")
        self.build_button.setToolTip(
            "Add an untrained network of this kind to the list; train it in the Train "
            "section. The other models stay."
        )

        models_box = QGroupBox("Models")
        mlayout = QVBoxLayout(models_box)
        mlayout.addWidget(self.models)
        files = QHBoxLayout()
        files.addWidget(self.load_button)
        files.addWidget(self.save_button)
        files.addWidget(self.export_button)
        files.addWidget(self.remove_button)
        mlayout.addLayout(files)

        build_box = QGroupBox("New model")
        form = QFormLayout(build_box)
        form.addRow(term("variant", self.variant.toolTip()), self.variant)
        form.addRow(term("base width", self.width.toolTip()), self.width)
        form.addRow(term("depth", self.depth.toolTip()), self.depth)
        form.addRow(term("input channels", self.in_channels.toolTip()), self.in_channels)
        form.addRow(term("classes", self.classes.toolTip()), self.classes)
        form.addRow(self.build_button)

        info_box = QGroupBox("Selected model")
        self.info_form = QFormLayout(info_box)
        self.info: dict[str, QLabel] = {}
        for key in self.INFO_ROWS:
            label = QLabel("—")
            label.setWordWrap(True)
            label.setToolTip(TERMS.get(key, ""))
            self.info[key] = label
            self.info_form.addRow(term(key, TERMS.get(key, "")), label)

        self.status = status_label()
        layout = self.body_layout
        layout.addWidget(self.header)
        layout.addWidget(self.warning)
        layout.addWidget(models_box)
        layout.addWidget(self.status)
        layout.addWidget(info_box)
        layout.addWidget(build_box)
        layout.addStretch(1)

        self.variant.currentTextChanged.connect(self._on_variant)
        self.build_button.clicked.connect(self.build)
        self.load_button.clicked.connect(self._ask_load)
        self.save_button.clicked.connect(self._ask_save)
        self.export_button.clicked.connect(self._ask_export)
        self.remove_button.clicked.connect(self._remove_selected)
        self.models.currentRowChanged.connect(self._on_row)
        self.state.models_changed.connect(self._fill_list)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self.state.device_changed.connect(self._on_model_changed)
        self._set_engine_ready(False)
        self._start_engine()
        self._fill_list()
        self._on_model_changed()
        self.state.ensure_model()

    # ------------------------------------------------------------- engine
    def _start_engine(self) -> None:
        """List variants (imports torch) in a worker so napari stays responsive."""

        def work(report: Any, cancel: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
            from ..models import list_models

            names = list_models()
            return names, {n: variant_defaults(n) for n in names}

        def done(result: tuple[list[str], dict[str, dict[str, Any]]]) -> None:
            if not alive(self):
                return
            names, self._defaults = result
            self.variant.blockSignals(True)
            self.variant.clear()
            self.variant.addItems(names)
            self.variant.blockSignals(False)
            self.variant.setCurrentText("unet")
            self._on_variant(self.variant.currentText())
            self._set_engine_ready(True)

        start_job(work, owner=self, on_done=done, on_error=self._on_error, name="list variants")

    def _set_engine_ready(self, ready: bool) -> None:
        for w in (self.variant, self.width, self.depth, self.build_button, self.load_button):
            w.setEnabled(ready)
        self._update_buttons()
        if ready:
            self._on_variant(self.variant.currentText())

    def _update_buttons(self) -> None:
        entry = self.selected_entry()
        ready = self.variant.isEnabled()
        self.save_button.setEnabled(ready and entry is not None and entry.model is not None)
        self.remove_button.setEnabled(entry is not None and entry.kind != "bundled")

    def new_model_defaults(self, name: str) -> dict[str, Any]:
        return new_model_defaults(self.state, self._defaults.get(name, {}), name)

    def _on_variant(self, name: str) -> None:
        defaults = self.new_model_defaults(name) if name else {}
        width_key = next((k for k in WIDTH_KEYS if k in defaults), None)
        depth_key = next((k for k in DEPTH_KEYS if k in defaults), None)
        self.width.setEnabled(width_key is not None and self.variant.isEnabled())
        self.depth.setEnabled(depth_key is not None and self.variant.isEnabled())
        if width_key:
            self.width.setValue(int(defaults[width_key]))
        if depth_key:
            self.depth.setValue(int(defaults[depth_key]))

    def config(self) -> dict[str, Any]:
        """Config for :func:`build_model` from the spin boxes."""
        defaults = self._defaults.get(self.variant.currentText(), {})
        cfg: dict[str, Any] = {}
        width_key = next((k for k in WIDTH_KEYS if k in defaults), None)
        if width_key:
            cfg[width_key] = self.width.value()
        if any(k in defaults for k in DEPTH_KEYS):
            cfg["depth"] = self.depth.value()
        return cfg

    # ---------------------------------------------------------------- list
    def _fill_list(self, *_: Any) -> None:
        if not alive(self):
            return
        self.models.blockSignals(True)
        self.models.clear()
        for entry in self.state.entries:
            tip = training_text(entry.summary)
            text = entry.describe()
            if entry.kind == "trained" and tip:
                text = f"{entry.label} — trained here: {tip}"
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, entry)
            item.setToolTip(f"{entry.source}\n{tip}" if tip else entry.source)
            if entry.untrained:
                item.setForeground(Qt.GlobalColor.darkYellow)
            self.models.addItem(item)
        self._select_current_row()
        self.models.blockSignals(False)
        self._update_buttons()

    def _select_current_row(self) -> None:
        for row in range(self.models.count()):
            if self.models.item(row).data(Qt.ItemDataRole.UserRole) is self.state.current:
                self.models.setCurrentRow(row)
                f = self.models.item(row).font()
                f.setBold(True)
                self.models.item(row).setFont(f)
            else:
                f = self.models.item(row).font()
                f.setBold(False)
                self.models.item(row).setFont(f)

    def selected_entry(self) -> ModelEntry | None:
        item = self.models.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def _on_row(self, row: int) -> None:
        entry = self.selected_entry()
        if entry is not None and entry is not self.state.current:
            self.select(entry)
        self._update_buttons()

    def select(self, entry: ModelEntry) -> None:
        """Use ``entry`` (instant; a bundled model is loaded the first time)."""
        if entry.model is None:
            set_status(self.status, f"Loading {entry.label}…")
        self.state.select(entry)

    def _remove_selected(self) -> None:
        entry = self.selected_entry()
        if entry is not None:
            self.state.remove(entry)

    # -------------------------------------------------------------- display
    def _warning_text(self) -> str:
        entry = self.state.current
        if entry is None or not entry.untrained:
            return ""
        if entry.kind == "fallback":
            return (
                "⚠ No bundled model is installed, so this U-Net is UNTRAINED: its predictions "
                "are noise. Train it (Train section) or load a checkpoint."
            )
        return (
            f"⚠ {entry.label} is UNTRAINED ({entry.source}): its predictions are noise. "
            "Train it (Train section) or pick a trained model in the list."
        )

    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state, short=True)
        set_status(self.header, text, kind)
        if self.state.error:
            set_status(self.status, self.state.error, "error")
        elif self.status.text().startswith("Loading ") and self.state.model is not None:
            set_status(self.status, "")
        warning = self._warning_text()
        self.warning.setText(warning)
        self.warning.setVisible(bool(warning))
        self.models.blockSignals(True)
        self._select_current_row()
        self.models.blockSignals(False)
        self._update_buttons()
        model = self.state.model
        if model is None:
            for label in self.info.values():
                label.setText("—")
            return
        device = self.state.device
        self._info_job = start_job(
            lambda report, cancel: describe(model, device),
            owner=self,
            on_done=lambda rows: self._show_info(model, rows),
            on_error=self._on_error,
            name="describe model",
        )

    def _show_info(self, model: Any, rows: dict[str, str]) -> None:
        if not alive(self) or model is not self.state.model:
            return
        for key, label in self.info.items():
            label.setText(rows.get(key, "—"))
            visible = key in rows
            label.setVisible(visible)
            name = self.info_form.labelForField(label)
            if name is not None:
                name.setVisible(visible)

    def info_text(self) -> dict[str, str]:
        return {k: v.text() for k, v in self.info.items()}

    # --------------------------------------------------------------- actions
    def _run(self, work: Any, done: Any, what: str) -> Job | None:
        if self.job is not None and self.job.running:
            set_status(self.status, "Busy; wait for the current action to finish.", "warn")
            return None
        for w in (self.build_button, self.load_button, self.save_button):
            w.setEnabled(False)
        set_status(self.status, what + "…")

        def finished() -> None:
            if alive(self):
                self._set_engine_ready(True)

        self.job = start_job(
            work,
            owner=self,
            on_done=done,
            on_error=self._on_error,
            on_finished=finished,
            name=what,
        )
        return self.job

    def build(self) -> Job | None:
        """Build an untrained model of the selected variant and add it to the list."""
        name, cfg = self.variant.currentText(), self.config()
        in_ch, classes = self.in_channels.value(), self.classes.value()

        def work(report: Any, cancel: Any) -> Any:
            from ..models import build_model

            model = build_model(name, in_ch, classes, **cfg)
            model.info  # noqa: B018  (receptive-field probe off the GUI thread)
            return model

        def done(model: Any) -> None:
            entry = self.state.add_model(model, "built here", kind="built", untrained=True)
            set_status(
                self.status,
                f"Added {entry.label} (untrained) to the list; the other models stay.",
                "ok",
            )

        return self._run(work, done, f"Building {name}")

    def load_checkpoint(self, path: str | Path) -> Job | None:
        path = Path(path)
        if path.suffix.lower() not in (".safetensors", ".zip"):
            set_status(
                self.status,
                f"{path.name}: load a .safetensors checkpoint or a bioimage.io package (.zip).",
                "error",
            )
            return None

        def work(report: Any, cancel: Any) -> Any:
            from ..loader import load_model  # a checkpoint or a bioimage.io package

            model = load_model(path)
            model.info  # noqa: B018
            return model

        def done(model: Any) -> None:
            kind = "package" if path.suffix.lower() == ".zip" else "checkpoint"
            self.state.add_model(model, f"{kind} {path.name}", kind="checkpoint")
            set_status(self.status, f"Loaded {path}.", "ok")

        return self._run(work, done, f"Loading {path.name}")

    def save_checkpoint(self, path: str | Path, entry: ModelEntry | None = None) -> Job | None:
        entry = entry or self.selected_entry() or self.state.current
        model = entry.model if entry is not None else None
        if model is None:
            set_status(self.status, "No model to save.", "warn")
            return None
        path = Path(path)
        if path.suffix == "":
            path = path.with_suffix(".safetensors")
        training = model.training_summary

        def work(report: Any, cancel: Any) -> Path:
            from ..checkpoint import save_model

            return save_model(model, path, training=training)

        def done(written: Path) -> None:
            set_status(self.status, f"Saved {written}.", "ok")

        return self._run(work, done, f"Saving {path.name}")

    def export_package(self, path: str | Path, entry: ModelEntry | None = None) -> Job | None:
        """Write the selected model as a bioimage.io package (in a worker)."""
        entry = entry or self.selected_entry() or self.state.current
        model = entry.model if entry is not None else None
        if model is None:
            set_status(self.status, "No model to export.", "warn")
            return None
        path = Path(path)
        if path.suffix.lower() != ".zip":
            path = path.with_name(path.name + ".zip")

        def work(report: Any, cancel: Any) -> Path:
            from ..bioimageio import export_bioimageio

            return export_bioimageio(model, path, overwrite=path.exists())

        def done(written: Path) -> None:
            set_status(self.status, f"Exported {written} (bioimage.io model package).", "ok")

        return self._run(work, done, f"Exporting {path.name}")

    def _ask_export(self) -> None:
        entry = self.selected_entry()
        name = f"{entry.variant}.zip" if entry is not None else ""
        path, _ = QFileDialog.getSaveFileName(self, "Export to bioimage.io", name, PACKAGE_FILTER)
        if path:
            self.export_package(path, entry)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", LOAD_FILTER)
        if path:
            self.load_checkpoint(path)

    def _ask_save(self) -> None:
        entry = self.selected_entry()
        name = f"{entry.variant}.safetensors" if entry is not None else ""
        path, _ = QFileDialog.getSaveFileName(self, "Save checkpoint", name, CHECKPOINT_FILTER)
        if path:
            self.save_checkpoint(path, entry)

    def _on_error(self, exc: BaseException) -> None:
        if alive(self):
            set_status(self.status, error_text(exc), "error")
