"""Model zoo: registry, reference parameter counts, shapes, deep supervision, gradients."""

from __future__ import annotations

import pytest
import torch

from napari_unet.models import build_model, canonical_name, count_parameters, list_models

# (call, reference count from the papers / reference implementations)
REFERENCE_COUNTS = [
    (
        ("unet", 1, 2, {"padding": "valid", "base_channels": 64, "depth": 4, "norm": "none"}),
        31_030_658,
    ),
    (("unet", 1, 1, {"base_channels": 32, "norm": "none"}), 7_759_521),
    (("wide_unet", 1, 1, {"norm": "none"}), 9_282_246),
    (("unetpp", 1, 1, {"base_channels": 32, "norm": "none"}), 9_041_601),
    (("unet3p", 3, 1, {"norm": "batch"}), 26_971_777),
    (("unet3p", 3, 1, {"norm": "batch", "deep_supervision": True, "cgm": True}), 26_991_687),
    (("u2net", 3, 1, {}), 44_009_869),
    (("u2netp", 3, 1, {}), 1_131_181),
    (("swin_unet", 3, 9, {"img_size": 224}), 27_168_900),
]

# Small configurations of every variant for fast behavioural tests.
SMALL = {
    "unet": {"base_channels": 4, "depth": 3},
    "wide_unet": {"base_channels": 5, "depth": 3},
    "unetpp": {"base_channels": 4, "depth": 4},
    "unet3p": {"base_channels": 4, "deep_supervision": True},
    "u2net": {"width": 0.125},
    "u2netp": {"width": 0.25},
    "swin_unet": {"embed_dim": 24},
}
N_OUTPUTS = {
    "unet": 1,
    "wide_unet": 1,
    "unetpp": 4,
    "unet3p": 5,
    "u2net": 7,
    "u2netp": 7,
    "swin_unet": 1,
}


def small(name: str, in_channels: int = 1, num_classes: int = 2, **extra):
    return build_model(name, in_channels, num_classes, **{**SMALL[name], **extra})


@pytest.mark.parametrize(("call", "expected"), REFERENCE_COUNTS, ids=lambda v: str(v))
def test_reference_parameter_counts(call, expected):
    name, cin, ncls, cfg = call
    n = count_parameters(build_model(name, cin, ncls, **cfg))
    assert abs(n - expected) <= 0.005 * expected, (n, expected)


def test_exact_counts_of_the_keras_setting():
    # The UNet++ paper's table: the deepest head only (without deep supervision) is exact,
    # and each pruned level matches the paper's 0.10M / 0.51M / 2.20M / 9.04M.
    m = build_model("unetpp", 1, 1, base_channels=32, norm="none", deep_supervision=False)
    assert count_parameters(m) == 9_041_601
    ds = build_model("unetpp", 1, 1, base_channels=32, norm="none")
    assert count_parameters(ds) == 9_041_601 + 3 * 33  # three extra 1×1 heads
    per_level = [ds.level_parameters(level) / 1e6 for level in (1, 2, 3, 4)]
    assert [round(p, 2) for p in per_level] == [0.10, 0.51, 2.20, 9.04]


def test_registry_names_and_aliases():
    assert set(list_models()) == set(SMALL)
    for alias, name in [
        ("unet++", "unetpp"),
        ("UNet3+", "unet3p"),
        ("u2-net", "u2net"),
        ("U²-Net", "u2net"),
        ("Swin-UNet", "swin_unet"),
        ("wide-unet", "wide_unet"),
    ]:
        assert canonical_name(alias) == name
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model("vnet")
    with pytest.raises(ValueError, match="unknown config key"):
        build_model("unet", base_chanels=8)


def test_config_is_recorded_for_rebuilding():
    m = build_model("unet++", 1, 3, base_channels=8)
    assert m.name == "unetpp"
    rebuilt = build_model(m.name, m.in_channels, m.num_classes, **m.config)
    assert count_parameters(rebuilt) == count_parameters(m)
    assert m.config["base_channels"] == 8 and m.config["norm"] == "batch"


def test_valid_unet_572_to_388():
    m = build_model("unet", 1, 2, padding="valid", base_channels=4, depth=4, norm="none").eval()
    with torch.no_grad():
        y = m(torch.randn(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)
    assert m.border == 92
    assert m.valid_input_size(388) == 572
    assert m.output_size(572) == 388


def test_valid_unet_rejects_illegal_sizes():
    m = build_model("unet", 1, 2, padding="valid", base_channels=4, depth=4, norm="none")
    with pytest.raises(ValueError, match=r"573 is not legal .* 572 or 588"):
        m(torch.randn(1, 1, 573, 572))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 1, 100, 100))


@pytest.mark.parametrize("name", list(SMALL))
def test_odd_sizes_keep_the_input_size(name):
    m = small(name).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, 97, 131))
    assert y.shape == (2, 2, 97, 131)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(SMALL))
def test_one_pixel_input_is_refused_clearly(name):
    m = small(name)
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 1, 1, 1))


@pytest.mark.parametrize("name", list(SMALL))
def test_wrong_channels_and_dims_are_refused(name):
    m = small(name, in_channels=3)
    with pytest.raises(ValueError, match="3 input channel"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D tensor"):
        m(torch.randn(3, 32, 32))


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_all_lengths_shapes_and_final(name):
    m = small(name).eval()
    x = torch.randn(1, 1, 45, 70)
    with torch.no_grad():
        outs = m.forward_all(x)
        final = m(x)
    assert len(outs) == N_OUTPUTS[name] == m.info.deep_supervision_outputs
    assert all(o.shape == (1, 2, 45, 70) for o in outs)
    # the final output is one of the heads: the deepest, or the fused one
    assert any(torch.allclose(o, final) for o in outs)


@pytest.mark.parametrize("name", list(SMALL))
def test_summed_deep_supervision_loss_reaches_every_parameter(name):
    m = small(name).train()
    outs = m.forward_all(torch.randn(2, 1, 64, 64))
    loss = sum(o.square().mean() for o in outs)
    if hasattr(m, "forward_cls"):
        loss = loss + m.forward_cls(torch.randn(2, 1, 64, 64)).square().mean()
    loss.backward()
    # every parameter is in the graph; every weight tensor gets a non-zero gradient (a conv
    # bias followed by train-mode BatchNorm has an analytically zero gradient)
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    zero = [n for n, p in m.named_parameters() if p.ndim > 1 and not p.grad.abs().sum() > 0]
    assert not missing and not zero


@pytest.mark.parametrize("name", list(SMALL))
def test_eval_mode_is_deterministic(name):
    m = small(name).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_unetpp_level_equals_the_head_of_the_full_network(level):
    m = small("unetpp").eval()
    x = torch.randn(1, 1, 50, 77)
    with torch.no_grad():
        full = m.forward_all(x)
        pruned = m(x, level=level)
    torch.testing.assert_close(pruned, full[level - 1], rtol=0, atol=0)


def test_unetpp_pruning_is_really_cheaper():
    from torch.utils.flop_counter import FlopCounterMode

    m = small("unetpp").eval()
    x = torch.randn(1, 1, 64, 64)
    flops = []
    for level in (1, 2, 3, 4):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x, level=level)
        flops.append(counter.get_total_flops())
    assert flops == sorted(flops) and flops[0] < flops[3] / 5
    with pytest.raises(ValueError, match="level must be in 1..4"):
        m(x, level=5)


@pytest.mark.parametrize("name", list(SMALL))
def test_info_fields(name):
    info = small(name).info
    assert info.name == name
    assert info.parameters > 0 and info.size_divisor >= 1
    assert info.receptive_field > 0
    # Swin-UNet (window attention) and UNet 3+ with its CGM (global max-pool) are not exact
    assert info.tile_exact == (name not in ("swin_unet", "unet3p"))


def test_receptive_field_is_measured():
    # depth-d same-padded U-Net: receptive field grows with depth; the probe sees it
    rf = [
        build_model("unet", 1, 2, base_channels=2, depth=d).info.receptive_field for d in (1, 2, 3)
    ]
    assert rf[0] < rf[1] < rf[2]
    # depth 1: conv3, conv3, pool2, conv3, conv3, up2, conv3, conv3 -> radius 2 + 2 + 2*2 + (1) + 2
    assert 9 <= rf[0] <= 12
    # the valid U-Net's dependence radius covers its halo
    valid = build_model("unet", 1, 2, padding="valid", base_channels=2, depth=4, norm="none")
    assert valid.info.receptive_field >= valid.border == 92


def test_group_norm_is_not_tile_exact():
    assert not build_model("unet", norm="group", base_channels=8).info.tile_exact
    assert build_model("unet", norm="batch", base_channels=8).info.tile_exact


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_receptive_field_measured_inside_no_grad_blocks(context):
    """A first ``model.info`` inside no_grad / inference_mode measures the same radius."""
    expected = build_model("unet", 1, 2, base_channels=4, depth=2).info.receptive_field
    fresh = build_model("unet", 1, 2, base_channels=4, depth=2)
    with context():
        assert fresh.info.receptive_field == expected


@pytest.mark.parametrize("scale", [2, 4, 16])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_upsample_conv_branch_equals_upsample_then_conv(scale, norm):
    """UNet 3+'s branch (taps mixed at low resolution) equals up-sample → 3×3 conv:
    outputs and input gradients, in train and eval mode, on a non-square input."""
    from torch import nn

    from napari_unet.models.blocks import UpsampleConvNormAct

    torch.manual_seed(0)
    branch = UpsampleConvNormAct(12, 5, scale, norm=norm).double()
    for mode in (True, False):
        branch.train(mode)
        x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
        fast = branch(x)
        (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
        slow = nn.Sequential.forward(branch, x)
        (g_slow,) = torch.autograd.grad(slow.square().sum(), x)
        assert fast.shape == (2, 5, 3 * scale, 5 * scale)
        assert torch.allclose(fast, slow, atol=1e-12, rtol=0)
        assert torch.allclose(g_fast, g_slow, atol=1e-10, rtol=1e-10)


def test_unet3p_output_unchanged_by_the_branch_rewrite():
    """The whole UNet 3+ (all deep-supervision outputs) equals the naive up-sample → conv."""
    from torch import nn

    from napari_unet.models.blocks import UpsampleConvNormAct

    torch.manual_seed(0)
    model = build_model("unet3p", 1, 2, base_channels=4).double().eval()
    x = torch.randn(1, 1, 48, 80, dtype=torch.float64)
    with torch.no_grad():
        fast = model.forward_all(x)
        originals = {}
        for m in model.modules():
            if isinstance(m, UpsampleConvNormAct):
                originals[m] = m.forward
                m.forward = nn.Sequential.forward.__get__(m)  # the naive order
        slow = model.forward_all(x)
    assert sum(1 for _ in originals) == 10
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_metadata_is_declared_on_the_base_class():
    """class_names / normalization / training_summary / levels exist on every model."""
    from napari_unet.postprocess import default_class_names

    for name in list_models():
        model = build_model(name, 1, 3, **SMALL[name])
        assert model.class_names == default_class_names(3) == ["background", "interior", "boundary"]
        assert model.normalization is None and model.training_summary is None
        assert model.supports_levels == (name == "unetpp")
        assert model.levels == (SMALL[name]["depth"] if name == "unetpp" else 0)
    model = build_model("unet", 1, 2, **SMALL["unet"])
    model.class_names = ("bg", 7)
    assert model.class_names == ["bg", "7"]
    model.class_names.append("x")  # a copy: the model's names do not change
    assert model.class_names == ["bg", "7"]
    model.class_names = None
    assert model.class_names == ["background", "foreground"]


def test_receptive_field_probe_without_the_registry():
    """The thin probe copy is rebuilt by the model's own factory; a network built directly
    (no factory) is probed as itself, with the same result."""
    from napari_unet.models.base import measure_receptive_field
    from napari_unet.models.unetpp import UNetPlusPlus

    built = build_model("unetpp", 1, 2, base_channels=2, depth=3)
    direct = UNetPlusPlus(1, 2, base_channels=2, depth=3)
    assert direct._factory is None and built._factory is UNetPlusPlus
    assert measure_receptive_field(built) == measure_receptive_field(direct) > 0


def test_has_classifier_is_declared_metadata():
    """Training asks ``model.has_classifier`` (not ``hasattr``) whether to train a CGM."""
    from napari_unet.models.unet import UNet
    from napari_unet.training.losses import cgm_loss, compute_loss, get_loss

    for name in list_models():  # SMALL's UNet 3+ has deep supervision, so its CGM is on
        assert build_model(name, 1, 2, **SMALL[name]).has_classifier is (name == "unet3p")
    small = {"base_channels": 2, "depth": 2}
    assert not build_model("unet3p", 1, 2, **small).has_classifier
    assert build_model("unet3p", 1, 2, **small, deep_supervision=True).has_classifier
    assert build_model("unet3p", 1, 2, **small, cgm=True).has_classifier
    assert not build_model("unet3p", 1, 2, **small, deep_supervision=True, cgm=False).has_classifier

    class WithClassifier(UNet):  # any model may declare one: the loss follows the metadata
        has_classifier = True

        def forward_all_with_cls(self, x):
            return self.forward_all(x), torch.tensor([[0.0, 2.0]]).expand(len(x), 2)

    model = WithClassifier(1, 2, base_channels=2, depth=2).eval()
    x, target = torch.rand(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))
    outputs, logits = model.forward_all_with_cls(x)
    expected = get_loss("ce")(outputs, target) + cgm_loss(logits, target)
    torch.testing.assert_close(compute_loss(model, x, target, loss="ce"), expected)
    plain = UNet(1, 2, base_channels=2, depth=2).eval()
    torch.testing.assert_close(
        compute_loss(plain, x, target, loss="ce"), get_loss("ce")(plain.forward_all(x), target)
    )


def test_model_panel_describes_unetpp_without_deep_supervision():
    """The Model panel's rows raised ValueError for ``deep_supervision=False`` (it listed
    levels 1..depth, which only exist with deep supervision)."""
    pytest.importorskip("napari")
    from napari_unet._widgets._model_info import describe

    plain = build_model("unetpp", 1, 3, base_channels=4, deep_supervision=False)
    rows = describe(plain, "cpu")
    assert rows["UNet++ levels"].startswith("L4 only")
    assert f"{plain.level_parameters(4):,}" in rows["UNet++ levels"]
    assert rows["deep-supervision outputs"] == "1"
    ds = build_model("unetpp", 1, 3, base_channels=4)
    levels = describe(ds, "cpu")["UNet++ levels"]
    assert levels.split(", ") == [f"L{L}: {ds.level_parameters(L):,}" for L in range(1, 5)]
