"""Engine work in napari thread workers, with throttled progress and a cancel token.

``start_job(fn)`` runs ``fn(report, cancel)`` in a :func:`napari.qt.threading.create_worker`
thread. ``report(item)`` may be called from the worker thread as often as the engine
likes (per tile, per optimiser step): items are batched and delivered as a list to
``on_progress`` on the GUI thread at most every ``interval`` seconds (default 0.2 s): each
repaint of a dock widget also recomposes the napari canvas, which takes tens of
milliseconds with software OpenGL, so updates are kept few. ``cancel`` is a :class:`threading.Event` the engine polls; a job that
is cancelled never calls ``on_done`` (``on_cancelled`` instead), even when the engine
had already finished when Cancel was pressed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, QThreadPool, Signal

_MIN_THREADS = 4  # Predict + Train + Inspect + a loader at once, even on 2-core machines
_JOBS: set[Job] = set()  # keep running jobs (and their bridges) alive


class _Bridge(QObject):
    """Lives in the GUI thread; signals emitted from a worker are queued to the GUI."""

    items = Signal(object)


class _Reporter:
    def __init__(self, bridge: _Bridge, interval: float) -> None:
        self._bridge, self._interval = bridge, interval
        self._pending: list[Any] = []
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, item: Any, flush: bool = False) -> None:
        with self._lock:
            self._pending.append(item)
            now = time.monotonic()
            if not (flush or now - self._last >= self._interval):
                return
            items, self._pending, self._last = self._pending, [], now
        self._bridge.items.emit(items)

    def flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        if items:
            self._bridge.items.emit(items)


class Job:
    """A running engine job: ``cancel()``, ``running``, ``result``."""

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        self.running = True
        self.cancelled = False
        self.worker: Any = None

    def cancel(self) -> None:
        self.cancel_event.set()


def start_job(
    fn: Callable[[Callable[..., None], threading.Event], Any],
    *,
    on_progress: Callable[[list[Any]], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_cancelled: Callable[[Any], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    interval: float = 0.2,
) -> Job:
    """Run ``fn(report, cancel)`` in a thread worker; callbacks run on the GUI thread."""
    from napari.qt.threading import create_worker

    pool = QThreadPool.globalInstance()
    if pool.maxThreadCount() < _MIN_THREADS:
        pool.setMaxThreadCount(_MIN_THREADS)

    job = Job()
    bridge = _Bridge()
    reporter = _Reporter(bridge, interval)
    if on_progress is not None:
        bridge.items.connect(on_progress)
    _CANCELLED = object()

    def work() -> Any:
        try:
            result = fn(reporter, job.cancel_event)
        except Exception:
            if job.cancel_event.is_set():  # Cancelled, or anything the cancel provoked
                return _CANCELLED
            raise
        finally:
            reporter.flush()
        return result

    def returned(result: Any) -> None:
        if result is _CANCELLED or job.cancel_event.is_set():
            job.cancelled = True
            if on_cancelled is not None:
                on_cancelled(None if result is _CANCELLED else result)
        elif on_done is not None:
            on_done(result)

    def errored(exc: BaseException) -> None:
        if on_error is not None:
            on_error(exc)
        else:  # pragma: no cover - every widget passes on_error
            from napari.utils.notifications import show_error

            show_error(f"napari-unet: {exc}")

    def finished() -> None:
        job.running = False
        _JOBS.discard(job)
        if on_finished is not None:
            on_finished()
        job.bridge = None  # type: ignore[attr-defined]

    job.bridge = bridge  # type: ignore[attr-defined]
    job.worker = create_worker(
        work,
        _start_thread=False,
        _connect={"returned": returned, "errored": errored, "finished": finished},
    )
    _JOBS.add(job)
    job.worker.start()
    return job


def error_text(exc: BaseException) -> str:
    """One line for a status label."""
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError))
        else (f"{type(exc).__name__}: {text}")
    )
