"""What each dask worker holds for a run: the model, its device and its runtime.

The model travels as safetensors bytes in a
:class:`~distributed.diagnostics.plugin.WorkerPlugin` (never pickled) and is loaded once
per worker, also on workers that start later; with it travels the OpenVINO export the
client chose (:mod:`.compiled`). Used by the 2-D chunk tasks and by
:mod:`napari_unet.volume_dask`.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import host_of
from .compiled import CompiledModel, load_on_worker

try:  # the base class of the model plugin; distributed is needed only to run
    from distributed.diagnostics.plugin import WorkerPlugin as _PluginBase
except ImportError:  # pragma: no cover
    _PluginBase = object  # type: ignore[assignment,misc]


@dataclass
class WorkerModel:
    """A model loaded on this worker: the network, its device, and the compiled runtime
    (``backend``, None for torch) with the name of what runs (``runtime``)."""

    model: Any
    device: Any
    backend: Any = None
    runtime: str = "torch"


_LOADED: dict[str, WorkerModel] = {}
"""Models loaded on this worker, keyed by the sha256 of their safetensors bytes."""


def worker_model(key: str) -> WorkerModel:
    """The model ``key`` loaded on this worker by its plugin."""
    if key not in _LOADED:
        raise RuntimeError(
            "the napari-unet model is not loaded on this worker (its plugin did not run)"
        )
    return _LOADED[key]


def _worker_device(device: Any, worker: Any) -> Any:
    """``device`` resolved here; with several GPUs and integer worker names
    (``LocalCluster``), worker ``i`` takes GPU ``i % n``."""
    import torch

    from ..runtime import select_device

    dev, _ = select_device(device)
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is None and count > 1:
        name = getattr(worker, "name", None)
        if isinstance(name, int):
            dev = torch.device("cuda", name % count)
    return dev


class ModelPlugin(_PluginBase):
    """Loads the model from safetensors bytes once per worker (also on restarted workers).

    ``device``: ``"auto"``/``"cpu"``/``"cuda"``. ``threads``: torch (and OpenVINO)
    threads per worker; None: the host's cores divided by its workers (``per_host``).
    ``compiled``: the OpenVINO export to run instead of torch on CPU workers.
    """

    def __init__(
        self,
        key: str,
        data: bytes,
        device: Any,
        threads: int | None,
        per_host: dict[str, int],
        compiled: CompiledModel | None = None,
    ) -> None:
        self.key, self.data, self.device = key, data, device
        self.threads, self.per_host, self.compiled = threads, per_host, compiled
        self.name = f"napari-unet-model-{key[:16]}"

    def setup(self, worker: Any) -> None:
        import torch

        threads = self.threads
        if threads is None:
            host = host_of(getattr(worker, "address", ""))
            threads = max(1, (os.cpu_count() or 1) // max(1, self.per_host.get(host, 1)))
        torch.set_num_threads(threads)
        dev = _worker_device(self.device, worker)
        held = _LOADED.get(self.key)
        model = held.model if held is not None else load_bytes(self.data)
        backend, runtime = load_on_worker(self.compiled, dev, threads)
        _LOADED[self.key] = WorkerModel(model, dev, backend, runtime)

    def teardown(self, worker: Any) -> None:
        _LOADED.pop(self.key, None)


def load_bytes(data: bytes) -> Any:
    """A model from its safetensors checkpoint bytes."""
    from ..checkpoint import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(data)
        return load_model(path)


def model_bytes(model: Any) -> tuple[Any, bytes]:
    """(model object, its safetensors checkpoint bytes) for a model, a path, a name or None."""
    from .. import checkpoint
    from ..inference.resolve import resolve_model
    from ..models.base import SegmentationModel

    if model is None:
        path = checkpoint.default_model_path()
        return checkpoint.load_default_model(), Path(path).read_bytes()
    if not isinstance(model, SegmentationModel):
        path = Path(model)
        if path.is_file():
            return checkpoint.load_model(path), path.read_bytes()
        model, _ = resolve_model(model)  # a variant name (bundled trained, else untrained)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save_model(model, Path(tmp) / "model.safetensors")
        return model, path.read_bytes()


def report(start: float, objects: int, runtime: str | None = None) -> dict[str, Any]:
    """What a task returns to the client: objects, seconds, process, peak memory, and
    the runtime a chunk task ran on."""
    try:
        import resource  # Unix only

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        maxrss = None
    found = {
        "objects": objects,
        "seconds": time.perf_counter() - start,
        "pid": os.getpid(),
        "maxrss_mb": maxrss,
    }
    if runtime is not None:
        found["runtime"] = runtime
    return found
