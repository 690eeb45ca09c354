"""``napari-unet demo --headless``: engine-only without a display, hidden viewer with one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_unet.checkpoint import save_model
from napari_unet.models import build_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(build_model("unet", 1, 3, base_channels=4, depth=2), path)
    return path


def _run(args, env, cwd):
    code = (
        "import sys; from napari_unet.cli import main; rc = main(sys.argv[1:]); "
        "print('Qt imported:', 'qtpy' in sys.modules or 'PyQt5' in sys.modules or 'PyQt6' in sys.modules); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, "demo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _check_outputs(folder):
    labels = tifffile.imread(folder / "labels.tif")
    probs = tifffile.imread(folder / "probabilities.tif")
    assert labels.shape == (256, 512) and labels.dtype == np.uint32
    assert probs.shape == (3, 256, 512) and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0


def test_demo_without_display_is_engine_only(tiny_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    out = _run(["--model", str(tiny_checkpoint)], env, tmp_path)  # no --headless needed
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "demo-output"  # the default output folder
    _check_outputs(folder)
    assert not (folder / "screenshot.png").exists()
    assert "engine only" in out.stdout and "wrote" in out.stdout
    assert "Qt imported: False" in out.stdout


@pytest.mark.skipif(
    not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen",
    reason="needs a display (run the tests under xvfb-run)",
)
def test_demo_headless_with_display_writes_screenshot(tiny_checkpoint, tmp_path):
    folder = tmp_path / "out"
    out = _run(
        ["--headless", "--output", str(folder), "--model", str(tiny_checkpoint)],
        dict(os.environ),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    _check_outputs(folder)
    shot = folder / "screenshot.png"
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert "screenshot.png" in out.stdout


def test_display_detection(monkeypatch):
    from napari_unet.demo import display_available

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert not display_available()
    monkeypatch.delenv("QT_QPA_PLATFORM")
    if sys.platform.startswith("linux"):
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        assert not display_available()
        monkeypatch.setenv("DISPLAY", ":99")
        assert display_available()
