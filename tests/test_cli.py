"""The console script: models table, predict and train on files, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
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


def test_closed_stdout_pipe_exits_quietly(tmp_path):
    """`napari-unet models | head -1`: a reader that goes away ends the command as it ends
    `ls` — no BrokenPipeError message, exit status 141 (was: an error line and 2)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # argparse itself ignores a failed write of --help (exit 0); either way: no message
    for args, codes in ((["models"], {141}), (["predict", "--help"], {0, 141})):
        cmd = [sys.executable, "-m", "napari_unet.cli", *args]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        proc.stdout.close()  # the reader leaves before the first line is written
        err = proc.stderr.read()
        assert proc.wait(timeout=300) in codes, err
        assert err == "", err


def test_broken_pipe_elsewhere_is_still_an_error(monkeypatch, capsys):
    """Only a closed stdout is quiet: a BrokenPipeError of anything else stays an error."""
    import napari_unet.cli.parser as parser

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(parser, "cmd_models", broken)
    assert main(["models"]) == 2
    assert "napari-unet: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "IMG", "-o", "OUT.tif", "--tile", "0"], "--tile: must be ≥ 2, got 0"),
        (["predict", "IMG", "-o", "OUT.tif", "--batch", "0"], "--batch: must be ≥ 1"),
        (["predict", "IMG", "-o", "OUT.tif", "--min-size", "-1"], "--min-size: must be ≥ 0"),
        (["predict", "IMG", "-o", "OUT.tif", "--tile", "big"], "invalid int value: 'big'"),
        (["train", "IMG", "IMG", "-o", "OUT.safetensors", "--epochs", "0"], "--epochs: must"),
        (["train", "IMG", "IMG", "-o", "OUT.safetensors", "--seconds", "0"], "--seconds: must"),
        (["train", "IMG", "IMG", "-o", "OUT.safetensors", "--lr", "-1"], "--lr: must"),
        (["models", "--classes", "0"], "--classes: must be ≥ 1"),
    ],
)
def test_bad_numbers_are_refused_in_one_line(args, message, tmp_path, capsys):
    """--tile 0 used to run with the default tile, --epochs 0 wrote an untrained copy."""
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    args = [str(img) if a == "IMG" else str(tmp_path / a) if a.startswith("OUT") else a
            for a in args]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.tif"]


def test_scale_without_3d_is_refused(tmp_path, capsys):
    """--scale only means something to --3d/--stitch; it was silently ignored."""
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    out = tmp_path / "o.tif"
    assert main(["predict", str(img), "-o", str(out), "--scale", "2,0.5,0.5"]) == 2
    assert "--scale" in capsys.readouterr().err and not out.exists()
