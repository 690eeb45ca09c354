"""Benchmark: fast local border weight map vs one whole-image EDT per cell.

Makes a 1024×1024 layout of ~500 random ellipses (non-overlapping, some touching),
times :func:`napari_unet.weightmap.border_weight_map` (median of 5) against
:func:`border_weight_map_bruteforce` (run once over all cells unless ``--brute-cells``
asks for a subset, in which case the full time is extrapolated and labelled so),
checks the maximum absolute difference and writes ``bench/results/weightmap.json``.

    python bench/weightmap.py [--size 1024] [--cells 500] [--w0 10] [--sigma 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
from skimage.draw import ellipse

from _env import cpu_model
from napari_unet.weightmap import border_weight_map, border_weight_map_bruteforce

RESULTS = Path(__file__).resolve().parent / "results" / "weightmap.json"


def make_layout(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """Random ellipses, int32 (size, size); a new cell may overlap existing ones by
    ≤ 15 % of its area and then only fills free pixels, so some cells touch."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    placed = 0
    for _ in range(50 * n_cells):
        if placed == n_cells:
            break
        r, c = rng.uniform(0, size, 2)
        a, b = rng.uniform(6, 16, 2)
        rr, cc = ellipse(r, c, a, b, shape=labels.shape, rotation=rng.uniform(0, np.pi))
        if len(rr) < 20:
            continue
        taken = labels[rr, cc] > 0
        if taken.mean() > 0.15:
            continue
        placed += 1
        labels[rr[~taken], cc[~taken]] = placed
    return labels


def touching_pairs(labels: np.ndarray) -> int:
    """Number of distinct pairs of cells that are 4-adjacent."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        m = (a > 0) & (b > 0) & (a != b)
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        pairs.update(zip(lo.tolist(), hi.tolist()))
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--brute-cells", type=int, default=0, help="time brute force on this many cells only"
    )
    args = parser.parse_args()

    labels = make_layout(args.size, args.cells)
    n_cells = int(labels.max())
    kw = {"w0": args.w0, "sigma": args.sigma}

    fast_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = border_weight_map(labels, **kw)
        fast_times.append(time.perf_counter() - t)
    fast_s = statistics.median(fast_times)

    subset = args.brute_cells if 0 < args.brute_cells < n_cells else n_cells
    sub_labels = np.where(labels <= subset, labels, 0) if subset < n_cells else labels
    t = time.perf_counter()
    brute = border_weight_map_bruteforce(sub_labels, **kw)
    brute_measured = time.perf_counter() - t
    brute_s = brute_measured * n_cells / subset
    reference = border_weight_map(sub_labels, **kw) if subset < n_cells else fast
    max_diff = float(np.abs(reference - brute).max())

    result = {
        "shape": list(labels.shape),
        "cells": n_cells,
        "touching_pairs": touching_pairs(labels),
        "foreground_fraction": float((labels > 0).mean()),
        **kw,
        "fast_median_s": fast_s,
        "fast_all_s": fast_times,
        "brute_cells_timed": subset,
        "brute_measured_s": brute_measured,
        "brute_s": brute_s,
        "brute_extrapolated": subset < n_cells,
        "speedup": brute_s / fast_s,
        "max_abs_diff": max_diff,
        "machine": cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    brute_label = "brute force" + (
        f" (extrapolated from {subset} cells)" if subset < n_cells else ""
    )
    print(
        f"layout {args.size}×{args.size}, {n_cells} cells, {result['touching_pairs']} touching "
        f"pairs, w0={args.w0}, sigma={args.sigma}"
    )
    print(f"{'method':<45}{'time (s)':>12}")
    print(f"{'fast (median of ' + str(args.repeats) + ')':<45}{fast_s:>12.3f}")
    print(f"{brute_label:<45}{brute_s:>12.2f}")
    print(f"speed-up ×{result['speedup']:.0f}; max |fast − brute| = {max_diff:.2e}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
