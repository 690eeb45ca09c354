"""Engine work in background threads that belong to a widget, with throttled progress.

``start_job(fn, owner=widget)`` runs ``fn(report, cancel)`` in a daemon thread.
``report(event)`` may be called from the worker as often as the engine likes (per tile,
per optimiser step) with a typed :mod:`._events` message (``Progress(done, total)``,
``Stage(text)``…; anything else raises at once): events are batched and delivered as a
list to ``on_progress`` on the GUI thread at most every ``interval`` seconds, and at the
latest ``interval`` seconds after they were reported (each repaint of a dock also recomposes
the napari canvas, tens of milliseconds with software OpenGL). ``cancel`` is a
:class:`threading.Event` the engine polls (within one tile batch / optimiser step).

Ownership (issue #10 item 7): a job belongs to its ``owner`` widget and to that widget's
viewer. Closing the dock (napari un-parents the widget) or the viewer (its main window
closes) cancels the owner's jobs and *drops* them: no callback of a dropped job ever
runs, so no result lands after its widget or viewer is gone. Threads are daemons and
are joined for at most :data:`EXIT_WAIT` seconds at interpreter exit (after being
cancelled), so closing napari never waits for a training budget and never aborts on a
thread that still emits into deleted Qt objects.

A job ends with one :class:`~._events.Outcome` (``Finished``, ``Failed``, ``Stopped``)
sent to the GUI thread. A job that is cancelled never calls ``on_done`` (``on_cancelled``
instead), even when the engine had already finished when Cancel was pressed.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QEvent, QObject, Signal

from ._events import Event, Failed, Finished, Outcome, Stopped, UnknownEvent, check

EXIT_WAIT = 1.5
"""Seconds the interpreter waits at exit for cancelled jobs to stop (then leaves them)."""

_JOBS: set[Job] = set()  # running jobs (their bridges must outlive the thread's emits)
_LOCK = threading.Lock()


class _Bridge(QObject):
    """Lives in the GUI thread; signals emitted from a worker are queued to the GUI."""

    items = Signal(object)
    ended = Signal(object)


def _emit(signal: Any, payload: Any) -> None:
    try:
        signal.emit(payload)
    except RuntimeError:  # the bridge was deleted (application torn down): nobody listens
        pass


class _Reporter:
    """Batches a worker's events; a batch is delivered at most every ``interval`` seconds
    and at the latest ``interval`` seconds after its first event (a timer), so the last
    event before a slow step (``Stage("exporting …")``, the tile before a long one) is
    shown while that step runs, not after it."""

    def __init__(self, job: Job, interval: float) -> None:
        self._job, self._interval = job, interval
        self._pending: list[Any] = []
        self._last = 0.0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, item: Event, flush: bool = False) -> None:
        check(item)  # a bare tuple or dict fails in the worker, at once
        if self._job.dropped:
            return
        with self._lock:
            if self._closed:
                return
            self._pending.append(item)
            wait = self._interval - (time.monotonic() - self._last)
            if flush or wait <= 0:
                self._send()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._deliver)
                self._timer.daemon = True
                self._timer.start()

    def _send(self) -> None:
        """Emit what is pending (under the lock, so batches keep their order)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._pending, self._last = self._pending, [], time.monotonic()
        if items and not self._job.dropped:
            _emit(self._job.bridge.items, items)

    def _deliver(self) -> None:
        with self._lock:
            if self._timer is threading.current_thread():
                self._timer = None  # (a newer timer, armed meanwhile, stays armed)
            if not self._closed:
                self._send()

    def flush(self) -> None:
        """The job ends: deliver what is pending; nothing is sent after this."""
        with self._lock:
            self._send()
            self._closed = True


class Job:
    """A running engine job: ``cancel()``, ``running``, ``cancelled``, ``dropped``."""

    def __init__(self, owner: Any = None, viewer: Any = None, name: str = "") -> None:
        self.cancel_event = threading.Event()
        self.running = True
        self.cancelled = False
        self.dropped = False
        """Cancelled because its widget or viewer is gone: no callback will run."""
        self.name = name
        self.thread: threading.Thread | None = None
        self.bridge = _Bridge()
        self._owner = weakref.ref(owner) if owner is not None else None
        self._viewer = weakref.ref(viewer) if viewer is not None else None
        self._finished: list[Callable[[], None]] = []

    @property
    def owner(self) -> Any:
        return self._owner() if self._owner is not None else None

    @property
    def viewer(self) -> Any:
        return self._viewer() if self._viewer is not None else None

    def cancel(self) -> None:
        self.cancel_event.set()

    def drop(self) -> None:
        """Cancel and forget: no callback of this job runs any more."""
        self.dropped = True
        self.cancel_event.set()

    def when_reported(self, fn: Callable[[list[Event]], None]) -> None:
        """Also call ``fn(events)`` on the GUI thread with each batch of reported events
        (after the handlers connected before; never once the job is dropped)."""
        self.bridge.items.connect(lambda items: None if self.dropped else fn(items))

    def when_finished(self, fn: Callable[[], None]) -> None:
        """Also call ``fn()`` on the GUI thread when the job ends (not if dropped)."""
        self._finished.append(fn)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (not for the GUI callbacks); True when it has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


def start_job(
    fn: Callable[[Callable[..., None], threading.Event], Any],
    *,
    owner: Any = None,
    viewer: Any = None,
    on_progress: Callable[[list[Event]], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_cancelled: Callable[[Any], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    interval: float = 0.2,
    name: str = "",
) -> Job:
    """Run ``fn(report, cancel)`` in a thread; callbacks run on the GUI thread.

    ``report`` takes :class:`~._events.Event` instances only. ``owner``: the widget the
    job belongs to (closing it drops the job); ``viewer``: the napari viewer (closing it
    drops the job; taken from ``owner.viewer`` if absent).
    """
    if viewer is None and owner is not None:
        viewer = getattr(owner, "viewer", None)
    viewer = unwrap(viewer)
    if owner is not None:
        watch_owner(owner)
    if viewer is not None:
        watch_viewer(viewer)
    job = Job(owner, viewer, name or getattr(fn, "__name__", "job"))
    reporter = _Reporter(job, interval)
    if on_progress is not None:
        job.when_reported(on_progress)
    handlers = _Handlers(on_done, on_error, on_cancelled, on_finished)
    job.bridge.ended.connect(lambda outcome: _ended(job, outcome, handlers))
    with _LOCK:
        _JOBS.add(job)
    job.thread = threading.Thread(
        target=_work, args=(job, fn, reporter), name=f"napari-unet {job.name}", daemon=True
    )
    job.thread.start()
    return job


@dataclass(frozen=True)
class _Handlers:
    on_done: Callable[[Any], None] | None
    on_error: Callable[[BaseException], None] | None
    on_cancelled: Callable[[Any], None] | None
    on_finished: Callable[[], None] | None


def _work(job: Job, fn: Callable[..., Any], reporter: _Reporter) -> None:
    """The thread: run ``fn``, then hand its :class:`~._events.Outcome` to the GUI."""
    outcome: Outcome
    try:
        result = fn(reporter, job.cancel_event)
        outcome = Stopped(result) if job.cancel_event.is_set() else Finished(result)
    except BaseException as exc:  # noqa: BLE001 - reported on the GUI thread
        # Cancelled, or anything the cancel provoked
        outcome = Stopped() if job.cancel_event.is_set() else Failed(exc)
    finally:
        reporter.flush()
    if not job.dropped:
        _emit(job.bridge.ended, outcome)
    else:
        with _LOCK:
            _JOBS.discard(job)


def _ended(job: Job, outcome: Outcome, handlers: _Handlers) -> None:
    """On the GUI thread: the one callback of the outcome, then the finished ones.

    Cancel pressed after the engine returned (its result still on the way) still
    counts: the job is cancelled and ``on_done`` does not run."""
    job.running = False
    with _LOCK:
        _JOBS.discard(job)
    if job.dropped:
        return
    if isinstance(outcome, Finished) and job.cancel_event.is_set():
        outcome = Stopped(outcome.result)
    try:
        match outcome:
            case Stopped(result=result):
                job.cancelled = True
                if handlers.on_cancelled is not None:
                    handlers.on_cancelled(result)
            case Finished(result=result):
                if handlers.on_done is not None:
                    handlers.on_done(result)
            case Failed(error=error):
                if handlers.on_error is not None:
                    handlers.on_error(error)
                else:  # pragma: no cover - every widget passes on_error
                    from napari.utils.notifications import show_error

                    show_error(f"napari-unet: {error}")
            case _:
                raise UnknownEvent(f"a job ended with {outcome!r}, not an Outcome")
    finally:
        if not job.dropped:
            for fn_ in ([handlers.on_finished] if handlers.on_finished else []) + job._finished:
                fn_()


def unwrap(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy`` (what plugins are handed)."""
    while obj is not None and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def running_jobs(owner: Any = None, viewer: Any = None) -> list[Job]:
    """Jobs not yet ended, optionally only those of ``owner`` / ``viewer``."""
    viewer = unwrap(viewer)
    with _LOCK:
        jobs = [j for j in _JOBS if j.running and not j.dropped]
    if owner is not None:
        jobs = [j for j in jobs if j.owner is owner]
    if viewer is not None:
        jobs = [j for j in jobs if j.viewer is viewer]
    return jobs


def drop_jobs(*, owner: Any = None, viewer: Any = None) -> int:
    """Cancel and drop the jobs of ``owner`` (and its child widgets) or of ``viewer``."""
    viewer = unwrap(viewer)
    with _LOCK:
        jobs = list(_JOBS)
    n = 0
    for job in jobs:
        if job.dropped:
            continue
        mine = False
        if owner is not None:
            o = job.owner
            while o is not None and not mine:
                mine = o is owner
                o = _parent(o)
        if viewer is not None and job.viewer is viewer:
            mine = True
        if mine:
            job.drop()
            job.running = False
            with _LOCK:
                _JOBS.discard(job)
            n += 1
    return n


def _parent(widget: Any) -> Any:
    try:
        return widget.parent()
    except (RuntimeError, AttributeError):
        return None


# ------------------------------------------------------------------------ ownership
def attached(widget: Any) -> bool:
    """True while ``widget`` sits (through its parents) in a main window."""
    from qtpy.QtWidgets import QMainWindow

    w = widget
    try:
        while w is not None:
            if isinstance(w, QMainWindow):
                return True
            w = w.parent()
    except RuntimeError:
        return False
    return False


class _OwnerFilter(QObject):
    """Drops the jobs of a widget when napari takes it out of its dock (the dock's ×):
    ``remove_dock_widget`` un-parents the widget (``setParent(None)``)."""

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt)
        if event.type() == QEvent.Type.ParentChange and _parent(obj) is None:
            drop_jobs(owner=obj)
            _closed(obj)
        return False


def _closed(obj: Any) -> None:
    hook = getattr(obj, "on_closed", None)
    if callable(hook):
        hook()


_OWNER_FILTER: _OwnerFilter | None = None


def watch_owner(widget: Any) -> None:
    """Drop ``widget``'s jobs once it leaves the main window (closed dock)."""
    global _OWNER_FILTER
    if getattr(widget, "_napari_unet_watched", False):
        return
    if _OWNER_FILTER is None:
        _OWNER_FILTER = _OwnerFilter()
    widget._napari_unet_watched = True
    widget.installEventFilter(_OWNER_FILTER)


class _WindowFilter(QObject):
    """Drops every job of a viewer when its main window closes (or is deleted)."""

    def __init__(self, viewer: Any, window: Any) -> None:
        super().__init__(window)
        self._viewer = weakref.ref(viewer)
        self._closing = False
        viewer_ref = self._viewer
        window.destroyed.connect(lambda *_: _drop_viewer(viewer_ref))

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt)
        kind = event.type()
        if kind == QEvent.Type.Close:
            self._closing = True
            if not obj.isVisible():  # a hidden viewer closes without a Hide event
                _drop_viewer(self._viewer)
        elif kind == QEvent.Type.Hide and self._closing:
            _drop_viewer(self._viewer)
        elif kind == QEvent.Type.Show:
            self._closing = False
        return False


def _drop_viewer(viewer_ref: Any) -> None:
    viewer = viewer_ref()
    if viewer is not None:
        drop_jobs(viewer=viewer)


def _main_window(viewer: Any) -> Any:
    window = getattr(unwrap(viewer), "window", None)
    return unwrap(getattr(window, "_qt_window", None))


def watch_viewer(viewer: Any) -> None:
    """Drop ``viewer``'s jobs when its window closes (installed once per viewer)."""
    viewer = unwrap(viewer)
    window = _main_window(viewer)
    if window is None or getattr(window, "_napari_unet_filter", None) is not None:
        return
    filt = _WindowFilter(viewer, window)
    window._napari_unet_filter = filt
    window.installEventFilter(filt)


@atexit.register
def _at_exit() -> None:
    """Cancel what still runs, give it :data:`EXIT_WAIT` s to stop (no Qt here), then
    spare the interpreter its final full garbage collections."""
    with _LOCK:
        jobs = list(_JOBS)
    for job in jobs:
        job.dropped = True
        job.cancel_event.set()
    deadline = time.monotonic() + EXIT_WAIT
    for job in jobs:
        job.join(max(0.0, deadline - time.monotonic()))
    # The interpreter's final garbage collections walk every object napari, torch (and
    # torch._dynamo, once an optimiser exists) created: 1.5–3 s on a busy 2-core machine.
    # Freezing them here skips those passes (objects are still freed by reference
    # counting); closing the viewer then ends the process in well under 2 s.
    import gc

    gc.freeze()


def error_text(exc: BaseException) -> str:
    """One line for a status label."""
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError))
        else (f"{type(exc).__name__}: {text}")
    )
