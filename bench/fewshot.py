"""Few-shot fine-tuning benchmark on the DSB 2018 nuclei image (256×512, 64 nuclei).

Convention (shared/data/README): the user annotates the nuclei of the 128×128 crop at
the top-left corner (rows 0:128, columns 0:128; 12 nuclei) and fine-tunes for at most
``--seconds`` (120) on this CPU; the whole image is predicted and the annotated nuclei
that do not touch the crop are scored (object precision / recall / F1 at IoU 0.5 and
mean matched IoU; predicted objects lying mostly inside the crop are not counted).

Rows: the bundled model before and after fine-tuning, the same small U-Net trained
from scratch with the same budget, and an Otsu + distance-transform watershed baseline.

    .venv/bin/python bench/fewshot.py [--seconds 120]

Writes ``bench/results/fewshot.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from _env import cpu_model
from napari_unet.checkpoint import load_default_model
from napari_unet.inference.predict import predict
from napari_unet.metrics import object_metrics
from napari_unet.models import build_model
from napari_unet.postprocess import segment
from napari_unet.training import train

CROP = (0, 128, 0, 128)
RESULTS = Path(__file__).resolve().parent / "results"


def load_data() -> tuple[np.ndarray, np.ndarray]:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if (shared / "nuclei_dev_image.tif").exists():
        import tifffile

        return tifffile.imread(shared / "nuclei_dev_image.tif"), tifffile.imread(
            shared / "nuclei_dev_labels.tif"
        )
    from napari_unet._sample_data import nuclei_image, nuclei_labels

    return nuclei_image(), nuclei_labels()


def otsu_watershed(image: np.ndarray, min_distance: int = 7, min_size: int = 15) -> np.ndarray:
    """Classical baseline: Gaussian smoothing, Otsu threshold, distance-transform watershed."""
    smooth = ndi.gaussian_filter(image.astype(np.float32), 1.0)
    fg = smooth > threshold_otsu(smooth)
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=1))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(
        dist, min_distance=min_distance, labels=ndi.label(fg)[0], exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    sizes = np.bincount(labels.ravel())
    labels[(sizes < min_size)[labels]] = 0
    return labels


def score(model_or_labels, image: np.ndarray, gt: np.ndarray, exclude: np.ndarray) -> dict:
    if isinstance(model_or_labels, np.ndarray):
        pred = model_or_labels
    else:
        pred = segment(
            predict(model_or_labels, image, device="cpu"), class_names=model_or_labels.class_names
        )
    m = object_metrics(gt, pred, exclude=exclude)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="few-shot fine-tuning benchmark")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    image, gt = load_data()
    y0, y1, x0, x1 = CROP
    annotation = np.zeros_like(gt)
    annotation[y0:y1, x0:x1] = gt[y0:y1, x0:x1]
    n_annotated = len(np.unique(annotation)) - 1
    exclude = np.zeros(gt.shape, bool)
    exclude[y0:y1, x0:x1] = True

    rows = []
    t = time.perf_counter()
    base = load_default_model()
    rows.append(
        {
            "method": "bundled model, no fine-tuning",
            "train_s": 0.0,
            **score(base, image, gt, exclude),
            "predict_s": round(time.perf_counter() - t, 2),
        }
    )

    for name, model in [
        ("bundled model + fine-tuning", load_default_model()),
        ("same U-Net from scratch", build_model("unet", 1, 3, **load_default_model().config)),
    ]:
        history = train(
            model,
            image,
            annotation,
            roi=CROP,
            seconds=args.seconds,
            lr=args.lr,
            val_fraction=0.0,
            seed=args.seed,
            device="cpu",
        )
        rows.append(
            {
                "method": name,
                "train_s": round(history.seconds, 1),
                "steps": len(history.losses),
                **score(model, image, gt, exclude),
            }
        )

    t = time.perf_counter()
    rows.append(
        {
            "method": "Otsu + watershed",
            "train_s": 0.0,
            **score(otsu_watershed(image), image, gt, exclude),
            "predict_s": round(time.perf_counter() - t, 2),
        }
    )

    header = f"{'method':32s} {'train s':>8s} {'steps':>6s} {'P':>6s} {'R':>6s} {'F1@0.5':>7s} {'mIoU':>6s} {'n_gt':>5s}"
    print(f"annotated nuclei in the crop: {n_annotated}; scored nuclei: {rows[0]['n_gt']}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:32s} {r['train_s']:8.1f} {r.get('steps', ''):>6} {r['precision']:6.3f} {r['recall']:6.3f} "
            f"{r['f1']:7.3f} {r['mean_matched_iou']:6.3f} {r['n_gt']:5d}"
        )
    goal = rows[1]["f1"] >= 0.90
    print(
        f"goal F1@0.5 ≥ 0.90 after fine-tuning: {'PASS' if goal else 'FAIL'} ({rows[1]['f1']:.3f})"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "few-shot fine-tuning, DSB 2018 nuclei dev image",
        "crop": CROP,
        "annotated_nuclei": n_annotated,
        "seconds_budget": args.seconds,
        "rows": rows,
        "goal_f1_after_finetune": {"target": 0.90, "value": rows[1]["f1"], "pass": goal},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    (RESULTS / "fewshot.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'fewshot.json'}")


if __name__ == "__main__":
    main()
