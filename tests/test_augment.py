"""Augmentation: image/label alignment, elastic field statistics, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_unet.training import Augmenter, elastic_field, outside_mask, warp


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks(n: int = 4, h: int = 64, w: int = 64) -> torch.Tensor:
    """Labels (n, h, w) with three rectangular objects of classes 1..3."""
    labels = torch.zeros(n, h, w, dtype=torch.long)
    labels[:, 8:30, 10:40] = 1
    labels[:, 35:60, 20:50] = 2
    labels[:, 40:50, 5:15] = 3
    return labels


def dihedral_images(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a 2-D tensor (fewer distinct ones if non-square)."""
    out = []
    for k in range(4):
        r = torch.rot90(t, k)
        out += [r, torch.flip(r, [1])]
    return [o for o in out if o.shape == t.shape]


def edges(labels: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Bool (N, H, W): a different label lies within ``radius`` pixels (Chebyshev)."""
    lab = labels[:, None].float()
    k = 2 * radius + 1
    hi = F.max_pool2d(lab, k, 1, radius)
    lo = -F.max_pool2d(-lab, k, 1, radius)
    return (hi != lo)[:, 0]


# ------------------------------------------------------------- flips / rot90
@pytest.mark.parametrize("shape", [(16, 16), (12, 20)])
def test_flips_rot90_keep_everything_aligned_exactly(shape):
    g = gen(3)
    labels = torch.randint(0, 4, (6, *shape), generator=g)
    image = torch.stack([labels.float(), 10 + labels.float()], dim=1)
    ignore = labels == 2
    weight = 0.5 * labels.float()
    aug = Augmenter(elastic=False, intensity=False, generator=gen(0))
    im2, lab2, ig2, w2 = aug(image, labels, ignore, weight)
    assert im2.shape == image.shape and lab2.dtype == labels.dtype
    assert torch.equal(im2[:, 0], lab2.float())
    assert torch.equal(im2[:, 1], 10 + lab2.float())
    assert torch.equal(ig2, lab2 == 2)
    assert torch.equal(w2, 0.5 * lab2.float())
    for before, after in zip(labels, lab2):  # each sample: one of the dihedral maps
        assert any(torch.equal(after, d) for d in dihedral_images(before))
    assert not torch.equal(lab2, labels)  # something happened
    assert torch.equal(labels, labels.clone())  # inputs untouched


def test_none_weight_stays_none_and_ignore_is_created():
    labels = blocks(2, 16, 16)
    aug = Augmenter(elastic=False, intensity=False, generator=gen(0))
    _, _, ignore, weight = aug(labels.float()[:, None], labels)
    assert weight is None
    assert ignore.dtype == torch.bool and not ignore.any()


# ------------------------------------------------------------------- elastic
def test_elastic_keeps_image_and_labels_aligned():
    labels = blocks()
    image = labels.float()[:, None]
    aug = Augmenter(flips=False, rot90=False, p_elastic=1.0, intensity=False, generator=gen(1))
    im2, lab2, ig2, w2 = aug(image, labels, labels == 3, labels.float())
    assert (lab2 != labels).float().mean() > 0.05  # the patch really deformed
    keep = ~ig2 & ~edges(lab2)
    assert keep.float().mean() > 0.3
    agree = (im2[:, 0].round().long() == lab2)[keep].float().mean()
    assert agree >= 0.99
    weight_agree = ((w2 - lab2.float()).abs() < 1e-4)[keep].float().mean()
    assert weight_agree >= 0.99  # weights follow bilinearly, like the image
    assert ig2[lab2 == 3].all()  # the ignored class moved with its labels


def test_elastic_marks_pixels_sampled_outside_as_ignored():
    field = torch.zeros(1, 2, 6, 8)
    field[:, 1] = 3.0  # sample 3 px to the right
    assert torch.equal(outside_mask(field)[0].any(0), torch.arange(8) >= 5)
    image = torch.arange(48.0).view(1, 1, 6, 8)
    shifted = warp(image, field, "bilinear")
    torch.testing.assert_close(shifted[..., :5], image[..., 3:], rtol=0, atol=1e-4)
    # mirror border: column 8 reflects to 6, 9 to 5, 10 to 4
    torch.testing.assert_close(shifted[..., 5:], image[..., [6, 5, 4]], rtol=0, atol=1e-4)
    labels = torch.arange(48).view(1, 6, 8)
    assert torch.equal(warp(labels, field, "nearest")[..., :5], labels[..., 3:])


def test_elastic_field_statistics_and_smoothness():
    field = elastic_field((200, 65, 65), grid=3, sigma=10.0, generator=gen(0))
    assert field.shape == (200, 2, 65, 65)
    nodes = field[..., ::32, ::32]  # the 3×3 lattice: exactly the drawn N(0, σ²) vectors
    assert nodes.std().item() == pytest.approx(10.0, rel=0.05)
    assert nodes.mean().abs() < 0.5
    rms = field.pow(2).mean().sqrt().item()
    assert 0.6 * 10.0 < rms < 10.0  # interpolation between nodes shrinks it a bit
    step = field[..., 1:, :] - field[..., :-1, :]
    # white noise of the same σ would have neighbour differences of std σ·√2 ≈ 14
    assert step.std() < 0.1 * field.std()
    assert step.abs().max() < 0.5 * 10.0


def test_elastic_field_scales_with_sigma():
    a = elastic_field((4, 17, 17), sigma=1.0, generator=gen(5))
    b = elastic_field((4, 17, 17), sigma=7.0, generator=gen(5))
    torch.testing.assert_close(b, 7.0 * a)


# ----------------------------------------------------------- determinism etc.
def test_seeded_generator_is_deterministic():
    labels = blocks(3, 32, 32)
    image = torch.rand(3, 2, 32, 32, generator=gen(9))

    def run(seed: int):
        aug = Augmenter(p_elastic=1.0, p_intensity=1.0, generator=gen(seed))
        return aug(image, labels, None, labels.float())

    first, again, other = run(0), run(0), run(1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_intensity_changes_image_only():
    labels = blocks(3, 16, 16)
    image = torch.rand(3, 1, 16, 16, generator=gen(2))
    ignore = labels == 1
    aug = Augmenter(flips=False, rot90=False, elastic=False, p_intensity=1.0, generator=gen(0))
    im2, lab2, ig2, w2 = aug(image, labels, ignore, None)
    assert torch.equal(lab2, labels) and torch.equal(ig2, ignore) and w2 is None
    assert not torch.allclose(im2, image)
    # a monotone increasing map per sample: the pixel order is preserved
    for a, b in zip(image.flatten(1), im2.flatten(1)):
        assert (b[a.argsort()].diff() >= 0).all()


def test_rejects_mismatched_shapes():
    aug = Augmenter(generator=gen(0))
    with pytest.raises(ValueError, match="labels"):
        aug(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 9, dtype=torch.long))
