"""The bundled model zoo on the DSB 2018 development image (256×512, 64 nuclei).

Per bundled trained variant: parameters, GFLOP per megapixel (FlopCounterMode, one
256² forward), CPU seconds to segment a 1024² image (the development image tiled
2×4; whole pipeline: predict + instances, fp32), zero-shot F1@0.5, mean matched IoU
and AP@0.5:0.95 on all 64 nuclei (none of these models saw the image), and one row per
depth for the deep-supervised variants (UNet++ L1..L4 pruned networks, timed each;
UNet 3+ d1..d5 and U²-Net† sides share one forward). With ``--finetune S`` also
each variant after ``S`` seconds of fine-tuning on the 128×128 top-left crop (12
nuclei, the few-shot convention of bench/fewshot.py), scored outside the crop.

    .venv/bin/python bench/zoo.py [--threads 1] [--finetune 120]

Writes ``bench/results/zoo.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _env import cpu_model
from napari_unet import compare_models, list_pretrained, load_pretrained, predict, segment, train
from napari_unet.metrics import object_metrics

RESULTS = Path(__file__).resolve().parent / "results"
CROP = (0, 128, 0, 128)


def seconds_1024(model, image: np.ndarray, repeats: int = 2) -> float:
    big = np.tile(image, (4, 2))[:1024, :1024]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        segment(predict(model, big, device="cpu"), class_names=model.class_names)
        best = min(best, time.perf_counter() - t0)
    return best


def outside_crop(model, image: np.ndarray, gt: np.ndarray) -> dict:
    """F1@0.5 / mean matched IoU of the whole-image prediction on the nuclei that do not
    touch the crop (``object_metrics(exclude=crop)``)."""
    y0, y1, x0, x1 = CROP
    exclude = np.zeros(gt.shape, bool)
    exclude[y0:y1, x0:x1] = True
    pred = segment(predict(model, image, device="cpu"), class_names=model.class_names)
    m = object_metrics(gt, pred, exclude=exclude)
    return {"f1": round(m["f1"], 4), "mean_iou": round(m["mean_matched_iou"], 4), "n_gt": m["n_gt"]}


def finetune(name: str, image: np.ndarray, gt: np.ndarray, seconds: float, threads: int) -> dict:
    """``seconds`` of fine-tuning on the annotated 128×128 crop (the few-shot convention
    of bench/fewshot.py: lr 1e-3, no validation split, seed 0, the trainer's defaults
    otherwise), scored outside the crop before and after."""
    model = load_pretrained(name)
    before = outside_crop(model, image, gt)
    y0, y1, x0, x1 = CROP
    ann = np.zeros_like(gt)
    ann[y0:y1, x0:x1] = gt[y0:y1, x0:x1]
    history = train(
        model, image, ann, roi=CROP, seconds=seconds, lr=1e-3, val_fraction=0.0,
        seed=0, device="cpu", threads=threads,
    )  # fmt: skip
    after = outside_crop(model, image, gt)
    return {
        "seconds": round(history.seconds, 1),
        "steps": len(history.losses),
        "final_loss": round(float(np.mean(history.losses[-20:])), 4),
        "annotated_nuclei": int(len(np.unique(ann)) - 1),
        "f1_before": before["f1"],
        "mean_iou_before": before["mean_iou"],
        **after,
    }


def finetune_cell(ft: dict) -> str:
    return (
        f"{ft['f1_before']:.3f} / {ft['mean_iou_before']:.3f} → "
        f"{ft['f1']:.3f} / {ft['mean_iou']:.3f} ({ft['steps']} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="bundled model zoo benchmark")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--finetune", type=float, default=0.0, help="fine-tune seconds (0: skip)")
    parser.add_argument("--only", nargs="*", default=None, help="bundled names to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from napari_unet._sample_data import nuclei_image, nuclei_labels

    image, gt = nuclei_image(), nuclei_labels()
    cards = [c for c in list_pretrained() if not args.only or c.name in args.only]
    variants = []
    for card in cards:
        model = load_pretrained(card.name)
        print(f"{card.name}: scoring", flush=True)
        rows = compare_models({card.name: model}, image, gt)
        final = next(r for r in rows if r.final)
        entry = {
            "name": card.name,
            "variant": card.variant,
            "title": card.title,
            "config": card.config,
            "parameters": card.parameters,
            "gflop_per_mp": card.gflop_per_mp,
            "cpu_seconds_1024": round(seconds_1024(model, image), 2),
            "f1": round(final.f1, 4),
            "mean_iou": round(final.mean_iou, 4),
            "ap": round(final.ap, 4),
            "n_pred": final.n_pred,
            "recorded_dev_f1": card.dev_f1,
            "train_steps": card.training.get("steps"),
            "train_seconds": card.training.get("seconds"),
            "stored_dtype": card.training.get("stored_dtype"),
            "dev_fp32_f1": (card.training.get("dev_fp32") or {}).get("f1"),
            "dev_fp16_f1": (card.training.get("dev_fp16") or {}).get("f1"),
        }
        if len(rows) > 1:
            order = {r.output: r for r in rows}
            entry["depths"] = [
                {
                    "output": r.output,
                    "f1": round(r.f1, 4),
                    "mean_iou": round(r.mean_iou, 4),
                    "ap": round(r.ap, 4),
                    "seconds_dev_image": r.seconds,
                    "parameters": r.parameters,
                    "final": r.final,
                }
                for r in sorted(order.values(), key=lambda r: r.output)
            ]
        if args.finetune > 0:
            print(f"{card.name}: fine-tuning {args.finetune:.0f} s", flush=True)
            entry["finetune"] = finetune(card.name, image, gt, args.finetune, args.threads)
        variants.append(entry)
        print(json.dumps(entry), flush=True)

    out_path = RESULTS / "zoo.json"
    if args.only and out_path.is_file():  # a partial run updates the stored table
        ran = {v["name"] for v in variants}
        kept = [v for v in json.loads(out_path.read_text())["variants"] if v["name"] not in ran]
        order = [c.name for c in list_pretrained()]
        variants = sorted(kept + variants, key=lambda v: order.index(v["name"]))
    ft = any("finetune" in v for v in variants)
    print()
    print(
        "| variant | params | GFLOP/MP | CPU s (1024²) | F1@0.5 | mean IoU | AP@.5:.95 |"
        + (" F1 / IoU outside the crop: zero-shot → fine-tuned |" if ft else "")
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if ft else ""))
    for v in sorted(variants, key=lambda v: -v["f1"]):
        print(
            f"| {v['title']} | {v['parameters'] / 1e6:.2f}M | {v['gflop_per_mp']:.0f} | "
            f"{v['cpu_seconds_1024']:.1f} | {v['f1']:.3f} | {v['mean_iou']:.3f} | {v['ap']:.3f} |"
            + ((f" {finetune_cell(v['finetune'])} |" if "finetune" in v else " - |") if ft else "")
        )
    for v in variants:
        if "depths" in v:
            print(f"\n{v['name']} per depth: " + ", ".join(
                f"{d['output']} F1 {d['f1']:.3f} ({d['seconds_dev_image']:.2f} s)" for d in v["depths"]
            ))  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "bundled zoo on the DSB 2018 development image (zero-shot, 64 nuclei)",
        "variants": variants,
        "goals": {
            "every_variant_f1_ge_0.85": all(v["f1"] >= 0.85 for v in variants),
            "best_f1_ge_0.92": max(v["f1"] for v in variants) >= 0.92,
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "date": time.strftime("%Y-%m-%d"),
            "note": "shared 2-core machine with other jobs running: times are upper bounds",
        },
    }
    out_path.write_text(json.dumps(out, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
