"""UNet 3+: parameter counts of the reference, shapes, deep supervision, CGM."""

from __future__ import annotations

import pytest
import torch

from napari_unet.models import build_model, count_parameters


def small(num_classes: int = 2, **config):
    torch.manual_seed(0)
    return build_model("unet3p", 1, num_classes, base_channels=4, **config)


def test_parameter_count_matches_reference():
    assert count_parameters(build_model("unet3p", 3, 1, norm="batch")) == 26_971_777


def test_parameter_count_deep_supervision_cgm_matches_reference():
    model = build_model("unet3p", 3, 1, norm="batch", deep_supervision=True)
    assert model.cgm  # cgm=None follows deep_supervision
    assert count_parameters(model) == 26_991_687


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_output_shapes_odd_size(deep_supervision):
    torch.manual_seed(0)
    model = build_model("unet3p", 1, 3, base_channels=8, deep_supervision=deep_supervision).eval()
    x = torch.randn(1, 1, 97, 131)
    with torch.no_grad():
        y = model(x)
        outs = model.forward_all(x)
    assert y.shape == (1, 3, 97, 131)
    assert len(outs) == model.num_outputs == (5 if deep_supervision else 1)
    assert all(o.shape == (1, 3, 97, 131) for o in outs)
    # d1 (the full-resolution decoder output) is the final prediction, listed first.
    assert torch.equal(outs[0], y)


def test_other_depths():
    model = small(depth=2, deep_supervision=True)
    assert model.size_divisor == 4
    assert model.num_outputs == 3
    outs = model.forward_all(torch.randn(2, 1, 21, 18))
    assert [o.shape for o in outs] == [(2, 2, 21, 18)] * 3
    with pytest.raises(ValueError, match="depth"):
        small(depth=0)


def test_gradients_reach_every_parameter_with_ds_and_cgm():
    model = small(deep_supervision=True).train()
    assert model.cgm
    x = torch.randn(2, 1, 32, 32)
    outs, cls_logits = model.forward_all_with_cls(x)
    assert len(outs) == 5 and cls_logits.shape == (2, 2)
    loss = sum(o.square().mean() for o in outs) + cls_logits.square().mean()
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or (p.ndim > 1 and not p.grad.any())
    ]
    assert not missing


@pytest.mark.parametrize("num_classes", [1, 3])
def test_cgm_gates_empty_images_to_background(num_classes):
    model = small(num_classes, deep_supervision=True).eval()
    conv = model.cls[1]
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([5.0, -5.0]))  # classifier says "empty"
        assert model.forward_cls(x).argmax(1).item() == 0
        gated = model.forward_all(x)
        final = model(x)
        raw, _ = model.forward_all_with_cls(x)  # training path: never gated
        conv.bias.copy_(torch.tensor([-5.0, 5.0]))  # classifier says "present"
        kept = model.forward_all(x)
    for y in [*gated, final]:
        if num_classes == 1:
            assert (y < 0).all()
        else:
            assert (y.argmax(1) == 0).all()
            assert (y[:, 0] > 0).all() and (y[:, 1:] < 0).all()
    for y, r in zip(kept, raw):
        assert torch.equal(y, r)


def test_forward_cls_needs_cgm():
    with pytest.raises(RuntimeError, match="cgm"):
        small().forward_cls(torch.randn(1, 1, 16, 16))
    outs, cls_logits = small().forward_all_with_cls(torch.randn(2, 1, 16, 16))
    assert cls_logits is None and len(outs) == 1


def test_eval_is_deterministic():
    model = small(deep_supervision=True).eval()
    x = torch.randn(1, 1, 40, 24)
    with torch.no_grad():
        a = model.forward_all(x)
        b = model.forward_all(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_tile_exact_and_probe():
    assert small(deep_supervision=True).tile_exact is False
    assert small(cgm=True).tile_exact is False
    assert small(deep_supervision=True, cgm=False).tile_exact is True
    assert small().tile_exact is True
    info = small(deep_supervision=True).info
    assert info.deep_supervision_outputs == 5
    assert info.size_divisor == 16
    assert info.receptive_field > 0
