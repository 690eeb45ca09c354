"""Distributed prediction on a dask cluster: probabilities and stitched labels in a zarr store.

``predict_distributed(model, image, scheduler=..., out="result.zarr")`` (also reached
through ``napari_unet.predict(..., scheduler=...)`` and ``napari-unet predict --dask``)
cuts every (Y, X) plane of ``image`` into output chunks of ``chunk_size`` pixels and
runs one dask task per chunk on the cluster's workers. The store ``out`` receives
``probabilities`` float32 ``(C, *leading, Y, X)``, ``labels`` uint32 ``(*leading, Y, X)``
(instance ids unique over the whole volume, or semantic classes) and ``_work/`` (the
completion marks and the small data needed to stitch and resume).

Modules, top-down:

* :mod:`.run` — :func:`predict_distributed`, the driver (client side of a run);
* :mod:`.cluster` — schedulers, connecting (timeouts), workers per host;
* :mod:`.spec` — the run's specification: chunk geometry and settings, each chunk's tile
  plan from the one planner (:mod:`napari_unet.inference.plan`);
* :mod:`.compiled` — the runtime the workers run, decided and exported once in the client;
* :mod:`.worker` — what each worker holds: the model (sent once as safetensors bytes by
  a worker plugin, never pickled), its device and runtime;
* :mod:`.tasks` — the chunk task: probabilities through the one input path and tiler,
  per-chunk labels;
* :mod:`.stitch` — instance labels across chunks: face strips, matching, the id join,
  relabelling;
* :mod:`.store` — the zarr output: arrays, completion marks (resume), the checks that
  refuse a store of another run, the store lock.

Failures and resuming: a task lost with a worker is re-run by dask. Each task writes its
completion mark after its data, so a run restarted with the same ``out`` recomputes only
unmarked chunks; a store written with another shape, dtype, chunking, model or setting is
refused with a clear error. The store records which run owns it: tasks of an older run
(still running after a cancel, or re-run by dask) never write into it.
"""

from __future__ import annotations

from .cluster import CONNECT_TIMEOUT, check_scheduler, connect
from .run import predict_distributed
from .spec import DEFAULT_CHUNK, DEFAULT_MARGIN, RunSpec, build_spec
from .store import RUNTIME_ATTR, store_lock
from .tasks import chunk_probabilities

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_CHUNK",
    "DEFAULT_MARGIN",
    "RUNTIME_ATTR",
    "RunSpec",
    "build_spec",
    "check_scheduler",
    "chunk_probabilities",
    "connect",
    "predict_distributed",
    "store_lock",
]
