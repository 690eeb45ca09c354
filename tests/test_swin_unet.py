"""Swin-UNet: parameter count of the reference, shapes, size rule, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from napari_unet.models import build_model, count_parameters
from napari_unet.models.swin_unet import SwinUNet, shifted_window_mask

# Thin but complete: every stage, both W-MSA and SW-MSA, skips, final 4× expand.
SMALL = {"embed_dim": 12, "num_heads": (1, 2, 2, 4), "drop_path_rate": 0.0}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_parameter_count_matches_reference():
    model = build_model("swin_unet", 3, 9, img_size=224)
    assert isinstance(model, SwinUNet)
    assert count_parameters(model) == 27_168_900
    assert model.size_divisor == 224
    assert model.stage_windows == (7, 7, 7, 7)
    assert model.stage_shifts == (3, 3, 3, 0)  # 7×7 bottleneck: one window, no shift
    assert model.tile_exact is False
    assert model.num_outputs == 1


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (448, 224), (5, 3)])
def test_output_shape(size):
    model = build_model("swin_unet", 1, 3, embed_dim=24).eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        y = model(x)
        outs = model.forward_all(x)
    assert y.shape == (1, 3, *size)
    assert len(outs) == 1 and torch.equal(outs[0], y)


def test_forward_all_requires_multiple_of_divisor():
    model = build_model("swin_unet", 1, 2, **SMALL)
    with pytest.raises(ValueError, match="multiples of 224"):
        model._forward_all(torch.randn(1, 1, 97, 131))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 3, 224, 224))


def test_size_rule_and_config_checks():
    # img_size 64, window 8: token grids 16, 8, 4, 2 → windows 8, 8, 4, 2, one shifted stage.
    model = build_model("swin_unet", 1, 2, img_size=64, window_size=8, **SMALL)
    assert model.stage_windows == (8, 8, 4, 2)
    assert model.stage_shifts == (4, 0, 0, 0)
    assert model.size_divisor == 64
    assert model.legal_size(65) == 128
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 70, 128)).shape == (1, 2, 70, 128)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("swin_unet", img_size=100)
    with pytest.raises(ValueError, match="not a multiple of window_size"):
        build_model("swin_unet", img_size=160)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_model("swin_unet", embed_dim=20)
    with pytest.raises(ValueError, match="same length"):
        build_model("swin_unet", depths=(2, 2, 2))


def test_shifted_window_mask_blocks_wraparound():
    mask = shifted_window_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # top-left window holds one region
    assert (mask[-1] == -100).any()  # bottom-right window mixes wrapped regions


def test_every_parameter_gets_a_gradient():
    model = build_model("swin_unet", 1, 2, **SMALL).train()
    y = model(torch.randn(2, 1, 224, 224))
    y.square().mean().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_eval_determinism_and_drop_path_only_in_training():
    model = build_model("swin_unet", 1, 2, embed_dim=12, num_heads=(1, 2, 2, 4), drop_path_rate=0.5)
    x = torch.randn(2, 1, 100, 60)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        c = model(x)
        torch.manual_seed(2)
        d = model(x)
    assert not torch.allclose(c, d)


def test_mask_cache_follows_resolution():
    model = build_model("swin_unet", 1, 2, **SMALL).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 224, 224))
        model(torch.randn(1, 1, 448, 224))
    keys = {k[:2] for k in model.layers[0]._mask_cache}
    assert keys == {(56, 56), (112, 56)}
    assert "attn_mask" not in "".join(model.state_dict())
