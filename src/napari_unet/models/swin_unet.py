"""Swin-UNet (Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image
Segmentation", ECCV workshops 2022, arXiv 2105.05537).

A faithful plain-torch port of the reference ``SwinTransformerSys``
(HuCaoFighting/Swin-Unet, ``swin_transformer_unet_skip_expand_decoder_sys.py``):
4×4 patch embedding, Swin encoder (W-MSA / SW-MSA blocks with a relative-position-bias
table, patch merging), bottleneck, symmetric Swin decoder with patch expanding and
concatenated skips, final 4× patch expanding and a 1×1 convolution head. Parameter and
sub-module names follow the reference, so a reference ``state_dict`` (without its
``attn_mask`` / ``relative_position_index`` buffers) loads into this model.

Differences from the reference, none of which changes the parameters or the maths at
``img_size``: any input size that is a multiple of ``size_divisor`` runs (the
shifted-window masks are computed for the actual feature-map size and cached), the
input channels go straight into the patch embedding (the reference's wrapper repeats a
grey channel 3×), and the final expansion scale follows ``patch_size`` (the reference
hard-codes 4, which is the default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import SegmentationModel

_MASK_CACHE_SIZE = 8


# --------------------------------------------------------------------------- helpers
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nW, ws, ws, C)`` non-overlapping windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, ws, ws, C)`` → ``(B, H, W, C)``."""
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def shifted_window_mask(h: int, w: int, window_size: int, shift_size: int) -> torch.Tensor:
    """SW-MSA attention mask ``(nW, ws², ws²)``: 0 within a region, −100 across regions.

    Same construction as the reference, for a feature map of ``h × w`` tokens.
    """
    img_mask = torch.zeros((1, h, w, 1))
    slices = (
        slice(0, -window_size),
        slice(-window_size, -shift_size),
        slice(-shift_size, None),
    )
    cnt = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


class DropPath(nn.Module):
    """Stochastic depth per sample (active only in training), as ``timm.DropPath``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        return x * random_tensor / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Linear → GELU → Linear on ``(..., C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------------ attention
class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``ws × ws`` windows with relative position bias.

    Input ``(B·nW, ws², C)``, optional additive mask ``(nW, ws², ws²)``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(1)  # 2, ws²
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window_size - 1
        rel[:, :, 1] += window_size - 1
        rel[:, :, 0] *= 2 * window_size - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """Pre-norm (S)W-MSA + MLP block on tokens ``(B, H·W, C)``; ``shift_size`` 0 is W-MSA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, length, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, mask=mask if shift > 0 else None)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, h, w)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


# ------------------------------------------------------------ resampling of tokens
class PatchEmbed(nn.Module):
    """``(B, Cin, H, W)`` → tokens ``(B, H/p · W/p, C)`` by a p×p stride-p conv + LayerNorm."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated → LayerNorm(4C) → Linear(4C → 2C): halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


def _pixel_shuffle_tokens(x: torch.Tensor, h: int, w: int, scale: int) -> torch.Tensor:
    """``b (h w) (p1 p2 c) → b (h p1 w p2) c`` (the reference's einops rearrange)."""
    b, _, c = x.shape
    c_out = c // (scale * scale)
    x = x.view(b, h, w, scale, scale, c_out).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale * w * scale, c_out)


class PatchExpand(nn.Module):
    """Linear(C → 2C, no bias) → 2×2 rearrange → LayerNorm(C/2): doubles H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.norm(_pixel_shuffle_tokens(self.expand(x), h, w, 2))


class FinalPatchExpand(nn.Module):
    """Linear(C → s²C, no bias) → s×s rearrange → LayerNorm(C) (``FinalPatchExpand_X4``, s=4)."""

    def __init__(self, dim: int, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.norm(_pixel_shuffle_tokens(self.expand(x), h, w, self.scale))


# --------------------------------------------------------------------------- stages
class BasicLayer(nn.Module):
    """``depth`` Swin blocks (W-MSA / SW-MSA alternating) + optional down/up-sampling.

    ``resample`` is ``"down"`` (PatchMerging, encoder), ``"up"`` (PatchExpand, decoder)
    or ``None``. The SW-MSA mask is built for the actual token grid and cached.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else shift_size,
                mlp_ratio,
                drop_path[i],
            )
            for i in range(depth)
        )
        if resample == "down":
            self.downsample = PatchMerging(dim)
        elif resample == "up":
            self.upsample = PatchExpand(dim)
        self.resample = resample
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def attn_mask(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.shift_size == 0 or len(self.blocks) < 2:
            return None
        key = (h, w, like.device, like.dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shifted_window_mask(h, w, self.window_size, self.shift_size)
            mask = mask.to(device=like.device, dtype=like.dtype)
            if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = mask
        return mask

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        mask = self.attn_mask(h, w, x)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.resample == "down":
            x = self.downsample(x, h, w)
        elif self.resample == "up":
            x = self.upsample(x, h, w)
        return x


# ---------------------------------------------------------------------------- model
def _stage_windows(
    img_size: int, window_size: int, patch_size: int, n_layers: int
) -> tuple[list[int], list[int]]:
    """Window and shift per stage at ``img_size``: a stage whose token grid is no larger
    than ``window_size`` attends over the whole grid without shifting."""
    windows, shifts = [], []
    for i in range(n_layers):
        res = img_size // patch_size // 2**i
        if res <= window_size:
            windows.append(res)
            shifts.append(0)
        else:
            windows.append(window_size)
            shifts.append(window_size // 2)
    return windows, shifts


_StageSpec = tuple[int, int, int, int, int, float, list[float]]
"""A :class:`BasicLayer`'s (width, depth, heads, window, shift, MLP ratio, drop-path rates)."""


def _stage_specs(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    windows: list[int],
    shifts: list[int],
    drop_path_rate: float,
) -> list[_StageSpec]:
    """Per stage ``i``: width ``embed_dim·2^i`` and its share of the linearly rising
    stochastic-depth rates (shared by the encoder stage and its decoder mirror)."""
    dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    return [
        (
            embed_dim * 2**i,
            depths[i],
            num_heads[i],
            windows[i],
            shifts[i],
            4.0,
            dpr[sum(depths[:i]) : sum(depths[: i + 1])],
        )
        for i in range(len(depths))
    ]


def _expanding_path(specs: list[_StageSpec]) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Decoder, deepest stage first: a patch expansion, then a Swin stage (expanding but
    the last) per shallower stage; and the linear layers that merge each skip back to
    the stage width (identity for the first)."""
    n_layers = len(specs)
    layers_up, concat_back_dim = nn.ModuleList(), nn.ModuleList()
    for j in range(n_layers):
        spec = specs[n_layers - 1 - j]
        width = spec[0]
        if j == 0:
            layers_up.append(PatchExpand(width))
            concat_back_dim.append(nn.Identity())
        else:
            layers_up.append(BasicLayer(*spec, "up" if j < n_layers - 1 else None))
            concat_back_dim.append(nn.Linear(2 * width, width))
    return layers_up, concat_back_dim


class SwinUNet(SegmentationModel):
    """Swin-UNet: pure-transformer U-shape with skip connections (``SwinTransformerSys``).

    Input ``(N, in_channels, H, W)`` → logits ``(N, num_classes, H, W)``.

    Size rule: stage ``i`` (``i = 0..len(depths)-1``) works on a token grid of
    ``H / (patch_size·2^i)`` and attends inside ``w_i × w_i`` windows, so the network
    computes on inputs whose H and W are multiples of
    ``size_divisor = patch_size · lcm_i(2^i · w_i)``, which is
    ``patch_size · 2^(len(depths)-1) · window_size`` (224 by default) whenever the
    deepest stage at ``img_size`` has at least one full window, as in the defaults.
    ``forward`` reflection-pads any other size up to the next multiple and crops the
    output back, so any input ≥ 2 px works; ``_forward_all`` raises on other sizes.

    ``img_size`` fixes the architecture as in the reference: a stage whose grid at
    ``img_size`` is no larger than ``window_size`` uses that grid as its window and does
    not shift (the 7×7 bottleneck at 224 px); the other stages alternate W-MSA and
    SW-MSA (shift ``window_size // 2``). Larger inputs (e.g. 448×224) keep those
    windows and shifts; the shifted-window masks are computed for the actual grid.
    Attention windows and shifts depend on absolute position, so tiles are not exact
    (``tile_exact`` is False).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int = 224,
        window_size: int = 7,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        patch_size: int = 4,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__(in_channels, num_classes)
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(n) for n in num_heads)
        img_size, window_size, embed_dim, patch_size = (
            int(v) for v in (img_size, window_size, embed_dim, patch_size)
        )
        self._validate(img_size, window_size, embed_dim, depths, num_heads, patch_size)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        n_layers = len(depths)
        self.num_layers = n_layers
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        # Per-stage window and shift, decided at img_size as in the reference.
        windows, shifts = _stage_windows(img_size, window_size, patch_size, n_layers)
        self.stage_windows = tuple(windows)
        self.stage_shifts = tuple(shifts)
        self.size_divisor = patch_size * math.lcm(*(2**i * w for i, w in enumerate(windows)))
        specs = _stage_specs(embed_dim, depths, num_heads, windows, shifts, drop_path_rate)

        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.layers = nn.ModuleList(
            BasicLayer(*spec, "down" if i < n_layers - 1 else None) for i, spec in enumerate(specs)
        )
        self.layers_up, self.concat_back_dim = _expanding_path(specs)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (n_layers - 1))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = FinalPatchExpand(embed_dim, patch_size)
        self.output = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _validate(
        img_size: int,
        window_size: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        patch_size: int,
    ) -> None:
        if min(img_size, window_size, embed_dim, patch_size) < 1:
            raise ValueError("img_size, window_size, embed_dim and patch_size must be ≥ 1")
        if len(depths) < 2 or len(depths) != len(num_heads):
            raise ValueError(
                f"depths and num_heads need the same length ≥ 2, got {depths} and {num_heads}"
            )
        if min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"depths and num_heads must be ≥ 1, got {depths}, {num_heads}")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(
                    f"stage {i}: width {embed_dim * 2**i} (embed_dim·2^{i}) is not divisible "
                    f"by num_heads {heads}"
                )
        deepest = patch_size * 2 ** (len(depths) - 1)
        if img_size % deepest:
            raise ValueError(
                f"img_size {img_size} must be a multiple of patch_size·2^(len(depths)-1) = {deepest}"
            )
        for i in range(len(depths)):
            res = img_size // patch_size // 2**i
            if res > window_size and res % window_size:
                raise ValueError(
                    f"stage {i} has a {res}×{res} token grid at img_size {img_size}, not a "
                    f"multiple of window_size {window_size}; pick img_size so every grid is "
                    f"a multiple of the window or no larger than it (e.g. "
                    f"{patch_size * 2 ** (len(depths) - 1) * window_size})"
                )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def tile_exact(self) -> bool:
        return False

    def _probe_config(self) -> dict:
        # Every channel of the probe carries the same value, so width and head count do
        # not change the support; one head per stage lets the thinnest width pass.
        return {
            "embed_dim": 8,
            "num_heads": (1,) * self.num_layers,
            "drop_path_rate": 0.0,
        }

    # -------------------------------------------------------------------- forward
    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, _, height, width = x.shape
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"SwinUNet computes on sizes that are multiples of {self.size_divisor}, got "
                f"{height}×{width}; call the model (forward) to pad automatically"
            )
        h, w = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(x)
        skips = []
        for i, layer in enumerate(self.layers):
            skips.append(x)
            x = layer(x, h >> i, w >> i)
        x = self.norm(x)

        top = self.num_layers - 1
        for j, layer_up in enumerate(self.layers_up):
            i = top - j
            if j > 0:
                x = self.concat_back_dim[j](torch.cat([x, skips[i]], -1))
            x = layer_up(x, h >> i, w >> i)
        x = self.norm_up(x)

        x = self.up(x, h, w)
        x = x.view(n, height, width, -1).permute(0, 3, 1, 2)
        return [self.output(x)]
