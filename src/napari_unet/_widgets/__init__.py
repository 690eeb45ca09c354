"""napari dock widgets of napari-unet: the one panel (tabs), Model, Predict, Inspect, Train.

Thin by design: read layers, run the engine in a thread worker, write new layers. This
package imports Qt and napari but never torch or the engine at import time, so napari
starts fast; the engine is imported inside the workers.
"""

from ._inspect import InspectWidget
from ._model import ModelWidget
from ._panel import UNetPanel
from ._predict import PredictWidget
from ._state import ModelEntry, ModelState, get_state
from ._train import TrainWidget

__all__ = [
    "InspectWidget",
    "ModelEntry",
    "ModelState",
    "ModelWidget",
    "PredictWidget",
    "TrainWidget",
    "UNetPanel",
    "get_state",
]
