"""Model widget: build a variant, load/save a checkpoint, and show what the model is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import alive, set_status, status_label
from ._jobs import Job, error_text, start_job
from ._predict import model_line
from ._state import get_state

WIDTH_KEYS = ("base_channels", "embed_dim")
DEPTH_KEYS = ("depth",)
CHECKPOINT_FILTER = "napari-unet checkpoints (*.safetensors)"


def variant_defaults(name: str) -> dict[str, Any]:
    """Config keys and defaults a variant accepts (engine import: call off start-up)."""
    from ..models import config_defaults

    return config_defaults(name)


def describe(model: Any, device: str) -> dict[str, str]:
    """Rows of the info panel (engine import; run in a worker: measures the RF once)."""
    from ..postprocess import default_class_names
    from ..predict import select_device

    info = model.info
    try:
        _, why = select_device(device)
    except ValueError as exc:
        why = f"unavailable: {exc}"
    classes = getattr(model, "class_names", None) or default_class_names(model.num_classes)
    rows = {
        "variant": model.name,
        "config": ", ".join(f"{k}={v}" for k, v in model.config.items()),
        "channels in → classes": f"{model.in_channels} → {model.num_classes} ({', '.join(classes)})",
        "parameters": f"{info.parameters:,}",
        "halo": f"{info.halo} px",
        "size divisor": str(info.size_divisor),
        "receptive field": f"radius {info.receptive_field} px",
        "deep-supervision outputs": str(info.deep_supervision_outputs),
        "exact tiling": "yes" if info.tile_exact else "no (Gaussian-blended tiles)",
        "device": why,
    }
    if hasattr(model, "level_parameters"):
        rows["UNet++ levels"] = ", ".join(
            f"L{L}: {model.level_parameters(L):,}" for L in range(1, model.depth + 1)
        )
    return rows


class ModelWidget(QWidget):
    """Choose the model every napari-unet widget uses."""

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
        "device",
    )

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: Job | None = None
        self._info_job: Job | None = None
        self._defaults: dict[str, dict[str, Any]] = {}

        self.header = status_label()
        self.warning = QLabel(
            "⚠ This model is UNTRAINED (the bundled model is missing): its predictions are "
            "noise. Train it in the Train widget or load a checkpoint."
        )
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #e9a23b; font-weight: bold;")
        self.warning.setVisible(False)

        self.variant = QComboBox()
        self.variant.setToolTip("Model variant from the napari-unet registry")
        self.width = QSpinBox()
        self.width.setRange(1, 1024)
        self.width.setToolTip("Base width: channels of the first level (embed_dim for Swin-UNet)")
        self.depth = QSpinBox()
        self.depth.setRange(1, 8)
        self.depth.setToolTip("Number of down-sampling steps")
        self.in_channels = QSpinBox()
        self.in_channels.setRange(1, 16)
        self.in_channels.setValue(1)
        self.classes = QSpinBox()
        self.classes.setRange(1, 64)
        self.classes.setValue(3)
        self.classes.setToolTip("3 = background / interior / boundary (instance segmentation)")
        self.build_button = QPushButton("Build")
        self.build_button.setToolTip("Build an untrained model of this variant")
        self.load_button = QPushButton("Load checkpoint…")
        self.save_button = QPushButton("Save…")

        build_box = QGroupBox("New model")
        form = QFormLayout(build_box)
        form.addRow("variant", self.variant)
        form.addRow("base width", self.width)
        form.addRow("depth", self.depth)
        form.addRow("input channels", self.in_channels)
        form.addRow("classes", self.classes)
        form.addRow(self.build_button)

        info_box = QGroupBox("Current model")
        self.info_form = QFormLayout(info_box)
        self.info: dict[str, QLabel] = {}
        for key in self.INFO_ROWS:
            label = QLabel("—")
            label.setWordWrap(True)
            self.info[key] = label
            self.info_form.addRow(key, label)

        files = QHBoxLayout()
        files.addWidget(self.load_button)
        files.addWidget(self.save_button)
        self.status = status_label()

        layout = QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(self.warning)
        layout.addWidget(info_box)
        layout.addLayout(files)
        layout.addWidget(build_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.variant.currentTextChanged.connect(self._on_variant)
        self.build_button.clicked.connect(self.build)
        self.load_button.clicked.connect(self._ask_load)
        self.save_button.clicked.connect(self._ask_save)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.loading_changed.connect(self._on_model_changed)
        self.state.device_changed.connect(self._on_model_changed)
        self._set_engine_ready(False)
        self._start_engine()
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

        start_job(work, on_done=done, on_error=self._on_error)

    def _set_engine_ready(self, ready: bool) -> None:
        for w in (self.variant, self.width, self.depth, self.build_button, self.load_button):
            w.setEnabled(ready)
        self.save_button.setEnabled(ready and self.state.model is not None)
        if ready:
            self._on_variant(self.variant.currentText())

    def _on_variant(self, name: str) -> None:
        defaults = self._defaults.get(name, {})
        width_key = next((k for k in WIDTH_KEYS if k in defaults), None)
        depth_key = next((k for k in DEPTH_KEYS if k in defaults), None)
        self.width.setEnabled(width_key is not None)
        self.depth.setEnabled(depth_key is not None)
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

    # -------------------------------------------------------------- display
    def _on_model_changed(self, *_: Any) -> None:
        if not alive(self):
            return
        text, kind = model_line(self.state, short=True)
        set_status(self.header, text, kind)
        if self.state.error:
            set_status(self.status, self.state.error, "error")
        self.warning.setVisible(self.state.model is not None and self.state.untrained)
        self.save_button.setEnabled(self.state.model is not None and self.variant.isEnabled())
        model = self.state.model
        if model is None:
            for label in self.info.values():
                label.setText("—")
            return
        device = self.state.device
        self._info_job = start_job(
            lambda report, cancel: describe(model, device),
            on_done=lambda rows: self._show_info(model, rows),
            on_error=self._on_error,
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

        self.job = start_job(work, on_done=done, on_error=self._on_error, on_finished=finished)
        return self.job

    def build(self) -> Job | None:
        """Build an untrained model of the selected variant and make it current."""
        name, cfg = self.variant.currentText(), self.config()
        in_ch, classes = self.in_channels.value(), self.classes.value()

        def work(report: Any, cancel: Any) -> Any:
            from ..models import build_model

            model = build_model(name, in_ch, classes, **cfg)
            model.info  # noqa: B018  (receptive-field probe off the GUI thread)
            return model

        def done(model: Any) -> None:
            self.state.set_model(model, "built here (untrained)", untrained=True)
            set_status(self.status, f"Built an untrained {model.name}.", "ok")

        return self._run(work, done, f"Building {name}")

    def load_checkpoint(self, path: str | Path) -> Job | None:
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            set_status(self.status, f"{path.name}: only .safetensors checkpoints load.", "error")
            return None

        def work(report: Any, cancel: Any) -> Any:
            from ..checkpoint import load_model

            model = load_model(path)
            model.info  # noqa: B018
            return model

        def done(model: Any) -> None:
            self.state.set_model(model, f"checkpoint {path.name}")
            set_status(self.status, f"Loaded {path}.", "ok")

        return self._run(work, done, f"Loading {path.name}")

    def save_checkpoint(self, path: str | Path) -> Job | None:
        model = self.state.model
        if model is None:
            set_status(self.status, "No model to save.", "warn")
            return None
        path = Path(path)
        if path.suffix == "":
            path = path.with_suffix(".safetensors")
        training = getattr(model, "training_summary", None)

        def work(report: Any, cancel: Any) -> Path:
            from ..checkpoint import save_model

            return save_model(model, path, training=training)

        def done(written: Path) -> None:
            set_status(self.status, f"Saved {written}.", "ok")

        return self._run(work, done, f"Saving {path.name}")

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load checkpoint", "", CHECKPOINT_FILTER)
        if path:
            self.load_checkpoint(path)

    def _ask_save(self) -> None:
        name = f"{self.state.model.name}.safetensors" if self.state.model is not None else ""
        path, _ = QFileDialog.getSaveFileName(self, "Save checkpoint", name, CHECKPOINT_FILTER)
        if path:
            self.save_checkpoint(path)

    def _on_error(self, exc: BaseException) -> None:
        if alive(self):
            set_status(self.status, error_text(exc), "error")
