"""Benchmark: tiled prediction (``napari_unet.predict``) vs MONAI sliding windows.

Everything is measured in one run, with one model and one image:

* **model**: ``build_model("unet", 1, 2)`` (base 32, depth 4, BatchNorm, same padding),
  seeded; its BatchNorm running statistics are calibrated by a few train-mode forwards
  (no gradients) on random crops of a synthetic image, then it is put in eval mode, so
  its outputs are not degenerate (the foreground-probability spread is reported);
* **image**: a ``--size``² (2048²) float32 synthetic fluorescence-like image (Gaussian
  blobs of three sizes on a smooth background, plus noise), seeded;
* **reference**: the whole-image output, ``predict(model, img, tile_size=4096)`` (one
  window = the whole image), checked against ``torch.softmax(model(x), 1)`` on the
  normalised tensor;
* **rows** (CPU, round-robin over ``--repeats`` runs so background load hits every row
  alike; the whole-image reference doubles as the warm-up):

  - ``ours default``: ``predict(model, img, device="cpu")`` (``exact=False``, default
    ``tile_size``; halo = half the receptive field);
  - ``ours exact``: the same with ``exact=True`` (halo = the receptive field);
  - ``MONAI T=…``: ``monai.inferers.sliding_window_inference`` with ``roi_size=(T, T)``,
    ``sw_batch_size=1``, ``overlap=0.25``, ``mode="gaussian"`` and
    ``predictor=lambda x: torch.softmax(model(x), 1)`` under ``torch.inference_mode()``,
    on the image normalised by the same routine as ``predict``
    (``normalization_stats(sample_plane(img[None]), get_normalization(model))`` +
    ``apply_normalization``; its time is included, ``predict`` normalises internally),
    for T = our default ``tile_size`` (``DEFAULT_TILE["cpu"]``, printed) and T = 512.

  For each row: median wall time, MONAI-time/row-time ratios, max and mean absolute
  probability difference vs the whole-image output, and the peak RSS increase during
  the call (a background thread samples ``psutil.Process().memory_info().rss`` every
  20 ms; the RSS just before the call is subtracted; the maximum over the repeats);
* **huge lazy run**: a ``--huge-size``² uint16 zarr v3 array (chunks 1024², filled chunk
  by chunk, never held in memory) is predicted with ``predict(model, zarr_array,
  out=<new zarr>)`` in a separate subprocess that reports its wall time and its own
  peak RSS (``ru_maxrss``; also ``VmHWM``). That subprocess is started at the very
  beginning and waits for its job on stdin: Linux carries the ``ru_maxrss`` high-water
  mark across ``exec``, so a process started later would report this process's peak.
  The time is first estimated from the 2048² default-mode speed and printed. Default size: 16384² (8192² with ``--quick``); without an explicit
  ``--huge-size`` it is reduced (12288², 8192², 4096²) when the estimate exceeds
  ``--huge-budget-min`` minutes (25). The stores live in ``bench/results/*.zarr``
  (git-ignored) and are always deleted at the end;
* **CUDA** (only when available; ``"cuda": null`` otherwise): megapixels/s of
  ``predict`` (bf16, default settings) on the same image vs the model's fixed-size
  throughput on batches of 8 default-size windows (bf16, channels_last, timed with
  ``torch.cuda.synchronize``).

It prints a table and writes ``bench/results/tiling.json`` (all numbers, environment,
settings and the goals with pass/fail: speed-up ≥ 1.5 vs MONAI at the same window
size; our default max-abs-diff ≤ MONAI's at that size; 16384² peak RSS < 1.5 GB).
Memory units are binary: MB = 2**20 bytes, GB = 2**30 bytes (the decimal value of the
huge run's peak is also recorded).

    .venv/bin/python bench/tiling.py [--quick] [--repeats 3] [--size 2048]
                                     [--huge-size 16384] [--skip-huge]

``--quick``: one timed run per row and an 8192² huge run. On 2 idle CPU cores the full
run takes about 30 minutes (20 of them the 16384² run); other load makes it longer and,
through the estimate, can shrink the huge run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from scipy.ndimage import gaussian_filter

from _env import cpu_model, vm_hwm_mb
from napari_unet.inference.normalize import (
    apply_normalization,
    get_normalization,
    normalization_stats,
    sample_plane,
)
from napari_unet.inference.plan import DEFAULT_TILE, tile_plan_for
from napari_unet.inference.predict import predict
from napari_unet.models import SegmentationModel, build_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "tiling.json"
HUGE_IN = RESULTS_DIR / "huge_in.zarr"
HUGE_OUT = RESULTS_DIR / "huge_out.zarr"
SEED = 0
CELL = 256
"""The synthetic pattern is generated per CELL² cell, so any cell-aligned region of a
huge image can be rendered on its own and agrees with its neighbours."""
BLOB_LEVELS = ((2.0, 60, 600.0), (4.0, 25, 900.0), (8.0, 6, 500.0))
"""(sigma px, blobs per cell, mean amplitude) of the three blob populations."""
GOAL_SPEEDUP = 1.5
GOAL_RSS_GB = 1.5
GOAL_CUDA_RATIO = 0.8
MONAI_OVERLAP = 0.25


# ------------------------------------------------------------------------ inputs
def _cell_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def render(y0: int, x0: int, h: int, w: int, seed: int = SEED) -> np.ndarray:
    """Synthetic fluorescence image region ``[y0:y0+h, x0:x0+w]`` (float32, ~0..3000).

    All arguments are multiples of :data:`CELL`; the region equals the same crop of a
    larger rendering (blobs are seeded per cell and rendered with a margin).
    """
    assert y0 % CELL == x0 % CELL == h % CELL == w % CELL == 0
    out = np.zeros((h, w), np.float32)
    for level, (sigma, per_cell, amp) in enumerate(BLOB_LEVELS):
        margin = round_cells(int(4 * sigma) + 1)
        impulses = np.zeros((h + 2 * margin, w + 2 * margin), np.float32)
        for cy in range((y0 - margin) // CELL, (y0 + h + margin) // CELL):
            for cx in range((x0 - margin) // CELL, (x0 + w + margin) // CELL):
                rng = _cell_rng(seed, level, cy + 10_000, cx + 10_000)
                n = rng.poisson(per_cell)
                ys = cy * CELL + rng.integers(0, CELL, n) - (y0 - margin)
                xs = cx * CELL + rng.integers(0, CELL, n) - (x0 - margin)
                a = rng.gamma(2.0, amp / 2.0, n).astype(np.float32)
                np.add.at(impulses, (ys, xs), a * (2 * np.pi * sigma**2))
        blobs = gaussian_filter(impulses, sigma, truncate=4.0)
        out += blobs[margin : margin + h, margin : margin + w]
    yy = (np.arange(y0, y0 + h, dtype=np.float32) / 4096.0)[:, None]
    xx = (np.arange(x0, x0 + w, dtype=np.float32) / 4096.0)[None, :]
    out += 150.0 + 60.0 * np.sin(2 * np.pi * yy) * np.cos(2 * np.pi * xx)
    for cy in range(h // CELL):
        for cx in range(w // CELL):
            rng = _cell_rng(seed, 99, y0 // CELL + cy + 10_000, x0 // CELL + cx + 10_000)
            noise = rng.normal(0.0, 15.0, (CELL, CELL)).astype(np.float32)
            out[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL] += noise
    return np.maximum(out, 0.0)


def round_cells(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`CELL`."""
    return -(-n // CELL) * CELL


def make_model(seed: int = SEED) -> SegmentationModel:
    """Seeded default U-Net with calibrated BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("unet", 1, 2)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = None  # cumulative average over the calibration forwards
    calib = render(0, 0, 1024, 1024, seed=seed + 1)[None]
    calib = apply_normalization(calib, normalization_stats(calib, get_normalization(model)))
    rng = np.random.default_rng(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            crops = []
            for _ in range(4):
                r, c = rng.integers(0, 1024 - 256, 2)
                crops.append(calib[:, r : r + 256, c : c + 256])
            model(torch.from_numpy(np.stack(crops)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    _ = model.receptive_field  # measured once here, not inside a timed call
    return model


# ------------------------------------------------------------------------ measuring
class PeakRSS:
    """Context manager: peak RSS increase (bytes) over the RSS at entry, sampled every
    ``interval`` seconds by a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.before


@dataclass
class Row:
    """One way of computing the probabilities of the 2048² image."""

    name: str
    window: int
    """Window (network input) side actually used."""
    n_windows: int
    computed_fraction: float
    """Pixels pushed through the network per output pixel."""
    times_s: list[float] = field(default_factory=list)
    median_s: float = float("nan")
    min_s: float = float("nan")
    max_abs_diff: float = float("nan")
    mean_abs_diff: float = float("nan")
    peak_rss_increase_mb: float = 0.0
    monai_same_window_over_this: float | None = None
    """Time of MONAI at T = our default tile size / this row's time."""
    monai_512_over_this: float | None = None
    this_over_ours_default: float | None = None


def compare(result: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute difference."""
    d = np.abs(np.asarray(result, np.float32) - reference)
    return float(d.max()), float(d.mean())


def monai_predict(model: SegmentationModel, img: np.ndarray, roi: int) -> np.ndarray:
    """Normalise like ``predict`` and run MONAI's Gaussian sliding window; (C, H, W)."""
    from monai.inferers import sliding_window_inference

    stats = normalization_stats(sample_plane(img[None]), get_normalization(model))
    x = torch.from_numpy(apply_normalization(img[None], stats))[None]
    with torch.inference_mode():
        out = sliding_window_inference(
            inputs=x,
            roi_size=(roi, roi),
            sw_batch_size=1,
            predictor=lambda t: torch.softmax(model(t), 1),
            overlap=MONAI_OVERLAP,
            mode="gaussian",
        )
    return out[0].numpy()


def monai_windows(length: int, roi: int) -> int:
    """Windows per axis of MONAI's ``dense_patch_slices`` (overlap 0.25, no padding)."""
    if roi >= length:
        return 1
    interval = max(int(roi * (1 - MONAI_OVERLAP)), 1)
    return len({min(i * interval, length - roi) for i in range(-(-(length - roi) // interval) + 1)})


def reference_output(
    model: SegmentationModel, img: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Whole-image output via ``predict`` (one window) and the check against ``model(x)``."""
    t = time.perf_counter()
    with PeakRSS() as rss:
        ref = predict(model, img, tile_size=4096, device="cpu")
    elapsed = time.perf_counter() - t
    plan = tile_plan_for(model, img.shape, tile_size=4096)
    stats = normalization_stats(sample_plane(img[None]), get_normalization(model))
    x = torch.from_numpy(apply_normalization(img[None], stats))[None]
    with torch.inference_mode():
        direct = torch.softmax(model(x), 1)[0].numpy()
    del x
    diff_max, diff_mean = compare(ref, direct)
    fg = ref[1]
    info = {
        "time_s": elapsed,
        "peak_rss_increase_mb": rss.increase / 2**20,
        "n_windows": plan.n_tiles,
        "window": plan.window_shape[0],
        "vs_direct_softmax_model_max_abs_diff": diff_max,
        "vs_direct_softmax_model_mean_abs_diff": diff_mean,
        "foreground_probability": {
            "min": float(fg.min()),
            "max": float(fg.max()),
            "mean": float(fg.mean()),
            "std": float(fg.std()),
            "fraction_above_0.5": float((fg > 0.5).mean()),
        },
    }
    return ref, info


def bench_rows(
    model: SegmentationModel,
    img: np.ndarray,
    reference: np.ndarray,
    repeats: int,
    tile: int,
) -> dict[str, Row]:
    """Time the four rows round-robin; differences and RSS from every repeat."""
    h = img.shape[0]
    rows: dict[str, Row] = {}
    calls: dict[str, Callable[[], np.ndarray]] = {}
    for name, exact in (("ours default", False), ("ours exact", True)):
        plan = tile_plan_for(model, img.shape, tile_size=tile, exact=exact)
        rows[name] = Row(name, plan.window_shape[0], plan.n_tiles, plan.computed_fraction())
        calls[name] = lambda exact=exact: predict(
            model, img, tile_size=tile, device="cpu", exact=exact
        )
    for roi in dict.fromkeys((tile, 512)):
        name = f"MONAI T={roi}"
        n = monai_windows(h, roi) ** 2
        rows[name] = Row(name, roi, n, n * roi * roi / img.size)
        calls[name] = lambda roi=roi: monai_predict(model, img, roi)
    for r in range(repeats):
        for name, call in calls.items():
            gc.collect()
            t = time.perf_counter()
            with PeakRSS() as rss:
                result = call()
            elapsed = time.perf_counter() - t
            row = rows[name]
            row.times_s.append(elapsed)
            row.peak_rss_increase_mb = max(row.peak_rss_increase_mb, rss.increase / 2**20)
            dmax, dmean = compare(result, reference)
            if r > 0 and (dmax != row.max_abs_diff or dmean != row.mean_abs_diff):
                print(f"  warning: {name} is not deterministic across repeats")
            row.max_abs_diff, row.mean_abs_diff = dmax, dmean
            del result
            print(f"  run {r + 1}/{repeats} {name}: {elapsed:.1f} s, max|Δ| {dmax:.2e}", flush=True)
    for row in rows.values():
        row.median_s = statistics.median(row.times_s)
        row.min_s = min(row.times_s)
    same, small = rows[f"MONAI T={tile}"], rows["MONAI T=512"]
    ours = rows["ours default"]
    for row in rows.values():
        row.monai_same_window_over_this = same.median_s / row.median_s
        row.monai_512_over_this = small.median_s / row.median_s
        row.this_over_ours_default = row.median_s / ours.median_s
    return rows


# ------------------------------------------------------------------------ huge lazy run
def write_huge_input(path: Path, size: int, chunk: int = 1024) -> float:
    """Create a ``size``² uint16 zarr v3 array at ``path`` chunk by chunk; seconds taken."""
    import zarr

    t = time.perf_counter()
    arr = zarr.create_array(
        store=str(path), shape=(size, size), chunks=(chunk, chunk), dtype="uint16"
    )
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            block = render(y, x, round_cells(h), round_cells(w))[:h, :w]
            arr[y : y + h, x : x + w] = np.clip(np.rint(block), 0, 65535).astype(np.uint16)
    return time.perf_counter() - t


def start_huge_child(threads: int | None) -> subprocess.Popen[str]:
    """Start the huge-run subprocess now, while this process is still small.

    Linux keeps ``ru_maxrss`` across ``exec``: a process started later would inherit
    this process's RSS high-water mark. The child imports everything, then waits for
    one JSON job line on stdin (EOF: exit without work).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_huge-child"]
    if threads:
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def huge_child() -> None:
    """Subprocess body: read ``{"input", "output", "weights"}`` from stdin, predict the
    zarr at ``input`` into a new zarr at ``output`` and print one JSON line with the wall
    time and this process's peak RSS."""
    import zarr

    line = sys.stdin.readline()
    if not line.strip():
        return
    job = json.loads(line)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model("unet", 1, 2)
    model.load_state_dict(torch.load(job["weights"], weights_only=True))
    model.eval()
    t = time.perf_counter()
    _ = model.receptive_field  # one-time probe, reported separately
    rf_s = time.perf_counter() - t
    image = zarr.open_array(job["input"], mode="r")
    rss_before = psutil.Process().memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 60 or done == total:
            last[0] = now
            eta = (now - t0) / done * (total - done)
            print(
                f"  huge: {done}/{total} tiles, {now - t0:.0f} s, ~{eta:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    predict(model, image, out=job["output"], progress=progress)
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_rss_vmhwm_mb": vm_hwm_mb(),
                "peak_rss_before_predict_mb": maxrss_before / 1024,
                "rss_before_predict_mb": rss_before / 2**20,
                "peak_rss_at_job_start_mb": rss0 / 1024,
                "receptive_field_probe_s": rf_s,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def check_huge_output(path: Path, n_classes: int) -> dict[str, Any]:
    """Chunk-wise sanity check of the huge output: finite, in [0, 1], sums to 1."""
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    worst_sum = lo = hi = 0.0
    lo = 1.0
    finite = True
    step = 1024
    for y in range(0, arr.shape[-2], step):
        for x in range(0, arr.shape[-1], step):
            block = np.asarray(arr[:, y : y + step, x : x + step])
            finite &= bool(np.isfinite(block).all())
            worst_sum = max(worst_sum, float(np.abs(block.sum(0) - 1).max()))
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return {
        "shape": list(arr.shape),
        "finite": finite,
        "min": lo,
        "max": hi,
        "max_abs_sum_minus_1": worst_sum,
        "classes": n_classes,
    }


def bench_huge(model: SegmentationModel, size: int, child: subprocess.Popen[str]) -> dict[str, Any]:
    """Write the huge input, predict it in ``child`` (see :func:`start_huge_child`), check
    the output and delete both stores."""
    for path in (HUGE_IN, HUGE_OUT):
        shutil.rmtree(path, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), weights)
        try:
            print(f"  writing {size}² uint16 zarr ...", flush=True)
            fill_s = write_huge_input(HUGE_IN, size)
            print(f"  written in {fill_s:.0f} s; predicting in a subprocess ...", flush=True)
            job = {"input": str(HUGE_IN), "output": str(HUGE_OUT), "weights": str(weights)}
            t = time.perf_counter()
            stdout, _ = child.communicate(json.dumps(job) + "\n")
            total_s = time.perf_counter() - t
            if child.returncode != 0:
                raise RuntimeError(f"huge-run subprocess failed (exit {child.returncode})")
            report = json.loads(stdout.strip().splitlines()[-1])
            check = check_huge_output(HUGE_OUT, model.num_classes)
        finally:
            for path in (HUGE_IN, HUGE_OUT):
                shutil.rmtree(path, ignore_errors=True)
    plan = tile_plan_for(model, (size, size))
    return {
        "size": size,
        "megapixels": size * size / 1e6,
        "input_fill_s": fill_s,
        "subprocess_total_s": total_s,
        **report,
        "megapixels_per_s": size * size / 1e6 / report["wall_s"],
        "n_windows": plan.n_tiles,
        "window": plan.window_shape[0],
        "window_at_16384": tile_plan_for(model, (16384, 16384)).window_shape[0],
        "computed_fraction": plan.computed_fraction(),
        "output_check": check,
        "stores_deleted": not HUGE_IN.exists() and not HUGE_OUT.exists(),
    }


def estimate_huge_s(model: SegmentationModel, ours: Row, n_pixels: int, size: int) -> float:
    """Seconds for a ``size``² default-mode run at the per-computed-pixel speed of the
    fastest 2048² default-mode run (the minimum is the least disturbed by other load)."""
    per_px = ours.min_s / (n_pixels * ours.computed_fraction)
    return per_px * size * size * tile_plan_for(model, (size, size)).computed_fraction()


# ------------------------------------------------------------------------ CUDA
def bench_cuda(
    model: SegmentationModel, img: np.ndarray, repeats: int, tile: int | None
) -> dict[str, Any] | None:
    """bf16 ``predict`` megapixels/s vs the model's batched fixed-size throughput."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    window = tile or DEFAULT_TILE["cuda"]
    predict(model, img, device="cuda", amp=True, tile_size=tile)  # warm-up
    times = []
    for _ in range(max(repeats, 3)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        predict(model, img, device="cuda", amp=True, tile_size=tile)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ours_mps = img.size / 1e6 / statistics.median(times)
    net = copy.deepcopy(model).to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, window, window, device=dev).contiguous(memory_format=torch.channels_last)
    iters = 20
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            net(x)
        torch.cuda.synchronize()
        model_s = time.perf_counter() - t
    model_mps = iters * x.shape[0] * window * window / 1e6 / model_s
    del net, x
    torch.cuda.empty_cache()
    ratio = ours_mps / model_mps
    return {
        "device": torch.cuda.get_device_name(0),
        "predict_times_s": times,
        "predict_megapixels_per_s": ours_mps,
        "model_batch8_megapixels_per_s": model_mps,
        "window": window,
        "ratio": ratio,
        "goal": f"ratio >= {GOAL_CUDA_RATIO}",
        "pass": ratio >= GOAL_CUDA_RATIO,
    }


# ------------------------------------------------------------------------ reporting
def environment() -> dict[str, Any]:
    import monai
    import zarr

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(rows: dict[str, Row], reference: dict[str, Any], tile: int) -> None:
    head = (
        f"{'row':<16}{'window':>7}{'tiles':>6}{'comp.':>6}{'median s':>10}{'min s':>7}"
        f"{'MONAI@' + str(tile) + '/x':>13}{'x/ours':>8}{'max|Δ|':>10}{'mean|Δ|':>10}"
        f"{'+RSS MB':>9}"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'whole image':<16}{reference['window']:>7}{1:>6}{1.0:>6.2f}{reference['time_s']:>10.1f}"
        f"{'':>7}{'':>13}{'':>8}{0.0:>10.1e}{0.0:>10.1e}{reference['peak_rss_increase_mb']:>9.0f}"
    )
    for row in rows.values():
        print(
            f"{row.name:<16}{row.window:>7}{row.n_windows:>6}{row.computed_fraction:>6.2f}"
            f"{row.median_s:>10.1f}{row.min_s:>7.1f}{row.monai_same_window_over_this:>13.2f}"
            f"{row.this_over_ours_default:>8.2f}{row.max_abs_diff:>10.1e}"
            f"{row.mean_abs_diff:>10.1e}{row.peak_rss_increase_mb:>9.0f}"
        )


def goals(
    rows: dict[str, Row], huge: dict[str, Any] | None, tile: int, cuda: dict[str, Any] | None
) -> dict[str, Any]:
    ours, monai = rows["ours default"], rows[f"MONAI T={tile}"]
    speedup = monai.median_s / ours.median_s
    out: dict[str, Any] = {
        "speedup_vs_monai_same_window": {
            "goal": f">= {GOAL_SPEEDUP}",
            "value": speedup,
            "value_from_min_times": monai.min_s / ours.min_s,
            "monai_roi": tile,
            "pass": speedup >= GOAL_SPEEDUP,
        },
        "default_max_abs_diff_le_monai": {
            "goal": "ours default max|Δ| <= MONAI max|Δ| (same window size)",
            "ours": ours.max_abs_diff,
            "monai": monai.max_abs_diff,
            "pass": ours.max_abs_diff <= monai.max_abs_diff,
        },
    }
    if huge is not None:
        gb = huge["peak_rss_mb"] / 1024
        ok = gb < GOAL_RSS_GB
        full = huge["size"] >= 16384
        # A smaller image with the same window size (same per-tile memory) does a subset
        # of the work, so exceeding the limit there already fails the 16384² goal.
        same_window = huge["window"] >= huge["window_at_16384"]
        out["huge_peak_rss"] = {
            "goal": f"peak RSS < {GOAL_RSS_GB} GB at 16384²",
            "size": huge["size"],
            "window": huge["window"],
            "value_gb": gb,
            "value_gb_decimal": huge["peak_rss_mb"] * 2**20 / 1e9,
            "pass": ok if full or (not ok and same_window) else None,
            "note": None
            if full
            else f"measured at {huge['size']}² only"
            + ("" if ok else " and already over the limit there"),
            "pass_at_measured_size": ok,
        }
    if cuda is not None:
        out["cuda_throughput_ratio"] = {k: cuda[k] for k in ("goal", "ratio", "pass")}
    return out


# ------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 8192² huge run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (3)")
    parser.add_argument("--size", type=int, default=2048, help="side of the test image")
    parser.add_argument("--tile-size", type=int, default=None, help="our tile size / MONAI T")
    parser.add_argument("--huge-size", type=int, default=None, help="side of the huge zarr")
    parser.add_argument("--huge-budget-min", type=float, default=25.0)
    parser.add_argument("--skip-huge", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--_huge-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._huge_child:
        huge_child()
        return
    child = None if args.skip_huge else start_huge_child(args.threads)
    try:
        run(args, child)
    finally:
        if child is not None and child.poll() is None:
            child.communicate("")  # EOF: the child exits without work


def run(args: argparse.Namespace, child: subprocess.Popen[str] | None) -> None:
    """The benchmark proper (``child``: the waiting huge-run subprocess, or None)."""
    repeats = args.repeats or (1 if args.quick else 3)
    tile = args.tile_size or DEFAULT_TILE["cpu"]
    size = round_cells(args.size)

    print(f"model: unet (seed {SEED}, calibrated BatchNorm); image {size}² float32")
    model = make_model()
    img = render(0, 0, size, size)
    print(f"receptive-field radius {model.receptive_field}; default tile_size {tile} (CPU)")
    print("reference: whole image in one window ...", flush=True)
    reference, ref_info = reference_output(model, img)
    print(
        f"  {ref_info['time_s']:.1f} s; vs softmax(model(x)): max|Δ| "
        f"{ref_info['vs_direct_softmax_model_max_abs_diff']:.1e}; foreground p "
        f"mean {ref_info['foreground_probability']['mean']:.3f} "
        f"std {ref_info['foreground_probability']['std']:.3f}",
        flush=True,
    )
    print(f"rows ({repeats} run(s) each, round-robin) ...", flush=True)
    rows = bench_rows(model, img, reference, repeats, tile)
    del reference
    gc.collect()
    print()
    print_table(rows, ref_info, tile)
    print()
    ours = rows["ours default"]
    print(
        f"speed-up vs MONAI T={tile}: {rows[f'MONAI T={tile}'].median_s / ours.median_s:.2f}×"
        f" (T=512: {rows['MONAI T=512'].median_s / ours.median_s:.2f}×); exact mode costs "
        f"{rows['ours exact'].median_s / ours.median_s:.2f}× the default",
        flush=True,
    )

    huge = None
    huge_choice: dict[str, Any] = {}
    if child is not None:
        estimates = {
            s: estimate_huge_s(model, ours, img.size, s) for s in (16384, 12288, 8192, 4096)
        }
        if args.huge_size:
            huge_size, reason = args.huge_size, "--huge-size"
        else:
            huge_size = 8192 if args.quick else 16384
            reason = "--quick default" if args.quick else "default"
            budget = args.huge_budget_min * 60
            if estimates.get(huge_size, 0) > budget:
                fits = [s for s in sorted(estimates, reverse=True) if estimates[s] <= budget]
                huge_size = fits[0] if fits else 4096
                reason = f"estimate for the default exceeds {args.huge_budget_min:g} min"
        est = estimates.get(huge_size) or estimate_huge_s(model, ours, img.size, huge_size)
        huge_choice = {
            "estimates_s": {str(k): v for k, v in estimates.items()},
            "chosen": huge_size,
            "reason": reason,
            "estimate_s": est,
        }
        print(
            "huge run estimates (from the default-mode speed): "
            + ", ".join(f"{s}²: {v / 60:.1f} min" for s, v in estimates.items())
        )
        print(f"huge run: {huge_size}² ({reason}), estimated {est / 60:.1f} min", flush=True)
        huge = bench_huge(model, huge_size, child)
        huge["estimate_s"] = est
        print(
            f"  {huge['wall_s']:.0f} s ({huge['megapixels_per_s']:.3f} MP/s), peak RSS "
            f"{huge['peak_rss_mb']:.0f} MB (before predict {huge['peak_rss_before_predict_mb']:.0f} MB)"
            f"; output check {huge['output_check']}; stores deleted: {huge['stores_deleted']}",
            flush=True,
        )

    cuda = bench_cuda(model, img, repeats, args.tile_size)
    if cuda is None:
        print("CUDA: not available, skipped")
    else:
        print(
            f"CUDA {cuda['device']}: predict {cuda['predict_megapixels_per_s']:.1f} MP/s, model "
            f"batch-8 {cuda['model_batch8_megapixels_per_s']:.1f} MP/s, ratio {cuda['ratio']:.2f}"
        )

    result = {
        "settings": {
            "image_size": size,
            "image_dtype": "float32",
            "repeats": repeats,
            "quick": args.quick,
            "model": "unet (base 32, depth 4, BatchNorm, padding same), 1 in, 2 classes",
            "seed": SEED,
            "receptive_field": model.receptive_field,
            "size_divisor": model.size_divisor,
            "default_tile_size_cpu": DEFAULT_TILE["cpu"],
            "tile_size_used": tile,
            "monai": {
                "overlap": MONAI_OVERLAP,
                "mode": "gaussian",
                "sw_batch_size": 1,
                "roi_sizes": [tile, 512],
            },
            "device": "cpu",
            "rss_sampling_interval_s": 0.02,
            "memory_units": "MB = 2**20 bytes, GB = 2**30 bytes",
            "huge": huge_choice or None,
        },
        "reference": ref_info,
        "rows": [asdict(r) for r in rows.values()],
        "huge": huge,
        "cuda": cuda,
        "goals": goals(rows, huge, tile, cuda),
        "environment": environment(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print()
    for name, goal in result["goals"].items():
        print(f"goal {name}: {goal['pass']}  ({goal})")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
