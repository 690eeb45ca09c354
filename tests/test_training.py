"""Trainer: loss goes down, beats chance on held-back pixels, sparse ROI, cancel, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.checkpoint import load_model, save_model
from napari_unet.models import build_model
from napari_unet.predict import predict
from napari_unet.synthetic import synthetic_nuclei
from napari_unet.training import default_roi, parse_roi, train
from napari_unet.weightmap import targets_from_instances


@pytest.fixture(scope="module")
def scene():
    return synthetic_nuclei((128, 192), density=0.3, seed=3)


def tiny(num_classes=3):
    return build_model("unet", 1, num_classes, base_channels=8, depth=2)


def test_short_training_lowers_the_loss_and_beats_chance(scene):
    img, lab = scene
    model = tiny()
    history = train(
        model,
        img,
        lab,
        roi=(0, 128, 0, 128),
        epochs=4,
        steps_per_epoch=15,
        batch_size=4,
        patch_size=64,
        lr=5e-3,
        val_fraction=0.0,
        seed=0,
    )
    losses = history.losses
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    # held-back pixels (columns 128..192 were never shown with labels)
    probs = predict(model, img)
    target = targets_from_instances(lab, mode="3class")[:, 128:]
    pred_fg = probs[0, :, 128:] < 0.5
    true_fg = target > 0
    balanced = 0.5 * (pred_fg[true_fg].mean() + (~pred_fg[~true_fg]).mean())
    assert balanced > 0.75, balanced  # chance is 0.5


def test_labels_outside_the_region_are_ignored(scene):
    img, lab = scene
    other = lab.copy()
    other[:, 100:] = 0  # change everything outside the region
    other[50:60, 150:170] = 99
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    kw = dict(
        roi=(0, 128, 0, 96),
        epochs=1,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        val_fraction=0.0,
        seed=1,
        augment=False,
    )
    train(a, img, lab, **kw)
    train(b, img, other, **kw)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_deterministic_with_a_seed_on_cpu(scene):
    img, lab = scene
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    kw = dict(epochs=1, steps_per_epoch=4, batch_size=2, patch_size=64, val_fraction=0.0, seed=7)
    ha, hb = train(a, img, lab, **kw), train(b, img, lab, **kw)
    assert ha.losses == hb.losses


def test_cancel_keeps_the_last_good_weights(scene):
    import threading

    img, lab = scene
    model = tiny()
    stop = threading.Event()
    snapshot = {}

    def callback(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        if event["kind"] == "step" and event["step"] == 6:
            stop.set()

    history = train(
        model,
        img,
        lab,
        epochs=5,
        steps_per_epoch=4,
        batch_size=2,
        patch_size=64,
        val_fraction=0.0,
        callback=callback,
        cancel=stop,
    )
    assert history.cancelled and len(history.losses) == 6 and len(history.epochs) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_validation_metrics_and_checkpoint_round_trip(scene, tmp_path):
    img, lab = scene
    model = tiny()
    events = []
    history = train(
        model,
        img,
        lab,
        roi=(0, 128, 0, 192),
        epochs=2,
        steps_per_epoch=5,
        batch_size=2,
        patch_size=64,
        val_fraction=0.25,
        callback=events.append,
    )
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert len(epochs) == 2 and 0.0 <= epochs[-1]["val_f1"] <= 1.0
    assert 0.0 <= epochs[-1]["val_iou"] <= 1.0
    path = save_model(model, tmp_path / "m.safetensors", training=history.summary())
    loaded = load_model(path)
    assert loaded.normalization == model.normalization
    assert loaded.training_summary["steps"] == 10
    np.testing.assert_array_equal(predict(loaded, img), predict(model, img))


def test_default_roi_and_parsing():
    lab = np.zeros((100, 100), np.uint16)
    lab[40:50, 30:35] = 1
    assert default_roi(lab, margin=5) == (35, 55, 25, 40)
    assert parse_roi("0:128,10:20") == (0, 128, 10, 20)
    with pytest.raises(ValueError, match="Y0:Y1,X0:X1"):
        parse_roi("0-128")
    with pytest.raises(ValueError, match="no annotation"):
        default_roi(np.zeros((10, 10), np.uint8))


def test_bad_training_inputs(scene):
    img, lab = scene
    with pytest.raises(ValueError, match="differ in size"):
        train(tiny(), img, lab[:64], epochs=1)
    with pytest.raises(ValueError, match="integers"):
        train(tiny(), img, lab.astype(np.float32), epochs=1)
    with pytest.raises(ValueError, match="no annotated cell"):
        train(tiny(), img, lab, roi=(0, 5, 0, 5), epochs=1)


@pytest.mark.parametrize(
    ("name", "loss", "cfg"),
    [
        ("unetpp", "ce_dice", {"base_channels": 4, "depth": 2}),
        ("unet3p", "unet3p_hybrid", {"base_channels": 4, "depth": 2, "deep_supervision": True}),
        ("u2netp", "u2net_sides", {"width": 0.25}),
        ("unet", "ce", {"base_channels": 4, "depth": 2, "padding": "valid", "norm": "none"}),
    ],
)
def test_every_family_trains_with_its_loss(scene, name, loss, cfg):
    img, lab = scene
    model = build_model(name, 1, 3, **cfg)
    history = train(
        model,
        img,
        lab,
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=64,
        loss=loss,
        val_fraction=0.0,
    )
    assert len(history.losses) == 2 and all(np.isfinite(history.losses))
