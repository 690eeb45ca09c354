"""The model the widgets share, one state per napari viewer.

Model, Train and Inspect write it, Predict and the Segment menu read it. No torch or
engine import here: the default model is loaded in a thread worker the first time a
widget asks for it (:meth:`ModelState.ensure_model`).
"""

from __future__ import annotations

import weakref
from typing import Any

from psygnal import Signal

# weak keys: a closed viewer takes its state with it
_STATES: weakref.WeakKeyDictionary[Any, ModelState] = weakref.WeakKeyDictionary()


class ModelState:
    """The current model of one viewer, its provenance and the compute device.

    ``model_changed`` is emitted (on the GUI thread) with the new model whenever
    :meth:`set_model` is called; ``device_changed`` with the device name.
    """

    model_changed = Signal(object)
    device_changed = Signal(str)
    loading_changed = Signal(bool)

    def __init__(self) -> None:
        self.model: Any = None
        self.source: str = ""
        """Where the model came from: "bundled default", a checkpoint path, "trained …"."""
        self.untrained: bool = False
        self.device: str = "auto"
        self.error: str = ""
        self._loader: Any = None

    # ------------------------------------------------------------------ model
    def set_model(self, model: Any, source: str, *, untrained: bool = False) -> None:
        self.model, self.source, self.untrained = model, source, bool(untrained)
        self.error = ""
        self.model_changed.emit(model)

    def set_device(self, device: str) -> None:
        if device != self.device:
            self.device = device
            self.device_changed.emit(device)

    @property
    def loading(self) -> bool:
        return self._loader is not None

    def ensure_model(self) -> None:
        """Start loading the default model in a worker unless a model exists or is loading."""
        if self.model is not None or self._loader is not None:
            return
        from ._jobs import start_job

        def done(result: tuple[Any, str, bool]) -> None:
            if self.model is None:  # a model set meanwhile (tests, Build, Load) wins
                self.set_model(*result[:2], untrained=result[2])

        def failed(exc: BaseException) -> None:
            self.error = f"could not load a model: {exc}"
            self.model_changed.emit(self.model)

        def finished() -> None:
            self._loader = None
            self.loading_changed.emit(False)

        self._loader = start_job(
            lambda report, cancel: load_default_or_fallback(),
            on_done=done,
            on_error=failed,
            on_finished=finished,
        )
        self.loading_changed.emit(True)


def load_default_or_fallback() -> tuple[Any, str, bool]:
    """(model, source, untrained): the bundled model, else an untrained 3-class U-Net.

    Runs in a worker (imports torch); also computes ``model.info`` (receptive field)."""
    from ..demo import default_or_fallback

    return default_or_fallback()


def get_state(viewer: Any) -> ModelState:
    """The :class:`ModelState` of ``viewer`` (created on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = ModelState()
    return state
