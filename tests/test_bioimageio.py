"""bioimage.io model packages: export passes bioimageio.core's own test, import round-trips."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")

from napari_unet.bioimageio import export_bioimageio, is_bioimageio_package, load_bioimageio
from napari_unet.checkpoint import load_default_model
from napari_unet.inference.predict import predict
from napari_unet.models import build_model


@pytest.fixture(scope="module")
def default_package(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = load_default_model()
    path = export_bioimageio(model, tmp_path_factory.mktemp("bio") / "nuclei.zip")
    return path, model


def test_export_passes_bioimageio_test(default_package):
    from bioimageio.core import test_model

    path, _ = default_package
    summary = test_model(str(path))
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    # both weight formats were run against the test tensors
    tested = {str(d.name) for d in summary.details}
    assert any("onnx" in t for t in tested) and any("pytorch_state_dict" in t for t in tested)


def test_package_content(default_package):
    import yaml

    path, model = default_package
    assert is_bioimageio_package(path)
    with zipfile.ZipFile(path) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        names = set(zf.namelist())
    assert rdf["format_version"].startswith("0.5")
    assert {"onnx", "pytorch_state_dict"} <= set(rdf["weights"])
    out_axes = rdf["outputs"][0]["axes"]
    channel = next(a for a in out_axes if a["type"] == "channel")
    assert channel["channel_names"] == list(model.class_names)
    pre = rdf["inputs"][0]["preprocessing"]
    scale = next(p for p in pre if p["id"] == "scale_range")
    assert scale["kwargs"]["min_percentile"] == model.normalization["low"]
    assert scale["kwargs"]["max_percentile"] == model.normalization["high"]
    assert {"README.md", "cover.png", "napari_unet.safetensors"} <= names
    doc = zipfile.ZipFile(path).read("README.md").decode()
    assert "Training" in doc and str(model.training_summary["steps"]) in doc


@pytest.mark.parametrize("prefer", ["auto", "onnx"])
def test_round_trip_predicts_the_same(default_package, nuclei, prefer):
    path, model = default_package
    image = nuclei[0]
    imported = load_bioimageio(path, prefer=prefer)
    if prefer == "onnx":
        assert type(imported).__name__ == "OnnxSegmentationModel"
    else:
        assert imported.name == model.name
    assert list(imported.class_names) == list(model.class_names)
    ref = predict(model, image, device="cpu")
    out = predict(imported, image, device="cpu")
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4


def test_load_model_accepts_a_package(default_package, nuclei):
    from napari_unet import load_model  # napari_unet.loader: checkpoints and packages

    path, model = default_package
    loaded = load_model(path)
    ref = predict(model, nuclei[0][:128, :128], device="cpu")
    assert np.abs(predict(loaded, nuclei[0][:128, :128], device="cpu") - ref).max() <= 1e-6


def _rewrite(src: Path, dst: Path, edit) -> Path:
    import yaml

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "rdf.yaml":
                data = yaml.safe_dump(edit(yaml.safe_load(data))).encode()
            zout.writestr(item, data)
    return dst


def test_pickled_weights_only_are_refused_unread(default_package, tmp_path):
    path, _ = default_package
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    def edit(rdf):
        rdf["weights"].pop("onnx")
        rdf["config"].pop("napari_unet")
        return rdf

    bad = _rewrite(path, tmp_path / "pickled.zip", edit)
    with zipfile.ZipFile(bad, "a") as zf:
        buf = io.BytesIO()
        pickle.dump(Evil(), buf)
        zf.writestr("weights.pt", buf.getvalue())  # a second, malicious copy
    with pytest.raises(ValueError, match="never unpickles"):
        load_bioimageio(bad)
    assert not marker.exists()


def test_foreign_3d_package_refused(default_package, tmp_path):
    path, _ = default_package

    def edit(rdf):
        rdf["config"].pop("napari_unet")
        rdf["inputs"][0]["axes"].append({"type": "space", "id": "z", "size": 8})
        return rdf

    bad = _rewrite(path, tmp_path / "three_d.zip", edit)
    with pytest.raises(ValueError, match="2-D models"):
        load_bioimageio(bad)


def test_export_refuses_to_overwrite(default_package):
    path, model = default_package
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        export_bioimageio(model, path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=".zip"):
        export_bioimageio(model, path.with_suffix(".tif"))


@pytest.mark.slow
def test_export_other_variants(tmp_path):
    """UNet++ (deep supervision: the final head) and the paper's valid U-Net export; the
    ONNX graph equals torch; the valid U-Net's output axes are the input minus its halo."""
    import onnxruntime as ort
    import yaml

    for name, kwargs in [
        ("unetpp", {"base_channels": 4, "depth": 2}),
        ("unet", {"base_channels": 4, "depth": 2, "padding": "valid"}),
    ]:
        model = build_model(name, 1, 3, **kwargs).eval()
        path = export_bioimageio(model, tmp_path / f"{name}.zip", test_size=96)
        with zipfile.ZipFile(path) as zf:
            rdf = yaml.safe_load(zf.read("rdf.yaml"))
            session = ort.InferenceSession(zf.read("weights.onnx"))
        y_axis = next(a for a in rdf["outputs"][0]["axes"] if a.get("id") == "y")
        assert y_axis["size"].get("offset", 0) == -2 * model.info.border
        side = model.valid_input_size(60) if model.info.border else 72
        x = torch.rand(2, 1, side, side + 8 * model.size_divisor)
        with torch.no_grad():
            ref = torch.softmax(model(x), 1).numpy()
        out = session.run(None, {"input": x.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4
        if model.info.border:  # napari-unet re-imports it through its checkpoint
            assert load_bioimageio(path).info.border == model.info.border
            with pytest.raises(ValueError, match="smaller than"):
                load_bioimageio(path, prefer="onnx")


@pytest.mark.slow
def test_cli_export_and_bioimageio_test_cli_on_a_freshly_trained_model(tmp_path, nuclei, capsys):
    """Train a small network a few steps, export it with the CLI, run the `bioimageio test`
    command line (offline) on the package, and import it back."""
    import shutil
    import subprocess
    import sys

    from napari_unet import save_model, train
    from napari_unet.cli import main

    image, labels = nuclei
    model = build_model("unet", 1, 3, base_channels=8, depth=2)
    history = train(model, image, labels, roi=(0, 128, 0, 128), steps=6, batch_size=2,
                    patch_size=64, val_fraction=0.0, device="cpu")  # fmt: skip
    ckpt = save_model(model, tmp_path / "fresh.safetensors", training=history.summary())
    out = tmp_path / "fresh.zip"
    assert main(["export", str(ckpt), "-o", str(out), "--author", "A. Biologist"]) == 0
    assert "bioimage.io model package" in capsys.readouterr().err
    assert main(["export", str(out), "-o", str(out), "--overwrite"]) == 2  # never the input
    exe = shutil.which("bioimageio", path=str(Path(sys.executable).parent))
    assert exe, "bioimageio.core's command line is installed with the bioimageio extra"
    run = subprocess.run([exe, "test", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout
    back = load_bioimageio(out)
    assert back.training_summary["steps"] == 6
    x = image[:96, :96]
    assert np.abs(predict(back, x, device="cpu") - predict(model, x, device="cpu")).max() <= 1e-5
