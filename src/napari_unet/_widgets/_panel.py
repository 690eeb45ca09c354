"""One dock for the whole cycle: Model, Predict, Train and Inspect as tabs.

Plugins → napari-unet → "All tools (one panel)". Each tab is the same widget that is also
available as its own dock; every tab scrolls, so the panel fits a laptop window.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._common import Panel
from ._compare import CompareWidget
from ._inspect import InspectWidget
from ._jobs import watch_owner
from ._model import ModelWidget
from ._predict import PredictWidget
from ._train import TrainWidget

TAB_TIPS = {
    "Model": "The model list: bundled, trained here, loaded; build a new one",
    "Predict": "Segment an image layer with the selected model (adds new layers)",
    "Train": "Fine-tune on your annotations (every rectangle of a Shapes layer)",
    "Inspect": "What training emphasises (weight map) and what each depth predicts",
    "Compare": "Score models against an annotation",
}


class CompareDock(CompareWidget):
    """The Compare widget as its own dock, its content in a scroll area (so it fits)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        make_scrolling(self)


def make_scrolling(widget: QWidget) -> QWidget:
    """Move ``widget``'s content into a vertical scroll area inside it (same attributes)."""
    body = QWidget()
    body.setLayout(widget.layout())  # re-parents the layout and its widgets to ``body``
    layout = QVBoxLayout(widget)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(_scrolling(body))
    return widget


class UNetPanel(QWidget):
    """All napari-unet tools in one dock widget (tabs)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.setUsesScrollButtons(True)
        self.widgets: dict[str, QWidget] = {
            "Model": ModelWidget(napari_viewer),
            "Predict": PredictWidget(napari_viewer),
            "Train": TrainWidget(napari_viewer),
            "Inspect": InspectWidget(napari_viewer),
        }
        self.widgets["Compare"] = CompareWidget(napari_viewer)
        for name, widget in self.widgets.items():
            page = widget if isinstance(widget, Panel) else _scrolling(widget)
            index = self.tabs.addTab(page, name)
            self.tabs.setTabToolTip(index, TAB_TIPS.get(name, ""))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.show_tab("Predict")
        watch_owner(self)  # closing this dock drops the jobs of every tab

    def show_tab(self, name: str) -> QWidget:
        widget = self.widgets[name]
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i) == name:
                self.tabs.setCurrentIndex(i)
        return widget

    def __getitem__(self, name: str) -> QWidget:
        return self.widgets[name]


def _scrolling(widget: QWidget) -> QScrollArea:
    """``widget`` in a vertical scroll area (tabs from elsewhere that do not scroll)."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area
