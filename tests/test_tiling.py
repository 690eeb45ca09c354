"""Tiled inference: exact overlap-tile, axes, lazy inputs, cancel, bad inputs."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_unet.inference.plan import tile_plan_for
from napari_unet.inference.predict import predict
from napari_unet.inference.source import reflect_index
from napari_unet.models import build_model
from napari_unet.runtime import Cancelled

EXACT = {
    "unet": {"base_channels": 4, "depth": 3},
    "wide_unet": {"base_channels": 3, "depth": 2},
    "unetpp": {"base_channels": 4, "depth": 3},
    "unet3p": {"base_channels": 4, "depth": 3},
    "u2netp": {"width": 0.25},
}


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 20, size=shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    img += 300 * (np.sin(yy / 7.0) * np.cos(xx / 5.0) > 0.3)
    return img


def _model(name, in_channels=1, num_classes=2, **cfg):
    m = build_model(name, in_channels, num_classes, **{**EXACT.get(name, {}), **cfg})
    # non-trivial BatchNorm statistics
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(2, in_channels, 64, 64))
    return m.eval()


@pytest.mark.parametrize("name", list(EXACT))
@pytest.mark.parametrize("shape", [(97, 131), (150, 77)])
def test_exact_tiling_equals_whole_image(name, shape):
    m = _model(name)
    img = _image(shape)
    whole = predict(m, img, tile_size=4096)
    # the reference: the network on the whole normalised image
    assert whole.shape == (2, *shape)
    for tile in (48, 80):
        plan = tile_plan_for(m, shape, tile_size=tile, exact=True)
        if name != "u2netp":  # U²-Net's receptive field (~3300 px) makes any exact tile whole
            assert plan.n_tiles > 1
        tiled = predict(m, img, tile_size=tile, exact=True)
        assert np.abs(tiled - whole).max() <= 1e-5


def test_whole_image_run_is_the_plain_forward():
    m = _model("unet")
    img = _image((97, 131))
    from napari_unet.inference.normalize import (
        apply_normalization,
        get_normalization,
        normalization_stats,
    )

    stats = normalization_stats(img[None].astype(np.float64), get_normalization(m))
    x = torch.from_numpy(apply_normalization(img[None], stats))[None]
    with torch.no_grad():
        ref = torch.softmax(m(x), 1)[0].numpy()
    np.testing.assert_allclose(predict(m, img, tile_size=4096), ref, atol=1e-6)


def test_default_mode_has_no_visible_seams():
    m = _model("unet")
    img = _image((200, 180))
    whole = predict(m, img, tile_size=4096)
    fast = predict(m, img, tile_size=64)
    assert tile_plan_for(m, img.shape, tile_size=64).n_tiles > 4
    assert np.abs(fast - whole).max() < 1e-2


def test_valid_unet_overlap_tile_from_388_pixel_tiles():
    m = build_model("unet", 1, 2, padding="valid", base_channels=2, depth=4, norm="none").eval()
    img = _image((700, 530))
    plan = tile_plan_for(m, img.shape, tile_size=572)
    assert plan.window_shape == (572, 572) and plan.rows.out_window == 388
    assert plan.n_tiles == 4
    tiled = predict(m, img, tile_size=572)
    whole = predict(m, img, tile_size=10_000)
    assert tiled.shape == (2, 700, 530)
    assert np.abs(tiled - whole).max() <= 1e-5
    # the whole-image run is the paper's: mirror by the halo, one pass, crop
    from napari_unet.inference.normalize import (
        apply_normalization,
        get_normalization,
        normalization_stats,
    )

    stats = normalization_stats(img[None].astype(np.float64), get_normalization(m))
    size = m.valid_input_size(700), m.valid_input_size(530)
    rows = reflect_index(np.arange(size[0]) - 92, 700)
    cols = reflect_index(np.arange(size[1]) - 92, 530)
    x = torch.from_numpy(apply_normalization(img[None][:, rows][:, :, cols], stats))[None]
    with torch.no_grad():
        ref = torch.softmax(m(x), 1)[0, :, :700, :530].numpy()
    np.testing.assert_allclose(whole, ref, atol=1e-6)


def test_reflect_index_matches_numpy_pad():
    for n in (2, 3, 7):
        a = np.arange(n)
        padded = np.pad(a, (0, 0), mode="reflect")
        for _ in range(4):  # repeated reflection, as pad_end_reflect does
            padded = np.pad(padded, (0, len(padded) - 1), mode="reflect")
        np.testing.assert_array_equal(reflect_index(np.arange(len(padded)), n), padded)


def test_grey_layouts_and_stacks():
    m = _model("unet")
    img = _image((3, 64, 80))
    stack = predict(m, img)  # ZYX
    assert stack.shape == (2, 3, 64, 80)
    for z in range(3):
        np.testing.assert_allclose(stack[:, z], predict(m, img[z]), atol=1e-6)
    ts = predict(m, np.stack([img, img[::-1]]))  # TZYX
    assert ts.shape == (2, 2, 3, 64, 80)
    np.testing.assert_allclose(ts[:, 1, 0], stack[:, 2], atol=1e-6)
    assert predict(m, img[0].astype(np.uint16)).dtype == np.float32


def test_multichannel_and_rgb_layouts():
    m2 = _model("unet", in_channels=2)
    cyx = _image((2, 64, 80))
    out = predict(m2, cyx)
    assert out.shape == (2, 64, 80)
    np.testing.assert_allclose(predict(m2, np.moveaxis(cyx, 0, -1), axes="YXC"), out, atol=1e-6)
    zcyx = np.stack([cyx, cyx])
    assert predict(m2, zcyx).shape == (2, 2, 64, 80)

    m1 = _model("unet")
    rgb = np.stack([_image((64, 80), s) for s in range(3)], axis=-1).astype(np.uint8)
    lum = (rgb.astype(np.float32) * [0.299, 0.587, 0.114]).sum(-1)
    np.testing.assert_allclose(predict(m1, rgb), predict(m1, lum), atol=1e-5)
    np.testing.assert_allclose(predict(m1, rgb, channel=1), predict(m1, rgb[..., 1]), atol=1e-6)
    rgba = np.concatenate([rgb, np.full((64, 80, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(predict(m1, rgba), predict(m1, rgb), atol=1e-6)


def test_dask_and_zarr_inputs_match_numpy(tmp_path):
    m = _model("unet")
    img = _image((150, 170))
    ref = predict(m, img, tile_size=64)
    lazy = da.from_array(img, chunks=(40, 50))
    np.testing.assert_allclose(predict(m, lazy, tile_size=64), ref, atol=1e-6)
    z = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=img.shape, chunks=(64, 64), dtype="float32"
    )
    z[:] = img
    out = predict(m, z, tile_size=64, out=tmp_path / "out.zarr")
    assert isinstance(out, zarr.Array)
    np.testing.assert_allclose(out[:], ref, atol=1e-6)
    with pytest.raises(FileExistsError):
        predict(m, z, out=tmp_path / "out.zarr")


def test_progress_and_cancel_leave_no_output(tmp_path):
    m = _model("unet")
    img = _image((200, 200))
    seen = []
    predict(m, img, tile_size=64, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 1 and len(seen) == seen[-1][1]

    stop = threading.Event()

    def progress(done, total):
        if done >= 2:
            stop.set()

    target = tmp_path / "cancelled.zarr"
    with pytest.raises(Cancelled):
        predict(m, img, tile_size=64, progress=progress, cancel=stop, out=target)
    assert not target.exists()
    assert m.training is False  # the model is left as it was (eval before the call)


def test_model_state_is_restored():
    m = _model("unet").train()
    predict(m, _image((40, 40)))
    assert m.training and next(m.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.full((32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((0, 32), np.float32), "empty"),
        (np.zeros((1, 1), np.float32), "at least 2"),
        (np.zeros((1, 32), np.float32), "at least 2"),
        (np.zeros((2, 3, 4, 32, 32), np.float32), "cannot guess the axes"),
    ],
)
def test_bad_inputs_give_clear_errors(image, match):
    with pytest.raises(ValueError, match=match):
        predict(_model("unet"), image)


def test_wrong_channels_and_options():
    m = _model("unet", in_channels=2)
    with pytest.raises(ValueError, match="expects 2"):
        predict(m, _image((3, 32, 32)), axes="CYX")
    with pytest.raises(ValueError, match="axes"):
        predict(m, _image((32, 32)), axes="ZYX")
    with pytest.raises(ValueError, match="UNet\\+\\+ only"):
        predict(m, _image((2, 32, 32)), level=2)
    with pytest.raises(ValueError, match="cannot be tiled exactly"):
        predict(build_model("unet", norm="group", base_channels=4), _image((32, 32)), exact=True)


def test_outputs_all_and_unetpp_levels():
    m = _model("unetpp")
    img = _image((70, 90))
    final, heads = predict(m, img, outputs="all", tile_size=48)
    assert len(heads) == 3 and all(h.shape == (2, 70, 90) for h in heads)
    np.testing.assert_allclose(final, heads[-1], atol=1e-6)
    np.testing.assert_allclose(predict(m, img, level=1, tile_size=48), heads[0], atol=1e-5)


def test_blended_mode_for_attention_models_has_small_seams():
    from napari_unet.inference.tiler import seam_score

    m = _model("swin_unet", embed_dim=24)
    img = _image((600, 500))
    plan = tile_plan_for(m, img.shape, tile_size=448)
    assert plan.blended and plan.n_tiles > 1
    out = predict(m, img, tile_size=448)
    assert out.shape == (2, 600, 500)
    assert seam_score(out, plan) < 1.5
    whole = predict(m, img, tile_size=4096)
    assert np.abs(out - whole).mean() < 0.05


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bf16_matches_cpu():
    m = _model("unet")
    img = _image((300, 260))
    cpu = predict(m, img, device="cpu", tile_size=128)
    gpu = predict(m, img, device="cuda", tile_size=128, batch_size=3)
    assert np.abs(gpu - cpu).max() < 0.05
    exact32 = predict(m, img, device="cuda", amp=False, exact=True, tile_size=128)
    assert np.abs(exact32 - predict(m, img, device="cuda", amp=False, tile_size=4096)).max() < 1e-4


@cuda
def test_cuda_exact_tiling_float32():
    m = _model("unetpp")
    img = _image((257, 199))
    whole = predict(m, img, device="cuda", amp=False, tile_size=4096)
    tiled = predict(m, img, device="cuda", amp=False, exact=True, tile_size=96)
    assert np.abs(whole - tiled).max() < 1e-4


@cuda
def test_cuda_raw_uint16_is_normalised_on_the_gpu_like_the_host():
    """uint16 windows travel raw (page-locked) and are normalised on the GPU: the same
    output as the float32 copy normalised on the host (fp32, exact tiling)."""
    m = _model("unet")
    img = _image((300, 260)).clip(0, 65535).astype(np.uint16) * 100
    raw = predict(m, img, device="cuda", amp=False, exact=True, tile_size=128)
    host = predict(m, img.astype(np.float32), device="cuda", amp=False, exact=True, tile_size=128)
    assert np.abs(raw - host).max() <= 1e-6


def test_cuda_request_without_gpu_is_clear():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        predict(_model("unet"), _image((32, 32)), device="cuda")


@cuda
def test_cuda_steps_down_past_32_bit_kernel_limits():
    """U²-Net's 64-channel full-resolution stages at a 3584² window and batch 4 exceed
    the 2³¹ elements CUDA's channels-last bilinear upsampling accepts: predict steps the
    batch down (as for out-of-memory) instead of failing."""
    from napari_unet.models.pretrained import load_pretrained
    from napari_unet.synthetic import synthetic_nuclei

    img = np.tile(synthetic_nuclei((1024, 1024), seed=2)[0], (4, 4))
    with pytest.warns(RuntimeWarning, match="retrying with batch size"):
        probs = predict(load_pretrained("u2netp"), img, device="cuda", tile_size=3584, batch_size=4)
    assert probs.shape == (3, 4096, 4096) and np.isfinite(probs).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_small_integer_images_are_normalised_on_the_device_bit_identically(dtype):
    """8/16-bit images travel raw (half or a quarter of float32's bytes) and are normalised
    after the transfer: the tiler's device path gives the numpy path's windows bit for bit,
    and predict gives the float32 copy's output exactly."""
    from napari_unet.inference.layout import resolve_layout
    from napari_unet.inference.normalize import DEFAULT_NORMALIZATION
    from napari_unet.inference.source import PlaneSource
    from napari_unet.inference.tiler import RunOptions, run_plane

    m = _model("unet")
    rng = np.random.default_rng(5)
    low = np.iinfo(dtype).min // 2
    img = rng.integers(low, np.iinfo(dtype).max, (150, 170), endpoint=True).astype(dtype)
    source = PlaneSource.open(resolve_layout(img, 1), 0, DEFAULT_NORMALIZATION)
    assert source.raw_ok and source.read_raw(np.arange(4), np.arange(4)).dtype == dtype
    plan = tile_plan_for(m, (150, 170), tile_size=64, device=torch.device("cpu"))
    opts = RunOptions(torch.device("cpu"), 2, None, False)
    outs = [np.zeros((m.num_classes, 150, 170), np.float32) for _ in range(2)]
    run_plane(m.eval(), source.read, plan, [outs[0]], opts)
    run_plane(m, source.read_raw, plan, [outs[1]], opts, stats=source.stats)
    assert np.array_equal(outs[0], outs[1])
    as_float = predict(m, img.astype(np.float32), tile_size=64, runtime="torch")
    assert np.array_equal(predict(m, img, tile_size=64, runtime="torch"), as_float)
    rgb = PlaneSource.open(resolve_layout(np.stack([img] * 3, -1), 1), 0, DEFAULT_NORMALIZATION)
    assert not rgb.raw_ok  # luminance mixes channels in float: normalised on the host


def test_fast_percentiles_equal_numpys():
    """The fast paths of the normalisation statistics (a histogram for 8/16-bit images, a
    partition in the image's own dtype otherwise) give np.percentile's float64 values on a
    float64 copy exactly."""
    from napari_unet.inference.normalize import normalization_stats

    rng = np.random.default_rng(6)
    for dtype in (np.uint8, np.uint16, np.int8, np.int16, np.int32, np.float32, np.float64):
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.iinfo(np.int16)
        for n in (1, 2, 7, 1001, 40_000):
            v = rng.integers(info.min, info.max, (2, n), endpoint=True).astype(dtype)
            if np.dtype(dtype).kind == "f":
                v = v * np.asarray(rng.random((2, n)), dtype)  # not integral
            for low, high in ((1.0, 99.8), (0.0, 100.0), (3.3, 97.1)):
                norm = {"method": "percentile", "low": low, "high": high}
                got = normalization_stats(v, norm)
                ref = normalization_stats(v.astype(np.float64), norm)
                assert np.array_equal(got, ref), (dtype, n, low, high)


def test_bad_settings_are_refused_in_one_line():
    """tile_size=0 / batch_size=0 were silently replaced by the defaults; an unknown
    device got torch's list of every device type; a UNet++ without deep supervision was
    offered levels it does not have."""
    m = _model("unet")
    img = _image((64, 64))
    for kwargs, message in (
        ({"tile_size": 0}, "tile_size must be ≥ 2, got 0"),
        ({"batch_size": 0}, "batch_size must be ≥ 1, got 0"),
        ({"device": "tpu"}, "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    ):
        with pytest.raises(ValueError) as err:
            predict(m, img, **kwargs)
        assert str(err.value) == message
    plain = build_model("unetpp", 1, 3, base_channels=4, depth=2, deep_supervision=False)
    assert not plain.supports_levels and plain.levels == 2
    with pytest.raises(ValueError, match="built without deep supervision: it cannot be pruned"):
        predict(plain, img, level=1)
    with pytest.raises(ValueError, match="prunes UNet.. only; unet has no levels"):
        predict(m, img, level=1)
    assert predict(plain, img).shape == (3, 64, 64)
