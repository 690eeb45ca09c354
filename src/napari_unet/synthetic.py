"""Synthetic fluorescence nuclei with instance labels (training the bundled model, tests).

Nuclei are filled ellipses (touching allowed, no overlap) with per-nucleus brightness,
a few small bright mitotic figures, smooth texture, optical blur, uneven background and
shot/read noise — the look of widefield DAPI/Hoechst images such as the DSB 2018 set.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse


def synthetic_nuclei(
    shape: tuple[int, int] = (256, 256),
    *,
    density: float | None = None,
    radius: tuple[float, float] = (7.0, 15.0),
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image: ``(image uint16 (H, W), labels uint16 (H, W))``.

    ``density``: fraction of the area covered by nuclei (random in 0.1..0.45 when None);
    ``radius``: range of the long semi-axis in pixels.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = shape
    density = rng.uniform(0.1, 0.45) if density is None else density
    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float32)
    covered, n, tries = 0, 0, 0
    base = rng.uniform(0.4, 1.0)
    while covered < density * h * w and tries < 4000:
        tries += 1
        mitotic = rng.random() < 0.06
        a = rng.uniform(3, 6) if mitotic else rng.uniform(*radius)
        b = a * rng.uniform(0.35, 0.6) if mitotic else a * rng.uniform(0.6, 1.0)
        cy, cx = rng.uniform(-a / 2, h + a / 2), rng.uniform(-a / 2, w + a / 2)
        rr, cc = ellipse(cy, cx, a, b, shape=shape, rotation=rng.uniform(0, np.pi))
        if rr.size < 12:
            continue
        taken = labels[rr, cc] > 0
        if taken.mean() > 0.08:  # may touch its neighbours, not overlap them
            continue
        rr, cc = rr[~taken], cc[~taken]
        n += 1
        labels[rr, cc] = n
        level = base * rng.lognormal(0.0, 0.35) * (rng.uniform(2.5, 5.0) if mitotic else 1.0)
        signal[rr, cc] = level
        covered += rr.size
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), rng.uniform(1, 3))
    texture /= texture.std() + 1e-6
    signal *= 1 + rng.uniform(0.05, 0.25) * texture
    # soften nuclear edges (chromatin falls off towards the envelope)
    inner = ndi.distance_transform_edt(labels > 0)
    signal *= np.clip(0.55 + 0.15 * inner, 0, 1)
    image = ndi.gaussian_filter(signal, rng.uniform(0.7, 2.0))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    background = rng.uniform(0.05, 0.35) * (
        1 + rng.uniform(-0.3, 0.3) * (yy - 0.5) + rng.uniform(-0.3, 0.3) * (xx - 0.5)
    )
    glow = ndi.gaussian_filter(signal, 12) * rng.uniform(0.0, 0.6)
    image = image + background + glow
    gain = rng.uniform(30, 400)
    counts = rng.poisson(np.clip(image, 0, None) * gain).astype(np.float32)
    counts += rng.normal(0, rng.uniform(0.5, 3.0), shape)
    image = np.clip(counts * rng.uniform(0.5, 2.0), 0, 65535).astype(np.uint16)
    return image, labels


def synthetic_dataset(
    n: int, shape: tuple[int, int] = (256, 256), seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` images and labels from one seeded generator."""
    rng = np.random.default_rng(seed)
    pairs = [synthetic_nuclei(shape, seed=rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def synthetic_nuclei_3d(
    shape: tuple[int, int, int] = (24, 128, 128),
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    radius: tuple[float, float] = (7.0, 12.0),
    count: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A Z-stack of nuclei: ``(image uint16 (Z, Y, X), labels uint16 (Z, Y, X))``.

    Nuclei are ellipsoids of semi-axes ``radius`` (in-plane pixels, in physical units of
    ``spacing[1]``) that do not overlap; ``spacing`` (z, y, x) makes voxels anisotropic (a
    z spacing of 4 gives four times fewer planes through each nucleus). The image has the
    in-plane look of :func:`synthetic_nuclei` (per-nucleus brightness, blur, background,
    shot noise); ``count`` nuclei (default: as many as fit at ~25 % volume).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    nz, ny, nx = shape
    sz, sy, sx = (float(s) for s in spacing)
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    zz, yy, xx = zz * sz / sy, yy, xx * sx / sy  # in-plane pixel units
    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float32)
    target = count if count is not None else 10**6
    covered, n, tries = 0, 0, 0
    while n < target and tries < 3000 and (count is not None or covered < 0.25 * labels.size):
        tries += 1
        a = rng.uniform(*radius)
        axes = np.array([a, a * rng.uniform(0.7, 1.0), a * rng.uniform(0.7, 1.0)])
        centre = rng.uniform([0, 0, 0], [nz * sz / sy, ny, nx * sx / sy])
        inside = (
            ((zz - centre[0]) / axes[0]) ** 2
            + ((yy - centre[1]) / axes[1]) ** 2
            + ((xx - centre[2]) / axes[2]) ** 2
        ) <= 1
        if inside.sum() < 20 or (labels[inside] > 0).any():
            continue
        n += 1
        labels[inside] = n
        signal[inside] = rng.lognormal(0.0, 0.3)
        covered += int(inside.sum())
    inner = ndi.distance_transform_edt(labels > 0, sampling=(sz / sy, 1.0, sx / sy))
    signal *= np.clip(0.55 + 0.15 * inner, 0, 1)
    image = ndi.gaussian_filter(signal, (1.2 * sy / sz, 1.2, 1.2 * sy / sx)) + 0.15
    gain = rng.uniform(80, 300)
    counts = rng.poisson(np.clip(image, 0, None) * gain).astype(np.float32)
    counts += rng.normal(0, 1.5, shape)
    return np.clip(counts, 0, 65535).astype(np.uint16), labels
