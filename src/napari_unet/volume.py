"""3-D instance labels for Z-stacks from the 2-D networks: one nucleus, one label.

Two methods, both on top of the one 2-D predictor (training and weight maps stay 2-D):

- ``"3d"`` (default): predict every Z plane (optionally also the YZ and XZ planes of the
  stack resampled to isotropic voxels, averaged, as Cellpose does), then segment the
  stacked probabilities in 3-D: an anisotropic distance transform of the core (voxel
  spacing from the layer's scale or ``spacing=(z, y, x)``), h-maxima seeds and a 3-D
  watershed over the foreground.
- ``"stitch"``: segment each plane in 2-D and join objects of consecutive planes whose
  IoU ≥ ``stitch_iou`` (greedy, best overlap first), as Cellpose's ``stitch_threshold``.

Large stacks are processed in slabs of Z planes with a halo of planes on each side
(:func:`segment_volume_slabs`), so memory is bounded by a slab, and labels are made
consistent across slab borders by joining the objects that overlap on the shared plane.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from .metrics import iou_matrix
from .postprocess import _foreground, default_class_names, segment

METHODS = ("3d", "stitch")


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"voxel spacing must be three positive numbers (z, y, x), got {spacing}")
    return sp  # type: ignore[return-value]


def segment_volume(
    probabilities: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    threshold: float = 0.5,
    min_size: int = 15,
    seed_h: float = 1.0,
) -> np.ndarray:
    """3-D instance labels from stacked class probabilities.

    Args:
        probabilities: (C, Z, Y, X) float class probabilities (as :func:`napari_unet.predict`
            returns for a ZYX stack).
        class_names: names of the C classes (``"background"``, ``"interior"``, …).
        spacing: voxel size (z, y, x) in any one unit; only ratios matter.
        threshold: probability above which a voxel is core / foreground.
        min_size: smallest object in in-plane pixel units (a 2-D area); the volume limit is
            ``min_size`` × (object extent ≈ 1 plane), i.e. objects of fewer voxels than
            ``min_size`` are removed.
        seed_h: h of the h-maxima seeds, in in-plane pixels of distance.

    Returns:
        (Z, Y, X) uint32 labels, objects numbered 1..N across the whole stack.
    """
    probs = np.asarray(probabilities)
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be (C, Z, Y, X), got shape {probs.shape}")
    names = list(class_names or default_class_names(probs.shape[0]))
    if len(names) != probs.shape[0]:
        raise ValueError(f"{len(names)} class names for {probs.shape[0]} channels")
    sz, sy, sx = _check_spacing(spacing)
    fg = _foreground(probs, names) > threshold
    core = probs[names.index("interior")] > threshold if "interior" in names else fg
    pixel = min(sy, sx)
    sampling = (sz / pixel, sy / pixel, sx / pixel)  # distances in in-plane pixels
    dist = ndi.distance_transform_edt(core, sampling=sampling).astype(np.float32)
    # σ = 1 in-plane pixel, the same physical width along z
    dist = ndi.gaussian_filter(dist, (1.0 / sampling[0], 1.0 / sampling[1], 1.0 / sampling[2]))
    seeds, _ = ndi.label(h_maxima(dist, seed_h) & core, structure=np.ones((3, 3, 3)))
    labels = watershed(-dist, seeds, mask=fg | core)
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels.astype(np.uint32))[0]


def stitch_planes(labels: np.ndarray, *, iou_threshold: float = 0.25) -> np.ndarray:
    """Join per-plane 2-D objects across Z by overlap.

    Args:
        labels: (Z, Y, X) integer labels, each plane labelled on its own.
        iou_threshold: an object continues the object of the previous plane with which it
            has the highest IoU, when that IoU ≥ this (each object continues at most one).

    Returns:
        (Z, Y, X) uint32 labels numbered 1..N across the stack.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {lab.shape}")
    out = np.zeros(lab.shape, np.uint32)
    next_id = 1
    prev = None
    for z in range(lab.shape[0]):
        plane = lab[z]
        ids = np.unique(plane)
        ids = ids[ids != 0]
        mapping: dict[int, int] = {}
        if prev is not None and ids.size and prev.any():
            iou, cur_ids, prev_ids = iou_matrix(plane, prev)
            order = np.dstack(np.unravel_index(np.argsort(-iou, axis=None), iou.shape))[0]
            used: set[int] = set()
            for i, j in order:
                if iou[i, j] < iou_threshold:
                    break
                c, p = int(cur_ids[i]), int(prev_ids[j])
                if c in mapping or p in used:
                    continue
                mapping[c] = p
                used.add(p)
        lut = np.zeros(int(plane.max()) + 1, np.uint32)
        for c in ids:
            if int(c) not in mapping:
                mapping[int(c)] = next_id
                next_id += 1
            lut[int(c)] = mapping[int(c)]
        out[z] = lut[plane]
        prev = out[z]
    return relabel_sequential(out)[0]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(a, a) != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _join_plane(seen_before: np.ndarray, seen_now: np.ndarray, uf: _UnionFind) -> None:
    """Join objects of one Z plane as labelled by two slabs (global ids), where they cover
    more than half of the smaller of the two."""
    mask = (seen_before > 0) & (seen_now > 0)
    if not mask.any():
        return
    pairs, counts = np.unique(
        np.stack([seen_before[mask], seen_now[mask]]).astype(np.int64), axis=1, return_counts=True
    )
    ids_a, area_a = np.unique(seen_before[seen_before > 0], return_counts=True)
    ids_b, area_b = np.unique(seen_now[seen_now > 0], return_counts=True)
    size_a, size_b = dict(zip(ids_a.tolist(), area_a)), dict(zip(ids_b.tolist(), area_b))
    for (a, b), n in zip(pairs.T.tolist(), counts):
        if n > 0.5 * min(size_a[a], size_b[b]):
            uf.union(a, b)


def _slab_labels(probs: np.ndarray, method: str, kwargs: dict[str, Any]) -> np.ndarray:
    if method == "3d":
        return segment_volume(probs, **kwargs)
    seg = {k: v for k, v in kwargs.items() if k in ("class_names", "threshold", "min_size")}
    return stitch_planes(segment(probs, **seg), iou_threshold=kwargs.get("stitch_iou", 0.25))


def segment_volume_slabs(
    read_probabilities: Callable[[int, int], np.ndarray],
    depth: int,
    *,
    out: Any = None,
    slab: int = 16,
    halo: int = 4,
    method: str = "3d",
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> Any:
    """3-D labels of a stack too large for memory, slab by slab along Z.

    Args:
        read_probabilities: ``f(z0, z1)`` → (C, z1 − z0, Y, X) probabilities of planes
            z0..z1 (e.g. predicted on demand).
        depth: number of Z planes.
        out: a (Z, Y, X) uint32 array to fill (e.g. a zarr array); default a new numpy one.
        slab: planes per slab; memory is bounded by slab + 2·halo planes.
        halo: context planes on each side (≥ 1): labels are computed with them and
            cropped, and the plane before a slab, labelled by both slabs, joins the
            objects that cross the border.
        method: ``"3d"`` (:func:`segment_volume`) or ``"stitch"`` (:func:`stitch_planes`,
            ``stitch_iou=`` in kwargs).
        progress: ``progress(done_planes, depth)``.
        **kwargs: passed to :func:`segment_volume` (class_names, spacing, threshold, …).

    Returns:
        ``out``: (Z, Y, X) uint32, ids numbered 1..N and consistent across slab borders.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if slab < 1 or halo < 1:
        raise ValueError("slab and halo must be ≥ 1")
    uf = _UnionFind()
    offset = 0
    prev_last: np.ndarray | None = None
    for z0 in range(0, depth, slab):
        z1 = min(depth, z0 + slab)
        a0, a1 = max(0, z0 - halo), min(depth, z1 + halo)
        lab = _slab_labels(read_probabilities(a0, a1), method, kwargs).astype(np.int64)
        lab[lab > 0] += offset
        offset = max(offset, int(lab.max()))
        if prev_last is not None:
            _join_plane(prev_last, lab[z0 - a0 - 1], uf)
        core = lab[z0 - a0 : z1 - a0]
        if out is None:
            out = np.zeros((depth, *core.shape[1:]), np.uint32)
        out[z0:z1] = core.astype(np.uint32)
        prev_last = core[-1]
        if progress is not None:
            progress(z1, depth)
    # one id per joined object, numbered 1..N in order of first appearance of the root
    lut = np.zeros(offset + 1, np.uint32)
    roots = [uf.find(i) for i in range(1, offset + 1)]
    present = np.zeros(offset + 1, bool)
    for z0 in range(0, depth, slab):
        present[np.unique(np.asarray(out[z0 : z0 + slab]))] = True
    new_ids: dict[int, int] = {}
    for i, root in enumerate(roots, start=1):
        if present[i]:
            lut[i] = new_ids.setdefault(root, len(new_ids) + 1)
    for z0 in range(0, depth, slab):
        out[z0 : z0 + slab] = lut[np.asarray(out[z0 : z0 + slab])]
    return out


def predict_stack(
    model: Any,
    stack: Any,
    *,
    axes: str = "ZYX",
    spacing: Sequence[float] | None = None,
    orthogonal: bool = False,
    **predict_kwargs: Any,
) -> np.ndarray:
    """Class probabilities (C, Z, Y, X) of a stack, plane by plane.

    Args:
        model: a napari-unet model.
        stack: (Z, Y, X) or (Z, C, Y, X) array (``axes`` "ZYX" / "ZCYX").
        spacing: voxel size (z, y, x); used with ``orthogonal``.
        orthogonal: also predict the YZ and XZ planes of the stack resampled to isotropic
            voxels, and average the three predictions (as Cellpose does); one-channel
            stacks only.
        **predict_kwargs: passed to :func:`napari_unet.predict` (device, tile_size, …).

    Returns:
        float32 (C, Z, Y, X) probabilities.
    """
    from .inference.predict import predict

    probs = np.asarray(predict(model, stack, axes=axes, **predict_kwargs))
    if not orthogonal:
        return probs
    if axes != "ZYX":
        raise ValueError("orthogonal planes are predicted for one-channel (Z, Y, X) stacks")
    sz, sy, sx = _check_spacing(spacing)
    factor = sz / sy
    vol = np.asarray(stack, dtype=np.float32)
    iso = ndi.zoom(vol, (factor, 1.0, sx / sy), order=1) if factor != 1 or sx != sy else vol
    total = probs.astype(np.float32)
    for perm in ((1, 0, 2), (2, 0, 1)):  # YZ planes stacked along Y, XZ planes along X
        side = np.asarray(predict(model, np.transpose(iso, perm), axes="ZYX", **predict_kwargs))
        back = np.transpose(side, (0, *(1 + np.argsort(perm))))  # (C, Z', Y, X')
        zoom = (1.0, vol.shape[0] / back.shape[1], 1.0, vol.shape[2] / back.shape[3])
        total += ndi.zoom(back, zoom, order=1)[:, : vol.shape[0], :, : vol.shape[2]]
    return total / 3.0


def segment_stack(
    model: Any,
    stack: Any,
    *,
    method: str = "3d",
    axes: str = "ZYX",
    spacing: Sequence[float] | None = None,
    orthogonal: bool = False,
    stitch_iou: float = 0.25,
    threshold: float = 0.5,
    min_size: int = 15,
    slab: int | None = None,
    halo: int = 4,
    out: Any = None,
    progress: Callable[[int, int], None] | None = None,
    **predict_kwargs: Any,
) -> Any:
    """3-D instance labels of a Z-stack with a 2-D network: one object per nucleus.

    Args:
        model: a napari-unet model (2-D).
        stack: (Z, Y, X) or (Z, C, Y, X) array, numpy, dask or zarr.
        method: ``"3d"`` (3-D seeds and watershed on the stacked probabilities, voxel
            anisotropy from ``spacing``) or ``"stitch"`` (2-D objects joined across Z when
            IoU ≥ ``stitch_iou``).
        axes: ``"ZYX"`` or ``"ZCYX"``.
        spacing: voxel size (z, y, x), e.g. a napari layer's ``scale``; default isotropic.
        orthogonal: average predictions of the XY, YZ and XZ planes (``"3d"`` only, whole
            stack in memory).
        stitch_iou, threshold, min_size: see :func:`stitch_planes` / :func:`segment_volume`.
        slab: process ``slab`` planes at a time (with ``halo`` context planes on each side)
            so memory stays bounded; default: the whole stack when its probabilities take
            ≤ 1 GiB, else 16.
        out: a (Z, Y, X) array to write the labels into (e.g. a new zarr array).
        progress: ``progress(done_planes, total_planes)``.
        **predict_kwargs: passed to :func:`napari_unet.predict`.

    Returns:
        (Z, Y, X) uint32 labels (``out`` when given).
    """
    _check_stack(stack, method, axes)
    seg_kwargs = segment_kwargs(model, method, spacing, stitch_iou, threshold, min_size)
    depth, plane_px = int(stack.shape[0]), int(stack.shape[-1]) * int(stack.shape[-2])
    if slab is None:
        whole = model.num_classes * depth * plane_px * 4 <= 2**30
        slab = depth if whole else 16
    if orthogonal and (method != "3d" or slab < depth):
        raise ValueError("orthogonal planes need method='3d' and the whole stack in memory")
    if orthogonal:

        def read(z0: int, z1: int) -> np.ndarray:
            return predict_stack(
                model, np.asarray(stack), axes=axes, spacing=spacing, orthogonal=True,
                **predict_kwargs,
            )  # fmt: skip

    else:
        read = _PlaneCache(model, stack, axes, halo, predict_kwargs).read
    return segment_volume_slabs(
        read, depth, out=out, slab=slab, halo=halo, method=method, progress=progress,
        **seg_kwargs,
    )  # fmt: skip


def _check_stack(stack: Any, method: str, axes: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if axes not in ("ZYX", "ZCYX"):
        raise ValueError(f"a stack's axes are 'ZYX' or 'ZCYX', got {axes!r}")
    if len(stack.shape) != len(axes):
        raise ValueError(f"stack of shape {tuple(stack.shape)} does not match axes {axes!r}")


def segment_kwargs(
    model: Any,
    method: str,
    spacing: Sequence[float] | None,
    stitch_iou: float,
    threshold: float,
    min_size: int,
) -> dict[str, Any]:
    """The keyword arguments of :func:`segment_volume` / :func:`stitch_planes` per slab
    (single-process and dask alike); ``spacing`` in (z, y, x) units, as floats."""
    seg: dict[str, Any] = {
        "class_names": model.class_names,
        "threshold": threshold,
        "min_size": min_size,
    }
    if method == "3d":
        seg["spacing"] = None if spacing is None else tuple(float(v) for v in spacing)
    else:
        seg["stitch_iou"] = stitch_iou
    return seg


class _PlaneCache:
    """Probabilities of planes z0..z1 of a stack, each plane predicted once: the planes a
    slab shares with the next (its halo) are kept, the others dropped."""

    def __init__(
        self, model: Any, stack: Any, axes: str, halo: int, predict_kwargs: dict[str, Any]
    ) -> None:
        self.model, self.stack, self.axes, self.halo = model, stack, axes, halo
        self.predict_kwargs = predict_kwargs
        self.cache: dict[int, np.ndarray] = {}

    def read(self, z0: int, z1: int) -> np.ndarray:
        """float32 (C, z1 - z0, Y, X) probabilities of planes z0..z1."""
        from .inference.predict import predict

        cache = self.cache
        todo = [z for z in range(z0, z1) if z not in cache]
        if todo:
            part = np.asarray(
                predict(
                    self.model,
                    np.asarray(self.stack[todo[0] : todo[-1] + 1]),
                    axes=self.axes,
                    **self.predict_kwargs,
                )
            )
            for k, z in enumerate(range(todo[0], todo[-1] + 1)):
                cache[z] = part[:, k]
        planes = [cache[z] for z in range(z0, z1)]
        for z in [z for z in cache if z < z1 - 2 * self.halo]:  # keep what the next slab needs
            del cache[z]
        return np.stack(planes, axis=1)
