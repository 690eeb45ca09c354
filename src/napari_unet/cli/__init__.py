"""``napari-unet`` command line: argument parsing only; the engine does the work.

``main`` runs one command (:mod:`.parser` builds the parser; :mod:`.commands`,
:mod:`.predict` and :mod:`.predict_dask` run the commands). Every failure is one line
``napari-unet: error: ...`` and exit code 2; Ctrl-C / SIGTERM stop at the next batch,
remove partial outputs and exit with 130; a closed stdout pipe (``| head``) exits quietly
with 141, as ``ls`` does.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

from .common import STOP, on_stop_signal
from .parser import build_parser

__all__ = ["build_parser", "main"]


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (OS errors: 'cannot ...: reason')."""
    from ..outputs import describe_os_error

    if isinstance(exc, MemoryError):
        text = "out of memory" + (f" ({exc})" if str(exc) else "")
    elif isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, FileExistsError)):
        text = describe_os_error(exc) if exc.strerror else str(exc)
    elif isinstance(exc, (ValueError, RuntimeError, FileNotFoundError, FileExistsError)):
        text = str(exc) or type(exc).__name__
    else:  # a bug: still one line, with what is needed to report it
        text = f"internal error {type(exc).__name__}: {exc} (NAPARI_UNET_DEBUG=1 shows where)"
    return " ".join(text.split())


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has gone (``napari-unet models | head -1``):
    a write end without a reader polls as an error (Linux, macOS)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a capture (tests)
        return False
    if not hasattr(select, "poll"):  # pragma: no cover - Windows: EPIPE is stdout's
        return True
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _quiet_exit_closed_stdout() -> int:
    """What ``ls | head`` does: no message, exit status 141 (128 + SIGPIPE). Stdout then
    points at /dev/null, so the interpreter's last flush cannot complain either."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; every failure is exit code 2 and one line ``napari-unet: error: ...``
    on stderr (no traceback; ``NAPARI_UNET_DEBUG=1`` re-raises). A reader of stdout that
    goes away early (``| head``) ends it quietly with 141, as it ends ``ls``."""
    try:
        try:
            return _run(argv)
        finally:
            if sys.stdout is not None:  # None: started with stdout closed (>&-)
                sys.stdout.flush()  # a reader that went away shows here, not at exit
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        return _quiet_exit_closed_stdout()


def _run(argv: Sequence[str] | None) -> int:
    import os
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    STOP.clear()
    old = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / `kill`: stop at the next batch and remove partial outputs; twice: at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_stop_signal)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-unet: interrupted (partial outputs removed)", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            return _quiet_exit_closed_stdout()
        if type(exc).__name__ == "Cancelled":  # napari_unet.runtime.Cancelled (a stop signal)
            print("napari-unet: interrupted (partial outputs removed)", file=sys.stderr)
            return 130
        if os.environ.get("NAPARI_UNET_DEBUG"):
            raise
        print(f"napari-unet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
