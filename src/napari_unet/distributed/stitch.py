"""Instance labels across chunks: one id per object over the whole volume.

Every chunk task numbers the objects of its core 1..n (:func:`relabel_core`), writes them
to ``_work/scratch`` and stores, for each of its four faces, its labels on a strip
``2·STRIP`` pixels wide across the face (:func:`face_strips`: its own pixels and the
neighbour's, from its margin). After all chunks, one small task per chunk
(:func:`task_match`) compares the strips of facing chunks: two ids are the same object
when they cover (mostly) the same pixels of the common strip (:func:`face_pairs`). The
client numbers all objects (per-chunk counts, cumulative sum), joins matched ids
(:func:`join_ids`: connected components of the match graph) and renumbers them 1..K; a
last task per chunk (:func:`task_relabel`) writes the chunk's final ids into ``labels``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .spec import RunSpec
from .store import WORK, open_group, owner
from .worker import report


def relabel_core(seg: np.ndarray, core: tuple[slice, slice]) -> tuple[np.ndarray, int]:
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


def face_strips(spec: RunSpec, labels: np.ndarray, s0: int, sc0: int, i: int, j: int) -> np.ndarray:
    """(4, 2k, chunk) labels across the top, bottom, left, right faces (0 where none);
    ``labels`` covers the chunk and its margin from row ``s0``, column ``sc0``."""
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


def face_pairs(mine: np.ndarray, theirs: np.ndarray, n_mine: int, n_theirs: int) -> np.ndarray:
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


def task_match(spec: RunSpec, lin: int, counts: dict[int, int]) -> np.ndarray:
    """Matched ids across the bottom and right faces of chunk ``lin``:
    rows (chunk, id, neighbour chunk, neighbour id)."""
    strips = open_group(spec, "r")[WORK]["strips"]
    p, i, j = spec.locate(lin)
    ny, nx = spec.grid
    mine = strips[lin]
    found = []
    for face, other, (ni, nj) in ((1, 0, (i + 1, j)), (3, 2, (i, j + 1))):
        if ni >= ny or nj >= nx:
            continue
        nlin = spec.linear(p, ni, nj)
        theirs = strips[nlin][other]
        pairs = face_pairs(mine[face], theirs, counts[lin], counts[nlin])
        if len(pairs):
            rows = np.empty((len(pairs), 4), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = lin, pairs[:, 0], nlin, pairs[:, 1]
            found.append(rows)
    return np.concatenate(found) if found else np.zeros((0, 4), np.int64)


def match_sources(spec: RunSpec) -> list[int]:
    """Chunks with a neighbour below or to the right (one match task each)."""
    ny, nx = spec.grid
    return [
        lin
        for lin in range(spec.n_chunks)
        if spec.locate(lin)[1] + 1 < ny or spec.locate(lin)[2] + 1 < nx
    ]


def join_ids(pairs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Final id of every global id 0..N: matched ids joined, renumbered 1..K.

    The global id of local id ``k`` (1..n) of chunk ``lin`` is ``offsets[lin] + k``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    total = int(offsets[-1])
    first = offsets[pairs[:, 0]] + pairs[:, 1]
    second = offsets[pairs[:, 2]] + pairs[:, 3]
    graph = coo_matrix(
        (np.ones(len(first), np.int8), (first, second)), shape=(total + 1, total + 1)
    )
    _, components = connected_components(graph, directed=False)
    # components are numbered in order of their smallest id; id 0 (background) → 0
    return components.astype(np.uint32)


def changed_chunks(
    old: np.ndarray | None, mapping: np.ndarray, offsets: np.ndarray, n_chunks: int
) -> np.ndarray:
    """Chunks whose final ids differ from the mapping stored by an earlier run."""
    if old is None:
        return np.zeros(n_chunks, bool)
    if old.shape != mapping.shape:
        return np.ones(n_chunks, bool)
    diff = np.concatenate([[0], np.cumsum(old != mapping)])
    return diff[offsets[1:] + 1] - diff[offsets[:-1] + 1] > 0


def chunk_lut(mapping: np.ndarray, offsets: np.ndarray, lin: int) -> np.ndarray:
    """Local id (0..n) of chunk ``lin`` → final id."""
    ids = mapping[offsets[lin] + 1 : offsets[lin + 1] + 1]
    return np.concatenate([[0], ids]).astype(np.uint32)


def task_relabel(spec: RunSpec, lin: int, lut: np.ndarray) -> dict[str, Any]:
    """Per-chunk ids → final ids; writes the chunk of ``labels`` once."""
    start = time.perf_counter()
    group = owner(spec)
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
    return report(start, len(lut) - 1)
