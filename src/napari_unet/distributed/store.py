"""The zarr output of a dask run: its arrays, the completion marks that make it
resumable, the checks that refuse a store of another run, and the store lock.

Layout of the group ``out``: ``probabilities`` float32 ``(C, *leading, Y, X)`` and
``labels`` uint32 ``(*leading, Y, X)``, chunked like the run; ``_work/``: per-chunk
completion marks (``counts``: objects + 1 once a chunk task is done, ``labelled``: 1 once
its final labels are written), the face strips, the id mapping and, during a run,
``scratch/`` (per-chunk labels). Attributes: :data:`ATTR` (the run's fingerprint),
:data:`RUN_ATTR` (the run that may write now), :data:`RUNTIME_ATTR` (what the chunk tasks
ran on).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .spec import RunSpec

FORMAT = "napari-unet-distributed/1"
ATTR = "napari_unet_distributed"
RUN_ATTR = "napari_unet_distributed_run"
RUNTIME_ATTR = "napari_unet_distributed_runtime"
WORK = "_work"
LOCK_STALE = 120.0
"""Seconds without a heartbeat after which another host's lock is considered abandoned."""


# ----------------------------------------------------------------------- the arrays
def create_array(
    group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str
) -> Any:
    """A zero-filled array in ``group`` (zarr 3 and 2)."""
    if hasattr(group, "create_array"):
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def open_group(spec: RunSpec, mode: str = "r+") -> Any:
    import zarr

    return zarr.open_group(spec.out, mode=mode)


def owner(spec: RunSpec) -> Any:
    """The output group, or None when another run has taken over the store since this
    task was submitted (a task of a cancelled run still running, or one re-run by dask
    after its results were lost): such tasks must not write."""
    group = open_group(spec)
    return group if dict(group.attrs).get(RUN_ATTR) == spec.run else None


def mark_chunk(spec: RunSpec, lin: int, objects: int) -> bool:
    """Write chunk ``lin``'s completion mark — the last write of its chunk task, after all
    its data. False (nothing written) when another run owns the store now."""
    group = owner(spec)
    if group is None:
        return False
    work = group[WORK]
    if spec.mode == "semantic":
        work["counts"][lin] = 1
        work["labelled"][lin] = 1
    else:
        work["scratch/present"][lin] = 1
        work["counts"][lin] = objects + 1  # the completion mark, written last
    return True


def marks(group: Any) -> tuple[np.ndarray, np.ndarray]:
    """(counts, labelled) completion marks of every chunk."""
    work = group[WORK]
    return np.asarray(work["counts"][:]), np.asarray(work["labelled"][:])


def result(spec: RunSpec) -> tuple[Any, Any]:
    """The finished store's arrays (probabilities, labels), read-only."""
    group = open_group(spec, "r")
    return group["probabilities"], group["labels"]


def fingerprint(spec: RunSpec, stats: np.ndarray) -> dict[str, Any]:
    """What a store must have been written with to be continued by this run."""
    found = {
        "format": FORMAT,
        "model": spec.key,
        "shape": [spec.num_classes, *spec.leading, spec.height, spec.width],
        "chunk": spec.chunk,
        "margin": spec.margin,
        "halo": spec.halo,
        "amp": spec.amp,
        "level": spec.level,
        "mode": spec.mode,
        "classes": list(spec.class_names),
        "threshold": spec.threshold,
        "min_size": spec.min_size,
        "seed_h": spec.seed_h,
        "normalization": hashlib.sha256(stats.tobytes()).hexdigest()[:16],
    }
    return json.loads(json.dumps(found))


def _expected(spec: RunSpec) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    tail = (1,) * len(spec.leading) + (spec.chunk, spec.chunk)
    return {
        "probabilities": (
            (spec.num_classes, *spec.leading, spec.height, spec.width),
            "float32",
            (spec.num_classes, *tail),
        ),
        "labels": ((*spec.leading, spec.height, spec.width), "uint32", tail),
    }


def _open_or_create(path: str) -> Any:
    import zarr

    remote = "://" in path
    if remote or Path(path).exists():
        try:
            return zarr.open_group(path, mode="r+")
        except Exception as err:  # an array, a file, or not zarr at all
            if not remote:
                raise ValueError(
                    f"{path} exists and is not a zarr group; distributed prediction writes a "
                    "group with 'probabilities' and 'labels' (choose a new path)"
                ) from err
    return zarr.open_group(path, mode="a")


def _check(group: Any, spec: RunSpec, wanted: dict[str, Any]) -> None:
    """Refuse a store this run cannot continue (other arrays, or another run's)."""
    path, expected = spec.out, _expected(spec)
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
    if stored is not None and stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ValueError(
            f"the existing store {path} was written by another run (different {', '.join(diff)}); "
            "use a new output path or delete the store to start over"
        )
    if stored is None and any(name in group for name in (*expected, WORK)):
        raise ValueError(
            f"{path} already holds arrays not written by napari-unet's distributed prediction; "
            "choose a new output path"
        )


def open_store(spec: RunSpec, wanted: dict[str, Any]) -> Any:
    """Open (or create) the output group; refuse a store this run cannot continue."""
    group = _open_or_create(spec.out)
    _check(group, spec, wanted)
    if ATTR not in dict(group.attrs):
        group.attrs[ATTR] = wanted
    for name, (shape, dtype, chunks) in _expected(spec).items():
        if name not in group:
            create_array(group, name, shape, chunks, dtype)
    work = group.require_group(WORK)
    n, k, cs = spec.n_chunks, spec.strip, spec.chunk
    if "counts" not in work:
        create_array(work, "counts", (n,), (1,), "int64")
    if "labelled" not in work:
        create_array(work, "labelled", (n,), (1,), "uint8")
    if spec.mode == "instance" and "strips" not in work:
        create_array(work, "strips", (n, 4, 2 * k, cs), (1, 4, 2 * k, cs), "uint32")
    return group


def scratch(group: Any, spec: RunSpec) -> Any:
    """``_work/scratch``: per-chunk labels and their marks, until the run is stitched."""
    work = group[WORK]
    found = work.require_group("scratch")
    if "labels" not in found:
        shape = (*spec.leading, spec.height, spec.width)
        chunks = (1,) * len(spec.leading) + (spec.chunk, spec.chunk)
        create_array(found, "labels", shape, chunks, "uint32")
    if "present" not in found:
        create_array(found, "present", (spec.n_chunks,), (1,), "uint8")
    return found


# ------------------------------------------------------------------------- the lock
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


def _take_lock(lock: Path, out: str) -> None:
    import socket

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
        return
    raise RuntimeError(f"cannot take the lock {lock}")  # pragma: no cover - re-created


@contextmanager
def store_lock(out: str) -> Iterator[None]:
    """One run writes a store at a time: a second run on the same output is refused at
    its start (the first is untouched). The lock is a small file beside the store,
    refreshed while the run lives and removed at its end; the lock of a dead process
    (or silent for ``LOCK_STALE`` s, on another host) is taken over."""
    import threading

    lock = _lock_path(out)
    if lock is None:
        yield
        return
    _take_lock(lock, out)
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
