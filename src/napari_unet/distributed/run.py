"""The driver of a dask run: :func:`predict_distributed` and the client side of a run.

Steps: check the call and take the store lock; load the model and build the run's
specification and normalisation statistics (:func:`_prepare`); return a finished store
as is; connect; create (or continue) the store; choose the runtime (:mod:`.compiled`);
register the model on the workers; run the chunk tasks, then — instance labels — the
match tasks, the id join and the relabel tasks (:class:`_Run`); record what ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cluster import check_scheduler, connect, register, workers_per_host
from .compiled import choose_runtime
from .spec import DEFAULT_CHUNK, DEFAULT_MARGIN, RunSpec, block_plan, build_spec
from .stitch import changed_chunks, chunk_lut, join_ids, match_sources, task_match, task_relabel
from .store import (
    RUN_ATTR,
    RUNTIME_ATTR,
    WORK,
    create_array,
    fingerprint,
    marks,
    open_store,
    result,
    scratch,
    store_lock,
)
from .tasks import LazyImage, task_chunk
from .worker import ModelPlugin, model_bytes

POLL = 0.05
"""Seconds between checks for finished tasks and for a cancel."""


@dataclass
class _Job:
    """How a run is executed (not part of what it computes)."""

    scheduler: Any
    device: Any
    runtime: str | None
    torch_threads: int | None
    retries: int
    progress: Callable[[int, int], None] | None
    cancel: Any
    overwrite: bool
    local: bool


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
    runtime: str | None = None,
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
    use Gaussian-blended windows (the planner's halo) and are approximate.
    ``mode``/``class_names``/``threshold``/``min_size``/``seed_h``: as
    :func:`napari_unet.postprocess.segment`. ``torch_threads``: torch (and OpenVINO)
    threads per worker (default: the host's cores divided by its workers). ``retries``:
    re-runs of a failing task (a task lost with its worker is re-run by dask anyway).

    ``runtime``: as in :func:`napari_unet.predict`, decided and exported once in the
    client, compiled by each worker (see :mod:`.compiled`); the store's attribute
    ``napari_unet_distributed_runtime`` records what the chunk tasks ran on.

    An existing ``out`` written by an earlier, interrupted run with the same settings
    is resumed: only chunks without a completion mark are computed. ``progress(done,
    total)`` is called after each finished chunk task; ``cancel`` (an Event or a
    callable) stops the run with :class:`~napari_unet.runtime.Cancelled` and keeps the
    store, so the same call resumes it.

    Safety: ``out`` is checked first (never the input, nor inside or around it; a zarr
    folder when it exists) and locked for this run (:func:`~.store.store_lock`: a second
    run on the same store is refused at its start). ``overwrite=True`` deletes an
    existing store — only once the model, the input and the cluster are ready. A store
    created by a run that fails before any chunk is done is removed. A bad ``scheduler``
    is refused at once; an unreachable one after ``CONNECT_TIMEOUT`` seconds.
    """
    out = _check_call(model, image, scheduler=scheduler, out=out, mode=mode, overwrite=overwrite)
    settings = dict(
        axes=axes, channel=channel, tile_size=tile_size, batch_size=batch_size, amp=amp,
        exact=exact, halo=halo, level=level, chunk_size=chunk_size, margin=margin, mode=mode,
        class_names=class_names, threshold=threshold, min_size=min_size, seed_h=seed_h,
    )  # fmt: skip
    job = _Job(scheduler, device, runtime, torch_threads, retries, progress, cancel, overwrite,
               local="://" not in out)  # fmt: skip
    with store_lock(out):
        return _predict_locked(model, image, out, settings, job)


def _check_call(model: Any, image: Any, *, scheduler, out, mode: str, overwrite: bool) -> str:
    """Refuse a bad call before anything starts; ``out`` as a string."""
    if out is None:
        raise ValueError("distributed prediction writes a zarr store: pass out='result.zarr'")
    if mode not in ("instance", "semantic"):
        raise ValueError(f"mode must be 'instance' or 'semantic', got {mode!r}")
    check_scheduler(scheduler)
    out = os.fspath(out)
    if "://" not in out:  # never the input, never inside it; the kind and the folder
        from ..outputs import plan_output

        plan_output(
            out, ("zarr",), overwrite=overwrite, resume=not overwrite,
            inputs=[image, model if isinstance(model, (str, os.PathLike)) else None],
            what="output store",
        )  # fmt: skip
    return out


def _prepare(model: Any, image: Any, out: str, settings: dict[str, Any]) -> tuple[Any, ...]:
    """(model, its safetensors bytes, run specification, per-plane normalisation
    statistics): the single-process statistics, from the same subsample, on the client."""
    from ..inference.layout import resolve_layout
    from ..inference.normalize import get_normalization
    from ..inference.source import PlaneSource

    obj, data = model_bytes(model)
    obj.check_level(settings["level"])
    key = hashlib.sha256(data).hexdigest()
    layout = resolve_layout(image, obj.in_channels, settings["axes"], settings["channel"])
    spec = build_spec(obj, layout, out=out, key=key, **settings)
    norm = get_normalization(obj)
    stats = np.stack([PlaneSource.open(layout, p, norm).stats for p in range(spec.n_planes)])
    return obj, data, spec, stats


def _predict_locked(
    model: Any, image: Any, out: str, settings: dict[str, Any], job: _Job
) -> tuple[Any, Any]:
    obj, data, spec, stats = _prepare(model, image, out, settings)
    wanted = fingerprint(spec, stats)
    existed = os.path.lexists(out) if job.local else True
    if existed and not job.overwrite:  # resume: refuse a store of another run before starting
        group = open_store(spec, wanted)
        counts, labelled = marks(group)
        if (counts > 0).all() and (labelled > 0).all():
            return result(spec)
    with connect(job.scheduler) as client:
        created = not existed or job.overwrite
        if job.local and job.overwrite and existed:  # only now: inputs, model, cluster fine
            shutil.rmtree(out)
        if created:
            group = open_store(spec, wanted)
        try:
            _run_on(client, group, spec, obj, data, image, stats, job)
        except BaseException:
            if created and job.local and not (marks(group)[0] > 0).any():
                shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave nothing
            raise
    return result(spec)


def _run_on(client, group, spec: RunSpec, obj, data: bytes, image, stats, job: _Job) -> None:
    """Choose the runtime, register the model on the workers and run the chunk, match
    and relabel tasks; record what the chunk tasks ran on."""
    counts, labelled = marks(group)
    plan = block_plan(obj, spec)
    name, compiled = choose_runtime(
        obj, plan, windows=plan.n_tiles * int((counts == 0).sum()), device=job.device,
        runtime=job.runtime, exact=spec.exact, amp=spec.amp, level=spec.level,
    )  # fmt: skip
    per_host = workers_per_host(client)
    register(client, ModelPlugin(spec.key, data, job.device, job.torch_threads, per_host, compiled))
    source = (
        client.scatter(image, broadcast=True) if isinstance(image, np.ndarray) else LazyImage(image)
    )
    spec = dataclasses.replace(spec, run=uuid.uuid4().hex[:12])
    group.attrs[RUN_ATTR] = spec.run  # from now on only this run's tasks write
    run = _Run(client, spec, source, stats, job)
    try:
        if spec.mode == "semantic":
            run.total = int((counts == 0).sum())
            run.chunks(np.flatnonzero(counts == 0))
        else:
            run.instance(group, counts)
    finally:
        group.attrs[RUN_ATTR] = ""  # tasks still running (cancel, error) must not write
        if not isinstance(source, LazyImage):
            source.release()
        _record_runtime(group, name, compiled, run.ran)


def _record_runtime(group: Any, chosen: str, compiled: Any, ran: Counter) -> None:
    """Store what this run's chunk tasks ran on (when it ran any); warn when workers fell
    back to torch."""
    if not ran:
        return
    group.attrs[RUNTIME_ATTR] = {
        "chosen": chosen,
        "precision": compiled.precision if compiled is not None else None,
        "ran": dict(sorted(ran.items())),
    }
    fallback = sum(n for name, n in ran.items() if name != chosen)
    if fallback:
        warnings.warn(
            f"napari-unet: {fallback} of {sum(ran.values())} chunks ran on torch instead of "
            f"{chosen} (workers on a GPU, or that could not load it: see their logs)",
            RuntimeWarning,
            stacklevel=4,
        )


def _gather(client: Any, futures: list[Any], on_done: Callable[[], None], cancel: Any) -> list:
    """Results of ``futures`` in order; calls ``on_done`` after each; honours ``cancel``.

    Polls :class:`distributed.as_completed` without blocking (every ``POLL`` s) so a
    cancel is seen quickly. (``distributed.wait(..., timeout=)`` in a loop would leak
    about 2.5 KB per pending future per call in the client: 1.4 GB over a 16384² run.)
    """
    from distributed import as_completed

    from ..runtime import Cancelled, is_cancelled

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


class _Run:
    """The client side of one run: submits tasks, stitches, records progress."""

    def __init__(self, client, spec: RunSpec, source, stats: np.ndarray, job: _Job) -> None:
        self.client, self.spec, self.source, self.stats = client, spec, source, stats
        self.progress, self.cancel, self.retries = job.progress, job.cancel, job.retries
        self.token = spec.run
        self.done = 0
        self.total = 0
        self.ran: Counter = Counter()
        """Chunk tasks of this run per runtime they ran on."""

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _submit(self, name: str, func: Callable, lins, *args: Callable[[int], Any]) -> list:
        """One task ``func(spec, …, lin, …)`` per chunk of ``lins``; ``args``: per-chunk
        arguments, each ``f(lin)``."""
        return [
            self.client.submit(
                func,
                self.spec,
                *(f(int(lin)) for f in args),
                key=f"napari-unet-{name}-{self.token}-{int(lin)}",
                retries=self.retries,
            )  # fmt: skip
            for lin in lins
        ]

    def chunks(self, todo: np.ndarray) -> list[dict[str, Any]]:
        """The chunk task for the chunks ``todo``."""
        if len(todo) == 0:
            return []
        stats = self.stats
        futures = self._submit(
            "chunk", task_chunk, todo, lambda lin: self.source, lambda lin: lin,
            lambda lin: stats[self.spec.locate(lin)[0]],
        )  # fmt: skip
        reports = _gather(self.client, futures, self._tick, self.cancel)
        self.ran.update(r.get("runtime", "torch") for r in reports)
        return reports

    def instance(self, group: Any, counts: np.ndarray) -> None:
        """Instance labels: chunk tasks, matching, the id join, relabel tasks."""
        work = group[WORK]
        scratch(group, self.spec)
        todo_a = np.flatnonzero(counts == 0)
        labelled = marks(group)[1]
        self.total = len(todo_a) + len(np.flatnonzero((labelled == 0) | (counts == 0)))
        self.chunks(todo_a)
        mapping, offsets, todo_b = self._stable_mapping(group, set(int(x) for x in todo_a))
        if "mapping" in work:
            del work["mapping"]
        chunks = (min(len(mapping), 1 << 20),)
        create_array(work, "mapping", mapping.shape, chunks, "uint32")[:] = mapping
        futures = self._submit(
            "relabel", task_relabel, todo_b, lambda lin: lin,
            lambda lin: chunk_lut(mapping, offsets, lin),
        )  # fmt: skip
        _gather(self.client, futures, self._tick, self.cancel)
        del work["scratch"]

    def _stable_mapping(self, group: Any, redone: set[int]) -> tuple[np.ndarray, ...]:
        """(mapping, offsets, chunks to relabel): the id join over all chunks; chunks whose
        per-chunk labels were cleaned up after an earlier run are computed again first."""
        work = group[WORK]
        old = np.asarray(work["mapping"][:]) if "mapping" in work else None
        for _ in range(3):
            counts, labelled = marks(group)
            if (counts == 0).any():  # pragma: no cover - a task returned without marking
                raise RuntimeError("some chunks were not computed; run again to resume")
            n = counts - 1
            offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            mapping = self._mapping(n, offsets)
            changed = changed_chunks(old, mapping, offsets, self.spec.n_chunks)
            todo_b = np.flatnonzero((labelled == 0) | changed)
            todo_b = np.union1d(todo_b, np.array(sorted(redone), dtype=np.int64))
            present = np.asarray(work["scratch/present"][:])
            missing = todo_b[present[todo_b] == 0]
            if len(missing) == 0:
                break
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
        return mapping, offsets, todo_b

    def _mapping(self, n: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Final id of every global id 0..N: match tasks on the workers, then the join."""
        counts = {int(i): int(c) for i, c in enumerate(n)}
        nx = self.spec.grid[1]
        futures = self._submit(
            "match", task_match, match_sources(self.spec), lambda lin: lin,
            lambda lin: {x: counts[x] for x in (lin, lin + 1, lin + nx) if x in counts},
        )  # fmt: skip
        pairs = _gather(self.client, futures, lambda: None, self.cancel)
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 4), np.int64)
        return join_ids(pairs, offsets)
