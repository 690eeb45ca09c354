"""A table of the registered variants (used by ``napari-unet models`` and the Model widget)."""

from __future__ import annotations

from typing import Any

from .registry import build_model, list_models, model_description


def model_rows(in_channels: int = 1, num_classes: int = 2) -> list[dict[str, Any]]:
    """One row per variant with its default config: parameters, border, divisor, RF, outputs."""
    rows = []
    for name in list_models():
        info = build_model(name, in_channels, num_classes).info
        rows.append(
            {
                "name": name,
                "parameters": info.parameters,
                "border": info.border,
                "size_divisor": info.size_divisor,
                "receptive_field": info.receptive_field,
                "outputs": info.deep_supervision_outputs,
                "tile_exact": info.tile_exact,
                "description": model_description(name),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`model_rows`."""
    header = (
        "variant",
        "params",
        "border",
        "divisor",
        "RF radius",
        "outputs",
        "exact tiling",
        "what",
    )
    lines = [
        (
            r["name"],
            f"{r['parameters'] / 1e6:.2f}M",
            str(r["border"]),
            str(r["size_divisor"]),
            str(r["receptive_field"]),
            str(r["outputs"]),
            "yes" if r["tile_exact"] else "no",
            r["description"],
        )
        for r in rows
    ]
    return align_columns(header, lines)


def align_columns(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    """``header`` and ``lines`` as left-aligned text columns under a dashed rule."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)
