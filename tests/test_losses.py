"""Losses: hand-computed values, ignore/weight semantics, deep supervision, presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_unet.models import build_model
from napari_unet.training import (
    MS_SSIM_WEIGHTS,
    ce_loss,
    cgm_loss,
    cgm_target,
    compute_loss,
    deep_supervision_loss,
    dice_loss,
    focal_loss,
    get_loss,
    iou_loss,
    list_losses,
    ms_ssim,
    ms_ssim_loss,
    ms_ssim_scales,
    u2net_sides_loss,
    unet3p_hybrid_loss,
)

LN3 = math.log(3.0)
C1, C2 = 0.01**2, 0.03**2


def two_pixels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary logits (1, 1, 1, 2): p = (3/4, 1/2); the same as 2-class logits; target (1, 0)."""
    binary = torch.tensor([[[[LN3, 0.0]]]])
    two_class = torch.cat([torch.zeros_like(binary), binary], dim=1)
    return binary, two_class, torch.tensor([[[1, 0]]])


def four_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logits (1, 1, 2, 2) with p = (3/4, 1/2, 1/4, 1/2), target (1, 1, 0, 0)."""
    logits = torch.tensor([[[[LN3, 0.0], [-LN3, 0.0]]]])
    return logits, torch.tensor([[[1, 1], [0, 0]]])


# ------------------------------------------------------------------ cross-entropy
def test_ce_hand_values_binary_and_softmax():
    binary, two_class, target = two_pixels()
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert ce_loss(binary, target).item() == pytest.approx(expected, rel=1e-6)
    assert ce_loss(two_class, target).item() == pytest.approx(expected, rel=1e-6)


def test_ce_weights_scale_the_mean():
    binary, _, target = two_pixels()
    weight = torch.tensor([[[2.0, 1.0]]])
    expected = (2 * math.log(4 / 3) + math.log(2)) / 2
    assert ce_loss(binary, target, weight).item() == pytest.approx(expected, rel=1e-6)
    assert ce_loss(binary, target, 3 * weight).item() == pytest.approx(3 * expected, rel=1e-6)


def test_ce_ignore_removes_pixel_from_normaliser():
    binary, _, target = two_pixels()
    ignore = torch.tensor([[[False, True]]])
    assert ce_loss(binary, target, ignore=ignore).item() == pytest.approx(math.log(4 / 3))


# --------------------------------------------------------------------- Dice / IoU
def test_dice_binary_hand_values():
    logits, target = four_pixels()
    # I = 3/4 + 1/2 = 5/4, Σp = 2, Σg = 2
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2.5 + 1) / (4 + 1))
    assert dice_loss(logits, target, smooth=0).item() == pytest.approx(1 - 2.5 / 4)


def test_dice_two_class_equals_binary():
    logits, target = four_pixels()
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)
    assert dice_loss(two, target).item() == pytest.approx(dice_loss(logits, target).item())


def test_dice_multiclass_mean_over_foreground_classes():
    logits = torch.zeros(1, 3, 2, 2)  # p = 1/3 everywhere
    target = torch.tensor([[[0, 1], [2, 2]]])
    # class 1: (2/3)/(4/3 + 1) = 2/7; class 2: (4/3)/(4/3 + 2) = 2/5
    expected = 1 - (2 / 7 + 2 / 5) / 2
    assert dice_loss(logits, target, smooth=0).item() == pytest.approx(expected)


def test_dice_weights_enter_the_sums():
    logits, target = four_pixels()
    weight = torch.tensor([[[2.0, 1.0], [1.0, 1.0]]])
    # I = 2·3/4 + 1/2 = 2, Σwp = 2·3/4 + 1/2 + 1/4 + 1/2 = 2.75, Σwg = 3
    assert dice_loss(logits, target, weight, smooth=0).item() == pytest.approx(1 - 4 / 5.75)


def test_iou_hand_values():
    logits, target = four_pixels()
    # I = 5/4, union = 2 + 2 − 5/4 = 11/4
    assert iou_loss(logits, target).item() == pytest.approx(1 - 2.25 / 3.75)
    assert iou_loss(logits, target, smooth=0).item() == pytest.approx(1 - 5 / 11)


# -------------------------------------------------------------------------- focal
def test_focal_hand_values():
    binary, two_class, target = two_pixels()
    # p_t = 3/4 and 1/2: (1/4)²·ln(4/3) and (1/2)²·ln 2
    fl = [math.log(4 / 3) / 16, math.log(2) / 4]
    assert focal_loss(binary, target).item() == pytest.approx(sum(fl) / 2, rel=1e-6)
    assert focal_loss(two_class, target).item() == pytest.approx(sum(fl) / 2, rel=1e-6)
    alpha = (0.25 * fl[0] + 0.75 * fl[1]) / 2
    assert focal_loss(binary, target, alpha=0.25).item() == pytest.approx(alpha, rel=1e-6)


def test_focal_multiclass_and_gamma_zero_is_ce():
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    assert focal_loss(logits, target).item() == pytest.approx((2 / 3) ** 2 * LN3, rel=1e-6)
    per_class = focal_loss(logits, target, alpha=[0.2, 0.3, 0.5]).item()
    assert per_class == pytest.approx((0.2 + 0.5) / 2 * (2 / 3) ** 2 * LN3, rel=1e-6)
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert focal_loss(x, t, gamma=0.0).item() == pytest.approx(ce_loss(x, t).item(), rel=1e-6)


# ------------------------------------------------------------------------ MS-SSIM
def test_ms_ssim_scales_follow_patch_size():
    assert ms_ssim_scales(176, 200) == 5
    assert ms_ssim_scales(175, 175) == 4
    assert ms_ssim_scales(64, 64) == 3
    assert ms_ssim_scales(22, 40) == 2
    assert ms_ssim_scales(10, 10) == 1


def test_ms_ssim_identical_maps_is_one_and_loss_zero():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 48, 48)
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2, 2))
    target = torch.randint(0, 2, (2, 48, 48))
    logits = (2 * target - 1).float()[:, None] * 40.0  # sigmoid saturates to 0/1
    assert ms_ssim_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("size", "scales"), [(8, 1), (32, 2)])
def test_ms_ssim_constant_maps_is_luminance_to_the_last_weight(size, scales):
    x, y = torch.full((1, 1, size, size), 0.5), torch.zeros(1, 1, size, size)
    lum = C1 / (0.25 + C1)  # (2·0.5·0 + C1) / (0.5² + 0² + C1); cs = C2/C2 = 1
    last = MS_SSIM_WEIGHTS[scales - 1] / sum(MS_SSIM_WEIGHTS[:scales])
    assert ms_ssim(x, y).item() == pytest.approx(lum**last, rel=1e-4)


def test_ms_ssim_two_known_pixels_hand_value():
    """Only two neighbouring pixels are known: each window sees them with Gaussian
    weights α (centre) and β = 1 − α (neighbour), α = 1 / (1 + exp(−1 / (2·1.5²)))."""
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    known = torch.zeros(1, 8, 8, dtype=torch.bool)
    known[0, 3, 3:5] = True
    x[0, 0, 3, 3:5] = torch.tensor([0.8, 0.2])
    y[0, 0, 3, 3:5] = torch.tensor([1.0, 0.0])
    a = 1 / (1 + math.exp(-1 / 4.5))
    b = 1 - a
    cs = (2 * a * b * 0.6 * 1.0 + C2) / (a * b * (0.6**2 + 1.0) + C2)

    def lum(mx: float, my: float) -> float:
        return (2 * mx * my + C1) / (mx * mx + my * my + C1)

    expected = cs * (lum(0.8 * a + 0.2 * b, a) + lum(0.2 * a + 0.8 * b, b)) / 2
    assert ms_ssim(x, y, known).item() == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------- ignore everywhere
def random_case(c: int, seed: int = 0, size: int = 24):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, size, size, generator=g)
    target = torch.randint(0, max(c, 2), (2, size, size), generator=g)
    ignore = torch.rand(2, size, size, generator=g) < 0.3
    weight = 0.5 + torch.rand(2, size, size, generator=g)
    return logits, target, ignore, weight


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", list_losses())
def test_ignored_pixels_change_nothing(name, c):
    loss = get_loss(name)
    logits, target, ignore, weight = random_case(c)

    def run(lg: torch.Tensor, tg: torch.Tensor, wt: torch.Tensor):
        lg = lg.clone().requires_grad_(True)
        value = loss(lg, tg, wt, ignore)
        value.backward()
        return value.detach(), lg.grad

    v1, g1 = run(logits, target, weight)
    mask = ignore[:, None].expand_as(logits)
    logits2 = torch.where(mask, 1e4 * torch.randn_like(logits), logits)
    target2 = torch.where(ignore, 255, target)  # out of range: must never be read
    weight2 = torch.where(ignore, torch.full_like(weight, float("nan")), weight)
    v2, g2 = run(logits2, target2, weight2)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    assert torch.all(g1[mask] == 0)
    assert g1[~mask].abs().sum() > 0


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("name", list_losses())
def test_all_ignored_is_finite_zero_with_grad(name, c):
    logits, target, _, _ = random_case(c, size=16)
    logits.requires_grad_(True)
    value = get_loss(name)(logits, target, None, torch.ones(2, 16, 16, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", list_losses())
def test_finite_under_bfloat16_autocast(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    x, target = torch.randn(2, 1, 24, 24), torch.randint(0, 2, (2, 24, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        value = get_loss(name)(logits, target)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert torch.isfinite(conv.weight.grad).all()


def test_hybrid_is_focal_plus_ms_ssim_plus_iou():
    logits, target, ignore, weight = random_case(2)
    parts = [f(logits, target, weight, ignore) for f in (focal_loss, ms_ssim_loss, iou_loss)]
    expected = sum(parts)
    torch.testing.assert_close(unet3p_hybrid_loss(logits, target, weight, ignore), expected)


# ---------------------------------------------------------- multi-output losses
def test_u2net_sides_is_sum_of_bce():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 1, 8, 8) for _ in range(7)]
    target = torch.randint(0, 2, (2, 8, 8))
    expected = sum(F.binary_cross_entropy_with_logits(o[:, 0], target.float()) for o in outputs)
    torch.testing.assert_close(u2net_sides_loss(outputs, target), expected)
    torch.testing.assert_close(get_loss("u2net_sides")(outputs, target), expected)


def test_deep_supervision_weights_are_normalised():
    target = torch.tensor([[[1, 0]]])
    a = torch.tensor([[[[LN3, 0.0]]]])  # CE = (ln 4/3 + ln 2) / 2
    b = torch.zeros(1, 1, 1, 2)  # CE = ln 2
    la, lb = (math.log(4 / 3) + math.log(2)) / 2, math.log(2)
    equal = deep_supervision_loss([a, b], target, ce_loss)
    assert equal.item() == pytest.approx((la + lb) / 2, rel=1e-6)
    weighted = deep_supervision_loss([a, b], target, ce_loss, weights=[1, 3])
    assert weighted.item() == pytest.approx((la + 3 * lb) / 4, rel=1e-6)
    raw = deep_supervision_loss([a, b], target, ce_loss, weights=[1, 3], normalize=False)
    assert raw.item() == pytest.approx(la + 3 * lb, rel=1e-6)
    with pytest.raises(ValueError, match="2 outputs"):
        deep_supervision_loss([a, b], target, ce_loss, weights=[1.0])


# --------------------------------------------------------------------------- CGM
def test_cgm_target_rules():
    target = torch.zeros(4, 2, 2, dtype=torch.long)
    ignore = torch.zeros(4, 2, 2, dtype=torch.bool)
    target[0, 0, 0] = 1  # known foreground → 1
    ignore[2, 1, 1] = True  # background + unknown → no label
    ignore[3] = True  # nothing known → no label
    target[3, 0, 0] = 1
    labels, valid = cgm_target(target, ignore)
    assert labels[:2].tolist() == [1, 0]
    assert valid.tolist() == [True, True, False, False]


def test_cgm_loss_hand_value():
    cls_logits = torch.tensor([[0.0, LN3], [0.0, 0.0], [5.0, -5.0]])
    target = torch.zeros(3, 2, 2, dtype=torch.long)
    target[0, 1, 1] = 2
    ignore = torch.zeros(3, 2, 2, dtype=torch.bool)
    ignore[2, 0, 0] = True  # third image has no label
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert cgm_loss(cls_logits, target, ignore).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ compute_loss
def batch(size: int = 32):
    torch.manual_seed(0)
    return torch.randn(2, 1, size, size), torch.randint(0, 2, (2, size, size))


def test_compute_loss_unetpp_averages_heads():
    model = build_model("unetpp", 1, 2, base_channels=2, depth=2).eval()
    x, target = batch()
    outputs = model.forward_all(x)
    assert len(outputs) == 2
    expected = (ce_loss(outputs[0], target) + ce_loss(outputs[1], target)) / 2
    torch.testing.assert_close(compute_loss(model, x, target, loss="ce"), expected)
    weighted = compute_loss(model, x, target, loss="ce", ds_weights=[0, 1])
    torch.testing.assert_close(weighted, ce_loss(outputs[1], target))


def test_compute_loss_unet3p_adds_cgm():
    model = build_model("unet3p", 1, 2, base_channels=2, depth=2, deep_supervision=True)
    model.eval()  # no dropout: reproducible
    x, target = batch()
    outputs, cls_logits = model.forward_all_with_cls(x)
    preset = get_loss("unet3p_hybrid")
    seg = preset(outputs, target)
    cls = cgm_loss(cls_logits, target)
    loss = compute_loss(model, x, target, loss="unet3p_hybrid")
    torch.testing.assert_close(loss, seg + cls)
    no_cls = compute_loss(model, x, target, loss="unet3p_hybrid", cls_weight=0.0)
    torch.testing.assert_close(no_cls, seg)


def test_compute_loss_u2net_sums_sides():
    model = build_model("u2netp", 1, 1, width=0.25).eval()
    x, target = batch()
    outputs = model.forward_all(x)
    expected = sum(ce_loss(o, target) for o in outputs)
    torch.testing.assert_close(compute_loss(model, x, target, loss="u2net_sides"), expected)


def test_compute_loss_crops_targets_for_valid_unet():
    model = build_model("unet", 1, 2, base_channels=2, depth=1, padding="valid").eval()
    x, target = batch(36)
    out = model(x)
    assert out.shape[-1] == 20
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[:, :8] = True  # only the cropped-away border: nothing ignored inside
    expected = ce_loss(out, target[:, 8:28, 8:28])
    loss = compute_loss(model, x, target, ignore=ignore, loss="ce")
    torch.testing.assert_close(loss, expected)
    loss.backward()


def test_get_loss_names_and_aliases():
    assert get_loss("UNet3P").name == "unet3p_hybrid"
    assert get_loss("BCE").name == "ce"
    assert get_loss("u2net").sum_outputs
    with pytest.raises(ValueError, match="available"):
        get_loss("nope")
