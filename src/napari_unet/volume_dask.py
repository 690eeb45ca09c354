"""3-D labels of Z-stacks on a dask cluster: one task per slab of Z planes.

Each task reads its slab plus ``halo`` planes on each side from the source (a zarr array
the workers can open), predicts the planes with the model (shipped once per worker as
safetensors bytes, as :mod:`napari_unet.distributed` does), segments the slab in 3-D
(:func:`napari_unet.volume.segment_volume`, or stitching) and writes its core planes into
the output zarr array with ids offset by ``slab index × ID_STRIDE``. It also returns the
plane just before its core as it labelled it (with its halo context). The client joins
the objects that this plane shares with the previous slab's last core plane (union-find,
as for 2-D chunk faces), then one relabel task per slab renumbers everything 1..N.
Memory per worker is bounded by one slab. The runtime is chosen once in the client, as for
2-D runs (:mod:`napari_unet.distributed.compiled`): an OpenVINO export travels with the
model and each worker predicts its slabs on it (or on torch, with a one-line warning,
when it cannot load it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .volume import METHODS, _join_plane, _slab_labels, _UnionFind, segment_kwargs

ID_STRIDE = 2**22
"""Ids reserved per slab before renumbering (4 194 304 objects per slab)."""


def _task_slab(
    key: str,
    source: str,
    out: str,
    k: int,
    z0: int,
    z1: int,
    halo: int,
    method: str,
    seg_kwargs: dict[str, Any],
    predict_kwargs: dict[str, Any],
) -> tuple[int, np.ndarray | None, np.ndarray]:
    import zarr

    from .distributed.worker import worker_model
    from .inference.predict import predict

    held = worker_model(key)
    src = zarr.open_array(source, mode="r")
    depth = src.shape[0]
    a0, a1 = max(0, z0 - halo), min(depth, z1 + halo)
    probs = np.asarray(
        predict(
            held.model,
            np.asarray(src[a0:a1]),
            axes="ZYX",
            device=held.device,
            runtime=held.runtime,
            **predict_kwargs,
        )  # fmt: skip
    )
    lab = _slab_labels(probs, method, dict(seg_kwargs)).astype(np.int64)
    n = int(lab.max())
    if n >= ID_STRIDE:
        raise ValueError(f"slab {k} has {n} objects; use smaller slabs")
    lab[lab > 0] += k * ID_STRIDE
    dst = zarr.open_array(out, mode="r+")
    core = lab[z0 - a0 : z1 - a0]
    dst[z0:z1] = core.astype(np.uint32)
    seen_before = lab[z0 - a0 - 1].astype(np.uint32) if z0 > 0 else None
    present = np.unique(core[core > 0]) - k * ID_STRIDE  # local ids kept in the core
    return n, seen_before, present


def _task_relabel(out: str, z0: int, z1: int, offset: int, lut: np.ndarray) -> None:
    """Renumber planes z0..z1: slab ids ``offset + i`` → ``lut[i]`` (0 stays 0)."""
    import zarr

    dst = zarr.open_array(out, mode="r+")
    block = np.asarray(dst[z0:z1]).astype(np.int64)
    local = np.where(block > 0, block - offset, 0)
    dst[z0:z1] = lut[local]


def segment_stack_distributed(
    model: Any,
    source: str | Path,
    out: str | Path,
    *,
    scheduler: Any,
    method: str = "3d",
    spacing: Sequence[float] | None = None,
    stitch_iou: float = 0.25,
    threshold: float = 0.5,
    min_size: int = 15,
    slab: int = 16,
    halo: int = 4,
    progress: Callable[[int, int], None] | None = None,
    **predict_kwargs: Any,
) -> Any:
    """3-D instance labels of a (Z, Y, X) zarr stack on a dask cluster.

    Args:
        model: a model, a checkpoint path or None (the bundled default).
        source: path of a (Z, Y, X) zarr array the workers can read.
        out: path of the (Z, Y, X) uint32 zarr array to create (must not exist).
        scheduler: a ``distributed.Client``, ``"tcp://…"`` or ``"local:N"``.
        method, spacing, stitch_iou, threshold, min_size: as
            :func:`napari_unet.volume.segment_stack`.
        slab: planes per task; halo: context planes on each side (≥ 1).
        progress: ``progress(done_slabs, total_slabs)``.
        **predict_kwargs: passed to :func:`napari_unet.predict` on the workers
            (``device`` and ``runtime`` are decided here, once for all workers).

    Returns:
        The output zarr array: ids 1..N, objects crossing slab borders keep one id.
    """
    import zarr

    from .distributed.cluster import connect, register, workers_per_host
    from .distributed.worker import ModelPlugin, model_bytes

    src = _check_stack(source, out, method, slab, halo)
    model_obj, data = model_bytes(model)
    seg = segment_kwargs(model_obj, method, spacing, stitch_iou, threshold, min_size)
    starts = list(range(0, src.shape[0], slab))
    device = predict_kwargs.pop("device", "cpu")
    compiled = _compiled(model_obj, src.shape, device, predict_kwargs)
    zarr.create_array(
        str(out), shape=src.shape, chunks=(1, *(min(1024, s) for s in src.shape[1:])),
        dtype="uint32", fill_value=0,
    )  # fmt: skip
    key = hashlib.sha256(data).hexdigest()
    with connect(scheduler) as client:
        plugin = ModelPlugin(key, data, device, 1, workers_per_host(client), compiled)
        register(client, plugin)
        results = _predict_slabs(
            client, key, (str(source), str(out)), starts, src.shape[0], (slab, halo),
            method, seg, predict_kwargs, progress,
        )  # fmt: skip
        luts = _slab_luts(zarr.open_array(str(out), mode="r"), starts, results)
        ends = [min(src.shape[0], z0 + slab) for z0 in starts]
        client.gather(
            [
                client.submit(_task_relabel, str(out), z0, z1, k * ID_STRIDE, luts[k], pure=False)
                for k, (z0, z1) in enumerate(zip(starts, ends))
            ]
        )
    return zarr.open_array(str(out), mode="r")


def _check_stack(source: str | Path, out: str | Path, method: str, slab: int, halo: int) -> Any:
    """The (Z, Y, X) source array; refuses bad settings and an existing output."""
    import zarr

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if slab < 1 or halo < 1:
        raise ValueError("slab and halo must be ≥ 1")
    src = zarr.open_array(str(source), mode="r")
    if src.ndim != 3:
        raise ValueError(f"the stack must be (Z, Y, X); {source} has shape {src.shape}")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; a 3-D result is written to a new zarr array")
    return src


def _compiled(model: Any, shape: tuple[int, ...], device: Any, kwargs: dict[str, Any]) -> Any:
    """The runtime of every slab's ``predict``, decided here (the rule of ``predict``),
    exported once here: the export to ship, or None (torch). Pops ``runtime``."""
    import torch

    from .distributed.compiled import choose_runtime
    from .inference.plan import tile_plan_for

    plan = tile_plan_for(
        model, tuple(shape[1:]), tile_size=kwargs.get("tile_size"),
        exact=bool(kwargs.get("exact", False)), device=torch.device("cpu"),
        halo=kwargs.get("halo"),
    )  # fmt: skip
    _, compiled = choose_runtime(
        model, plan, windows=plan.n_tiles * shape[0], device=device,
        runtime=kwargs.pop("runtime", None), exact=bool(kwargs.get("exact", False)),
        amp=kwargs.get("amp"), level=kwargs.get("level"),
    )  # fmt: skip
    return compiled


def _predict_slabs(
    client: Any,
    key: str,
    paths: tuple[str, str],
    starts: list[int],
    depth: int,
    sizes: tuple[int, int],
    method: str,
    seg: dict[str, Any],
    predict_kwargs: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> list[tuple[int, np.ndarray | None, np.ndarray]]:
    """One slab task per start (``sizes``: planes per slab, halo planes); results in order."""
    slab, halo = sizes
    futures = [
        client.submit(
            _task_slab,
            key,
            *paths,
            k,
            z0,
            min(depth, z0 + slab),
            halo,
            method,
            seg,
            predict_kwargs,
            pure=False,
        )  # fmt: skip
        for k, z0 in enumerate(starts)
    ]
    results = []
    for k, fut in enumerate(futures):
        results.append(fut.result())
        if progress is not None:
            progress(k + 1, len(starts))
    return results


def _slab_luts(dst: Any, starts: list[int], results: list[Any]) -> list[np.ndarray]:
    """Per slab: local id → final id (objects shared across slab borders joined, ids 1..N
    in slab order, cores only)."""
    uf = _UnionFind()
    for k in range(1, len(starts)):
        seen = results[k][1]
        if seen is not None:
            last = np.asarray(dst[starts[k] - 1]).astype(np.int64)
            _join_plane(last, seen.astype(np.int64), uf)
    new_id: dict[int, int] = {}
    luts = []
    for k, (n, _, present) in enumerate(results):
        lut = np.zeros(n + 1, np.uint32)
        for local in present.tolist():
            root = uf.find(k * ID_STRIDE + local)
            lut[local] = new_id.setdefault(root, len(new_id) + 1)
        luts.append(lut)
    return luts
