"""Engine runtime policy: how many CPU threads a job uses and which precision it runs in.

No napari or Qt import here (the engine runs headless); whether a GUI is running is read
from what the process has already imported.

**Threads** (:func:`choose_threads`, :func:`torch_threads`). torch's intra-op pool is
OpenMP: its threads meet at a barrier after every operator, so one thread that loses its
core to another process stalls all of them. On a machine with other work (or with
napari's own event loop and rendering) a pool as wide as the machine therefore collapses
— measured in ``bench/hitl.py``. The policy: the number of *physical* cores (hyper-threads
do not help convolutions), minus one when a GUI event loop runs in this process, within
the CPUs this process may use, at least 1; ``NAPARI_UNET_THREADS`` (then
``OMP_NUM_THREADS``) overrides it.

**OpenMP waiting** (:func:`configure_openmp`). Idle OpenMP workers spin before they sleep;
spinning threads steal the cores that the busy ones (or napari, or other programs) need.
Measured (``bench/hitl.py``, 2 cores, other programs using about one core): 2 threads with
libgomp's default waiting ran 0.1–0.3 steps/s at 1.7–2.7 CPU-seconds per step; with
``OMP_WAIT_POLICY=PASSIVE`` 1–2 steps/s at 0.3 CPU-seconds per step. The variable only
takes effect when set before torch is first imported: call :func:`configure_openmp` before
anything imports torch (the package's ``__init__`` is the place); it leaves a value the user
set alone.

**Precision** (:func:`choose_precision`). bfloat16 autocast on CUDA (bf16-capable GPUs)
and on CPUs with bf16 matrix units (AMX-BF16 or AVX512-BF16); float32 elsewhere — on a
CPU without them bf16 is emulated and slower.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

THREADS_ENV = "NAPARI_UNET_THREADS"
"""Environment variable overriding :func:`choose_threads` (a positive integer)."""

PRECISIONS = ("auto", "bf16", "fp32")


# ------------------------------------------------------------------------ threads
def configure_openmp(environ: dict[str, str] | None = None) -> bool:
    """Ask OpenMP for passive waiting if torch is not imported yet; True when it applies.

    Leaves an explicit ``OMP_WAIT_POLICY`` alone. After torch is imported the OpenMP
    runtime has read its settings and this does nothing (returns False).
    """
    env = os.environ if environ is None else environ
    if "torch" in sys.modules and environ is None:
        return env.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def openmp_passive() -> bool:
    """True when OpenMP was asked to wait passively (``OMP_WAIT_POLICY=PASSIVE``)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity / cgroup-pinned set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores of the machine (hyper-threads not counted); falls back to logical CPUs."""
    try:
        import psutil  # optional

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:  # noqa: BLE001 - psutil missing or failing: fall back
        pass
    try:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def gui_running() -> bool:
    """True when a Qt application object exists in this process (napari's GUI, for one).

    Looks only at Qt bindings that are already imported; never imports Qt.
    """
    for name in ("PyQt6.QtCore", "PyQt5.QtCore", "PySide6.QtCore", "PySide2.QtCore"):
        mod = sys.modules.get(name)
        if mod is not None:
            try:
                if mod.QCoreApplication.instance() is not None:
                    return True
            except Exception:  # noqa: BLE001 - a half-torn-down binding: assume no GUI
                continue
    return False


def choose_threads(
    *,
    gui: bool | None = None,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    cpus: int | None = None,
) -> int:
    """torch intra-op threads for a training or inference job.

    ``NAPARI_UNET_THREADS`` (a positive integer) wins, then ``OMP_NUM_THREADS``. Otherwise: physical cores
    (``cores``, default :func:`physical_cores`), limited to the CPUs this process may use
    (``cpus``, default :func:`usable_cpus`), minus one when a GUI runs in this process
    (``gui``, default :func:`gui_running`) and at least 3 are available, so that the event
    loop and rendering keep a core; at least 1. On a 2-core machine the GUI shares: with
    passive OpenMP waiting (:func:`configure_openmp`) 2 training threads kept 0.98× of their
    idle speed under a competing load against 0.55× for 1 thread (``bench/hitl.py``).
    """
    env = os.environ if environ is None else environ
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            if name == THREADS_ENV:
                raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
            continue  # an OMP list like "4,2" or garbage: not ours to judge
        return n
    cores = physical_cores() if cores is None else cores
    cpus = usable_cpus() if cpus is None else cpus
    n = min(cores, cpus)
    if n >= 3 and (gui_running() if gui is None else gui):
        n -= 1
    return max(1, n)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: :func:`choose_threads`).

    Restores the previous count afterwards. The setting is process-wide in torch.
    """
    import torch

    n = choose_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be ≥ 1, got {n}")
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ---------------------------------------------------------------------- precision
def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty set where unavailable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX-BF16 or AVX512-BF16) torch can use."""
    try:
        import torch

        cpu = torch.cpu
        if getattr(cpu, "_is_amx_tile_supported", None) and cpu._is_amx_tile_supported():
            return True
        if getattr(cpu, "_is_avx512_bf16_supported", None) and cpu._is_avx512_bf16_supported():
            return True
        if hasattr(cpu, "_is_avx512_bf16_supported"):
            return False
    except Exception:  # noqa: BLE001 - private API changed: use the flags
        pass
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


@dataclass(frozen=True)
class Precision:
    """Chosen compute precision: ``name`` "bf16"/"fp32", the autocast dtype, and why."""

    name: str
    dtype: Any  # torch.dtype or None (no autocast)
    reason: str

    @property
    def autocast(self) -> bool:
        return self.dtype is not None


def choose_precision(device: Any, precision: str = "auto") -> Precision:
    """Resolve ``precision`` ("auto" | "bf16" | "fp32") for ``device`` (a torch.device).

    "auto": bf16 autocast on CUDA when the GPU supports bf16 and on CPUs with bf16 matrix
    units, float32 otherwise. "bf16" is honoured everywhere (emulated, slow, on CPUs
    without the units; refused on a GPU without bf16). Losses always run in float32.
    """
    import torch

    key = str(precision).lower().replace("bfloat16", "bf16").replace("float32", "fp32")
    if key not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if key == "fp32":
        return Precision("fp32", None, "float32 (requested)")
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if key == "bf16" and not ok:
            raise ValueError("precision 'bf16' requested but this GPU does not support bfloat16")
        if ok:
            return Precision("bf16", torch.bfloat16, "bf16 autocast (CUDA)")
        return Precision("fp32", None, "float32 (this GPU has no bfloat16)")
    if dev.type != "cpu":
        return Precision("fp32", None, f"float32 (device {dev.type})")
    units = cpu_has_bf16()
    if key == "bf16":
        why = "bf16 autocast (requested; " + (
            "CPU has bf16 matrix units)" if units else "emulated: this CPU has no bf16 units)"
        )
        return Precision("bf16", torch.bfloat16, why)
    if units:
        return Precision("bf16", torch.bfloat16, "bf16 autocast (CPU has bf16 matrix units)")
    return Precision("fp32", None, "float32 (this CPU has no bf16 matrix units)")


# ------------------------------------------------------------ devices and cancelling
def select_device(device: str | torch.device = "auto") -> tuple[torch.device, str]:
    """Resolve ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` and say why.

    Returns:
        (device, reason): the torch device and a one-line reason for the status bar.
    """
    import torch

    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"CUDA: {torch.cuda.get_device_name(0)}"
        return torch.device("cpu"), "CPU (CUDA not available)"
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch lists every device type it knows
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return (
        dev,
        "CPU (requested)" if dev.type == "cpu" else f"CUDA: {torch.cuda.get_device_name(dev)}",
    )


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype for inference: None (fp32) unless ``amp`` (default: on CUDA only);
    bf16 on the CPU and on CUDA cards that have it, else fp16."""
    import torch

    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


class Cancelled(Exception):
    """Raised when a cancel token fires; no partial result is returned."""


def is_cancelled(cancel: Any) -> bool:
    """A cancel token is a ``threading.Event``-like object or a zero-argument callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def device_lock() -> threading.Lock:
    """Serialises GPU use between concurrent predictions in one process."""
    return _LOCK


_LOCK = threading.Lock()


class StageNote(str):
    """A ``stage(text)`` message of the engine that callers may also tell apart by kind:
    ``"export"`` (the one-off OpenVINO export of new weights), ``"compile"`` (compiling it
    for the CPU) or ``"run"`` (the windows start; the text names the runtime, and
    ``runtime`` says ``"openvino"`` or ``"torch"``). A plain ``str`` to everything that
    only shows it."""

    kind: str
    runtime: str

    def __new__(cls, kind: str, text: str, runtime: str = "") -> StageNote:
        note = super().__new__(cls, text)
        note.kind, note.runtime = kind, runtime
        return note


class RunClock:
    """A ``stage`` callback watching ``predict``'s notes: it passes them on to ``stage``,
    and keeps when the windows started (so that a timing leaves out the one-off OpenVINO
    export and compilation: Compare's and Inspect's per-output times) and the runtime they
    ran on (``segment_image``'s result).

    Args:
        stage: where the notes go on (None: nowhere).
        forward_run: also pass the run note on ("running 9 windows … on OpenVINO bf16");
            the per-output timings keep their own "timing level L2" text instead.
    """

    def __init__(self, stage: Any = None, forward_run: bool = False) -> None:
        self.stage, self.forward_run = stage, forward_run
        self.started, self.runtime = time.perf_counter(), ""

    def __call__(self, text: str) -> None:
        run = getattr(text, "kind", None) == "run"
        if run:
            self.started, self.runtime = time.perf_counter(), text.runtime
        if self.stage is not None and (self.forward_run or not run):
            self.stage(text)

    def since_run(self) -> float:
        """Seconds since the windows started (since creation when no run note came)."""
        return time.perf_counter() - self.started
