"""The console script: models table, predict and train on files, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import tifffile

from napari_unet.checkpoint import read_metadata, save_model
from napari_unet.cli import main
from napari_unet.models import build_model, list_models


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "napari_unet.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "31.03M" not in out and "7.77M" in out  # default unet: base 32, depth 4


def test_predict_and_train_on_files(tmp_path, nuclei):
    image, labels = nuclei
    img_path = tmp_path / "img.tif"
    tifffile.imwrite(img_path, image[:128, :160])
    ann = np.zeros((128, 160), np.uint16)
    ann[:96, :96] = labels[:96, :96]
    ann_path = tmp_path / "ann.tif"
    tifffile.imwrite(ann_path, ann)
    ckpt = save_model(
        build_model("unet", 1, 3, base_channels=4, depth=2), tmp_path / "m.safetensors"
    )

    out = tmp_path / "labels.tif"
    probs = tmp_path / "probs.tif"
    r = run(
        "predict",
        str(img_path),
        "-m",
        str(ckpt),
        "-o",
        str(out),
        "--probabilities",
        str(probs),
        "--tile",
        "64",
    )
    assert r.returncode == 0, r.stderr
    assert tifffile.imread(out).shape == (128, 160) and tifffile.imread(out).dtype == np.uint32
    p = tifffile.imread(probs)
    assert p.shape == (3, 128, 160) and np.allclose(p.sum(0), 1, atol=1e-5)
    # existing outputs are never overwritten silently
    r = run("predict", str(img_path), "-m", str(ckpt), "-o", str(out))
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr

    trained = tmp_path / "trained.safetensors"
    r = run(
        "train",
        str(img_path),
        str(ann_path),
        "-o",
        str(trained),
        "--init",
        str(ckpt),
        "--epochs",
        "1",
        "--roi",
        "0:96,0:96",
        "--val-fraction",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "epoch   1" in r.stderr
    meta = read_metadata(trained)
    assert meta["training"]["steps"] == 20 and meta["variant"] == "unet"


def test_errors_are_one_line(tmp_path):
    r = run("predict", str(tmp_path / "missing.tif"), "-m", "unet", "-o", str(tmp_path / "o.tif"))
    assert r.returncode == 2 and "no such image" in r.stderr and "Traceback" not in r.stderr
    evil = tmp_path / "model.pt"
    evil.write_bytes(b"\x80\x04K\x01.")
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    r = run("predict", str(img), "-m", str(evil), "-o", str(tmp_path / "o.tif"))
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr
