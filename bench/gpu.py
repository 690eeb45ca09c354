"""GPU benchmark (run by scripts/gpu_check.sh on a machine with an NVIDIA GPU).

1. Throughput of tiled ``predict`` (bf16 autocast, channels-last, batched fixed-size tiles)
   against the model's own fixed-size batched forward on the same window size: the tiler's
   overhead (goal: ratio ≥ 0.8). The image is uint16 (sent raw, normalised on the GPU);
   the same image as float32 (normalised on the host, twice the bytes) is timed in the
   same run for comparison.
2. A 16384² uint16 image predicted on the GPU: seconds and megapixels/s.
3. OOM step-down: with the process capped to a small share of the GPU memory, a large batch
   must step down (batch, then tile) and still finish with the same result.
4. Every bundled variant: tiled predict Mpx/s on a 4096² image (bf16 autocast), and the
   Compare table (F1@0.5 on the 64 development nuclei) on CUDA against the CPU (fp32 torch).
5. Fine-tuning on CUDA: steps/s of ``train`` (bf16 autocast, batch 8, 128² patches) and the
   development-image F1 before and after 300 steps on the sample's annotations.

Prints one table and writes bench/results/gpu.json.

    python bench/gpu.py [--huge 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_unet.checkpoint import load_default_model
from napari_unet.inference.predict import predict

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"


def sync() -> None:
    torch.cuda.synchronize()


def raw_forward_mps(model, window: int, batch: int, repeats: int, host: bool = False) -> float:
    """Megapixels/s of the model's own batched forward (bf16 autocast, channels-last);
    ``host``: and the float32 probabilities copied to the CPU (what any tiler that returns
    a numpy array must at least pay)."""
    dev = torch.device("cuda")
    model = model.to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, model.in_channels, window, window, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            torch.softmax(model(x).float(), 1)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(8):
                y = torch.softmax(model(x).float(), 1)
                if host:
                    y.cpu()
            sync()
            times.append(time.perf_counter() - t0)
    model.to("cpu").to(memory_format=torch.contiguous_format)
    return 8 * batch * window * window / statistics.median(times) / 1e6


def tiled_mps(model, image: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    predict(model, image[:2048, :2048], device="cuda")  # warm-up
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = predict(model, image, device="cuda")
        sync()
        times.append(time.perf_counter() - t0)
    return image.size / statistics.median(times) / 1e6, out


def oom_step_down(model, image: np.ndarray) -> dict:
    ref = predict(model, image, device="cuda", batch_size=1, tile_size=512, amp=False)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = 1.5 * 2**30 / total  # 1.5 GiB
    torch.cuda.set_per_process_memory_fraction(cap, 0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = predict(model, image, device="cuda", batch_size=64, tile_size=2048, amp=False)
        steps = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    return {
        "cap_gib": 1.5,
        "asked": {"batch": 64, "tile": 2048},
        "step_downs": steps,
        "max_abs_diff_vs_uncapped": float(np.abs(out - ref).max()),
    }


def variants(repeats: int) -> list[dict]:
    """Per bundled variant: GPU tiled Mpx/s (4096²) and F1 on CUDA vs CPU (Compare)."""
    from napari_unet._sample_data import nuclei_image, nuclei_labels
    from napari_unet.compare import compare_models
    from napari_unet.models.pretrained import available, load_pretrained
    from napari_unet.synthetic import synthetic_nuclei

    tile, _ = synthetic_nuclei((1024, 1024), seed=2)
    image = np.tile(tile, (4, 4))
    img, lab = nuclei_image(), nuclei_labels()
    gpu_rows = {r.name: r for r in compare_models(None, img, lab, heads=False, device="cuda")}
    cpu_rows = {r.name: r for r in compare_models(None, img, lab, heads=False, device="cpu")}
    out = []
    for name in available():
        model = load_pretrained(name)
        mps, _ = tiled_mps(model, image, repeats)
        g, c = gpu_rows[name], cpu_rows[name]
        out.append(
            {"variant": name, "mpx_s_4096": round(mps, 1), "f1_cuda": round(g.f1, 3),
             "f1_cpu": round(c.f1, 3), "seconds_dev_cuda": round(g.seconds, 3),
             "seconds_dev_cpu": round(c.seconds, 3)}
        )  # fmt: skip
        print(f"  {name:<12}{mps:8.1f} Mpx/s   F1 cuda {g.f1:.3f}  cpu {c.f1:.3f}")
    return out


def finetune() -> dict:
    """Fine-tune the default model on CUDA: steps/s and development F1 before/after."""
    from napari_unet._sample_data import nuclei_image, nuclei_labels
    from napari_unet.metrics import object_metrics
    from napari_unet.postprocess import segment
    from napari_unet.training import train

    img, lab = nuclei_image(), nuclei_labels()
    model = load_default_model()

    def f1() -> float:
        labels = segment(predict(model, img, device="cuda"))
        return float(object_metrics(lab, labels)["f1"])

    before = f1()
    h = train(model, img, lab, roi=(0, 128, 0, 128), steps=300, batch_size=8, patch_size=128,
              lr=1e-4, validation="none", device="cuda")  # fmt: skip
    return {
        "steps": 300,
        "batch": 8,
        "patch": 128,
        "precision": h.settings["precision"],
        "seconds": round(h.seconds, 2),
        "steps_per_s": round(300 / h.seconds, 1),
        "dev_f1_before": round(before, 3),
        "dev_f1_after": round(f1(), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--huge", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    model = load_default_model()
    rng = np.random.default_rng(0)
    from napari_unet.synthetic import synthetic_nuclei

    tile, _ = synthetic_nuclei((1024, 1024), seed=1)
    image = np.tile(tile, (8, 8))  # 8192²
    raw = raw_forward_mps(model, 1024, 4, args.repeats)
    raw_host = raw_forward_mps(model, 1024, 4, args.repeats, host=True)
    tiled, _ = tiled_mps(model, image, args.repeats)
    tiled_f32, _ = tiled_mps(model, image.astype(np.float32), args.repeats)
    huge = np.tile(tile, (args.huge // 1024, args.huge // 1024))
    sync()
    t0 = time.perf_counter()
    predict(model, huge, device="cuda")
    sync()
    huge_s = time.perf_counter() - t0
    oom = oom_step_down(model, image[:4096, :4096].astype(np.float32) + rng.random((4096, 4096)))
    print("per variant:")
    per_variant = variants(args.repeats)
    tune = finetune()
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "raw_forward_mpx_s": round(raw, 1),
        "raw_forward_to_host_mpx_s": round(raw_host, 1),
        "tiled_predict_mpx_s": round(tiled, 1),
        "throughput_ratio": round(tiled / raw, 3),
        "tiled_predict_float32_input_mpx_s": round(tiled_f32, 1),
        "goal_ratio": 0.8,
        "huge": {
            "size": args.huge,
            "seconds": round(huge_s, 1),
            "mpx_s": round(huge.size / huge_s / 1e6, 1),
        },  # fmt: skip
        "oom": oom,
        "variants": per_variant,
        "finetune": tune,
    }
    print(f"{'device':<28}{result['device']}")
    print(f"{'raw batched forward':<28}{raw:.1f} Mpx/s (1024² windows, batch 4, bf16)")
    print(f"{'raw forward + copy to host':<28}{raw_host:.1f} Mpx/s")
    print(
        f"{'tiled predict (8192² u16)':<28}{tiled:.1f} Mpx/s → ratio {tiled / raw:.2f} (goal ≥ 0.8)"
    )
    print(f"{'  same image as float32':<28}{tiled_f32:.1f} Mpx/s")
    print(f"{f'predict {args.huge}²':<28}{huge_s:.1f} s ({result['huge']['mpx_s']} Mpx/s)")
    print(f"{'OOM step-down (1.5 GiB cap)':<28}{len(oom['step_downs'])} steps, "
          f"max |Δ| {oom['max_abs_diff_vs_uncapped']:.2e}")  # fmt: skip
    print(f"{'fine-tune on CUDA':<28}{tune['steps_per_s']} steps/s ({tune['precision']}), "
          f"dev F1 {tune['dev_f1_before']} → {tune['dev_f1_after']}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
