"""The specification of a dask run: the chunk geometry and the settings every task needs
(small, frozen and picklable), and each chunk's tile plan from the one planner.

Geometry per axis (``g`` = the model's ``size_divisor``): output chunks of ``chunk``
pixels; each chunk task reads a *block* of ``chunk + 2·context`` pixels around it, on the
``g`` grid, inside the axis padded to a multiple of ``g`` (the whole-image ``model(x)``
reflect-pads there; a block at an image edge is shifted inwards rather than cut, so every
block of a run has the same shape and the same tile plan — one window shape, one
compiled model). ``context`` = ``margin`` (the segmentation's context) + the planner's
halo (the receptive-field radius of tile-exact models: the block's own edges do not
change the chunk's probabilities).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

STRIP = 8
"""Half-width of the strips compared across chunk faces to match objects."""
DEFAULT_CHUNK = 1024
DEFAULT_MARGIN = 64
MAX_TILE = 2048
"""Largest network window in a chunk's block (default ``tile_size``)."""


def round_up(n: int, g: int) -> int:
    return -(-n // g) * g


@dataclass(frozen=True)
class RunSpec:
    """Everything a task needs (small and picklable)."""

    out: str
    key: str
    """sha256 of the model's safetensors bytes (the worker-side model registry's key)."""
    in_channels: int
    num_classes: int
    axes: str | None
    channel: int | None
    leading: tuple[int, ...]
    height: int
    width: int
    divisor: int
    chunk: int
    margin: int
    context: int
    exact: bool
    halo: int
    tile: int
    batch: int | None
    amp: bool | None
    level: int | None
    mode: str
    class_names: tuple[str, ...]
    threshold: float
    min_size: int
    seed_h: float
    strip: int = STRIP
    run: str = ""
    """The run that owns the store now; tasks of an older run never write (see
    :func:`~.store.owner`)."""

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.height // self.chunk), -(-self.width // self.chunk)

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.leading)) if self.leading else 1

    @property
    def n_chunks(self) -> int:
        ny, nx = self.grid
        return self.n_planes * ny * nx

    def locate(self, lin: int) -> tuple[int, int, int]:
        """Linear chunk index → (plane, row, column) of the chunk grid."""
        ny, nx = self.grid
        p, rest = divmod(lin, ny * nx)
        i, j = divmod(rest, nx)
        return p, i, j

    def linear(self, p: int, i: int, j: int) -> int:
        ny, nx = self.grid
        return (p * ny + i) * nx + j

    def plane_index(self, p: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(p, self.leading)) if self.leading else ()

    def core(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Output rows [a, b) and columns [c, d) of chunk (i, j)."""
        c = self.chunk
        return i * c, min((i + 1) * c, self.height), j * c, min((j + 1) * c, self.width)

    def _block_length(self, length: int) -> int:
        return min(self.chunk + 2 * self.context, round_up(length, self.divisor))

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, columns) of every chunk's block."""
        return self._block_length(self.height), self._block_length(self.width)

    def block(self, a: int, b: int, length: int) -> tuple[int, int]:
        """Input [A, B) computed for output [a, b) on an axis of ``length`` pixels: the
        chunk ± ``context``, on the divisor grid, shifted inwards at the (padded) edges."""
        size = self._block_length(length)
        start = max(0, min(a - self.context, round_up(length, self.divisor) - size))
        return start, start + size


def _tiling(obj: Any, tile: int, exact: bool, halo: int | None) -> tuple[bool, int]:
    """(exact, halo) of every chunk's plan, by the planner's rules
    (:func:`~napari_unet.inference.plan.window_rules`). Tile-exact models always get the
    receptive-field halo, unless a shorter ``halo`` is asked for without ``exact``; models
    that cannot be tiled exactly use Gaussian-blended windows (with a warning when
    ``exact``)."""
    from ..inference.plan import window_rules

    if obj.border > 0:  # valid convolutions: always exact
        return True, 0
    if not obj.info.tile_exact:
        if exact:
            warnings.warn(
                f"{obj.name} cannot be tiled exactly; distributed chunks use Gaussian-blended "
                "windows and differ slightly from a single-process prediction",
                RuntimeWarning,
                stacklevel=4,
            )
        return False, window_rules(obj, tile, exact=False, halo=halo)[1]
    _, eff, _ = window_rules(obj, tile, exact=exact or halo is None, halo=halo)
    return eff >= obj.receptive_field, eff


def _warn_costly_context(obj: Any, tile: int, chunk: int, context: int) -> None:
    """One line when exact chunks read far more than they write (U²-Net's receptive field
    is 3296 px), with the shorter halo that single-process ``predict`` uses by default."""
    from ..inference.plan import window_rules

    fast = window_rules(obj, tile, exact=False, halo=None)[1]
    side = chunk + 2 * context
    warnings.warn(
        f"{obj.name}: exact chunks need {context} px of context ({side}² read for each "
        f"{chunk}² chunk, ~{(side / chunk) ** 2:.0f}× the work); exact=False, halo={fast} "
        f"(CLI: --halo {fast}) gives predict's default halo, differences far below what is "
        "visible",
        RuntimeWarning,
        stacklevel=4,
    )


SETTINGS = frozenset(
    "axes channel tile_size batch_size amp exact halo level chunk_size margin mode "
    "class_names threshold min_size seed_h".split()
)


def build_spec(obj: Any, layout: Any, *, out: Any, key: str, **settings: Any) -> RunSpec:
    """The chunk geometry and settings of a run.

    Args:
        obj: the network; ``layout``: the input's layout.
        out: the zarr group's path; ``key``: the weights' SHA-256.
        **settings: the keyword arguments of
            :func:`~napari_unet.distributed.predict_distributed` (axes, channel, tile_size,
            batch_size, amp, exact, halo, level, chunk_size, margin, mode, class_names,
            threshold, min_size, seed_h); those left out take its defaults.
    """
    unknown = set(settings) - SETTINGS
    if unknown:
        raise TypeError(f"build_spec got unknown settings {sorted(unknown)}")
    get = settings.get
    height, width = layout.spatial
    g = obj.size_divisor
    mode = get("mode", "instance")
    chunk = round_up(max(int(get("chunk_size", DEFAULT_CHUNK)), 2 * STRIP, g), g)
    margin = get("margin", DEFAULT_MARGIN)
    margin = 0 if mode == "semantic" else round_up(max(int(margin), STRIP), g)
    tile = int(get("tile_size") or MAX_TILE)
    exact_run, eff_halo = _tiling(obj, tile, get("exact", True), get("halo"))
    context = margin if obj.border > 0 else round_up(margin + eff_halo, g)
    if exact_run and get("halo") is None and context > chunk:
        _warn_costly_context(obj, tile, chunk, context)
    names = tuple(get("class_names") or obj.class_names)
    return RunSpec(
        out=str(out), key=key, in_channels=obj.in_channels, num_classes=obj.num_classes,
        axes=get("axes"), channel=get("channel"), leading=tuple(int(n) for n in layout.leading),
        height=int(height), width=int(width), divisor=g, chunk=chunk, margin=margin,
        context=context, exact=exact_run, halo=eff_halo, tile=tile, batch=get("batch_size"),
        amp=get("amp"), level=get("level"), mode=mode, class_names=names,
        threshold=float(get("threshold", 0.5)), min_size=int(get("min_size", 15)),
        seed_h=float(get("seed_h", 1.0)),
    )  # fmt: skip


def block_plan(model: Any, spec: RunSpec) -> Any:
    """The tile plan of every chunk's block (one plan per run: blocks share their shape)."""
    from ..inference.plan import tile_plan_for

    return tile_plan_for(
        model, spec.block_shape, tile_size=spec.tile, exact=spec.exact, halo=spec.halo
    )
