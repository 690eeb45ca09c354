"""Inference runtimes behind the one tiler: torch, and OpenVINO for CPUs.

The tiler feeds fixed-shape batches of windows ``(B, C_in, H, W)``; a backend turns one
batch into probabilities. ``torch`` runs the model eagerly (training, CUDA, fallback).
``openvino`` converts the network once per (weights, window, outputs) into an OpenVINO
model — cached on disk under the user cache directory, keyed by a hash of the weights and
configuration, so that a trained model (new weights) is exported again — and compiles it
for the CPU at the chosen precision: ``f32`` (exact mode; equal to torch to ~1e-5) or
``bf16`` on CPUs with bf16 matrix units (AMX / AVX512-BF16).

``runtime="auto"`` exports only for jobs of at least :data:`AUTO_MIN_WINDOWS` windows or
when an export of these weights is already cached: after each fine-tuning the weights are
new, and a small image runs faster on torch than the one-off export takes.

Why OpenVINO: measured on this project's 2-core CPU (bundled U-Net, 768² window, see
issue #12 and ``bench/engine.py``) it was the fastest runtime, f32 2.5× and bf16 8.1× torch
eager fp32, against 2.2× for ONNX Runtime fp32; it ships as one pip wheel with no
network access at run time. Any network it cannot convert runs on torch, with a one-line
reason (:func:`openvino_backend` returns it instead of raising).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUNTIMES = ("auto", "torch", "openvino")
RUNTIME_ENV = "NAPARI_UNET_RUNTIME"
CACHE_ENV = "NAPARI_UNET_CACHE"

_COMPILED: dict[tuple[Any, ...], Any] = {}
_MAX_COMPILED = 8
AUTO_SKIP = frozenset({"unet3p"})
"""Variants ``runtime="auto"`` keeps on torch: measured slower on OpenVINO (UNet 3+ at 1024²,
2 threads: f32 0.4×, bf16 0.6× of torch eager — its up-sampling branches mix channels per
tap, ``bench/engine.py``)."""
BF16_UNSAFE = frozenset({"swin_unet"})
"""Variants whose OpenVINO bf16 output is not trusted: they compile at f32 in the default
mode too. Swin-UNet at 768² windows gave NaN in 61-76 % of the pixels (labels F1 0.40
against fp32 on a 1024² synthetic image, ``bench/engine.py``); f32 is still 1.3× torch."""
AUTO_MIN_WINDOWS = 8
"""``runtime="auto"`` exports a model only for jobs of at least this many windows (a
768² window each on the CPU); smaller jobs use an existing export or run on torch."""
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """``$NAPARI_UNET_CACHE``, else ``$XDG_CACHE_HOME/napari-unet``, else ``~/.cache/napari-unet``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-unet"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(device: torch.device, runtime: str | None = None) -> tuple[str, str]:
    """(runtime, why): ``torch`` or ``openvino`` for a device.

    Args:
        device: where the tiles run.
        runtime: ``"auto"`` (default: ``$NAPARI_UNET_RUNTIME``, else OpenVINO on the CPU
            when installed, torch otherwise), ``"torch"`` or ``"openvino"``.
    """
    runtime = runtime or os.environ.get(RUNTIME_ENV) or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return "torch", "torch (asked for)"
    if device.type != "cpu":
        if runtime == "openvino":
            raise ValueError(f"the OpenVINO runtime runs on the CPU, not on {device.type}")
        return "torch", f"torch on {device.type}"
    if not openvino_available():
        if runtime == "openvino":
            raise ValueError("the OpenVINO runtime is not installed: pip install openvino")
        return "torch", "torch (pip install openvino for 2-8× faster CPU inference)"
    return "openvino", "OpenVINO on the CPU"


def weights_key(model: torch.nn.Module, extra: dict[str, Any]) -> str:
    """SHA-256 of the model's tensors (names, shapes, dtypes, bytes), its configuration and
    ``extra`` (window, outputs, versions): the export cache key."""
    h = hashlib.sha256()
    meta = {
        "name": getattr(model, "name", type(model).__name__),
        "config": getattr(model, "config", {}),
        "in": getattr(model, "in_channels", None),
        "classes": getattr(model, "num_classes", None),
        **extra,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Probabilities(torch.nn.Module):
    """The exported graph: window batch → probabilities (final, or final + every head)."""

    def __init__(self, model: torch.nn.Module, outputs: str, level: int | None) -> None:
        super().__init__()
        self.model, self.outputs, self.level = model, outputs, level

    def forward(self, x: torch.Tensor) -> Any:
        from .tiler import activation

        if self.outputs == "all":
            heads = self.model.forward_all(x)
            return tuple(
                [activation(heads[self.model.final_index])] + [activation(h) for h in heads]
            )
        kwargs = {"level": self.level} if self.level is not None else {}
        return activation(self.model(x, **kwargs))


@dataclass
class Backend:
    """A compiled runtime for one window shape: ``backend(x)`` (B, C_in, H, W) float32 numpy
    → list of (B, K, H', W') float32 probabilities (the final output first)."""

    name: str
    precision: str
    run: Callable[[np.ndarray], list[np.ndarray]]
    cached: bool = False

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.run(x)


def _quiet_tracing() -> None:
    """Silence the tracer's warnings about our own shape checks (expected: the window is
    fixed) with one filter limited to napari_unet's modules. No redirection of stdout or
    ``catch_warnings``: both are process-wide and would swallow what other threads (the
    napari GUI) print during an export."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"napari_unet(\.|$)")


def _export(
    model: torch.nn.Module, window: tuple[int, int, int], outputs: str, level: int | None,
    path: Path,
) -> None:  # fmt: skip
    import openvino as ov

    _quiet_tracing()
    wrapper = _Probabilities(model, outputs, level).eval()
    example = torch.zeros((1, *window), dtype=torch.float32)
    with torch.no_grad():
        converted = ov.convert_model(wrapper, example_input=example, input=[(-1, *window)])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part.xml")
    ov.save_model(converted, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(tmp, path)


def export_key(
    model: torch.nn.Module, window: tuple[int, int, int], outputs: str, level: int | None
) -> str:
    """The cache key of an export: weights, configuration, window, outputs, versions."""
    import openvino as ov

    extra = {
        "window": list(window),
        "outputs": outputs,
        "level": level,
        "openvino": ov.__version__,
        "torch": torch.__version__,
    }
    return weights_key(model, extra)


def is_exported(key: str) -> bool:
    """True when an export with this key is in memory or in the disk cache."""
    if any(m[0] == key for m in _COMPILED):
        return True
    xml = cache_dir() / "openvino" / f"{key}.xml"
    return xml.is_file() and xml.with_suffix(".bin").is_file()


def compiled_precision(
    model: torch.nn.Module,
    window: tuple[int, int, int],
    *,
    windows: int,
    device: torch.device,
    runtime: str | None = None,
    exact: bool = False,
    amp: bool | None = None,
    outputs: str = "final",
    level: int | None = None,
) -> str | None:
    """The precision (``"f32"``/``"bf16"``) of the OpenVINO runtime a job runs on, or None
    for torch: :func:`resolve_runtime`; ``"auto"`` keeps :data:`AUTO_SKIP` variants on torch,
    and jobs of fewer than :data:`AUTO_MIN_WINDOWS` ``windows`` unless these weights are
    already exported; fp32 in exact mode, bf16 otherwise on CPUs with bf16 units unless
    ``amp=False``. The rule of ``predict`` and of the dask run alike."""
    from ..runtime import cpu_has_bf16

    name, _ = resolve_runtime(device, runtime)
    if name != "openvino":
        return None
    chosen = runtime or os.environ.get(RUNTIME_ENV) or "auto"
    if chosen == "auto" and getattr(model, "name", None) in AUTO_SKIP:
        return None
    if chosen == "auto" and windows < AUTO_MIN_WINDOWS:
        # a small job on weights never exported (e.g. just trained): the one-off export
        # would cost more than running the few windows on torch
        if not is_exported(export_key(model, window, outputs, level)):
            return None
    if getattr(model, "name", None) in BF16_UNSAFE:
        return "f32"
    return "bf16" if not exact and amp is not False and cpu_has_bf16() else "f32"


def _reason(model: Any, err: BaseException) -> str:
    text = " ".join(str(err).split())[:200] or type(err).__name__
    return f"{getattr(model, 'name', 'model')} cannot run on OpenVINO ({text})"


def export_ir(
    model: torch.nn.Module,
    window: tuple[int, int, int],
    *,
    outputs: str = "final",
    level: int | None = None,
    key: str | None = None,
) -> tuple[Path, bool] | str:
    """Export ``model`` for windows ``window`` into the disk cache, once per key.

    Returns:
        (the OpenVINO ``.xml`` path, whether it was cached already), or a one-line reason
        why this model cannot be converted (nothing half-written is left in the cache).
    """
    key = key or export_key(model, window, outputs, level)
    xml = cache_dir() / "openvino" / f"{key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml, True
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        _export(model, window, outputs, level, xml)
    except Exception as err:  # noqa: BLE001 - any conversion failure falls back to torch
        for p in (xml, xml.with_suffix(".bin")):
            p.unlink(missing_ok=True)
        return _reason(model, err)
    return xml, False


class _NoBf16(ValueError):
    """The CPU has no bf16 units (the export itself is fine)."""


class NonFiniteOutput(ArithmeticError):
    """A bf16 runtime returned NaN or infinite probabilities (``predict`` then runs the
    job again at f32, with a warning)."""


def _compile(xml: Path, precision: str, threads: int) -> Backend:
    import openvino as ov

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(xml.parent / "compiled")})  # compiled blobs
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise _NoBf16("this CPU has no bf16 units; use precision='f32'")
    compiled = core.compile_model(
        core.read_model(str(xml)),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    n_out = len(compiled.outputs)
    request_lock = threading.Lock()

    def run(x: np.ndarray) -> list[np.ndarray]:
        with request_lock:
            result = compiled(np.ascontiguousarray(x, dtype=np.float32))
            outs = [np.array(result[k], dtype=np.float32, copy=True) for k in range(n_out)]
        if precision == "bf16" and not all(np.isfinite(o).all() for o in outs):
            raise NonFiniteOutput(f"OpenVINO bf16 gave non-finite values ({xml.stem[:12]})")
        return outs

    return Backend("openvino", precision, run)


def _remember(memo: tuple[Any, ...], backend: Backend) -> Backend:
    _COMPILED[memo] = backend
    while len(_COMPILED) > _MAX_COMPILED:  # a model retrained many times: keep the last
        _COMPILED.pop(next(iter(_COMPILED)))
    return backend


def compile_ir(xml: str | Path, *, precision: str = "f32", threads: int | None = None) -> Backend:
    """Compile an exported model (an ``.xml`` of :func:`export_ir`) for the CPU; never
    exports. Raises when OpenVINO cannot load or compile it (e.g. a dask worker with
    another OpenVINO version than the client that exported it). ``threads``: default
    torch's current setting (see :func:`openvino_backend`)."""
    xml, threads = Path(xml), threads or torch.get_num_threads()
    memo = (xml.stem, precision, threads)
    with _LOCK:
        if memo in _COMPILED:
            return _COMPILED[memo]
        return _remember(memo, _compile(xml, precision, threads))


def openvino_backend(
    model: torch.nn.Module,
    window: tuple[int, int, int],
    *,
    outputs: str = "final",
    level: int | None = None,
    precision: str = "f32",
    threads: int | None = None,
    stage: Callable[[str], None] | None = None,
) -> Backend | str:
    """An OpenVINO backend for ``model`` on windows of shape ``window`` (C_in, H, W).

    Args:
        model: the network (eval mode, CPU); its weights are hashed for the cache key.
        window: the tiler's window shape (C_in, H, W); any batch size runs.
        outputs: ``"final"`` or ``"all"`` (final + every deep-supervision head).
        level: UNet++ pruning level (``outputs="final"`` only).
        precision: ``"f32"`` or ``"bf16"`` (the CPU must have bf16 units).
        threads: inference threads (default: torch's current setting, so that one thread
            policy covers both runtimes: :func:`napari_unet.runtime.torch_threads`, the
            dask workers' threads, ``segment_image(threads=)``).
        stage: ``stage(text)`` before the slow one-off steps: exporting weights not in the
            cache (seconds; once per trained weights and window) and compiling for the CPU.

    Returns:
        The :class:`Backend`, or a one-line reason why this model stays on torch.
    """
    from ..runtime import StageNote

    threads = threads or torch.get_num_threads()
    key = export_key(model, window, outputs, level)
    memo = (key, precision, threads)
    with _LOCK:
        if memo in _COMPILED:
            return _COMPILED[memo]
        name, size = getattr(model, "name", "the model"), "×".join(map(str, window[1:]))
        if stage is not None and not is_exported(key):
            text = f"exporting {name} to OpenVINO for {size} windows (once for these weights)"
            stage(StageNote("export", text))
        exported = export_ir(model, window, outputs=outputs, level=level, key=key)
        if isinstance(exported, str):
            return exported
        xml, cached = exported
        if stage is not None:
            stage(StageNote("compile", f"compiling {name} for the CPU (OpenVINO {precision})"))
        try:
            backend = _compile(xml, precision, threads)
        except _NoBf16 as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - any failure falls back to torch
            if not cached:
                for p in (xml, xml.with_suffix(".bin")):
                    p.unlink(missing_ok=True)
            return _reason(model, err)
        backend.cached = cached
        return _remember(memo, backend)


def clear_compiled() -> None:
    """Forget the compiled models held in memory (the disk cache stays)."""
    with _LOCK:
        _COMPILED.clear()
