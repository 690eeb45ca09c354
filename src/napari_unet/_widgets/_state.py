"""The models the widgets share, one state per napari viewer: a list and a current one.

Every model that appears in a viewer stays in its list until the user removes it: the
bundled model(s), every model trained in this viewer (with its training summary),
loaded checkpoints and models built here. Switching is instant (the objects stay in
memory; a bundled model not yet used is loaded on first selection). Model, Train and
Inspect add to it, Predict and the Segment menu read the current one.

No torch or engine import here: the bundled model is loaded in a thread the first time
a widget asks for it (:meth:`ModelState.ensure_model`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from psygnal import Signal

# weak keys: a closed viewer takes its state with it
_STATES: weakref.WeakKeyDictionary[Any, ModelState] = weakref.WeakKeyDictionary()

KINDS = ("bundled", "trained", "checkpoint", "built", "fallback", "given")


@dataclass(eq=False)
class ModelEntry:
    """One model of the list. ``model`` is None for a bundled model not loaded yet."""

    label: str
    """Short unique name used in layer names, e.g. ``unet``, ``unet (trained 2)``."""
    source: str
    """Where it came from, in words: "bundled nuclei model", "checkpoint m.safetensors"…"""
    kind: str
    model: Any = None
    untrained: bool = False
    summary: dict[str, Any] | None = None
    """Training summary (images, regions, objects, pixels, steps, validation…)."""
    bundled_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return getattr(self.model, "name", "") or (self.bundled_name or "")

    def describe(self) -> str:
        """One line for the model list."""
        text = f"{self.label} — {self.source}"
        if self.untrained:
            text += " (untrained)"
        elif self.model is None:
            text += " (loads when selected)"
        return text


class ModelState:
    """The model list of one viewer, the current entry and the compute device.

    Signals (GUI thread): ``model_changed(model)`` when the current model changes,
    ``models_changed()`` when the list changes, ``device_changed(str)``,
    ``loading_changed(bool)``.
    """

    model_changed = Signal(object)
    models_changed = Signal()
    device_changed = Signal(str)
    loading_changed = Signal(bool)

    def __init__(self, viewer: Any = None) -> None:
        self._viewer = weakref.ref(viewer) if viewer is not None else None
        self.entries: list[ModelEntry] = []
        self.current: ModelEntry | None = None
        self.device: str = "auto"
        self.error: str = ""
        self.runs = 0
        """Predictions written in this viewer (numbers result layers)."""
        self._trained = 0
        self._loader: Any = None
        self._bundled_listed = False

    @property
    def viewer(self) -> Any:
        return self._viewer() if self._viewer is not None else None

    # ------------------------------------------------------------ the current
    @property
    def model(self) -> Any:
        return self.current.model if self.current is not None else None

    @property
    def source(self) -> str:
        return self.current.source if self.current is not None else ""

    @property
    def untrained(self) -> bool:
        return bool(self.current is not None and self.current.untrained)

    @property
    def label(self) -> str:
        return self.current.label if self.current is not None else ""

    def entry_of(self, model: Any) -> ModelEntry | None:
        return next((e for e in self.entries if e.model is model and model is not None), None)

    # ------------------------------------------------------------------ list
    def _unique_label(self, label: str) -> str:
        labels = {e.label for e in self.entries}
        if label not in labels:
            return label
        n = 2
        while f"{label} {n}" in labels:
            n += 1
        return f"{label} {n}"

    def add_model(
        self,
        model: Any,
        source: str,
        *,
        kind: str = "given",
        untrained: bool = False,
        label: str | None = None,
        summary: dict[str, Any] | None = None,
        select: bool = True,
    ) -> ModelEntry:
        """Append ``model`` to the list (or find it there) and, by default, select it."""
        entry = self.entry_of(model)
        if entry is None:
            if kind == "trained" and label is None:
                self._trained += 1
                label = f"{model.name} (trained {self._trained})"
            entry = ModelEntry(
                label=self._unique_label(label or model.name),
                source=source,
                kind=kind,
                model=model,
                untrained=bool(untrained),
                summary=summary if summary is not None else model.training_summary,
            )
            self.entries.append(entry)
            self.models_changed.emit()
        if select:
            self.select(entry)
        return entry

    def set_model(
        self, model: Any, source: str, *, untrained: bool = False, **kw: Any
    ) -> ModelEntry:
        """Add ``model`` to the list and make it current (nothing is discarded)."""
        low = source.lower()
        guess = "fallback" if "fallback" in low else "bundled" if "bundled" in low else "given"
        kind = kw.pop("kind", guess)
        entry = self.add_model(model, source, kind=kind, untrained=untrained, **kw)
        if kind == "bundled" and entry.bundled_name is None:
            entry.bundled_name = getattr(model, "bundled_name", None) or model.name
        return entry

    def select(self, entry: ModelEntry) -> None:
        """Make ``entry`` current; a bundled entry not loaded yet is loaded first."""
        if entry not in self.entries:
            raise ValueError(f"{entry.label!r} is not in the model list")
        if entry.model is None:
            self._load_bundled(entry)
            return
        if entry is self.current:
            return
        self.current = entry
        self.error = ""
        self.model_changed.emit(entry.model)

    def remove(self, entry: ModelEntry) -> None:
        """Forget a model (bundled ones stay). The current one falls back to the first."""
        if entry.kind == "bundled" or entry not in self.entries:
            return
        self.entries.remove(entry)
        self.models_changed.emit()
        if entry is self.current:
            self.current = None
            loaded = [e for e in self.entries if e.model is not None]
            if loaded:
                self.select(loaded[0])
            else:
                self.model_changed.emit(None)

    def set_device(self, device: str) -> None:
        if device != self.device:
            self.device = device
            self.device_changed.emit(device)

    def next_run(self) -> int:
        self.runs += 1
        return self.runs

    # --------------------------------------------------------------- loading
    @property
    def loading(self) -> bool:
        return self._loader is not None

    def ensure_model(self) -> None:
        """List the bundled models and, unless a model exists, load the default one (in a
        thread). Does nothing while loading or once done."""
        if self._loader is not None or (self._bundled_listed and self.model is not None):
            return
        need_model = self.model is None

        def work(report: Any, cancel: Any) -> tuple[list[str], tuple[Any, str, bool] | None]:
            names = bundled_names()
            if cancel.is_set() or not need_model:
                return names, None
            return names, load_default_or_fallback()

        def done(result: tuple[list[str], tuple[Any, str, bool] | None]) -> None:
            names, loaded = result
            self._add_bundled_names(names)
            if loaded is None:
                return
            model, source, untrained = loaded
            if untrained:  # no bundled weights: say so, and only if nothing else is set
                if self.model is None:
                    self.set_model(model, source, untrained=True, kind="fallback")
                return
            entry = next(
                (
                    e
                    for e in self.entries
                    if e.kind == "bundled"
                    and e.model is None
                    and e.bundled_name == getattr(model, "bundled_name", None)
                ),
                None,
            )
            if entry is None:
                entry = self.add_model(model, source, kind="bundled", select=False)
                entry.bundled_name = getattr(model, "bundled_name", None)
            else:
                entry.model, entry.source = model, source
                self.models_changed.emit()
            if self.model is None:  # a model set meanwhile (tests, Build, Load) wins
                self.select(entry)

        self._start_loader(work, done)

    def _add_bundled_names(self, names: list[str]) -> None:
        if self._bundled_listed:
            return
        self._bundled_listed = True
        known = {e.bundled_name for e in self.entries}
        added = False
        for name in names:
            if name not in known:
                self.entries.append(
                    ModelEntry(
                        label=self._unique_label(name),
                        source=bundled_source(name),
                        kind="bundled",
                        bundled_name=name,
                    )
                )
                added = True
        if added:
            # bundled models first, in the order listed
            self.entries.sort(key=lambda e: e.kind != "bundled")
            self.models_changed.emit()

    def _load_bundled(self, entry: ModelEntry) -> None:
        if self._loader is not None:
            return
        name = entry.bundled_name

        def work(report: Any, cancel: Any) -> Any:
            return load_bundled(name)

        def done(model: Any) -> None:
            if entry in self.entries:
                entry.model = model
                self.models_changed.emit()
                self.select(entry)

        self._start_loader(work, done)

    def _start_loader(self, work: Any, done: Any) -> None:
        from ._jobs import start_job

        def failed(exc: BaseException) -> None:
            self.error = f"could not load a model: {exc}"
            self.model_changed.emit(self.model)

        def finished() -> None:
            self._loader = None
            self.loading_changed.emit(False)

        self._loader = start_job(
            work,
            viewer=self.viewer,
            on_done=done,
            on_error=failed,
            on_finished=finished,
            name="model loader",
        )
        self.loading_changed.emit(True)


# ----------------------------------------------------------- engine (in threads)
_TITLES: dict[str, str] = {}
"""Bundled name -> card line (title, size, speed, development-image F1), once listed."""


def bundled_names() -> list[str]:
    """Names of the bundled trained models (engine import: call in a thread)."""
    try:
        from ..models import pretrained

        cards = pretrained.list_pretrained()
        for card in cards:
            _TITLES[card.name] = card.summary()
        return [card.name for card in cards]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken card: fall back to the file listing
        try:
            from ..models import pretrained

            return list(pretrained.available())
        except Exception:  # noqa: BLE001
            return []
    try:
        from .. import checkpoint

        return ["unet"] if checkpoint.default_model_path().is_file() else []
    except Exception:  # noqa: BLE001 - a broken installation still opens the widgets
        return []


def bundled_source(name: str) -> str:
    title = _TITLES.get(name, "")
    return f"bundled: {title}" if title else f"bundled {name} model (nuclei)"


def load_bundled(name: str | None) -> Any:
    """The bundled model ``name`` with ``model.info`` measured (call in a thread)."""
    try:
        from ..models.pretrained import load_pretrained
    except ImportError:
        load_pretrained = None
    if load_pretrained is not None and name is not None:
        model = load_pretrained(name)
    else:
        from ..checkpoint import load_default_model

        model = load_default_model()
    model.bundled_name = name or model.name
    model.info  # noqa: B018
    return model


def load_default_or_fallback() -> tuple[Any, str, bool]:
    """(model, source, untrained): the bundled model, else an untrained 3-class U-Net.

    Runs in a worker (imports torch); also computes ``model.info`` (receptive field)."""
    from ..pipeline import default_or_fallback

    model, source, untrained = default_or_fallback()
    if not untrained:
        names = bundled_names()
        model.bundled_name = model.name if model.name in names or not names else names[0]
        source = bundled_source(model.bundled_name)
    return model, source, untrained


def model_line(state: ModelState, short: bool = False) -> tuple[str, str]:
    """(text, status kind) describing the state's model for the widgets' headers."""
    if state.model is None:
        return ("Model: loading…" if state.loading else "Model: none", "info")
    text = f"Model: {state.label} — {state.source}"
    if not state.untrained:
        return text, "info"
    return (text if short else text + " (untrained: results are not meaningful)"), "warn"


def get_state(viewer: Any) -> ModelState:
    """The :class:`ModelState` of ``viewer`` (created on first use)."""
    from ._jobs import unwrap

    viewer = unwrap(viewer)
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = ModelState(viewer)
    return state
