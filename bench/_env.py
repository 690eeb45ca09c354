"""Shared helpers of the benchmark scripts (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (falls back to :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (``VmHWM`` of /proc/self/status), MiB; None off Linux.

    Unlike ``ru_maxrss``, it does not start at the parent's peak after fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
