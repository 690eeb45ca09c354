"""Small Qt helpers shared by the widgets: layer combo boxes, output layers, status lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFrame,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

OUTPUT_KEY = "napari_unet_output"
"""``layer.metadata[OUTPUT_KEY] = (source layer unique id, kind)`` marks the plugin's layers."""


class Panel(QWidget):
    """A tool widget whose content scrolls, so any number of them fit a small window.

    Subclasses put their content into ``self.body`` (a :class:`QVBoxLayout` is
    ``self.body_layout``). ``on_closed()`` runs when napari closes the dock.
    """

    def __init__(self) -> None:
        super().__init__()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.body = QWidget()
        self.body_layout = QVBoxLayout(self.body)
        self.scroll.setWidget(self.body)
        outer.addWidget(self.scroll)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt)
        """As wide as the content needs (no horizontal clipping), any height (it scrolls)."""
        body = self.body.minimumSizeHint()
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        return QSize(body.width() + bar + 4, super().minimumSizeHint().height())

    def on_closed(self) -> None:
        """The dock was closed (its jobs are already dropped)."""


def tip(widget: QWidget, text: str) -> QWidget:
    """Set a tooltip (plain words for an ML term) and return the widget."""
    widget.setToolTip(text)
    return widget


def term(text: str, tooltip: str) -> QLabel:
    """A form row label with a tooltip that explains the term."""
    label = QLabel(text)
    label.setToolTip(tooltip)
    return label


def alive(widget: QWidget) -> bool:
    """False once Qt deleted the C++ side of ``widget`` (a closed dock widget)."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


class LayerCombo(QComboBox):
    """Layers of some types, kept in sync with the viewer; ``layer()`` is the layer object.

    Items store the layer object itself, so renaming or reordering layers never changes
    which layer is selected. ``optional`` adds a first "(none)" entry.
    """

    def __init__(
        self,
        viewer: Any,
        types: Sequence[str],
        *,
        optional: bool = False,
        predicate: Callable[[Any], bool] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer, self._types, self._optional = viewer, tuple(types), optional
        self._predicate = predicate
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        events.inserted.connect(self.refresh)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        events.inserted.connect(self._watch_names)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _watch_names(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)

    def _accepts(self, layer: Any) -> bool:
        if type(layer).__name__.lower() not in self._types:
            return False
        return self._predicate is None or bool(self._predicate(layer))

    def refresh(self, *_: Any) -> None:
        if not alive(self):
            return
        current = self.layer()
        layers = [lyr for lyr in self._viewer.layers if self._accepts(lyr)]
        self.blockSignals(True)
        self.clear()
        if self._optional:
            self.addItem("(none)", None)
        for layer in layers:
            self.addItem(layer.name, layer)
        index = -1
        if current is not None:
            index = next((i for i in range(self.count()) if self.itemData(i) is current), -1)
        if index < 0:
            active = self._viewer.layers.selection.active
            index = next((i for i in range(self.count()) if self.itemData(i) is active), -1)
        if index < 0 and self.count():
            # default: a user layer rather than one of ours
            own = [i for i in range(self.count()) if is_output(self.itemData(i))]
            index = next((i for i in range(self.count()) if i not in own), 0)
            if self._optional:
                index = 0
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if current is not self.layer():
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any:
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Any) -> None:
        for i in range(self.count()):
            if self.itemData(i) is layer:
                self.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not offered here")


def is_output(layer: Any) -> bool:
    return layer is not None and OUTPUT_KEY in getattr(layer, "metadata", {})


def output_key(source: Any, kind: str) -> tuple[str, str]:
    return (str(source.unique_id), kind)


def find_output(viewer: Any, key: tuple[str, str]) -> Any:
    """The plugin's newest layer for ``key`` (never a user layer), or None."""
    for layer in reversed(list(viewer.layers)):
        if tuple(layer.metadata.get(OUTPUT_KEY, ())) == tuple(key):
            return layer
    return None


def unique_name(viewer: Any, name: str, ignore: Any = None) -> str:
    names = {layer.name for layer in viewer.layers if layer is not ignore}
    if name not in names:
        return name
    n = 2
    while f"{name} ({n})" in names:
        n += 1
    return f"{name} ({n})"


def write_output(
    viewer: Any,
    key: tuple[str, str],
    layer_type: str,
    data: np.ndarray,
    *,
    name: str,
    scale: Sequence[float],
    translate: Sequence[float],
    metadata: dict[str, Any] | None = None,
    replace: bool = True,
    select: bool = False,
    **kwargs: Any,
) -> Any:
    """Add a new output layer, or (``replace``) the data of the plugin's own layer for ``key``.

    Results of predictions are added (``replace=False``): each run its own layer, earlier
    ones untouched; the weight map / side outputs of Inspect are refreshed in place. A user
    layer is never touched: if one has ``name``, the new layer gets a unique name. Once
    the user paints on an output labels layer it becomes theirs (see :func:`_adopt`).
    ``select``: make the layer visible and the only selected one.
    """
    meta = {OUTPUT_KEY: tuple(key), **(metadata or {})}
    old = find_output(viewer, key) if replace else None
    if (
        old is not None
        and type(old).__name__.lower() == layer_type
        and old.data.shape == data.shape
        and old.data.dtype == data.dtype
        and len(old.scale) == len(scale)
    ):
        old.metadata.update(meta)
        old.scale, old.translate = tuple(scale), tuple(translate)
        old.data = data
        if "contrast_limits" in kwargs and hasattr(old, "contrast_limits"):
            old.contrast_limits = kwargs["contrast_limits"]
        if old.name != name:
            old.name = unique_name(viewer, name, ignore=old)
        layer = old
    else:
        from napari.layers import Image, Labels

        cls = {"labels": Labels, "image": Image}[layer_type]
        layer = cls(
            data,
            name=unique_name(viewer, name, ignore=old),
            scale=tuple(scale),
            translate=tuple(translate),
            metadata=meta,
            **kwargs,
        )
        if layer_type == "labels":
            layer.events.paint.connect(_adopt)
        if old is not None:
            index = viewer.layers.index(old)
            viewer.layers.remove(old)
            viewer.layers.insert(index, layer)
        else:
            viewer.layers.append(layer)
    if select:
        layer.visible = True
        viewer.layers.selection.active = layer
    return layer


def copy_as_annotation(viewer: Any, layer: Any) -> Any:
    """A new, editable Labels layer with a copy of ``layer``'s labels (a prediction).

    The copy is the user's (not one of the plugin's outputs): correct it and train on it.
    The prediction itself stays as it was.
    """
    from napari.layers import Labels

    data = np.array(layer.data, dtype=np.uint32, copy=True)
    base = layer.name.split(" [")[0] if " [" in layer.name else layer.name
    new = Labels(
        data,
        name=unique_name(viewer, f"{base} annotation"),
        scale=tuple(layer.scale),
        translate=tuple(layer.translate),
        metadata={"napari_unet_annotation_from": layer.name},
    )
    viewer.layers.append(new)
    viewer.layers.selection.active = new
    new.mode = "paint"
    return new


def _adopt(event: Any) -> None:
    """The user edited one of our labels layers (e.g. corrected a prediction to train on
    it): it is theirs now, and the next run writes a new layer instead of replacing it."""
    layer = event.source
    if layer.metadata.pop(OUTPUT_KEY, None) is not None:
        layer.metadata["napari_unet_edited_output"] = True


def status_label() -> QLabel:
    label = QLabel("")
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    return label


def set_status(label: QLabel, text: str, kind: str = "info") -> None:
    colors = {"info": "", "ok": "color: #6c6;", "warn": "color: #e9a23b;", "error": "color: #f66;"}
    label.setStyleSheet(colors.get(kind, ""))
    label.setText(text)


NOTE_CHARS = 60
"""The longest note a progress bar shows (the status line below it has the whole text)."""


def shorten(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: a trailing "(…)" aside is dropped first,
    then the text is cut after a whole word with "…" (never inside a word)."""
    if len(text) <= limit:
        return text
    core = text.removesuffix("…")
    if core.endswith(")") and " (" in core:
        core = core[: core.rindex(" (")]
        if len(core) + 1 <= limit:
            return core + "…"
    cut = core[: limit - 1]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


class RunControls:
    """A progress bar, a Run button and a Cancel button."""

    def __init__(self, run_text: str) -> None:
        self.run = QPushButton(run_text)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)

    def busy(self, busy: bool) -> None:
        self.run.setEnabled(not busy)
        self.cancel.setEnabled(busy)

    def note(self, text: str) -> None:
        """Say what the job is doing in the bar (value unchanged): slow steps before the
        first tile, e.g. the one-off OpenVINO export of new weights."""
        self.progress.setFormat(shorten(text, NOTE_CHARS))

    def fraction(self, value: float, text: str | None = None) -> None:
        self.progress.setValue(int(round(100 * max(0.0, min(1.0, value)))))
        if text is not None:
            self.progress.setFormat(text)


class ChannelPicker(QWidget):
    """Which axis of an image layer holds channels, and which channel a model reads.

    Shown only for layers where it matters: a non-RGB image with an axis before Y, X
    ("Z planes / time" or "channels", guessed from axis labels and size) and images
    whose channel count differs from what the model reads (pick one; RGB: luminance).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        from qtpy.QtWidgets import QHBoxLayout

        super().__init__(parent)
        self.axis = QComboBox()
        self.axis.addItems(["Z planes / time points", "channels"])
        self.axis.setToolTip(
            "What the first axis of this image is: separate planes (each is segmented) "
            "or colour channels of one image"
        )
        self.channel = QComboBox()
        self.channel.setToolTip("The channel the model reads (the model takes fewer channels)")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.axis)
        row.addWidget(self.channel)
        self._layer: Any = None
        self._in_channels = 1
        self.axis.currentIndexChanged.connect(self._fill_channels)
        self.setVisible(False)

    def update_for(self, layer: Any, in_channels: int) -> None:
        from ._geometry import guess_channels, layer_array

        same = layer is self._layer and in_channels == self._in_channels
        self._layer, self._in_channels = layer, in_channels
        if same:
            return
        if layer is None:
            self.setVisible(False)
            return
        shape = layer_array(layer).shape
        ask_axis = not layer.rgb and len(shape) >= 3
        self.axis.blockSignals(True)
        self.axis.setVisible(ask_axis)
        if ask_axis:
            self.axis.setItemText(1, f"{shape[-3]} channels")
            self.axis.setItemText(0, f"{shape[-3]} Z planes / time points")
            self.axis.setCurrentIndex(1 if guess_channels(layer) else 0)
        self.axis.blockSignals(False)
        self._fill_channels()

    def _fill_channels(self, *_: Any) -> None:
        from ._geometry import layer_array

        layer = self._layer
        self.channel.clear()
        if layer is None:
            return
        shape = layer_array(layer).shape
        n = shape[-1] if layer.rgb else shape[-3] if self.channels() else 1
        if n > 1:
            if layer.rgb and self._in_channels == 1:
                self.channel.addItem("luminance", None)
            elif n == self._in_channels:
                self.channel.addItem(f"all {n} channels", None)
            if self._in_channels == 1:
                for c in range(n):
                    self.channel.addItem(f"channel {c + 1}", c)
        self.channel.setVisible(self.channel.count() > 0)
        self.setVisible(self.axis.isVisibleTo(self) or self.channel.count() > 0)

    def channels(self) -> bool | None:
        """True/False: the axis before Y, X is channels/planes; None: not asked."""
        if self._layer is None or not self.axis.isVisibleTo(self):
            return None
        return self.axis.currentIndex() == 1

    def channel_index(self) -> int | None:
        return self.channel.currentData() if self.channel.count() else None
