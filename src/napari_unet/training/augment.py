"""Data augmentation applied consistently to images, labels, masks and weights.

Torch ops only, on whatever device the tensors live; randomness comes from one
``torch.Generator`` so a seeded generator reproduces a run exactly.

Shapes: image ``(N, C, H, W)`` float; labels ``(N, H, W)`` int; ignore ``(N, H, W)``
bool (True = unknown pixel); weight ``(N, H, W)`` float. Each sample of the batch gets
its own random transform.

* **Flips / 90° rotations** are exact permutations of pixels. Rotations by 90° or
  270° need a square patch; non-square patches only get 0° or 180° (so the batch keeps
  its shape).
* **Elastic deformation** (U-Net paper): displacement vectors drawn from
  ``N(0, σ²)`` (σ ≈ 10 px) on a coarse ``grid × grid`` lattice spanning the patch
  (corners included), upsampled bicubically to a dense field. The image and weights
  are sampled bilinearly with mirror (reflection) borders; labels and the ignore mask
  by nearest neighbour; pixels whose sample point falls outside the patch (more than
  half a pixel beyond the border pixel centres) are marked ignored.
* **Intensity** (image only): gamma on the per-sample min–max range, then scale and
  shift: ``x ← (lo + span·((x − lo)/span)^γ)·s + b``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Augmenter", "elastic_field", "outside_mask", "warp"]


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """(n,) samples of U(low, high) on the generator's device."""
    u = torch.rand(n, generator=generator, device=_generator_device(generator))
    return low + (high - low) * u


# ------------------------------------------------------------------------ elastic
def elastic_field(
    shape: Sequence[int],
    grid: int = 3,
    sigma: float = 10.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense displacement field ``(N, 2, H, W)`` in pixels for ``shape = (N, H, W)``.

    Channel 0 is the row (y) displacement, channel 1 the column (x) displacement.
    Coarse ``grid × grid`` vectors ~ ``N(0, σ²)`` are placed on a lattice whose outer
    nodes sit on the border pixels and are interpolated bicubically
    (``align_corners=True``), so the field equals the drawn vectors at the nodes.
    """
    n, h, w = (int(s) for s in shape)
    if grid < 2:
        raise ValueError(f"elastic grid must be ≥ 2, got {grid}")
    coarse = torch.randn(n, 2, grid, grid, generator=generator, device=_generator_device(generator))
    coarse = (coarse * sigma).to(device if device is not None else coarse.device)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)


def _sample_points(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute sample coordinates ``(y, x)``, each (N, H, W), of a field (N, 2, H, W)."""
    _, _, h, w = field.shape
    ys = torch.arange(h, dtype=field.dtype, device=field.device).view(1, h, 1)
    xs = torch.arange(w, dtype=field.dtype, device=field.device).view(1, 1, w)
    return ys + field[:, 0], xs + field[:, 1]


def outside_mask(field: torch.Tensor) -> torch.Tensor:
    """Bool (N, H, W): the sample point lies outside the patch (beyond ±½ px of the border)."""
    _, _, h, w = field.shape
    y, x = _sample_points(field)
    return (y < -0.5) | (y > h - 0.5) | (x < -0.5) | (x > w - 0.5)


def warp(
    tensor: torch.Tensor, field: torch.Tensor, mode: str = "bilinear", padding: str = "reflection"
) -> torch.Tensor:
    """``out[..., y, x] = tensor[..., y + dy, x + dx]`` for (N, C, H, W) or (N, H, W).

    ``field (N, 2, H, W)`` holds ``(dy, dx)`` in pixels. ``mode`` is a
    ``grid_sample`` mode ("bilinear", "nearest", "bicubic"); ``padding`` one of
    "reflection" (mirror about the border pixels), "border", "zeros". Integer and
    bool tensors keep their dtype (use ``mode="nearest"`` for them).
    """
    squeeze = tensor.ndim == 3
    x = tensor[:, None] if squeeze else tensor
    n, _, h, w = x.shape
    if field.shape != (n, 2, h, w):
        raise ValueError(f"field must be {(n, 2, h, w)}, got {tuple(field.shape)}")
    y_pts, x_pts = _sample_points(field.float())
    grid = torch.stack([2 * x_pts / max(w - 1, 1) - 1, 2 * y_pts / max(h - 1, 1) - 1], dim=-1)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode=padding, align_corners=True)
    if tensor.dtype == torch.bool:
        out = out > 0.5
    elif not tensor.dtype.is_floating_point:
        out = out.round()
    out = out.to(tensor.dtype)
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------- dihedral
def _dihedral(t: torch.Tensor, flip_y: bool, flip_x: bool, k: int) -> torch.Tensor:
    """Flip then rotate by ``k·90°`` the last two axes of ``t``."""
    dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
    if dims:
        t = torch.flip(t, dims)
    return torch.rot90(t, k, dims=(-2, -1)) if k % 4 else t


# ---------------------------------------------------------------------- augmenter
class Augmenter:
    """Random flips, 90° rotations, elastic deformation and intensity changes.

    ``augmenter(image, labels, ignore=None, weight=None)`` returns
    ``(image, labels, ignore, weight)`` with the input shapes and dtypes; ``ignore``
    is always a bool tensor (all False when none was given and no pixel left the
    patch), ``weight`` stays ``None`` when not given. Inputs are not modified.

    Probabilities: each flip axis 0.5, rotation ``k`` uniform, elastic ``p_elastic``,
    intensity ``p_intensity``. Intensity parameters are drawn uniformly from
    ``scale_range`` and ``shift_range`` and log-uniformly from ``gamma_range``.
    ``generator=None`` uses a fresh, non-deterministically seeded generator.
    """

    def __init__(
        self,
        flips: bool = True,
        rot90: bool = True,
        elastic: bool = True,
        elastic_sigma: float = 10.0,
        elastic_grid: int = 3,
        intensity: bool = True,
        p_elastic: float = 0.5,
        p_intensity: float = 0.5,
        scale_range: tuple[float, float] = (0.8, 1.25),
        shift_range: tuple[float, float] = (-0.1, 0.1),
        gamma_range: tuple[float, float] = (0.7, 1.4),
        generator: torch.Generator | None = None,
    ) -> None:
        self.flips = flips
        self.rot90 = rot90
        self.elastic = elastic
        self.elastic_sigma = float(elastic_sigma)
        self.elastic_grid = int(elastic_grid)
        self.intensity = intensity
        self.p_elastic = float(p_elastic)
        self.p_intensity = float(p_intensity)
        self.scale_range = scale_range
        self.shift_range = shift_range
        self.gamma_range = gamma_range
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.generator = generator

    # -------------------------------------------------------------------- helpers
    def _rand(self, n: int) -> torch.Tensor:
        return _uniform(n, 0.0, 1.0, self.generator).cpu()

    def _dihedral_params(self, n: int, square: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flips (n, 2) bool and quarter turns (n,) int64."""
        flip = torch.zeros(n, 2, dtype=torch.bool)
        k = torch.zeros(n, dtype=torch.long)
        if self.flips:
            flip = (self._rand(2 * n) < 0.5).view(n, 2)
        if self.rot90:
            turns = 4 if square else 2  # non-square: 0° or 180° only
            k = (self._rand(n) * turns).long().clamp_max(turns - 1) * (4 // turns)
        return flip, k

    def _geometric(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The same random flip/rotation per sample on every (N, ..., H, W) tensor."""
        if not (self.flips or self.rot90):
            return tensors
        n, h, w = tensors[1].shape  # labels
        flip, k = self._dihedral_params(n, h == w)

        def apply(t: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [_dihedral(t[i], bool(flip[i, 0]), bool(flip[i, 1]), int(k[i])) for i in range(n)]
            )

        return [None if t is None else apply(t) for t in tensors]

    def _elastic(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        ignore: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, h, w = labels.shape
        chosen = torch.nonzero(self._rand(n) < self.p_elastic).flatten()
        if len(chosen) == 0 or min(h, w) < 2:
            return image, labels, ignore, weight
        field = elastic_field(
            (len(chosen), h, w), self.elastic_grid, self.elastic_sigma, self.generator, image.device
        )
        idx = chosen.to(image.device)

        def put(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[idx] = value
            return t

        image = put(image, warp(image[idx], field, "bilinear"))
        labels = put(labels, warp(labels[idx], field, "nearest"))
        ignore = put(ignore, warp(ignore[idx], field, "nearest") | outside_mask(field))
        if weight is not None:
            weight = put(weight, warp(weight[idx], field, "bilinear"))
        return image, labels, ignore, weight

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        apply = self._rand(n) < self.p_intensity
        log_g = _uniform(n, *(math.log(g) for g in self.gamma_range), self.generator).cpu()
        gamma = torch.where(apply, log_g.exp(), 1.0)
        scale = torch.where(apply, _uniform(n, *self.scale_range, self.generator).cpu(), 1.0)
        shift = torch.where(apply, _uniform(n, *self.shift_range, self.generator).cpu(), 0.0)
        gamma, scale, shift = (
            v.to(image.device, image.dtype).view(n, 1, 1, 1) for v in (gamma, scale, shift)
        )
        lo = image.amin(dim=(1, 2, 3), keepdim=True)
        span = (image.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
        x = lo + span * ((image - lo) / span).clamp(0, 1).pow(gamma)
        return x * scale + shift

    # ---------------------------------------------------------------------- call
    def __call__(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        ignore: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Augment a batch; see the class docstring for shapes and the return value."""
        if image.ndim != 4 or labels.ndim != 3 or image.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected image (N, C, H, W) and labels (N, H, W), got {tuple(image.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if image.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and labels {tuple(labels.shape)} differ")
        if ignore is None:
            ignore = torch.zeros_like(labels, dtype=torch.bool)
        ignore = ignore.bool()
        image, labels, ignore, weight = self._geometric([image, labels, ignore, weight])
        if self.elastic:
            image, labels, ignore, weight = self._elastic(image, labels, ignore, weight)
        if self.intensity:
            image = self._intensity(image)
        return image, labels, ignore, weight
