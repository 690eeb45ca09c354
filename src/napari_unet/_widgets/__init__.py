"""napari dock widgets of napari-unet: Model, Predict, Inspect, Train.

Thin by design: read layers, run the engine in a thread worker, write new layers. This
package imports Qt and napari but never torch or the engine at import time, so napari
starts fast; the engine is imported inside the workers.
"""

from ._inspect import InspectWidget
from ._model import ModelWidget
from ._predict import PredictWidget
from ._state import ModelState, get_state
from ._train import TrainWidget

__all__ = [
    "InspectWidget",
    "ModelState",
    "ModelWidget",
    "PredictWidget",
    "TrainWidget",
    "get_state",
]
