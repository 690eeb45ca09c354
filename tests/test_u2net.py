"""U²-Net / U²-Net†: parameter counts, shapes, side outputs, gradients, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_unet.models import build_model, count_parameters


@pytest.mark.parametrize(("name", "expected"), [("u2net", 44_009_869), ("u2netp", 1_131_181)])
def test_parameter_counts_match_reference(name, expected):
    assert count_parameters(build_model(name, 3, 1)) == expected


def test_config_and_divisor():
    model = build_model("u2netp")
    assert model.config == {"norm": "batch", "width": 1.0}
    assert model.size_divisor == 32
    assert model.num_outputs == 7


def test_reference_structure():
    """Dilations, ceil-mode pools and module names as in the reference code."""
    model = build_model("u2net", 3, 1)
    assert model.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    assert [getattr(model.stage5, f"rebnconv{i}").conv_s1.dilation[0] for i in (1, 2, 3, 4)] == [
        1,
        2,
        4,
        8,
    ]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(p.ceil_mode and p.kernel_size == 2 for p in pools)
    assert model.outconv.in_channels == 6 and model.outconv.kernel_size == (1, 1)


def test_odd_size_shapes():
    model = build_model("u2netp", 1, 2).eval()
    x = torch.randn(1, 1, 97, 131)
    with torch.no_grad():
        y = model(x)
        outs = model.forward_all(x)
    assert y.shape == (1, 2, 97, 131)
    assert len(outs) == 7
    assert all(o.shape == (1, 2, 97, 131) for o in outs)
    assert torch.equal(outs[-1], y)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model("u2netp", 2, 3).train()
    x = torch.randn(2, 2, 64, 64)
    loss = sum(o.square().mean() for o in model.forward_all(x))
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or (p.ndim > 1 and not p.grad.any())
    ]
    assert not missing


def test_eval_determinism():
    torch.manual_seed(0)
    model = build_model("u2netp", 1, 2).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_width_and_norm_options():
    thin = build_model("u2net", 1, 1, width=1 / 16, norm="none")
    assert count_parameters(thin) < count_parameters(build_model("u2netp", 1, 1))
    assert thin(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    grouped = build_model("u2netp", 1, 2, norm="group")
    assert not grouped.tile_exact
    assert build_model("u2netp").tile_exact
    with pytest.raises(ValueError):
        build_model("u2netp", width=0)
