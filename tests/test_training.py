"""Trainer: loss goes down, regions and entries, validation modes, step budget, safety, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.checkpoint import load_model, save_model
from napari_unet.inference.predict import predict
from napari_unet.models import build_model
from napari_unet.synthetic import synthetic_nuclei
from napari_unet.training import (
    MIN_VAL_OBJECTS,
    TrainingEntry,
    as_entries,
    default_roi,
    parse_roi,
    train,
)
from napari_unet.training.data import prepare_entry, region_objects
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


# ------------------------------------------------------------------ entries, regions, budget
def _same_weights(a, b) -> bool:
    return all(
        torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values())
    )


def _twins():
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    return a, b


FAST = dict(steps=4, batch_size=2, patch_size=64, validation="none", seed=2, augment=False)


def test_every_rectangle_is_used(scene):
    img, lab = scene
    first, second = (0, 64, 0, 64), (64, 128, 128, 192)
    changed = lab.copy()
    changed[64:128, 128:192] = 0  # annotations differ only inside the second rectangle
    changed[80:100, 150:170] = 500
    a, b = _twins()
    ha = train(a, TrainingEntry(img, lab, [first, second]), **FAST)
    train(b, TrainingEntry(img, changed, [first, second]), **FAST)
    assert not _same_weights(a, b)  # the second rectangle's annotations change the result
    c, d = _twins()
    train(c, TrainingEntry(img, lab, [first]), **FAST)
    train(d, TrainingEntry(img, changed, [first]), **FAST)
    assert _same_weights(c, d)  # without the second rectangle they are ignored
    both = np.unique(lab[0:64, 0:64]).size - 1 + np.unique(lab[64:128, 128:192]).size - 1
    assert ha.data.regions == 2 and ha.data.images == 1
    ids = set(np.unique(lab[0:64, 0:64])) | set(np.unique(lab[64:128, 128:192]))
    assert ha.data.objects == len(ids - {0})
    assert ha.data.objects <= both
    assert ha.data.pixels == 2 * 64 * 64


def test_several_images_and_the_start_event(scene):
    img, lab = scene
    img2, lab2 = synthetic_nuclei((96, 96), density=0.3, seed=5)
    events = []
    history = train(
        tiny(),
        [TrainingEntry(img, lab, [(0, 64, 0, 64)], name="a"), (img2, lab2)],
        callback=events.append,
        **FAST,
    )
    start = events[0]
    assert start["kind"] == "start" and start["images"] == 2 and start["regions"] == 2
    summary = start["summary"]
    assert summary is history.data
    assert summary.objects == sum(p["objects"] for p in summary.per_image) > 0
    assert summary.per_image[0]["name"] == "a"
    assert "2 images, 2 regions" in summary.describe()
    assert [e["kind"] for e in events].count("step") == 4


def test_backwards_compatible_roi_forms(scene):
    img, lab = scene
    one = as_entries(img, lab, (0, 64, 0, 64))
    assert len(one) == 1 and one[0].regions == [(0, 64, 0, 64)]
    two_rects = as_entries(img, lab, [(0, 64, 0, 64), (64, 128, 0, 64)])
    assert len(two_rects) == 1 and len(two_rects[0].regions) == 2
    per_image = as_entries([img, img], [lab, lab], [(0, 64, 0, 64), None])
    assert per_image[0].regions == [(0, 64, 0, 64)] and per_image[1].regions is None


def test_step_budget_is_deterministic(scene):
    img, lab = scene
    a, b = _twins()
    kw = dict(steps=7, steps_per_epoch=3, batch_size=2, patch_size=64, validation="none", seed=4)
    ha, hb = train(a, img, lab, **kw), train(b, img, lab, seconds=1e6, **kw)
    assert ha.losses == hb.losses and len(ha.losses) == 7 and len(ha.epochs) == 3
    assert _same_weights(a, b)
    h = train(tiny(), img, lab, epochs=2, steps_per_epoch=3, batch_size=2, patch_size=64)
    assert len(h.losses) == 6


# ------------------------------------------------------------------------ validation
def _scene_many():
    return synthetic_nuclei((192, 192), density=0.35, seed=11)


def test_validation_none_and_too_few_objects(scene):
    img, lab = scene
    events = []
    h = train(tiny(), img, lab, validation="none", steps=2, patch_size=64, callback=events.append)
    assert h.data.validation == "none" and h.epochs[-1]["val_f1"] is None
    # 20 % of the objects in a small region is fewer than 5: nothing held out, and why
    small = (0, 48, 0, 48)
    n = region_objects(TrainingEntry(img, lab, [small]))[0]
    assert round(0.2 * n) < MIN_VAL_OBJECTS
    h = train(tiny(), img, lab, roi=small, steps=2, patch_size=64, batch_size=2)
    assert h.data.validation == "none" and "fewer than 5" in h.data.val_note
    assert h.data.objects == n and h.epochs[-1]["val_f1"] is None
    # asked for held-out objects explicitly: still none withheld for a score never computed
    h = train(tiny(), img, lab, roi=small, validation="objects", steps=2, patch_size=64,
              batch_size=2)  # fmt: skip
    assert h.data.validation == "none" and h.data.objects == n and "fewer than 5" in h.data.val_note


def _prepared(entry: TrainingEntry, **kwargs):
    """``prepare_entry`` for a 3-class, one-channel network on the CPU, default norm."""
    from napari_unet.inference.normalize import DEFAULT_NORMALIZATION

    return prepare_entry(
        entry, num_classes=3, in_channels=1, norm=dict(DEFAULT_NORMALIZATION),
        device=torch.device("cpu"), **kwargs,
    )  # fmt: skip


def test_validation_held_out_objects(scene):
    img, lab = _scene_many()
    entry = TrainingEntry(img, lab)
    data = _prepared(entry, weight_map=False, val_fraction=0.3)
    held = np.unique(data.val_labels[data.val_labels > 0])
    assert len(held) == data.val_objects >= MIN_VAL_OBJECTS
    ignore = data.ignore.numpy()
    assert ignore[np.isin(lab, held)].all()  # held-out cells are never trained on
    assert data.objects + len(held) == np.unique(lab[lab > 0]).size
    events = []
    h = train(tiny(), img, lab, validation=0.3, steps=2, patch_size=64, callback=events.append)
    ep = [e for e in events if e["kind"] == "epoch"][-1]
    assert h.data.validation == "objects" and h.data.scored
    assert 0.0 <= ep["val_f1"] <= 1.0 and ep["val_objects"] == h.data.val_objects >= 5
    assert f"on {h.data.val_objects} held-out objects" in ep["val_note"]


def test_validation_region_of_its_own(scene):
    img, lab = _scene_many()
    train_rect, val_rect = (0, 192, 0, 96), (0, 192, 112, 192)
    changed = lab.copy()
    changed[0:192, 112:192] = 0  # different annotations inside the validation region only
    a, b = _twins()
    kw = dict(steps=3, batch_size=2, patch_size=64, augment=False, seed=3)
    ha = train(a, TrainingEntry(img, lab, [train_rect], [val_rect]), **kw)
    train(b, TrainingEntry(img, changed, [train_rect], [val_rect]), **kw)
    assert _same_weights(a, b)  # validation pixels are never trained on
    assert ha.data.validation == "regions" and ha.data.val_objects >= MIN_VAL_OBJECTS
    assert ha.epochs[-1]["val_f1"] is not None
    tiny_val = (0, 40, 150, 190)
    few = TrainingEntry(img, lab, [train_rect], [tiny_val])
    h = train(tiny(), few, **kw)
    assert h.data.val_objects < MIN_VAL_OBJECTS and h.epochs[-1]["val_f1"] is None
    assert "No validation score" in h.data.val_note
    with pytest.raises(ValueError, match="validation"):
        train(tiny(), img, lab, validation="regions", steps=1)


# ------------------------------------------------------------------ #16 item 12: edge cases
@pytest.mark.parametrize("shape", [(40, 50), (9, 30), (3, 3)])
def test_small_images_train(shape):
    rng = np.random.default_rng(0)
    img = rng.random(shape).astype(np.float32)
    lab = np.zeros(shape, np.uint16)
    lab[1 : shape[0] - 1, 1 : max(2, shape[1] // 2)] = 1
    h = train(
        tiny(), img, lab, roi=(0, shape[0], 0, shape[1]), steps=2, batch_size=2, validation="none"
    )
    assert len(h.losses) == 2 and np.isfinite(h.losses).all()


def test_zero_epochs_train_nothing(scene):
    img, lab = scene
    a, b = _twins()
    events = []
    h = train(a, img, lab, epochs=0, callback=events.append)
    assert h.steps == 0 and h.epochs == [] and _same_weights(a, b)
    assert [e["kind"] for e in events] == ["start"]
    assert train(a, img, lab, steps=0).steps == 0 and _same_weights(a, b)
    with pytest.raises(ValueError, match="epochs"):
        train(a, img, lab, epochs=-1)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_epoch_restores_the_last_good_weights(scene, exc):
    img, lab = scene
    model = tiny()
    snapshot = {}

    def callback(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        if event["kind"] == "step" and event["step"] == 5:
            raise exc

    with pytest.raises(type(exc)):
        train(
            model,
            img,
            lab,
            steps=9,
            steps_per_epoch=3,
            batch_size=2,
            patch_size=64,
            validation="none",
            callback=callback,
        )
    assert snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_exception_in_the_first_epoch_restores_the_initial_weights(scene):
    img, lab = scene
    a, b = _twins()

    def callback(event):
        if event["kind"] == "step" and event["step"] == 2:
            raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        train(a, img, lab, steps=5, batch_size=2, patch_size=64, callback=callback)
    assert _same_weights(a, b)


# ------------------------------------------------------------------------ precision
def test_bf16_training_gives_finite_losses(scene):
    img, lab = scene
    h = train(
        tiny(), img, lab, steps=3, batch_size=2, patch_size=64, precision="bf16", validation="none"
    )
    assert h.settings["precision"] == "bf16" and np.isfinite(h.losses).all()
    h32 = train(
        tiny(), img, lab, steps=1, batch_size=2, patch_size=64, precision="fp32", validation="none"
    )
    assert h32.settings["precision"] == "fp32"


def test_cosine_schedule_with_a_step_budget(scene):
    img, lab = scene
    a, b = _twins()
    kw = dict(steps=3, batch_size=2, patch_size=64, validation="none", seed=1, augment=False)
    ha = train(a, img, lab, **kw)
    hb = train(b, img, lab, schedule="constant", **kw)
    assert ha.settings["schedule"] == "cosine" and hb.settings["schedule"] == "constant"
    assert ha.losses[0] == hb.losses[0] and not _same_weights(a, b)
    ht = train(tiny(), img, lab, seconds=0.5, batch_size=2, patch_size=64, validation="none")
    assert ht.settings["schedule"] == "constant"  # time-only budget: no end to decay to
    with pytest.raises(ValueError, match="schedule"):
        train(tiny(), img, lab, steps=1, schedule="linear")


def test_z_stack_trains_on_its_annotated_planes():
    """A (Z, Y, X) stack with annotations on two planes trains per plane (2-D), on exactly
    those planes; a stack without annotations is refused."""
    from napari_unet.synthetic import synthetic_nuclei_3d
    from napari_unet.training.data import as_entries, planes_of_stacks

    image, truth = synthetic_nuclei_3d((6, 80, 80), seed=1)
    annotation = np.zeros_like(truth)
    annotation[2], annotation[4] = truth[2], truth[4]
    entries = planes_of_stacks(as_entries(image, annotation), in_channels=1)
    assert [e.name for e in entries] == ["stack z=2", "stack z=4"]
    assert np.array_equal(entries[1].labels, truth[4]) and entries[1].image.shape == (80, 80)
    events = []
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    train(model, image, annotation, steps=2, batch_size=2, patch_size=64, device="cpu",
          validation="none", callback=events.append)  # fmt: skip
    start = next(e for e in events if e["kind"] == "start")
    assert start["summary"].images == 2
    with pytest.raises(ValueError, match="no plane has annotations"):
        train(model, image, np.zeros_like(truth), steps=1, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_learns_and_comes_back_to_the_cpu(scene):
    """Fine-tuning on CUDA (bf16 autocast by default): the loss falls, the weights end up
    on the device they started on and predict on the CPU like they do on the GPU."""
    img, lab = scene
    model = tiny()
    h = train(model, img, lab, roi=(0, 128, 0, 128), steps=60, batch_size=4, patch_size=64,
              lr=5e-3, validation="none", device="cuda")  # fmt: skip
    assert h.settings["precision"] == "bf16" and np.isfinite(h.losses).all()
    assert np.mean(h.losses[-10:]) < 0.8 * np.mean(h.losses[:10])
    assert next(model.parameters()).device.type == "cpu"
    cpu = predict(model, img, amp=False)
    gpu = predict(model, img, device="cuda", amp=False)
    assert np.abs(cpu - gpu).max() < 1e-3


def test_valid_unet_batches_align_and_reach_every_known_pixel(scene):
    """A valid U-Net's output pixel (i, j) is input pixel (i + border, j + border): the
    loss's centre crop of the target must be the target at the image position of the
    output pixel, and known pixels at the image edge (a corner region) must be reachable
    (the image is mirrored by ``border`` as at inference, not clipped inside it)."""
    from napari_unet.training.data import sample_batch
    from napari_unet.training.losses import _center_crop
    from napari_unet.training.trainer import _patch_size

    img, lab = scene
    model = build_model("unet", 1, 3, base_channels=4, depth=2, padding="valid", norm="none")
    b, h, w = model.border, *lab.shape
    entry = TrainingEntry(img, lab, [(0, 24, 0, 24)])
    data = _prepared(entry, weight_map=True, val_fraction=0.0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    data.image = torch.stack([yy, xx]).float()  # each input pixel carries its position
    patch = _patch_size(model, 24)
    out = model.output_size(patch)
    assert out >= 24 and patch - out == 2 * b
    reached = np.zeros((h, w), bool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, t, ign, wgt = sample_batch(data, 8, patch, gen, b)
        t, ign, wgt = (_center_crop(v, out, out) for v in (t, ign, wgt))
        pos = x[:, :, b : b + out, b : b + out].long()  # input under each output pixel
        known = ~ign
        ys, xs = pos[:, 0][known], pos[:, 1][known]
        assert torch.equal(t[known], data.target[ys, xs])
        assert torch.equal(wgt[known], data.weight[ys, xs])
        reached[ys.numpy(), xs.numpy()] = True
    assert reached[~data.ignore.numpy()].all()  # the image corner (0, 0) included


@pytest.mark.parametrize(
    ("name", "trained", "frozen"),
    [("u2netp", True, True), ("u2netp", False, False), ("unet", True, False)],
)
def test_u2net_fine_tuning_keeps_its_batchnorm_statistics(scene, name, trained, frozen):
    """A trained U²-Net†'s BatchNorm running statistics (learnt on whole images) are kept
    while its weights train on small patches; an untrained one and other families update
    theirs as usual."""
    img, lab = scene
    cfg = {"width": 0.25} if name == "u2netp" else {"base_channels": 4, "depth": 2}
    model = build_model(name, 1, 3, **cfg)
    model.training_summary = {"steps": 1} if trained else None
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, img, lab, **FAST)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    same_stats = all(torch.equal(before[k], after[k]) for k in stats)
    assert same_stats == frozen
    assert not all(torch.equal(before[k], after[k]) for k in after if k.endswith("weight"))
    assert not model.training and not any(m.training for m in bns)
