"""``napari-unet`` command line: argument parsing only; the engine does the work.

``main`` runs one command (:mod:`.parser` builds the parser; :mod:`.commands`,
:mod:`.predict` and :mod:`.predict_dask` run the commands). Every failure is one line
``napari-unet: error: ...`` and exit code 2; Ctrl-C / SIGTERM stop at the next batch,
remove partial outputs and exit with 130.
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; every failure is exit code 2 and one line ``napari-unet: error: ...``
    on stderr (no traceback; ``NAPARI_UNET_DEBUG=1`` re-raises)."""
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
