"""Benchmark: the inference runtimes behind the tiler on this CPU.

One run, A/B alternating, medians of ``--repeats``:

1. Per variant (bundled weights where they exist, else the default configuration): seconds
   per 1024² image for torch eager fp32, OpenVINO f32 and OpenVINO bf16 (where the CPU has
   bf16 units), the ratios, the achieved GFLOP/s, the fp32 GEMM GFLOP/s of the same run,
   and the label agreement (F1@0.5) of each runtime with torch fp32.
2. The default ``predict`` of a 2048² image (OpenVINO, bf16 where available) against torch
   eager fp32 of the same tiles, and against MONAI ``sliding_window_inference`` (roi 256,
   overlap 0.25, Gaussian): seconds and max distance from the whole-image output.
3. How long a cached export takes to load (disk cache → compiled, in-memory cache cleared).
4. Optionally (``--huge 16384``) a uint16 zarr → zarr run with peak RSS.

    python bench/engine.py [--repeats 3] [--threads 2] [--huge 0] [--variants unet,unetpp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _env import cpu_model, vm_hwm_mb
from napari_unet.inference import backends
from napari_unet.inference.predict import predict
from napari_unet.metrics import object_metrics
from napari_unet.models import build_model
from napari_unet.postprocess import segment
from napari_unet.runtime import cpu_has_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def load_variant(name: str):
    try:
        from napari_unet.models.pretrained import is_pretrained, load_pretrained

        if is_pretrained(name):
            return load_pretrained(name), "bundled"
    except ImportError:
        pass
    if name == "unet":
        from napari_unet.checkpoint import load_default_model

        return load_default_model(), "bundled"
    return build_model(name, 1, 3).eval(), "untrained default config"


def flops_per_mp(model) -> float:
    x = torch.zeros(1, model.in_channels, 512, 512)
    if model.info.border:
        x = torch.zeros(
            1, model.in_channels, model.valid_input_size(512), model.valid_input_size(512)
        )
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    out = model.output_size(x.shape[-1]) if model.info.border else x.shape[-1]
    return counter.get_total_flops() / (out * out) * 1e6 / 1e9


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def variant_rows(names: list[str], image: np.ndarray, repeats: int, threads: int) -> list[dict]:
    rows = []
    bf16 = cpu_has_bf16()
    for name in names:
        model, source = load_variant(name)
        classes = model.class_names
        runs = {
            "torch fp32": dict(runtime="torch", amp=False),
            "openvino f32": dict(runtime="openvino", exact=False, amp=False),
        }
        if bf16:
            runs["openvino bf16"] = dict(runtime="openvino", exact=False)
        for kw in runs.values():  # warm-up: exports and compiles once per window (cached)
            predict(model, image, device="cpu", **kw)
        times: dict[str, list[float]] = {k: [] for k in runs}
        outs: dict[str, np.ndarray] = {}
        for _ in range(repeats):  # A/B alternating
            for key, kw in runs.items():
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                outs[key] = predict(model, image, device="cpu", **kw)
                times[key].append(time.perf_counter() - t0)
        ref = segment(outs["torch fp32"], class_names=classes)
        gf = flops_per_mp(model) * image.size / 1e6
        row = {"variant": name, "weights": source, "gflop_per_image": round(gf, 1)}
        base = statistics.median(times["torch fp32"])
        for key in runs:
            med = statistics.median(times[key])
            f1 = object_metrics(ref, segment(outs[key], class_names=classes))["f1"]
            row[key] = {
                "seconds": round(med, 3),
                "speedup": round(base / med, 2),
                "gflops": round(gf / med, 1),
                "labels_f1_vs_torch_fp32": round(f1, 4),
            }
        rows.append(row)
        print(
            f"{name:<12} "
            + "  ".join(f"{k}: {row[k]['seconds']:.2f} s ({row[k]['speedup']:.1f}×)" for k in runs),
            flush=True,
        )
    return rows


def default_vs_peers(image: np.ndarray, repeats: int, threads: int) -> dict:
    from napari_unet.checkpoint import load_default_model

    model = load_default_model()
    with torch.no_grad():
        x = torch.from_numpy(
            (
                (image - np.percentile(image, 1))
                / (np.percentile(image, 99.8) - np.percentile(image, 1))
            ).astype(np.float32)[None, None]
        )
        whole = torch.softmax(model(x), 1)[0].numpy()

    def ours():
        return predict(model, image, device="cpu")

    def torch_eager():
        return predict(model, image, device="cpu", runtime="torch", amp=False)

    def monai():
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            return torch.softmax(
                sliding_window_inference(x, (256, 256), 4, model, overlap=0.25, mode="gaussian"), 1
            )[0].numpy()

    ours()  # export / compile once
    res: dict[str, list[float]] = {"ours (default)": [], "torch eager fp32": [], "monai": []}
    outs = {}
    for _ in range(repeats):
        for key, fn in (
            ("ours (default)", ours),
            ("torch eager fp32", torch_eager),
            ("monai", monai),
        ):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            outs[key] = fn()
            res[key].append(time.perf_counter() - t0)
    ref = segment(outs["torch eager fp32"], class_names=model.class_names)
    table = {}
    for key, t in res.items():
        table[key] = {
            "seconds": round(statistics.median(t), 3),
            "max_abs_diff_from_whole_image": round(float(np.abs(outs[key] - whole).max()), 4),
            "labels_f1_vs_torch_fp32": round(
                object_metrics(ref, segment(outs[key], class_names=model.class_names))["f1"], 4
            ),
        }
    o = table["ours (default)"]["seconds"]
    table["speedup_vs_torch_eager"] = round(table["torch eager fp32"]["seconds"] / o, 2)
    table["speedup_vs_monai"] = round(table["monai"]["seconds"] / o, 2)
    print(json.dumps(table, indent=1), flush=True)
    return table


def cached_load_seconds() -> float:
    """Seconds from a disk-cached export to a compiled model (memory cache cleared)."""
    from napari_unet.checkpoint import load_default_model

    model = load_default_model()
    precision = "bf16" if cpu_has_bf16() else "f32"
    backends.openvino_backend(model, (1, 768, 768), precision=precision)  # export (cached)
    times = []
    for _ in range(3):
        backends.clear_compiled()
        t0 = time.perf_counter()
        backends.openvino_backend(model, (1, 768, 768), precision=precision)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_huge_input(path: Path, size: int) -> None:
    """A size² uint16 zarr (1024² chunks) of a repeated synthetic nuclei tile."""
    import zarr

    from napari_unet.synthetic import synthetic_nuclei

    src = zarr.create_array(str(path), shape=(size, size), chunks=(1024, 1024), dtype="uint16")
    tile, _ = synthetic_nuclei((1024, 1024), seed=0)
    for i in range(0, size, 1024):
        for j in range(0, size, 1024):
            src[i : i + 1024, j : j + 1024] = tile


def huge(source: str) -> dict:
    """Predict a zarr image into a new zarr store (run in a fresh process: its peak RSS)."""
    import zarr

    from napari_unet.checkpoint import load_default_model

    src = zarr.open_array(source, mode="r")
    out = Path(source).with_name("out.zarr")
    rss0 = _peak_rss_mib()
    t0 = time.perf_counter()
    predict(load_default_model(), src, device="cpu", out=str(out))
    seconds = time.perf_counter() - t0
    return {
        "size": int(src.shape[0]),
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "peak_rss_before_mib": round(rss0, 1),
    }


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss off Linux). Not ru_maxrss on Linux:
    after fork + exec it starts at the parent's peak (a parent that ran the other
    benchmarks showed 6.2 GB "before" the run)."""
    return vm_hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def huge_in_subprocess(size: int, threads: int) -> dict:
    """Make the input here, predict it in a fresh process (whose peak RSS is the run's)."""
    import shutil
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="engine-"))
    try:
        make_huge_input(tmp / "in.zarr", size)
        run = subprocess.run(
            [sys.executable, __file__, "--huge-only", str(tmp / "in.zarr"), "--threads",
             str(threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{size}² uint16 zarr → zarr: {result['seconds']} s, peak RSS "
          f"{result['peak_rss_mib']} MiB", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="unet,unet_valid,unetpp,u2netp,unet3p,swin_unet")
    parser.add_argument("--huge", type=int, default=0, help="side of a uint16 zarr run (0 skips)")
    parser.add_argument("--huge-only", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.huge_only:  # in a fresh process, so that its peak RSS is its own
        torch.set_num_threads(args.threads)
        print(json.dumps(huge(args.huge_only)))
        return
    os.environ.pop(backends.RUNTIME_ENV, None)
    torch.set_num_threads(args.threads)
    from napari_unet.synthetic import synthetic_nuclei

    load0 = os.getloadavg()
    gemm = gemm_gflops(args.threads)
    print(f"fp32 GEMM: {gemm:.0f} GFLOP/s on {args.threads} threads", flush=True)
    image1024, _ = synthetic_nuclei((1024, 1024), seed=5)
    rows = variant_rows(args.variants.split(","), image1024, args.repeats, args.threads)
    image2048 = np.tile(image1024, (2, 2)).astype(np.float32)
    peers = default_vs_peers(image2048, args.repeats, args.threads)
    load_s = cached_load_seconds()
    print(f"cached export → compiled: {load_s:.2f} s", flush=True)
    result = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "bf16_units": cpu_has_bf16(),
        "load_average_start": [round(v, 2) for v in load0],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "fp32_gemm_gflops": round(gemm, 1),
        "variants_1024": rows,
        "default_2048": peers,
        "cached_export_load_seconds": round(load_s, 3),
        "huge_zarr": huge_in_subprocess(args.huge, args.threads) if args.huge else None,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
