"""Checkpoints: safetensors round trips, metadata, and refusal of pickle-based files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_unet import checkpoint
from napari_unet.checkpoint import load_default_model, load_model, read_metadata, save_model
from napari_unet.models import build_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _trained_bn(model: torch.nn.Module, in_channels: int = 1) -> torch.nn.Module:
    """Give BatchNorm running stats non-trivial values with a train-mode forward."""
    model.train()
    with torch.no_grad():
        model(3.0 * torch.randn(2, in_channels, 16, 16) + 1.0)
    return model.eval()


class _Evil:
    """Unpickling this opens (creates) ``marker`` for writing."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("variant", "in_ch", "n_cls"),
    [("unet", 1, 2), ("unetpp", 1, 3)],
)
def test_round_trip_identical_outputs(tmp_path: Path, variant: str, in_ch: int, n_cls: int) -> None:
    model = _trained_bn(build_model(variant, in_ch, n_cls, base_channels=4, depth=2), in_ch)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1 and not torch.allclose(bn.running_var, torch.ones(4))
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert not loaded.training and loaded.name == model.name and loaded.config == model.config
    x = torch.randn(1, in_ch, 20, 24)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_tuple_config_round_trip(tmp_path: Path) -> None:
    cfg = {"img_size": 32, "window_size": 4, "embed_dim": 12, "depths": (1, 1), "num_heads": (1, 2)}
    model = build_model("swin_unet", 1, 2, **cfg).eval()
    loaded = load_model(save_model(model, tmp_path / "swin"))
    assert loaded.config == model.config and isinstance(loaded.config["depths"], tuple)


def test_metadata_round_trip(tmp_path: Path) -> None:
    model = build_model("unet", 2, 3, base_channels=4, depth=2)
    model.normalization = {"method": "percentile", "low": 2.0, "high": 99.0}
    model.class_names = ["bg", "cell", "edge"]
    training = {"epochs": 3, "loss": np.float32(0.25), "history": np.arange(3)}
    path = save_model(model, tmp_path / "m", training=training, extra={"note": "x"})
    assert path.name == "m.safetensors"
    meta = read_metadata(path)
    assert meta["format"] == "napari-unet/1" and meta["variant"] == "unet"
    assert (meta["in_channels"], meta["num_classes"]) == (2, 3)
    assert meta["config"]["base_channels"] == 4
    assert meta["normalization"] == model.normalization
    assert meta["classes"] == ["bg", "cell", "edge"]
    assert meta["training"] == {"epochs": 3, "loss": 0.25, "history": [0, 1, 2]}
    assert meta["package_version"] and meta["torch_version"]
    loaded = load_model(path)
    assert loaded.normalization == model.normalization
    assert loaded.class_names == ["bg", "cell", "edge"]
    assert loaded.training_summary == meta["training"] and loaded.checkpoint_extra == {"note": "x"}


def test_defaults_for_plain_model(tmp_path: Path) -> None:
    meta = read_metadata(
        save_model(build_model("unet", 1, 3, base_channels=4, depth=2), tmp_path / "m")
    )
    assert meta["classes"] == ["background", "interior", "boundary"]
    assert meta["normalization"]["method"] == "percentile" and meta["training"] is None


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.bin"])
def test_pickle_refused_without_unpickling(tmp_path: Path, name: str) -> None:
    # Sanity: this payload really executes on unpickling.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(str(probe)))).close()
    assert probe.exists()

    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ValueError, match="pickle"):
        load_model(path)
    with pytest.raises(ValueError, match="pickle"):
        read_metadata(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_torch_save_zip_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    torch.save(build_model("unet", 1, 2, base_channels=4, depth=2).state_dict(), path)
    with pytest.raises(ValueError, match="pickle"):
        load_model(path)


def test_corrupt_and_truncated(tmp_path: Path) -> None:
    good = save_model(build_model("unet", 1, 2, base_channels=4, depth=2), tmp_path / "good")
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) - 100],
        "header_cut": data[:200],
        "garbage": b"this is certainly not a safetensors file at all",
        "empty": b"",
        "bad_json": data[:8]
        + b"{"
        + b"!" * (int.from_bytes(data[:8], "little") - 1)
        + data[8 + int.from_bytes(data[:8], "little") :],
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=name + ".safetensors"):
            load_model(path)


def test_foreign_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="napari-unet metadata"):
        load_model(path)


def _rewrite_meta(src: Path, dst: Path, **changes: object) -> None:
    with safe_open(str(src), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()["napari_unet"])
    for key, value in changes.items():
        if key == "config":
            meta["config"].update(value)
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata={"napari_unet": json.dumps(meta)})


def test_shape_mismatch_and_unknown_variant(tmp_path: Path) -> None:
    src = save_model(build_model("unet", 1, 2, base_channels=4, depth=2), tmp_path / "m")
    wide = tmp_path / "wide.safetensors"
    _rewrite_meta(src, wide, config={"base_channels": 8})
    with pytest.raises(ValueError, match=r"shape .*base_channels"):
        load_model(wide)
    odd = tmp_path / "odd.safetensors"
    _rewrite_meta(src, odd, variant="mystery_net")
    with pytest.raises(ValueError, match="mystery_net"):
        load_model(odd)
    newer = tmp_path / "newer.safetensors"
    _rewrite_meta(src, newer, format="napari-unet/99")
    with pytest.raises(ValueError, match="format"):
        load_model(newer)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "nope.safetensors")


def test_overwrite_rules_and_atomic_write(tmp_path: Path) -> None:
    model = build_model("unet", 1, 2, base_channels=4, depth=2)
    other = tmp_path / "notes.safetensors"
    other.write_text("my precious notes")
    with pytest.raises(FileExistsError, match="not a napari-unet checkpoint"):
        save_model(model, other)
    assert other.read_text() == "my precious notes"
    save_model(model, other, overwrite=True)
    save_model(model, other)  # replacing an existing checkpoint is fine
    assert read_metadata(other)["variant"] == "unet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors"]  # no temp files
    with pytest.raises(ValueError, match="safetensors"):
        save_model(model, tmp_path / "m.pt")


def test_default_model_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert checkpoint.default_model_path().name == "default.safetensors"
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "default.safetensors")
    with pytest.raises(FileNotFoundError, match="bundled default model"):
        load_default_model()


def test_a_model_package_is_named_not_called_a_pickle(tmp_path: Path) -> None:
    # checkpoint.load_model reads checkpoints only (napari_unet.load_model also reads
    # packages): a bioimage.io package is named as such, not refused as a torch pickle
    import zipfile

    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\n")
    with pytest.raises(ValueError, match="bioimage.io model package.*napari_unet.load_model"):
        load_model(path)


def test_a_trained_model_saved_plainly_keeps_its_training_record(tmp_path, nuclei):
    """save_model(model, path) after train() stores model.training_summary (the record of
    which images it was trained on, accumulated over fine-tunes), and loading restores it."""
    from napari_unet import train

    image, labels = nuclei
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    kw = dict(roi=(0, 128, 0, 128), steps=1, batch_size=2, patch_size=64, validation="none")
    train(model, image, labels, **kw)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.training_summary["trained_on"] == [{"name": "", "shape": [256, 512]}]
    train(loaded, image[:, :300], labels[:, :300], **kw)
    assert loaded.training_summary["trained_on"] == [
        {"name": "", "shape": [256, 512]},
        {"name": "", "shape": [256, 300]},
    ]
    assert read_metadata(save_model(loaded, tmp_path / "m2"))["training"]["steps"] == 1
