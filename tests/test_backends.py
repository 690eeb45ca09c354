"""The OpenVINO runtime behind the tiler: exact equality, bf16 label agreement, the export
cache (keyed by the weights: invalidated by training), and the torch fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from napari_unet.checkpoint import load_default_model
from napari_unet.inference import backends
from napari_unet.inference.predict import predict
from napari_unet.metrics import object_metrics
from napari_unet.models import build_model
from napari_unet.models.base import SegmentationModel
from napari_unet.postprocess import segment
from napari_unet.runtime import cpu_has_bf16
from napari_unet.synthetic import synthetic_nuclei


@pytest.fixture(autouse=True)
def _openvino(tmp_path, monkeypatch):
    """The users' default (runtime auto → OpenVINO on the CPU), a fresh cache folder."""
    monkeypatch.delenv(backends.RUNTIME_ENV, raising=False)
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    backends.clear_compiled()
    yield
    backends.clear_compiled()


def _exported(tmp_path):
    return sorted((tmp_path / "cache" / "openvino").glob("*.xml"))


def test_auto_is_openvino_on_the_cpu(monkeypatch):
    assert backends.resolve_runtime(torch.device("cpu"))[0] == "openvino"
    assert backends.resolve_runtime(torch.device("cpu"), "torch")[0] == "torch"
    monkeypatch.setenv(backends.RUNTIME_ENV, "torch")
    assert backends.resolve_runtime(torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="runtime must be"):
        backends.resolve_runtime(torch.device("cpu"), "tensorrt")


@pytest.mark.parametrize(
    "name, kwargs, extra",
    [
        ("unet", {"base_channels": 4, "depth": 3}, {}),
        ("unet", {"base_channels": 4, "depth": 2, "padding": "valid"}, {}),
        ("unetpp", {"base_channels": 4, "depth": 3}, {"level": 2}),
        ("unetpp", {"base_channels": 4, "depth": 3}, {"outputs": "all"}),
        ("u2netp", {}, {}),
    ],
)
def test_exact_mode_equals_the_whole_image_torch_output(name, kwargs, extra, tmp_path):
    model = build_model(name, 1, 3, **kwargs).eval()
    rng = np.random.default_rng(0)
    image = rng.random((150, 170), np.float32)
    tile = model.valid_input_size(60) if model.info.border else 96  # several windows
    ref = predict(model, image, exact=True, runtime="torch", tile_size=tile, device="cpu", **extra)
    got = predict(
        model, image, exact=True, tile_size=tile, device="cpu", runtime="openvino", **extra
    )
    assert _exported(tmp_path), "the OpenVINO runtime was used"
    if extra.get("outputs") == "all":
        assert len(got[1]) == len(ref[1]) == 3
        pairs = [(got[0], ref[0]), *zip(got[1], ref[1])]
    else:
        pairs = [(got, ref)]
    for a, b in pairs:
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
def test_bf16_default_labels_agree_with_fp32(nuclei, tmp_path):
    model = load_default_model()
    images = [nuclei[0]] + [synthetic_nuclei((256, 256), seed=s)[0] for s in (1, 2)]
    for image in images:
        fast = predict(model, image, device="cpu", runtime="openvino")  # bf16 on this CPU
        exact32 = predict(model, image, device="cpu", runtime="torch", amp=False)
        assert np.abs(fast - exact32).max() > 1e-4  # it really ran in bf16
        a = segment(fast, class_names=model.class_names)
        b = segment(exact32, class_names=model.class_names)
        assert object_metrics(b, a)["f1"] >= 0.99


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
@pytest.mark.parametrize("name", ["unet_valid", "unetpp", "u2netp", "swin_unet"])
def test_every_bundled_variant_keeps_its_labels_in_the_default_mode(name, nuclei):
    """#12's bf16 rule for every bundled variant (the default U-Net above; UNet 3+ stays on
    torch): the default mode's labels agree with fp32 torch (F1 ≥ 0.99) on the sample and
    on a synthetic image in 768² windows — where Swin-UNet's bf16 gave NaN (F1 0.40), so it
    compiles at f32."""
    from napari_unet.models.pretrained import load_pretrained

    model = load_pretrained(name)
    synthetic = synthetic_nuclei((768, 1024), seed=5)[0]
    for image in (nuclei[0], synthetic):
        fast = predict(model, image, device="cpu", runtime="openvino")
        exact32 = predict(model, image, device="cpu", runtime="torch", amp=False)
        assert np.isfinite(fast).all()
        a = segment(fast, class_names=model.class_names)
        b = segment(exact32, class_names=model.class_names)
        assert object_metrics(b, a)["f1"] >= 0.99, name


class _Cancelling(SegmentationModel):
    """log((1000·x + 1) − 1000·x): the argument is 1 in fp32; in bf16 convolutions the +1
    is lost (8-bit mantissa) and the log gives −inf / NaN."""

    name = "cancel_net"

    def __init__(self) -> None:
        super().__init__(1, 2)
        self.a = torch.nn.Conv2d(1, 2, 1)
        self.b = torch.nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.a.weight[:] = 1000.0
            self.a.bias[:] = torch.tensor([1.0, 0.0])
            self.b.weight[:] = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
        self._receptive_field = 0

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.log(self.b(self.a(x)))
        return [torch.cat([y, -y], 1)]


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
def test_non_finite_bf16_output_is_predicted_again_at_f32():
    """A bf16 run that returns NaN / inf is never returned: predict warns in one line and
    runs the job at f32 (as Swin-UNet's 768² windows needed, now listed in BF16_UNSAFE)."""
    from napari_unet.models.pretrained import load_pretrained

    model = _Cancelling().eval()
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32) + 0.5
    with pytest.warns(RuntimeWarning, match="cancel_net gave non-finite values at bf16"):
        out = predict(model, image, device="cpu", runtime="openvino")
    ref = predict(model, image, device="cpu", runtime="openvino", amp=False)
    assert np.isfinite(out).all() and np.array_equal(out, ref)
    swin = load_pretrained("swin_unet")
    window = (1, 768, 768)
    assert (
        backends.compiled_precision(swin, window, windows=100, device=torch.device("cpu")) == "f32"
    )


def test_cache_is_keyed_by_the_weights_and_training_invalidates_it(nuclei, tmp_path):
    from napari_unet import train

    image, labels = nuclei
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    crop = image[:96, :128]
    first = predict(model, crop, exact=True, device="cpu", runtime="openvino")
    assert len(_exported(tmp_path)) == 1
    backends.clear_compiled()
    again = predict(model, crop, exact=True, device="cpu", runtime="openvino")  # disk cache
    assert len(_exported(tmp_path)) == 1 and np.array_equal(first, again)
    train(model, image, labels, roi=(0, 128, 0, 128), steps=2, batch_size=2, patch_size=64,
          val_fraction=0.0, device="cpu")  # fmt: skip
    after = predict(model, crop, exact=True, device="cpu", runtime="openvino")
    assert len(_exported(tmp_path)) == 2  # new weights → a new export, the old one not trusted
    ref = predict(model, crop, exact=True, device="cpu", runtime="torch")
    assert np.abs(after - ref).max() <= 1e-4
    assert np.abs(after - first).max() > 1e-3


class _Unconvertible(SegmentationModel):
    """A network OpenVINO cannot convert (an SVD in the forward pass)."""

    name = "svd_net"

    def __init__(self) -> None:
        super().__init__(1, 2)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self._receptive_field = 2

    @property
    def tile_exact(self) -> bool:
        return False

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        s = torch.linalg.svdvals(y.flatten(2)).sum(-1)
        return [y + 0 * s[..., None, None]]


def test_a_model_that_cannot_be_converted_runs_on_torch_with_one_line(tmp_path):
    model = _Unconvertible().eval()
    image = np.random.default_rng(1).random((64, 64), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = predict(model, image, device="cpu", runtime="openvino")
    lines = [str(w.message) for w in caught if "running on torch" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "svd_net" in lines[0]
    ref = predict(model, image, device="cpu", runtime="torch")
    assert np.array_equal(got, ref)
    assert not _exported(tmp_path)  # nothing half-written is left in the cache


def test_auto_exports_for_large_jobs_and_reuses_exports_for_small_ones(tmp_path):
    """runtime='auto': a small job on never-exported weights runs on torch (the export would
    cost more); a job of ≥ AUTO_MIN_WINDOWS windows exports; a small job then uses it."""
    model = build_model("unet", 1, 3, base_channels=4, depth=2).eval()
    rng = np.random.default_rng(2)
    small = rng.random((64, 80), np.float32)  # 2 windows of 64², the same as below
    torch_out = predict(model, small, exact=True, tile_size=64, device="cpu", runtime="torch")
    out = predict(model, small, exact=True, tile_size=64, device="cpu")
    assert not _exported(tmp_path) and np.array_equal(out, torch_out)
    large = rng.random((192, 256), np.float32)  # 117 windows of 64²
    predict(model, large, exact=True, tile_size=64, device="cpu")
    assert len(_exported(tmp_path)) == 1
    out = predict(model, small, exact=True, tile_size=64, device="cpu")  # now cached
    assert not np.array_equal(out, torch_out)  # it ran on OpenVINO ...
    assert np.abs(out - torch_out).max() <= 1e-4  # ... with the same result


def test_auto_keeps_unet3p_on_torch(tmp_path):
    """UNet 3+ measured slower on OpenVINO than on torch: 'auto' leaves it on torch."""
    model = build_model("unet3p", 1, 3, base_channels=4, depth=3).eval()
    image = np.random.default_rng(3).random((192, 256), np.float32)
    out = predict(model, image, tile_size=64, device="cpu")
    assert not _exported(tmp_path)
    ref = predict(model, image, tile_size=64, device="cpu", runtime="torch")
    assert np.array_equal(out, ref)


def test_stage_says_the_export_once_then_the_runtime(tmp_path):
    """predict(stage=): the one-off export and compilation are announced before the first
    window (the GUI and CLI show them); a second call with cached weights exports nothing;
    every call names the runtime its windows run on."""
    from napari_unet.runtime import RunClock

    model = build_model("unet", 1, 3, base_channels=4, depth=2).eval()
    image = np.random.default_rng(4).random((96, 128), np.float32)
    notes: list[str] = []
    predict(model, image, exact=True, tile_size=64, device="cpu", runtime="openvino",
            stage=notes.append)  # fmt: skip
    kinds = [n.kind for n in notes]
    assert kinds == ["export", "compile", "run"], notes
    assert "OpenVINO" in notes[0] and "64×64" in notes[0]
    assert notes[2].endswith("on OpenVINO f32") and "windows of 64×64" in notes[2]
    assert all(isinstance(n, str) for n in notes)
    backends.clear_compiled()  # a new session: the disk cache, no export
    notes.clear()
    predict(model, image, exact=True, tile_size=64, device="cpu", runtime="openvino",
            stage=notes.append)  # fmt: skip
    assert [n.kind for n in notes] == ["compile", "run"]
    notes.clear()
    predict(model, image, tile_size=64, device="cpu", runtime="torch", stage=notes.append)
    assert [n.kind for n in notes] == ["run"] and notes[0].endswith("on torch (cpu)")
    # a RunClock passes the export notes on and starts timing at the run note
    passed: list[str] = []
    clock = RunClock(passed.append)
    other = build_model("unet", 1, 3, base_channels=4, depth=2).eval()  # new weights
    predict(other, image, exact=True, tile_size=64, device="cpu", runtime="openvino",
            stage=clock)  # fmt: skip
    assert [n.kind for n in passed] == ["export", "compile"]
    assert 0 < clock.since_run() < 10


def test_openvino_uses_torchs_thread_setting(tmp_path):
    """One thread policy for both runtimes: OpenVINO compiles with the threads torch runs
    with (segment_image(threads=), torch_threads, the dask workers' setting)."""
    from napari_unet.runtime import torch_threads

    model = build_model("unet", 1, 3, base_channels=4, depth=2).eval()
    image = np.random.default_rng(7).random((64, 64), np.float32)
    for n in (1, 2):
        backends.clear_compiled()
        with torch_threads(n):
            predict(model, image, exact=True, device="cpu", runtime="openvino")
        assert [memo[2] for memo in backends._COMPILED] == [n]


def test_export_neither_swallows_other_threads_output_nor_prints_tracer_noise(tmp_path, capfd):
    """The export runs in a worker thread while napari prints: nothing the other thread
    writes is lost (no process-wide redirection), and the tracer's expected warnings about
    our shape checks do not reach the console."""
    import sys
    import threading

    model = build_model("unet", 1, 3, base_channels=4, depth=2).eval()
    job = threading.Thread(
        target=predict, args=(model, np.zeros((64, 64), np.float32)),
        kwargs={"exact": True, "device": "cpu", "runtime": "openvino"},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job.start()
        n = 0
        while job.is_alive() or n < 3:
            print(f"gui line {n}", file=sys.stderr, flush=True)
            n += 1
            job.join(0.02)
    assert len(_exported(tmp_path)) == 1
    err = capfd.readouterr().err
    assert all(f"gui line {i}\n" in err for i in range(n))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
