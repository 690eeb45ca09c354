"""Benchmark: 3-D instance labels of Z-stacks with the bundled 2-D model.

For synthetic stacks of ellipsoid nuclei (isotropic and 1:4 anisotropic voxels), compares
per plane (today's behaviour: every plane labelled on its own), ``stitch`` (2-D objects
joined across Z by IoU), ``3d`` (3-D seeds and watershed with the voxel spacing) and
``3d`` + orthogonal planes: F1@0.5 in 3-D, object count error and seconds. Then a large
uint16 zarr stack → zarr labels in slabs, with the peak RSS of the process.

    python bench/stack3d.py [--stacks 3] [--big 64,2048,2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _env import cpu_model
from napari_unet.checkpoint import load_default_model
from napari_unet.inference.predict import predict
from napari_unet.metrics import object_metrics
from napari_unet.postprocess import segment
from napari_unet.synthetic import synthetic_nuclei_3d
from napari_unet.volume import segment_stack

RESULTS = Path(__file__).resolve().parent / "results" / "stack3d.json"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quality(model, args) -> list[dict]:
    rows = []
    for label, spacing in (("isotropic", (1.0, 1.0, 1.0)), ("1:4 anisotropic", (4.0, 1.0, 1.0))):
        depth = int(48 / spacing[0])
        stacks = [
            synthetic_nuclei_3d((depth, 128, 128), spacing=spacing, seed=100 + k)
            for k in range(args.stacks)
        ]
        methods = {
            "per plane (before)": lambda im, sp: segment(
                predict(model, im, device="cpu"), class_names=model.class_names
            ),
            "stitch (IoU 0.25)": lambda im, sp: segment_stack(
                model, im, method="stitch", device="cpu"
            ),
            "3d": lambda im, sp: segment_stack(model, im, spacing=sp, device="cpu"),
            "3d + orthogonal": lambda im, sp: segment_stack(
                model, im, spacing=sp, orthogonal=True, device="cpu"
            ),
        }
        for name, fn in methods.items():
            f1s, errs, secs = [], [], []
            for image, truth in stacks:
                t0 = time.perf_counter()
                labels = fn(image, spacing)
                secs.append(time.perf_counter() - t0)
                f1s.append(object_metrics(truth, labels)["f1"])
                errs.append(int(labels.max()) - int(truth.max()))
            rows.append(
                {
                    "stack": f"{label} {depth}x128x128",
                    "method": name,
                    "f1_mean": round(float(np.mean(f1s)), 4),
                    "count_error_mean": round(float(np.mean(errs)), 1),
                    "count_abs_error_mean": round(float(np.mean(np.abs(errs))), 1),
                    "seconds_median": round(statistics.median(secs), 2),
                }
            )
            print(
                f"{rows[-1]['stack']:<28} {name:<20} F1 {rows[-1]['f1_mean']:.3f}  "
                f"count error {rows[-1]['count_error_mean']:+.1f}  "
                f"{rows[-1]['seconds_median']:.2f} s",
                flush=True,
            )
    return rows


def big_stack(model, shape: tuple[int, int, int], slab: int, halo: int) -> dict:
    import zarr

    tmp = Path(tempfile.mkdtemp(prefix="stack3d-"))
    try:
        src = zarr.create_array(
            str(tmp / "image.zarr"), shape=shape, chunks=(1, 1024, 1024), dtype="uint16"
        )
        rng = np.random.default_rng(0)
        tile, tile_labels = synthetic_nuclei_3d((8, 256, 256), spacing=(1, 1, 1), seed=rng)
        for z in range(shape[0]):  # a repeated synthetic tile, written plane by plane
            plane = np.tile(tile[z % 8], (shape[1] // 256 + 1, shape[2] // 256 + 1))
            src[z] = plane[: shape[1], : shape[2]]
        del tile, tile_labels
        out = zarr.create_array(
            str(tmp / "labels.zarr"), shape=shape, chunks=(1, 1024, 1024), dtype="uint32"
        )
        rss0 = peak_rss_mib()
        t0 = time.perf_counter()
        segment_stack(model, src, device="cpu", slab=slab, halo=halo, out=out)
        seconds = time.perf_counter() - t0
        objects = 0
        for z0 in range(0, shape[0], 8):
            objects = max(objects, int(np.asarray(out[z0 : z0 + 8]).max()))
        return {
            "shape": list(shape),
            "slab": slab,
            "halo": halo,
            "seconds": round(seconds, 1),
            "objects": objects,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_rss_before_mib": round(rss0, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, default=3, help="synthetic stacks per setting")
    parser.add_argument("--big", default="64,2048,2048", help="Z,Y,X of the zarr run ('' skips)")
    parser.add_argument("--slab", type=int, default=8)
    parser.add_argument("--halo", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default_model()
    load0 = os.getloadavg()
    rows = quality(model, args)
    big = None
    if args.big:
        shape = tuple(int(v) for v in args.big.split(","))
        big = big_stack(model, shape, args.slab, args.halo)  # type: ignore[arg-type]
        print(
            f"zarr {'x'.join(map(str, shape))}: {big['seconds']:.0f} s, "
            f"{big['objects']} objects, peak RSS {big['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    result = {
        "cpu": cpu_model(),
        "torch_threads": args.threads,
        "load_average_start": [round(v, 2) for v in load0],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
        "big_zarr": big,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
