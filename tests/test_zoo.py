"""The bundled trained zoo, ``load_pretrained``, the CLI's ``-m NAME`` / ``--untrained``
and ``compare`` (scores equal to napari_unet.metrics; one row per UNet++ level)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_unet import compare_models, list_pretrained, load_pretrained, predict, segment
from napari_unet.checkpoint import read_metadata
from napari_unet.compare import format_rows
from napari_unet.metrics import object_metrics
from napari_unet.models import build_model
from napari_unet.models.pretrained import _BUNDLED, available, is_pretrained, pretrained_path

SHIPPED = list(_BUNDLED)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "napari_unet.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_every_variant_is_bundled():
    assert available() == SHIPPED
    names = [c.name for c in list_pretrained()]
    assert names == SHIPPED
    for alias, name in [("UNet++", "unetpp"), ("unet3+", "unet3p"), ("Swin-UNet", "swin_unet")]:
        assert is_pretrained(alias) and pretrained_path(alias) == pretrained_path(name)
    assert not is_pretrained("u2net")  # the full-width U²-Net is not shipped
    with pytest.raises(ValueError, match="no bundled trained model"):
        load_pretrained("u2net")


def test_wheel_weights_stay_small():
    total = sum(pretrained_path(n).stat().st_size for n in SHIPPED)
    assert total < 20e6


@pytest.mark.parametrize("name", SHIPPED)
def test_bundled_checkpoint(name, nuclei):
    """Loads safely (safetensors only), was trained on synthetic data only, predicts a
    sane number of nuclei and matches its recorded development-image F1 within 0.02."""
    image, labels = nuclei
    path = pretrained_path(name)
    assert path.suffix == ".safetensors"
    with open(path, "rb") as fh:  # a safetensors header, not a pickle
        assert fh.read(1) != b"\x80"
    meta = read_metadata(path)
    training = meta["training"]
    assert "synthetic" in training["data"]
    model = load_pretrained(name)
    assert not model.training and model.num_classes == 3
    card = next(c for c in list_pretrained() if c.name == name)
    assert card.parameters == sum(p.numel() for p in model.parameters())
    assert card.dev_f1 is not None and card.gflop_per_mp and card.cpu_seconds_per_mp
    pred = segment(predict(model, image, device="cpu"), class_names=model.class_names)
    n = int(len(np.unique(pred)) - 1)
    assert 40 <= n <= 90, n  # 64 nuclei
    m = object_metrics(labels, pred)
    assert abs(m["f1"] - card.dev_f1) <= 0.02, (m["f1"], card.dev_f1)
    assert m["f1"] >= 0.5


def test_fp16_storage_is_recorded():
    for card in list_pretrained():
        dtype = card.training.get("stored_dtype")
        assert dtype in ("float16", "float32")
        if dtype == "float16":  # fp16 only when it keeps F1 within 0.005 of fp32
            assert abs(card.training["dev_fp16"]["f1"] - card.training["dev_fp32"]["f1"]) <= 0.005


def test_compare_equals_metrics(nuclei):
    image, labels = nuclei
    image, labels = image[:, :256], labels[:, :256]
    rows = compare_models(["unet"], image, labels, ap=True)
    assert len(rows) == 1
    model = load_pretrained("unet")
    pred = segment(predict(model, image, device="cpu"), class_names=model.class_names)
    m = object_metrics(labels, pred)
    r = rows[0]
    assert r.f1 == pytest.approx(m["f1"]) and r.mean_iou == pytest.approx(m["mean_matched_iou"])
    assert (r.n_gt, r.n_pred) == (m["n_gt"], m["n_pred"])
    ap = np.mean(
        [
            (lambda s: s["tp"] / (s["tp"] + s["fp"] + s["fn"]))(
                object_metrics(labels, pred, iou_threshold=t)
            )
            for t in np.arange(0.5, 0.96, 0.05)
        ]
    )
    assert r.ap == pytest.approx(ap)
    assert r.parameters == sum(p.numel() for p in model.parameters())
    assert "F1@0.5" in format_rows(rows)


def test_compare_region_scores_only_inside(nuclei):
    """A region is predicted with context; only ground truth inside it is scored, with
    ``object_metrics(exclude=outside)`` on the same prediction."""
    image, labels = nuclei
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    roi = (40, 140, 60, 200)
    rows = compare_models({"tiny": model}, image, labels, rois=[roi], ap=False, keep_labels=True)
    r = rows[0]
    y0, y1, x0, x1 = roi
    cy0, cy1, cx0, cx1 = max(0, y0 - 32), y1 + 32, max(0, x0 - 32), x1 + 32
    probs = predict(model, image[cy0:cy1, cx0:cx1], device="cpu")
    pred = segment(probs, class_names=model.class_names)
    exclude = np.ones(pred.shape, bool)
    exclude[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = False
    m = object_metrics(labels[cy0:cy1, cx0:cx1], pred, exclude=exclude)
    assert r.f1 == pytest.approx(m["f1"]) and r.n_gt == m["n_gt"] and r.ap is None
    assert r.labels.shape == labels.shape and not r.labels[:cy0].any()


def test_compare_unetpp_rows_per_level(nuclei):
    image, labels = nuclei
    rows = compare_models(["unetpp"], image[:128, :256], labels[:128, :256], ap=False)
    by = {r.output: r for r in rows}
    assert sorted(by) == ["L1", "L2", "L3", "L4"]
    assert [by[f"L{i}"].level for i in range(1, 5)] == [1, 2, 3, 4]
    assert by["L4"].final and not by["L1"].final
    params = [by[f"L{i}"].parameters for i in range(1, 5)]
    assert params == sorted(params) and params[0] < params[-1]
    assert [r.f1 for r in rows] == sorted((r.f1 for r in rows), reverse=True)


def test_compare_heads_of_unet3p_and_u2netp(nuclei):
    image, labels = nuclei
    rows = compare_models(["unet3p", "u2netp"], image[:128, :128], labels[:128, :128], ap=False)
    outs = {(r.name, r.output) for r in rows}
    assert {("unet3p", f"d{i}") for i in range(1, 6)} <= outs
    assert {("u2netp", f"side{i}") for i in range(1, 7)} | {("u2netp", "fuse")} <= outs
    finals = {r.name: r.output for r in rows if r.final}
    assert finals == {"unet3p": "d1", "u2netp": "fuse"}


def test_cli_bundled_name_and_untrained(tmp_path, nuclei):
    image, labels = nuclei
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, image[:128, :128])
    out = tmp_path / "lab.tif"
    r = run("predict", str(img), "-m", "unetpp", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "untrained" not in r.stderr and "unetpp" in r.stderr
    assert tifffile.imread(out).max() >= 5  # trained: finds nuclei
    r = run("predict", str(img), "-m", "unetpp", "--untrained", "-o", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "untrained" in r.stderr
    r = run("predict", str(img), "--untrained", "-o", str(out), "--overwrite")
    assert r.returncode == 2 and "--untrained needs a variant name" in r.stderr


def test_cli_compare(tmp_path, nuclei):
    image, labels = nuclei
    img, lab = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(img, image[:128, :192])
    tifffile.imwrite(lab, labels[:128, :192])
    r = run("compare", str(img), str(lab), "-m", "unet", "unet_valid", "--roi", "0:128,0:160")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["#", "model", "F1@0.5"]
    assert {line.split()[1] for line in lines[2:]} == {"unet", "unet_valid"}


def test_compare_widget(make_napari_viewer, qtbot):
    pytest.importorskip("pytestqt")
    from napari_unet._widgets import get_state

    viewer = make_napari_viewer()
    viewer.open_sample("napari-unet", "nuclei")
    tiny = build_model("unet", 1, 3, base_channels=4, depth=2)
    state = get_state(viewer)
    state.add_model(tiny, "tiny test model", kind="given", label="tiny")
    _, w = viewer.window.add_plugin_dock_widget("napari-unet", "Compare models")
    qtbot.waitUntil(lambda: w.model_list.count() == len(available()) + 1, timeout=60_000)
    assert {"unet", "tiny"} <= set(w._models)
    for i in range(w.model_list.count()):  # keep the bundled U-Net and the tiny model
        item = w.model_list.item(i)
        if item.text() not in ("unet", "tiny"):
            item.setCheckState(item.checkState().__class__.Unchecked)
    assert set(w.selected_models()) == {"unet", "tiny"}
    w.labels_combo.set_layer(viewer.layers["nuclei labels"])
    w.run()
    qtbot.waitUntil(lambda: w._job is None, timeout=120_000)
    assert [r.name for r in w.rows] == ["unet", "tiny"]  # the trained one first
    assert w.table.rowCount() == 2 and w.table.item(0, 0).text() == "unet"
    assert "best: unet" in w.status.text()
    assert w.progress.value() == 100 and w.progress.format() == "done"
    w.table.selectRow(0)
    w.use_selected()
    assert state.model is w.rows[0].model
    n = len(viewer.layers)
    w.show_selected()
    assert len(viewer.layers) == n + 1 and viewer.layers[-1].data.max() >= 40
