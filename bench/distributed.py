"""Benchmark: distributed prediction (``napari_unet.distributed``) with 1 vs 2 workers.

* **image**: a ``--size``² (16384²) uint16 zarr array (chunks 1024²), a 512² synthetic
  nuclei image (``synthetic_nuclei((512, 512), seed=0)``) repeated, written chunk by
  chunk (never held whole in memory);
* **model**: the bundled default model when installed (3-class U-Net, base 16, depth
  3); otherwise the same configuration trained here for ``--train-seconds`` (60) on
  synthetic nuclei so that the segmentation has realistic work to do (an untrained net
  finds no objects);
* **rows**: for each worker count in ``--workers`` (1,2) a fresh
  ``LocalCluster(n_workers=N, processes=True, threads_per_worker=1)``, one torch
  thread per worker (``--torch-threads``), then ``predict_distributed(model_path,
  zarr_array, scheduler=client, out=<new store>, chunk_size=--chunk, device="cpu")``:
  wall time (cluster start-up excluded, reported apart), megapixels/s, speed-up vs 1
  worker, peak memory per worker process (``VmHWM`` from ``/proc/<pid>/status``: the
  peak RSS since the worker process started, read through ``client.run`` at the end)
  and the client's RSS increase over the run and its peak RSS (the client process also
  hosts the ``LocalCluster`` scheduler); the CPU seconds the workers used and
  ``cores used`` = CPU seconds / wall time (on a shared machine this shows how much CPU
  the workers actually got), and the 1-minute load average before and after;
* **check**: the labels of every row equal the first row's (chunk by chunk), and
  probabilities agree on a few sampled chunks.

Results go to ``bench/results/distributed.json`` and a printed table. Stores live in a
temporary folder (``--tmp``, default the system one) and are deleted at the end.

    .venv/bin/python bench/distributed.py [--size 16384] [--chunk 1024] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
# this file is named like the ``distributed`` package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
RESULTS = ROOT / "results" / "distributed.json"


def _vm_hwm_mb() -> float:
    """Peak RSS of this process since it started (``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds (user + system) used by this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _vm_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_image(path: Path, size: int) -> None:
    import zarr

    from napari_unet.synthetic import synthetic_nuclei

    tile, _ = synthetic_nuclei((512, 512), seed=0)
    z = zarr.open_array(
        str(path), mode="w", shape=(size, size), chunks=(1024, 1024), dtype="uint16"
    )
    block = np.tile(tile, (2, 2))
    for r in range(0, size, 1024):
        for c in range(0, size, 1024):
            z[r : r + 1024, c : c + 1024] = block[: min(1024, size - r), : min(1024, size - c)]


def model_path(tmp: Path, train_seconds: float) -> tuple[Path, str]:
    import torch

    from napari_unet.checkpoint import default_model_path, save_model
    from napari_unet.models import build_model
    from napari_unet.synthetic import synthetic_dataset
    from napari_unet.training import train

    path = default_model_path()
    if path.is_file():
        return path, "bundled default model"
    torch.manual_seed(0)
    model = build_model("unet", 1, 3, base_channels=16, depth=3)
    images, labels = synthetic_dataset(4, (256, 256), seed=0)
    train(model, images, labels, seconds=train_seconds, device="cpu", seed=0, lr=3e-3)
    out = save_model(model.eval(), tmp / "unet16x3.safetensors")
    return out, f"U-Net base 16 depth 3 (default config), trained {train_seconds:.0f} s here"


def run_row(n: int, image: Path, model: Path, out: Path, args) -> dict:
    import zarr

    from distributed import Client, LocalCluster
    from napari_unet.distributed import predict_distributed

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None
    )
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(n)
    start_s = time.perf_counter() - t0
    rss0 = _vm_rss_mb()
    load0 = os.getloadavg()[0]
    try:
        cpu0 = sum(client.run(_cpu_s).values())
        t = time.perf_counter()
        predict_distributed(
            str(model),
            zarr.open_array(str(image), mode="r"),
            scheduler=client,
            out=out,
            chunk_size=args.chunk,
            device="cpu",
            torch_threads=args.torch_threads,
        )
        seconds = time.perf_counter() - t
        cpu = sum(client.run(_cpu_s).values()) - cpu0
        peaks = client.run(_vm_hwm_mb)
    finally:
        client.close()
        cluster.close()
    return {
        "workers": n,
        "seconds": round(seconds, 2),
        "megapixels_per_s": round(args.size**2 / 1e6 / seconds, 3),
        "cluster_start_s": round(start_s, 2),
        "peak_rss_mb_per_worker": sorted(round(v, 1) for v in peaks.values()),
        "client_rss_increase_mb": round(max(_vm_rss_mb() - rss0, 0.0), 1),
        "client_peak_rss_mb": round(_vm_hwm_mb(), 1),
        "worker_cpu_s": round(cpu, 1),
        "cores_used": round(cpu / seconds, 2),
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def compare(first: Path, other: Path, chunk: int, size: int) -> dict:
    import zarr

    a, b = zarr.open_group(str(first), mode="r"), zarr.open_group(str(other), mode="r")
    same = True
    for r in range(0, size, chunk):
        for c in range(0, size, chunk):
            win = (slice(r, r + chunk), slice(c, c + chunk))
            same &= bool(np.array_equal(a["labels"][win], b["labels"][win]))
    rng = np.random.default_rng(0)
    diff = 0.0
    for _ in range(4):
        r, c = (int(x) * chunk for x in rng.integers(0, size // chunk, 2))
        win = (slice(None), slice(r, r + chunk), slice(c, c + chunk))
        diff = max(diff, float(np.abs(a["probabilities"][win] - b["probabilities"][win]).max()))
    return {"labels_identical": same, "probabilities_max_abs_diff_sampled": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--tmp", default=None, help="folder for the zarr stores")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-", dir=args.tmp))
    try:
        t = time.perf_counter()
        image = tmp / "image.zarr"
        make_image(image, args.size)
        print(f"input {args.size}² written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        model, model_desc = model_path(tmp, args.train_seconds)
        print(f"model: {model_desc}", file=sys.stderr)
        rows, stores = [], []
        for n in workers:
            store = tmp / f"out-{n}.zarr"
            row = run_row(n, image, model, store, args)
            rows.append(row)
            stores.append(store)
            print(f"{n} worker(s): {row['seconds']:.1f} s", file=sys.stderr)
        for row in rows:
            row["speedup_vs_first"] = round(rows[0]["seconds"] / row["seconds"], 2)
        checks = [compare(stores[0], s, args.chunk, args.size) for s in stores[1:]]
        import zarr

        labels = zarr.open_group(str(stores[0]), mode="r")["labels"]
        n_objects = int(
            max(np.asarray(labels[r : r + 1024]).max() for r in range(0, args.size, 1024))
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import torch

    import distributed

    result = {
        "benchmark": "distributed prediction, 1 vs 2 workers",
        "size": args.size,
        "chunk": args.chunk,
        "model": model_desc,
        "objects": n_objects,
        "torch_threads_per_worker": args.torch_threads,
        "rows": rows,
        "checks": checks,
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "distributed": distributed.__version__,
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ndistributed prediction, {args.size}² uint16 zarr, chunks {args.chunk}², {model_desc}")
    print(
        f"{'workers':>7} {'seconds':>9} {'Mpx/s':>7} {'speed-up':>8} "
        f"{'peak RSS/worker (MiB)':>24} {'worker CPU s':>12} {'cores used':>10} {'client ΔRSS MiB':>15} {'load':>11}"
    )
    for row in rows:
        peaks = ", ".join(f"{v:.0f}" for v in row["peak_rss_mb_per_worker"])
        print(
            f"{row['workers']:>7} {row['seconds']:>9.1f} {row['megapixels_per_s']:>7.2f} "
            f"{row['speedup_vs_first']:>8.2f} {peaks:>24} {row['worker_cpu_s']:>12.0f} "
            f"{row['cores_used']:>10.2f} {row['client_rss_increase_mb']:>15.0f} {'→'.join(f'{x:.1f}' for x in row['load_average_1min']):>11}"
        )
    for check in checks:
        print(f"check: {check}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
