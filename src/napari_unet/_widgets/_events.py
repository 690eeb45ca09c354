"""The messages of the widgets' job bridge: what a worker reports and how a job ends.

A worker reports :class:`Event` instances only (``report(Progress(3, 12))``); the
reporter refuses anything else at once (:func:`check`), and every widget's progress
handler dispatches on the type and raises :class:`UnknownEvent` for a type it does not
expect (:func:`unexpected`), so a mistyped message fails loudly instead of being
skipped. The engine's own callbacks are converted at the bridge: ``train(callback=)``
dicts by :func:`train_event`, ``predict(progress=)`` pairs by building :class:`Progress`.

A job ends with one :class:`Outcome`: :class:`Finished`, :class:`Failed` or
:class:`Stopped` (cancelled).

No Qt, no engine import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnknownEvent(TypeError):
    """A worker reported something that is not an :class:`Event`, or a handler got an
    event type it does not handle."""


@dataclass(frozen=True)
class Event:
    """Base of everything a worker may report."""


# ------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class Stage(Event):
    """A stage starts (``"predicting on CPU (requested)"``, ``"all outputs"``)."""

    text: str


@dataclass(frozen=True)
class Progress(Event):
    """The network: ``done`` of ``total`` tiles (batches of tiles) computed."""

    done: int
    total: int


@dataclass(frozen=True)
class PostProgress(Event):
    """Post-processing: ``done`` of ``total`` planes turned into labels."""

    done: int
    total: int


@dataclass(frozen=True)
class ModelLoaded(Event):
    """The worker loaded the default model itself (none was loaded when it started)."""

    model: Any
    source: str
    untrained: bool


# --------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainStarted(Event):
    """Training starts: what went in (a ``TrainingSummary``)."""

    summary: Any


@dataclass(frozen=True)
class Step(Event):
    """One optimiser step done."""

    step: int
    loss: float
    fraction: float
    elapsed: float
    total_steps: int | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class Epoch(Event):
    """One epoch done, with its validation score (``val_f1`` None: nothing scored)."""

    epoch: int
    step: int | None = None
    loss: float | None = None
    val_f1: float | None = None


# ---------------------------------------------------------------------- compare
@dataclass(frozen=True)
class Compared(Event):
    """``done`` of ``total`` models scored, the last one ``name``."""

    done: int
    total: int
    name: str


# --------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """How a job ended (delivered once, on the GUI thread)."""


@dataclass(frozen=True)
class Finished(Outcome):
    result: Any


@dataclass(frozen=True)
class Failed(Outcome):
    error: BaseException


@dataclass(frozen=True)
class Stopped(Outcome):
    """Cancelled; ``result`` is what the engine returned anyway (None when it raised)."""

    result: Any = None


# ---------------------------------------------------------------------- helpers
def check(item: Any) -> Event:
    """``item`` if it is an :class:`Event`, else :class:`UnknownEvent` (in the worker)."""
    if not isinstance(item, Event):
        raise UnknownEvent(f"a job reported {item!r}, not a napari-unet job event")
    return item


def unexpected(event: Any, where: str) -> UnknownEvent:
    """The error a handler raises for an event type it does not handle."""
    return UnknownEvent(f"{where} got an unexpected job event {event!r}")


def train_event(ev: dict[str, Any]) -> Event:
    """The typed event of one ``train(callback=)`` dict (``{"kind": "step", ...}``)."""
    kind = ev.get("kind")
    if kind == "start":
        return TrainStarted(ev["summary"])
    if kind == "step":
        return Step(
            step=ev["step"],
            loss=ev["loss"],
            fraction=ev["fraction"],
            elapsed=ev["elapsed"],
            total_steps=ev.get("total_steps"),
            epoch=ev.get("epoch"),
        )
    if kind == "epoch":
        return Epoch(
            epoch=ev["epoch"], step=ev.get("step"), loss=ev.get("loss"), val_f1=ev.get("val_f1")
        )
    raise UnknownEvent(f"training reported an unknown kind {kind!r}: {ev!r}")
