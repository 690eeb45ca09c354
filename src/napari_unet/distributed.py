"""Distributed prediction on a dask cluster: probabilities and stitched labels in a zarr store.

``predict_distributed(model, image, scheduler=..., out="result.zarr")`` (also reached
through ``napari_unet.predict(..., scheduler=...)`` and ``napari-unet predict --dask``)
cuts every (Y, X) plane of ``image`` into output chunks of ``chunk_size`` pixels and
runs one dask task per chunk on the cluster's workers. The store ``out`` receives:

* ``probabilities`` float32 ``(C, *leading, Y, X)``, chunks ``(C, 1, ..., chunk, chunk)``;
* ``labels`` uint32 ``(*leading, Y, X)`` (instance ids unique over the whole volume, or
  semantic classes), chunks ``(1, ..., chunk, chunk)``;
* ``_work/``: per-chunk completion marks and the small data needed to stitch and resume.

How one chunk is computed (task ``A``): the input is read around the chunk with a
*context* of ``margin`` + the receptive-field radius, with the tiler's mirror rules at
the true image borders only (padded nets compute on the image reflect-padded at the
bottom/right to ``size_divisor``; the context block starts on that grid). The network
runs on that block with :func:`napari_unet.tiling.run_plane`, so the chunk's
probabilities equal the whole-image output — and the single-process ``predict(...,
exact=True)`` — to float rounding. The chunk plus ``margin`` pixels is then segmented
(:func:`napari_unet.postprocess.segment`) and only the chunk's core is kept, so an
object smaller than the margin is segmented exactly as in the whole image.

Stitching instance labels: every task numbers the objects of its core 1..n, writes
them to a scratch array (``_work/scratch``, deleted at the end) and stores, for each
of its four faces, its labels on a strip ``2·STRIP`` pixels wide across the
face (its own pixels and the neighbour's, from its margin). After all chunks, one small
task per chunk compares the strips of facing chunks: two ids are the same object when
they cover (mostly) the same pixels of the common strip. The client numbers all
objects (per-chunk counts, cumulative sum), joins matched ids (connected components of
the match graph = union-find) and renumbers them 1..K; a last task per chunk (``B``)
writes the chunk's final ids into ``labels``. Each output chunk is written once.

Failures and resuming: a task lost with a worker is re-run by dask. Each task writes
its completion mark after its data (``_work/counts`` for ``A``: objects + 1;
``_work/labelled`` for ``B``), so a run restarted with the same ``out`` recomputes only
unmarked chunks; a store written with another shape, dtype, chunking, model or setting
is refused with a clear error. The store records which run owns it: tasks of an older
run (still running after a cancel, or re-run by dask) never write into it. The models travel to the workers as safetensors bytes
(a :class:`~distributed.diagnostics.plugin.WorkerPlugin`) and are loaded once per
worker — never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # the base class of the model plugin; distributed is needed only to run
    from distributed.diagnostics.plugin import WorkerPlugin as _PluginBase
except ImportError:  # pragma: no cover
    _PluginBase = object  # type: ignore[assignment,misc]

__all__ = ["predict_distributed", "connect"]

FORMAT = "napari-unet-distributed/1"
ATTR = "napari_unet_distributed"
RUN_ATTR = "napari_unet_distributed_run"
WORK = "_work"
STRIP = 8
"""Half-width of the strips compared across chunk faces to match objects."""
DEFAULT_CHUNK = 1024
DEFAULT_MARGIN = 64
MAX_TILE = 2048
POLL = 0.05
"""Seconds between checks for finished tasks and for a cancel."""

# models loaded on this worker, keyed by the sha256 of their safetensors bytes
_MODELS: dict[str, Any] = {}
_DEVICES: dict[str, Any] = {}


# ------------------------------------------------------------------------ the cluster
def _parse_local(scheduler: str) -> int:
    rest = scheduler[len("local") :].lstrip(":")
    if not rest:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()  # one worker per GPU
        return os.cpu_count() or 1  # one single-threaded worker per core
    try:
        n = int(rest)
    except ValueError:
        raise ValueError(f"bad scheduler {scheduler!r}: use local:N with N workers") from None
    if n < 1:
        raise ValueError(f"bad scheduler {scheduler!r}: need at least one worker")
    return n


_ADDRESS = re.compile(
    r"^(?:(tcp|tls|inproc|ucx|ws|wss)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$"
)


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that is neither a ``Client``, ``local[:N]`` nor an address
    ``[tcp://]host:port`` — before anything is started or connected."""
    if not isinstance(scheduler, str):
        from distributed import Client

        if isinstance(scheduler, Client):
            return
        raise ValueError(
            f"scheduler must be a distributed.Client, an address or 'local:N', got {scheduler!r}"
        )
    if scheduler == "local" or scheduler.startswith("local:"):
        _parse_local(scheduler)
        return
    match = _ADDRESS.match(scheduler)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise ValueError(
            f"bad scheduler {scheduler!r}: use local:N (N worker processes here) or a "
            "scheduler address such as tcp://host:8786"
        )


CONNECT_TIMEOUT = float(os.environ.get("NAPARI_UNET_CONNECT_TIMEOUT", 20))
"""Seconds to wait for a remote scheduler before giving up
(environment variable ``NAPARI_UNET_CONNECT_TIMEOUT``)."""


@contextmanager
def connect(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``; closes what it opened.

    ``scheduler``: a ``Client`` (used as is), a scheduler address (``"tcp://host:8786"``)
    or ``"local:N"`` — a ``LocalCluster`` of N worker processes with one thread each
    (closed afterwards). The client opened here does not become dask's default. An
    unreachable address raises ``RuntimeError`` after ``CONNECT_TIMEOUT`` seconds.
    """
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    check_scheduler(scheduler)
    if scheduler == "local" or scheduler.startswith("local:"):
        n = _parse_local(scheduler)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(scheduler, set_as_default=False, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"cannot reach the dask scheduler at {scheduler} within {CONNECT_TIMEOUT:g} s "
            f"({reason[:200]}); is `dask scheduler` running there?"
        ) from None
    try:
        yield client
    finally:
        client.close()


# -------------------------------------------------------------------------- the lock
LOCK_STALE = 120.0
"""Seconds without a heartbeat after which another host's lock is considered abandoned."""


def _lock_path(out: str) -> Path | None:
    if "://" in out:
        return None  # object stores: no lock (one run per store is the user's job)
    path = Path(out)
    return path.with_name(f".{path.name}.napari-unet.lock")


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The live holder of ``lock``, or None when the lock is free or abandoned."""
    import socket

    try:
        info = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except ProcessLookupError:
            return None
        except (PermissionError, ValueError, OverflowError):
            pass
        return info
    return info if age < LOCK_STALE else None


@contextmanager
def store_lock(out: str) -> Iterator[None]:
    """One run writes a store at a time: a second run on the same output is refused at
    its start (the first is untouched). The lock is a small file beside the store,
    refreshed while the run lives and removed at its end; the lock of a dead process
    (or silent for ``LOCK_STALE`` s, on another host) is taken over."""
    import socket
    import threading

    lock = _lock_path(out)
    if lock is None:
        yield
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
                raise RuntimeError(
                    f"{out} is being written by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {since}); wait for it to finish, or choose "
                    "another output"
                ) from None
            lock.unlink(missing_ok=True)  # abandoned
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        break
    else:  # pragma: no cover - another process keeps re-creating it
        raise RuntimeError(f"cannot take the lock {lock}")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(10.0):
            try:
                os.utime(lock)
            except OSError:  # pragma: no cover
                pass

    thread = threading.Thread(target=beat, name="napari-unet-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        lock.unlink(missing_ok=True)


class _ModelPlugin(_PluginBase):
    """Loads the model from safetensors bytes once per worker (also on restarted workers).

    ``device``: ``"auto"``/``"cpu"``/``"cuda"``; with several GPUs and integer worker
    names (``LocalCluster``), worker ``i`` takes GPU ``i % n``. ``threads``: torch
    threads per worker; None: the host's cores divided by its workers.
    """

    def __init__(
        self,
        key: str,
        data: bytes,
        device: Any,
        threads: int | None,
        per_host: dict[str, int],
    ) -> None:
        self.key, self.data, self.device = key, data, device
        self.threads, self.per_host = threads, per_host
        self.name = f"napari-unet-model-{key[:16]}"

    def setup(self, worker: Any) -> None:
        import torch

        from .runtime import select_device

        threads = self.threads
        if threads is None:
            host = _host(getattr(worker, "address", ""))
            threads = max(1, (os.cpu_count() or 1) // max(1, self.per_host.get(host, 1)))
        torch.set_num_threads(threads)
        dev, _ = select_device(self.device)
        count = torch.cuda.device_count() if dev.type == "cuda" else 0
        if dev.type == "cuda" and dev.index is None and count > 1:
            name = getattr(worker, "name", None)
            if isinstance(name, int):
                dev = torch.device("cuda", name % count)
        if self.key not in _MODELS:
            _MODELS[self.key] = _load_bytes(self.data)
        _DEVICES[self.key] = dev

    def teardown(self, worker: Any) -> None:
        _MODELS.pop(self.key, None)
        _DEVICES.pop(self.key, None)


def _host(address: str) -> str:
    return address.split("://")[-1].rsplit(":", 1)[0]


def _register(client: Any, plugin: _ModelPlugin) -> None:
    if hasattr(client, "register_plugin"):
        client.register_plugin(plugin, name=plugin.name)
    else:  # pragma: no cover - distributed < 2023.9
        client.register_worker_plugin(plugin, name=plugin.name)


# ---------------------------------------------------------------------------- models
def _load_bytes(data: bytes) -> Any:
    from .checkpoint import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(data)
        return load_model(path)


def _model_bytes(model: Any) -> tuple[Any, bytes]:
    """(model object, its safetensors checkpoint bytes) for a model, a path, a name or None."""
    from . import checkpoint
    from .inference.resolve import resolve_model
    from .models.base import SegmentationModel

    if model is None:
        path = checkpoint.default_model_path()
        return checkpoint.load_default_model(), _read(path)
    if not isinstance(model, SegmentationModel):
        path = Path(model)
        if path.is_file():
            return checkpoint.load_model(path), _read(path)
        model = resolve_model(model)  # a variant name (bundled trained, else untrained)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save_model(model, Path(tmp) / "model.safetensors")
        return model, path.read_bytes()


def _read(path: Path) -> bytes:
    return Path(path).read_bytes()


# -------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Spec:
    """Everything a task needs (small and picklable)."""

    out: str
    key: str
    in_channels: int
    num_classes: int
    axes: str | None
    channel: int | None
    leading: tuple[int, ...]
    height: int
    width: int
    chunk: int
    margin: int
    context: int
    valid: bool
    exact: bool
    halo: int | None
    tile: int | None
    batch: int | None
    amp: bool | None
    level: int | None
    mode: str
    class_names: tuple[str, ...]
    threshold: float
    min_size: int
    seed_h: float
    strip: int = STRIP
    run: str = ""
    """The run that owns the store now; tasks of an older run never write (see ``_owner``)."""

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.height // self.chunk), -(-self.width // self.chunk)

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.leading)) if self.leading else 1

    @property
    def n_chunks(self) -> int:
        ny, nx = self.grid
        return self.n_planes * ny * nx

    def locate(self, lin: int) -> tuple[int, int, int]:
        """Linear chunk index → (plane, row, column) of the chunk grid."""
        ny, nx = self.grid
        p, rest = divmod(lin, ny * nx)
        i, j = divmod(rest, nx)
        return p, i, j

    def linear(self, p: int, i: int, j: int) -> int:
        ny, nx = self.grid
        return (p * ny + i) * nx + j

    def plane_index(self, p: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(p, self.leading)) if self.leading else ()

    def core(self, i: int, j: int) -> tuple[int, int, int, int]:
        c = self.chunk
        return i * c, min((i + 1) * c, self.height), j * c, min((j + 1) * c, self.width)

    def block(self, a: int, b: int, length: int, divisor: int) -> tuple[int, int]:
        """Input rows [A, B) computed for output rows [a, b): core + context, on the
        divisor grid, clipped to the (padded) image."""
        if self.valid:  # valid convolutions mirror the image themselves
            return max(a - self.context, 0), min(b + self.context, length)
        padded = -(-length // divisor) * divisor
        return max(a - self.context, 0), min(b + self.context, padded)


def _round_up(n: int, g: int) -> int:
    return -(-n // g) * g


def build_spec(
    obj: Any,
    layout: Any,
    *,
    out: Any,
    key: str,
    axes: str | None = None,
    channel: int | None = None,
    tile_size: int | None = None,
    batch_size: int | None = None,
    amp: bool | None = None,
    exact: bool = True,
    halo: int | None = None,
    level: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    margin: int = DEFAULT_MARGIN,
    mode: str = "instance",
    class_names: Any = None,
    threshold: float = 0.5,
    min_size: int = 15,
    seed_h: float = 1.0,
) -> _Spec:
    """The chunk geometry and settings of a run (see :func:`predict_distributed`)."""
    from .postprocess import default_class_names

    height, width = layout.spatial
    g = obj.size_divisor
    chunk = _round_up(max(int(chunk_size), 2 * STRIP, g), g)
    margin = 0 if mode == "semantic" else _round_up(max(int(margin), STRIP), g)
    valid = obj.border > 0
    if valid:
        context, eff_halo, exact_run = margin, halo, exact
    elif obj.info.tile_exact:
        rf = obj.receptive_field
        if halo is not None and exact and halo < rf:
            raise ValueError(f"exact tiling needs halo ≥ the receptive field radius {rf}")
        eff_halo = rf if halo is None else halo
        context, exact_run = _round_up(margin + eff_halo, g), eff_halo >= rf
    else:
        if exact:
            warnings.warn(
                f"{obj.name} cannot be tiled exactly; distributed chunks use Gaussian-blended "
                "windows and differ slightly from a single-process prediction",
                RuntimeWarning,
                stacklevel=2,
            )
        eff_halo = halo if halo is not None else 128
        context, exact_run = _round_up(margin + eff_halo, g), False
    names = tuple(
        class_names or getattr(obj, "class_names", None) or default_class_names(obj.num_classes)
    )
    return _Spec(
        out=str(out),
        key=key,
        in_channels=obj.in_channels,
        num_classes=obj.num_classes,
        axes=axes,
        channel=channel,
        leading=tuple(int(n) for n in layout.leading),
        height=int(height),
        width=int(width),
        chunk=chunk,
        margin=margin,
        context=context,
        valid=valid,
        exact=exact_run,
        halo=eff_halo,
        tile=tile_size,
        batch=batch_size,
        amp=amp,
        level=level,
        mode=mode,
        class_names=names,
        threshold=float(threshold),
        min_size=int(min_size),
        seed_h=float(seed_h),
    )


# ----------------------------------------------------------------------------- tasks
def _worker_model(spec: _Spec) -> tuple[Any, Any]:
    if spec.key not in _MODELS:
        raise RuntimeError(
            "the napari-unet model is not loaded on this worker (its plugin did not run)"
        )
    return _MODELS[spec.key], _DEVICES[spec.key]


def _open(spec: _Spec, mode: str = "r+") -> Any:
    import zarr

    return zarr.open_group(spec.out, mode=mode)


def _owner(spec: _Spec) -> Any:
    """The output group, or None when another run has taken over the store since this
    task was submitted (a task of a cancelled run still running, or one re-run by dask
    after its results were lost): such tasks must not write."""
    group = _open(spec)
    return group if dict(group.attrs).get(RUN_ATTR) == spec.run else None


def chunk_probabilities(
    model: Any,
    layout: Any,
    plane: int,
    stats: np.ndarray,
    spec: _Spec,
    i: int,
    j: int,
    device: Any,
) -> tuple[np.ndarray, int, int]:
    """Probabilities (C, h, w) of the context block of chunk (i, j) and its origin (A, Ac).

    The block's rows are ``[A, A + h)`` of the image (it may run into the bottom/right
    padding); every pixel of the chunk + ``margin`` equals the whole-image output.
    """
    import dask

    from .inference.normalize import normalize_block
    from .inference.plan import tile_plan_for
    from .inference.source import read_window, reflect_index
    from .inference.tiler import RunOptions, run_plane
    from .runtime import amp_dtype as _amp_dtype
    from .runtime import device_lock

    h, w = spec.height, spec.width
    g = model.size_divisor
    a, b, c, d = spec.core(i, j)
    r0, r1 = spec.block(a, b, h, g)
    c0, c1 = spec.block(c, d, w, g)
    shape = (r1 - r0, c1 - c0)
    tile = spec.tile or min(max(shape), MAX_TILE)
    plan = tile_plan_for(
        model, shape, tile_size=tile, exact=spec.exact, device=device, halo=spec.halo
    )
    opts = RunOptions(
        device=device,
        batch_size=spec.batch or (4 if device.type == "cuda" else 1),
        amp_dtype=_amp_dtype(device, spec.amp),
        channels_last=device.type == "cuda",
        level=spec.level,
    )
    data = layout.plane(plane)

    def read(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        block = read_window(data, reflect_index(rows + r0, h), reflect_index(cols + c0, w))
        return normalize_block(layout.convert(block), stats)

    sink = np.zeros((spec.num_classes, *shape), np.float32)
    with dask.config.set(scheduler="synchronous"), device_lock():
        model.eval().to(device)
        if opts.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        run_plane(model, read, plan, [sink], opts)
    return sink, r0, c0


def _relabel_core(seg: np.ndarray, core: tuple[slice, slice]) -> tuple[np.ndarray, int]:
    """Renumber ``seg``: ids present in the core → 1..n (in order), others → n+1.. ."""
    ids = np.unique(seg)
    ids = ids[ids > 0]
    inside = np.unique(seg[core])
    inside = inside[inside > 0]
    n = len(inside)
    lut = np.zeros(int(seg.max()) + 1, np.uint32)
    lut[inside] = np.arange(1, n + 1, dtype=np.uint32)
    outside = np.setdiff1d(ids, inside)
    lut[outside] = np.arange(n + 1, n + 1 + len(outside), dtype=np.uint32)
    return lut[seg], n


def _strips(spec: _Spec, labels: np.ndarray, s0: int, sc0: int, i: int, j: int) -> np.ndarray:
    """(4, 2k, chunk) labels across the top, bottom, left, right faces (0 where none)."""
    k, cs = spec.strip, spec.chunk
    a, b, c, d = spec.core(i, j)
    out = np.zeros((4, 2 * k, cs), np.uint32)
    for face, edge in ((0, a), (1, b)):
        if 0 < edge < spec.height:
            rows = labels[edge - k - s0 : min(edge + k, spec.height) - s0, c - sc0 : d - sc0]
            out[face, : rows.shape[0], : rows.shape[1]] = rows
    for face, edge in ((2, c), (3, d)):
        if 0 < edge < spec.width:
            cols = labels[a - s0 : b - s0, edge - k - sc0 : min(edge + k, spec.width) - sc0]
            out[face, : cols.shape[1], : cols.shape[0]] = cols.T
    return out


def _layout_for(spec: _Spec, source: Any) -> Any:
    from .inference.layout import resolve_layout

    image = source.data if isinstance(source, _Source) else source
    return resolve_layout(image, spec.in_channels, spec.axes, spec.channel)


@dataclass
class _Source:
    """Wraps a lazy image so that dask ships it as an object, never as a collection."""

    data: Any


FAULT_ENV = "NAPARI_UNET_DISTRIBUTED_FAULT"


def _maybe_fault() -> None:
    """Fault injection for tests: when the environment variable ``FAULT_ENV`` names an
    existing file, the first worker to remove it exits at once, after writing a chunk's
    data and before its completion mark — as if the machine had died there."""
    arm = os.environ.get(FAULT_ENV)
    if not arm:
        return
    try:
        os.remove(arm)
    except OSError:
        return
    os._exit(1)


def _task_chunk(spec: _Spec, source: Any, lin: int, stats: np.ndarray) -> dict[str, Any]:
    """Task A: probabilities and per-chunk labels of one chunk; returns a small report."""
    from .postprocess import segment

    start = time.perf_counter()
    model, device = _worker_model(spec)
    layout = _layout_for(spec, source)
    p, i, j = spec.locate(lin)
    a, b, c, d = spec.core(i, j)
    probs, r0, c0 = chunk_probabilities(model, layout, p, stats, spec, i, j, device)
    group = _owner(spec)
    if group is None:
        return {"stale": True}
    pidx = spec.plane_index(p)
    group["probabilities"][(slice(None), *pidx, slice(a, b), slice(c, d))] = probs[
        :, a - r0 : b - r0, c - c0 : d - c0
    ]
    work = group[WORK]
    if spec.mode == "semantic":
        labels = segment(
            probs[:, a - r0 : b - r0, c - c0 : d - c0],
            mode="semantic",
            class_names=spec.class_names,
            threshold=spec.threshold,
        )
        group["labels"][(*pidx, slice(a, b), slice(c, d))] = labels
        _maybe_fault()
        if _owner(spec) is None:
            return {"stale": True}
        work["counts"][lin] = 1
        work["labelled"][lin] = 1
        return _report(start, 0)
    s0, s1 = max(a - spec.margin, 0), min(b + spec.margin, spec.height)
    sc0, sc1 = max(c - spec.margin, 0), min(d + spec.margin, spec.width)
    seg = segment(
        probs[:, s0 - r0 : s1 - r0, sc0 - c0 : sc1 - c0],
        mode="instance",
        class_names=spec.class_names,
        threshold=spec.threshold,
        min_size=spec.min_size,
        seed_h=spec.seed_h,
    )
    core = (slice(a - s0, b - s0), slice(c - sc0, d - sc0))
    seg, n = _relabel_core(seg, core)
    work["scratch/labels"][(*pidx, slice(a, b), slice(c, d))] = seg[core]
    work["strips"][lin] = _strips(spec, seg, s0, sc0, i, j)
    _maybe_fault()
    if _owner(spec) is None:
        return {"stale": True}
    work["scratch/present"][lin] = 1
    work["counts"][lin] = n + 1  # the completion mark, written last
    return _report(start, n)


def _report(start: float, n: int) -> dict[str, Any]:
    try:
        import resource  # Unix only

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        maxrss = None
    return {
        "objects": n,
        "seconds": time.perf_counter() - start,
        "pid": os.getpid(),
        "maxrss_mb": maxrss,
    }


def _face_pairs(mine: np.ndarray, theirs: np.ndarray, n_mine: int, n_theirs: int) -> np.ndarray:
    """(m, 2) pairs of ids (mine, theirs) that cover mostly the same pixels of a strip."""
    a = mine.ravel().astype(np.int64)
    b = theirs.ravel().astype(np.int64)
    own_a = (a > 0) & (a <= n_mine)
    own_b = (b > 0) & (b <= n_theirs)
    both = own_a & own_b
    if not both.any():
        return np.zeros((0, 2), np.int64)
    size_a = np.bincount(a[own_a], minlength=n_mine + 1)
    size_b = np.bincount(b[own_b], minlength=n_theirs + 1)
    pair = a[both] * (n_theirs + 1) + b[both]
    keys, overlap = np.unique(pair, return_counts=True)
    pa, pb = keys // (n_theirs + 1), keys % (n_theirs + 1)
    keep = 2 * overlap >= np.minimum(size_a[pa], size_b[pb])
    return np.stack([pa[keep], pb[keep]], axis=1)


def _task_match(spec: _Spec, lin: int, counts: dict[int, int]) -> np.ndarray:
    """Matched ids across the bottom and right faces of chunk ``lin``:
    rows (chunk, id, neighbour chunk, neighbour id)."""
    strips = _open(spec, "r")[WORK]["strips"]
    p, i, j = spec.locate(lin)
    ny, nx = spec.grid
    mine = strips[lin]
    found = []
    for face, other, (ni, nj) in ((1, 0, (i + 1, j)), (3, 2, (i, j + 1))):
        if ni >= ny or nj >= nx:
            continue
        nlin = spec.linear(p, ni, nj)
        theirs = strips[nlin][other]
        pairs = _face_pairs(mine[face], theirs, counts[lin], counts[nlin])
        if len(pairs):
            rows = np.empty((len(pairs), 4), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = lin, pairs[:, 0], nlin, pairs[:, 1]
            found.append(rows)
    return np.concatenate(found) if found else np.zeros((0, 4), np.int64)


def _task_relabel(spec: _Spec, lin: int, lut: np.ndarray) -> dict[str, Any]:
    """Task B: per-chunk ids → final ids; writes the chunk of ``labels`` once."""
    start = time.perf_counter()
    group = _owner(spec)
    if group is None:
        return {"stale": True}
    if not group[WORK]["scratch/present"][lin]:
        raise RuntimeError(f"chunk {lin} has no per-chunk labels to relabel")  # pragma: no cover
    p, i, j = spec.locate(lin)
    a, b, c, d = spec.core(i, j)
    region = (*spec.plane_index(p), slice(a, b), slice(c, d))
    local = np.asarray(group[WORK]["scratch/labels"][region])
    group["labels"][region] = lut[local]
    group[WORK]["labelled"][lin] = 1
    return _report(start, len(lut) - 1)


# ----------------------------------------------------------------------------- store
def _create(
    group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str
) -> Any:
    if hasattr(group, "create_array"):
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def _open_store(spec: _Spec, fingerprint: dict[str, Any]) -> Any:
    """Open (or create) the output group; refuse a store this run cannot continue."""
    import zarr

    path = spec.out
    expected = {
        "probabilities": (
            (spec.num_classes, *spec.leading, spec.height, spec.width),
            "float32",
            (spec.num_classes,) + (1,) * len(spec.leading) + (spec.chunk, spec.chunk),
        ),
        "labels": (
            (*spec.leading, spec.height, spec.width),
            "uint32",
            (1,) * len(spec.leading) + (spec.chunk, spec.chunk),
        ),
    }
    exists = Path(path).exists() if "://" not in path else True
    group = None
    if exists:
        try:
            group = zarr.open_group(path, mode="r+")
        except Exception as err:  # an array, a file, or not zarr at all
            if "://" in path:
                group = None
            else:
                raise ValueError(
                    f"{path} exists and is not a zarr group; distributed prediction writes a "
                    "group with 'probabilities' and 'labels' (choose a new path)"
                ) from err
    if group is None:
        group = zarr.open_group(path, mode="a")
    stored = dict(group.attrs).get(ATTR)
    for name, (shape, dtype, chunks) in expected.items():
        if name not in group:
            continue
        arr = group[name]
        got = (tuple(arr.shape), str(np.dtype(arr.dtype)), tuple(arr.chunks))
        if got != (shape, dtype, chunks):
            raise ValueError(
                f"the existing store {path} cannot be continued: its array {name!r} has shape "
                f"{got[0]}, dtype {got[1]}, chunks {got[2]} but this run writes shape {shape}, "
                f"dtype {dtype}, chunks {chunks}; use a new output path or delete the store"
            )
    if stored is not None and stored != fingerprint:
        diff = sorted(
            k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"the existing store {path} was written by another run (different {', '.join(diff)}); "
            "use a new output path or delete the store to start over"
        )
    if stored is None and any(name in group for name in (*expected, WORK)):
        raise ValueError(
            f"{path} already holds arrays not written by napari-unet's distributed prediction; "
            "choose a new output path"
        )
    if stored is None:
        group.attrs[ATTR] = fingerprint
    for name, (shape, dtype, chunks) in expected.items():
        if name not in group:
            _create(group, name, shape, chunks, dtype)
    work = group.require_group(WORK)
    n, k, cs = spec.n_chunks, spec.strip, spec.chunk
    if "counts" not in work:
        _create(work, "counts", (n,), (1,), "int64")
    if "labelled" not in work:
        _create(work, "labelled", (n,), (1,), "uint8")
    if spec.mode == "instance" and "strips" not in work:
        _create(work, "strips", (n, 4, 2 * k, cs), (1, 4, 2 * k, cs), "uint32")
    return group


def _scratch(group: Any, spec: _Spec) -> Any:
    work = group[WORK]
    scratch = work.require_group("scratch")
    if "labels" not in scratch:
        shape = (*spec.leading, spec.height, spec.width)
        _create(
            scratch, "labels", shape, (1,) * len(spec.leading) + (spec.chunk, spec.chunk), "uint32"
        )
    if "present" not in scratch:
        _create(scratch, "present", (spec.n_chunks,), (1,), "uint8")
    return scratch


# ------------------------------------------------------------------------------- run
def _gather(
    client: Any,
    futures: list[Any],
    on_done: Callable[[], None],
    cancel: Any,
) -> list[Any]:
    """Results of ``futures`` in order; calls ``on_done`` after each; honours ``cancel``.

    Polls :class:`distributed.as_completed` without blocking (every ``POLL`` s) so a
    cancel is seen quickly. (``distributed.wait(..., timeout=)`` in a loop would leak
    about 2.5 KB per pending future per call in the client: 1.4 GB over a 16384² run.)
    """
    from distributed import as_completed

    from .runtime import Cancelled, is_cancelled

    with client.as_current():
        finished = as_completed(futures)
    left = len(futures)
    try:
        while left:
            if is_cancelled(cancel):
                raise Cancelled()
            batch = finished.next_batch(block=False)
            if not batch:
                time.sleep(POLL)
                continue
            for fut in batch:
                if fut.status == "error":
                    fut.result()  # raises the task's exception here
                left -= 1
                on_done()
        results = [f.result() for f in futures]
    except BaseException:
        client.cancel([f for f in futures if not f.done()])
        raise
    finally:
        finished.clear()
        # let the scheduler forget them now: if a worker dies later, dask must not
        # re-run finished tasks of this phase
        for fut in futures:
            fut.release()
    if any(isinstance(r, dict) and r.get("stale") for r in results):
        raise RuntimeError("another run has taken over the output store; stopping this one")
    return results


def predict_distributed(
    model: Any,
    image: Any,
    *,
    scheduler: Any,
    out: str | os.PathLike[str],
    axes: str | None = None,
    channel: int | None = None,
    tile_size: int | None = None,
    batch_size: int | None = None,
    device: Any = "auto",
    amp: bool | None = None,
    exact: bool = True,
    halo: int | None = None,
    level: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    margin: int = DEFAULT_MARGIN,
    mode: str = "instance",
    class_names: list[str] | None = None,
    threshold: float = 0.5,
    min_size: int = 15,
    seed_h: float = 1.0,
    torch_threads: int | None = None,
    retries: int = 1,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    overwrite: bool = False,
) -> tuple[Any, Any]:
    """Predict ``image`` on a dask cluster into the zarr group ``out``.

    Returns the opened zarr arrays ``(probabilities, labels)``: float32
    ``(C, *leading, Y, X)`` and uint32 ``(*leading, Y, X)``.

    ``scheduler``: a ``distributed.Client``, an address ``"tcp://…"`` or ``"local:N"``
    (a local cluster of N single-threaded worker processes, closed afterwards); run
    one worker per GPU. Workers must see ``out`` (a shared folder or an fsspec URL)
    and ``image`` (a zarr array is read by the workers themselves; a numpy array is
    copied to every worker; a dask array is computed piecewise on the workers).

    ``chunk_size``: output chunk (and task) size in pixels, rounded up to the model's
    ``size_divisor``. ``margin``: pixels of context around each chunk used for the
    segmentation; objects smaller than the margin are segmented exactly as in the whole
    image and keep one id across chunk borders. Probabilities use a halo of the
    receptive-field radius (``halo`` may raise it), i.e. they equal the single-process
    ``predict(..., exact=True)``; models that cannot be tiled exactly (Swin-UNet, …)
    use Gaussian-blended windows inside each chunk's context and are approximate.
    ``mode``/``class_names``/``threshold``/``min_size``/``seed_h``: as
    :func:`napari_unet.postprocess.segment`. ``torch_threads``: torch threads per
    worker (default: the host's cores divided by its workers). ``retries``: re-runs of a
    failing task (a task lost with its worker is re-run by dask anyway).

    An existing ``out`` written by an earlier, interrupted run with the same settings
    is resumed: only chunks without a completion mark are computed. ``progress(done,
    total)`` is called after each finished chunk task; ``cancel`` (an Event or a
    callable) stops the run with :class:`~napari_unet.tiling.Cancelled` and keeps the
    store, so the same call resumes it.

    Safety: ``out`` is checked first (never the input, nor inside or around it; a zarr
    folder when it exists) and locked for this run (:func:`store_lock`: a second run on
    the same store is refused at its start). ``overwrite=True`` deletes an existing store
    — only once the model, the input and the cluster are ready. A store created by a
    run that fails before any chunk is done is removed. A bad ``scheduler`` is refused
    at once; an unreachable one after ``CONNECT_TIMEOUT`` seconds.
    """

    if out is None:
        raise ValueError("distributed prediction writes a zarr store: pass out='result.zarr'")
    if mode not in ("instance", "semantic"):
        raise ValueError(f"mode must be 'instance' or 'semantic', got {mode!r}")
    check_scheduler(scheduler)
    out = os.fspath(out)
    local = "://" not in out
    if local:  # never the input, never inside it; the kind and the folder are checked
        from .outputs import plan_output

        plan_output(
            out, ("zarr",), overwrite=overwrite, resume=not overwrite,
            inputs=[image, model if isinstance(model, (str, os.PathLike)) else None],
            what="output store",
        )  # fmt: skip
    with store_lock(out):
        return _predict_locked(
            model, image, scheduler=scheduler, out=out, axes=axes, channel=channel,
            tile_size=tile_size, batch_size=batch_size, device=device, amp=amp, exact=exact,
            halo=halo, level=level, chunk_size=chunk_size, margin=margin, mode=mode,
            class_names=class_names, threshold=threshold, min_size=min_size, seed_h=seed_h,
            torch_threads=torch_threads, retries=retries, progress=progress, cancel=cancel,
            overwrite=overwrite, local=local,
        )  # fmt: skip


def _predict_locked(
    model: Any,
    image: Any,
    *,
    scheduler: Any,
    out: str,
    axes: str | None,
    channel: int | None,
    tile_size: int | None,
    batch_size: int | None,
    device: Any,
    amp: bool | None,
    exact: bool,
    halo: int | None,
    level: int | None,
    chunk_size: int,
    margin: int,
    mode: str,
    class_names: list[str] | None,
    threshold: float,
    min_size: int,
    seed_h: float,
    torch_threads: int | None,
    retries: int,
    progress: Callable[[int, int], None] | None,
    cancel: Any,
    overwrite: bool,
    local: bool,
) -> tuple[Any, Any]:
    from .inference.layout import resolve_layout
    from .inference.normalize import get_normalization, normalization_stats, sample_plane

    obj, data = _model_bytes(model)
    if level is not None and not hasattr(obj, "level_parameters"):
        raise ValueError(f"level= prunes UNet++ only; {obj.name} has no levels")
    key = hashlib.sha256(data).hexdigest()
    layout = resolve_layout(image, obj.in_channels, axes, channel)
    spec = build_spec(
        obj,
        layout,
        out=out,
        key=key,
        axes=axes,
        channel=channel,
        tile_size=tile_size,
        batch_size=batch_size,
        amp=amp,
        exact=exact,
        halo=halo,
        level=level,
        chunk_size=chunk_size,
        margin=margin,
        mode=mode,
        class_names=class_names,
        threshold=threshold,
        min_size=min_size,
        seed_h=seed_h,
    )
    chunk, margin, eff_halo, names = spec.chunk, spec.margin, spec.halo, spec.class_names
    # the single-process statistics: one per plane, from the same subsample, on the client
    norm = get_normalization(obj)
    stats = np.stack(
        [
            normalization_stats(layout.convert(sample_plane(layout.plane(p))), norm)
            for p in range(spec.n_planes)
        ]
    )
    fingerprint = {
        "format": FORMAT,
        "model": key,
        "shape": [spec.num_classes, *spec.leading, spec.height, spec.width],
        "chunk": chunk,
        "margin": margin,
        "halo": eff_halo,
        "amp": amp,
        "level": level,
        "mode": mode,
        "classes": list(names),
        "threshold": spec.threshold,
        "min_size": spec.min_size,
        "seed_h": spec.seed_h,
        "normalization": hashlib.sha256(stats.tobytes()).hexdigest()[:16],
    }
    fingerprint = json.loads(json.dumps(fingerprint))
    existed = os.path.lexists(out) if local else True
    if existed and not overwrite:  # resume: refuse a store of another run before starting
        group = _open_store(spec, fingerprint)
        work = group[WORK]
        counts = np.asarray(work["counts"][:])
        labelled = np.asarray(work["labelled"][:])
        if (counts > 0).all() and (labelled > 0).all():
            return _result(spec)

    with connect(scheduler) as client:
        created = not existed or overwrite
        if local and overwrite and existed:  # only now: inputs, model and cluster are fine
            shutil.rmtree(out)
        if created:
            group = _open_store(spec, fingerprint)
            work = group[WORK]
            counts = np.asarray(work["counts"][:])
            labelled = np.asarray(work["labelled"][:])
        try:
            _run_on(client, group, spec, image, key, data, device, torch_threads, stats,
                    progress, cancel, retries, counts, labelled)  # fmt: skip
        except BaseException:
            if created and local and not (np.asarray(group[WORK]["counts"][:]) > 0).any():
                shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave nothing
            raise
    return _result(spec)


def _run_on(
    client, group, spec, image, key, data, device, torch_threads, stats, progress, cancel,
    retries, counts, labelled,
) -> None:  # fmt: skip
    """Register the model on the workers and run the chunk, match and relabel tasks."""
    per_host: dict[str, int] = {}
    for addr in client.scheduler_info()["workers"]:
        per_host[_host(addr)] = per_host.get(_host(addr), 0) + 1
    _register(client, _ModelPlugin(key, data, device, torch_threads, per_host))
    source = (
        client.scatter(image, broadcast=True) if isinstance(image, np.ndarray) else _Source(image)
    )
    spec = dataclasses.replace(spec, run=uuid.uuid4().hex[:12])
    group.attrs[RUN_ATTR] = spec.run  # from now on only this run's tasks write
    run = _Run(client, spec, source, stats, progress, cancel, retries)
    try:
        if spec.mode == "semantic":
            run.total = int((counts == 0).sum())
            run.chunks(np.flatnonzero(counts == 0))
        else:
            run.instance(group, counts, labelled)
    finally:
        group.attrs[RUN_ATTR] = ""  # tasks still running (cancel, error) must not write
        if not isinstance(source, _Source):
            source.release()


def _result(spec: _Spec) -> tuple[Any, Any]:
    group = _open(spec, "r")
    return group["probabilities"], group["labels"]


class _Run:
    """The client side of one run: submits tasks, stitches, records progress."""

    def __init__(self, client, spec, source, stats, progress, cancel, retries) -> None:
        self.client, self.spec, self.source, self.stats = client, spec, source, stats
        self.progress, self.cancel, self.retries = progress, cancel, retries
        self.token = spec.run
        self.done = 0
        self.total = 0

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def chunks(self, todo: np.ndarray) -> list[dict[str, Any]]:
        """Task A for the chunks ``todo``."""
        if len(todo) == 0:
            return []
        spec = self.spec
        futures = [
            self.client.submit(
                _task_chunk,
                spec,
                self.source,
                int(lin),
                self.stats[spec.locate(int(lin))[0]],
                key=f"napari-unet-chunk-{self.token}-{int(lin)}",
                retries=self.retries,
            )
            for lin in todo
        ]
        return _gather(self.client, futures, self._tick, self.cancel)

    def instance(self, group: Any, counts: np.ndarray, labelled: np.ndarray) -> None:
        spec, work = self.spec, group[WORK]
        scratch = _scratch(group, spec)
        todo_a = np.flatnonzero(counts == 0)
        self.total = len(todo_a) + len(np.flatnonzero((labelled == 0) | (counts == 0)))
        self.chunks(todo_a)
        redone = set(int(x) for x in todo_a)
        old = np.asarray(work["mapping"][:]) if "mapping" in work else None
        for _ in range(3):
            counts = np.asarray(work["counts"][:])
            if (counts == 0).any():  # pragma: no cover - a task returned without marking
                raise RuntimeError("some chunks were not computed; run again to resume")
            n = counts - 1
            offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            mapping = self._mapping(n, offsets)
            changed = self._changed(old, mapping, offsets, n)
            labelled = np.asarray(work["labelled"][:])
            todo_b = np.flatnonzero((labelled == 0) | changed)
            todo_b = np.union1d(todo_b, np.array(sorted(redone), dtype=np.int64))
            present = np.asarray(scratch["present"][:])
            missing = todo_b[present[todo_b] == 0]
            if len(missing) == 0:
                break
            # their per-chunk labels were cleaned up after an earlier run: recompute
            self.total += 2 * len(missing)
            for lin in missing:
                work["counts"][int(lin)] = 0
            self.chunks(missing)
            redone.update(int(x) for x in missing)
        else:  # pragma: no cover - non-deterministic results on every try
            raise RuntimeError("chunk results changed on every recomputation; cannot stitch")
        self.total = self.done + len(todo_b)
        for lin in np.flatnonzero(changed & (labelled > 0)):
            work["labelled"][int(lin)] = 0
        if "mapping" in work:
            del work["mapping"]
        _create(work, "mapping", mapping.shape, (min(len(mapping), 1 << 20),), "uint32")[:] = (
            mapping
        )
        futures = [
            self.client.submit(
                _task_relabel,
                spec,
                int(lin),
                np.concatenate([[0], mapping[offsets[lin] + 1 : offsets[lin + 1] + 1]]).astype(
                    np.uint32
                ),
                key=f"napari-unet-relabel-{self.token}-{int(lin)}",
                retries=self.retries,
            )
            for lin in todo_b
        ]
        _gather(self.client, futures, self._tick, self.cancel)
        del work["scratch"]

    def _mapping(self, n: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Final id of every global id 0..N: matched ids joined, renumbered 1..K."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        spec = self.spec
        counts = {int(i): int(c) for i, c in enumerate(n)}
        ny, nx = spec.grid
        lins = [
            lin
            for lin in range(spec.n_chunks)
            if (spec.locate(lin)[1] + 1 < ny or spec.locate(lin)[2] + 1 < nx)
        ]
        futures = [
            self.client.submit(
                _task_match,
                spec,
                lin,
                {x: counts[x] for x in (lin, lin + 1, lin + nx) if x in counts},
                key=f"napari-unet-match-{self.token}-{lin}",
                retries=self.retries,
            )
            for lin in lins
        ]
        pairs = _gather(self.client, futures, lambda: None, self.cancel)
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 4), np.int64)
        total = int(offsets[-1])
        # global id of local id ``k`` (1..n) of chunk ``lin`` is offsets[lin] + k
        first = offsets[pairs[:, 0]] + pairs[:, 1]
        second = offsets[pairs[:, 2]] + pairs[:, 3]
        graph = coo_matrix(
            (np.ones(len(first), np.int8), (first, second)), shape=(total + 1, total + 1)
        )
        _, components = connected_components(graph, directed=False)
        # components are numbered in order of their smallest id; id 0 (background) → 0
        return components.astype(np.uint32)

    def _changed(
        self, old: np.ndarray | None, mapping: np.ndarray, offsets: np.ndarray, n: np.ndarray
    ) -> np.ndarray:
        """Chunks whose final ids differ from the mapping stored by an earlier run."""
        spec = self.spec
        if old is None:
            return np.zeros(spec.n_chunks, bool)
        if old.shape != mapping.shape:
            return np.ones(spec.n_chunks, bool)
        diff = np.concatenate([[0], np.cumsum(old != mapping)])
        return diff[offsets[1:] + 1] - diff[offsets[:-1] + 1] > 0
