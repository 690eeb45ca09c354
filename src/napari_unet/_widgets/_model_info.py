"""What the Model widget shows about a model, in words: the info rows, the training
summary, the runtime, and the defaults of a new network. Engine imports stay inside the
functions (they run in workers)."""

from __future__ import annotations

from typing import Any


def variant_defaults(name: str) -> dict[str, Any]:
    """Config keys and defaults a variant accepts (engine import: call off start-up)."""
    from ..models import config_defaults

    return config_defaults(name)


TERMS = {
    "variant": "The network architecture (U-Net, UNet++, UNet 3+, U²-Net, Swin-UNet…)",
    "config": "Settings the network was built with (width, depth, normalisation…)",
    "channels in → classes": "Image channels the network reads → classes it outputs per "
    "pixel (background / interior / boundary separates touching nuclei)",
    "parameters": "Number of learned weights: a measure of the network's size",
    "border": "Pixels lost on each side by unpadded (valid) convolutions: the paper's U-Net "
    "outputs a smaller image than its input (0 for padded networks)",
    "size divisor": "Image sizes are padded to a multiple of this (the network halves the "
    "image this many times over)",
    "receptive field": "How far (in pixels) the network looks around each pixel to decide",
    "deep-supervision outputs": "Extra predictions from inside the network (side outputs), "
    "shown in the Inspect section",
    "exact tiling": "Whether predicting in tiles gives exactly the whole-image result",
    "UNet++ levels": "UNet++ can be cut to a smaller network (level L): parameters per level",
    "device": "Where the network runs (CPU or GPU)",
    "training": "How this model was trained in this viewer",
    "runtime": "The engine that computes predictions: OpenVINO on the CPU (several times "
    "faster than plain PyTorch; the first prediction with a new model converts it once), "
    "PyTorch on a GPU",
}


def training_text(summary: dict[str, Any] | None) -> str:
    """The training summary in words (images, regions, objects, pixels, steps, validation).

    Reads the widget's summary keys (``images``…) or a checkpoint's (``data_images``…)."""
    if not summary:
        return ""

    def get(key: str) -> Any:
        value = summary.get("data_" + key)
        return summary.get(key) if value is None else value

    def count(n: Any, word: str) -> str | None:
        return f"{n:,} {word}{'s' if n != 1 else ''}" if isinstance(n, int) else None

    words = [count(get(k), k[:-1]) for k in ("images", "regions", "objects", "pixels")]
    parts = [", ".join(w for w in words if w)] if any(words) else []
    if summary.get("steps") is not None:
        parts.append(f"{summary['steps']} steps")
    if summary.get("seconds") is not None:
        parts.append(f"{float(summary['seconds']):.0f} s")
    if summary.get("val_f1") is not None:
        n = summary.get("val_objects")
        on = f" on {n} objects" if n else ""
        parts.append(f"validation F1@0.5 {summary['val_f1']:.2f}{on}")
    elif summary.get("validation") is not None:
        parts.append("no validation score")
    return "; ".join(parts)


def new_model_defaults(state: Any, defaults: dict[str, Any], name: str) -> dict[str, Any]:
    """Config defaults for a new ``name`` network: the bundled net's width/depth where one
    of this variant is in the list (for U-Net: the bundled default's shape), else the
    variant's own ``defaults``."""
    from ..pipeline import FALLBACK_CONFIG, FALLBACK_VARIANT

    out = dict(defaults)
    bundled = next(
        (
            e.model
            for e in state.entries
            if e.kind == "bundled" and e.model is not None and e.model.name == name
        ),
        None,
    )
    if bundled is not None:
        out.update({k: v for k, v in bundled.config.items() if k in out})
    elif name == FALLBACK_VARIANT:
        out.update(FALLBACK_CONFIG)
    return out


def runtime_text(model: Any, device: str) -> str:
    """Which inference runtime predictions of ``model`` use here, and how to get faster."""
    from ..inference.backends import resolve_runtime
    from ..runtime import cpu_has_bf16, select_device

    try:
        dev, _ = select_device(device)
        name, why = resolve_runtime(dev)
    except ValueError as exc:
        return f"unavailable: {exc}"
    if name == "openvino":
        precision = "bf16 (this CPU has bf16 units)" if cpu_has_bf16() else "f32"
        return f"{why}, {precision}; exported once per model and window, then cached"
    return why


def describe(model: Any, device: str) -> dict[str, str]:
    """Rows of the info panel (engine import; run in a worker: measures the RF once)."""
    from ..runtime import select_device

    info = model.info
    try:
        _, why = select_device(device)
    except ValueError as exc:
        why = f"unavailable: {exc}"
    classes = model.class_names
    rows = {
        "variant": model.name,
        "config": ", ".join(f"{k}={v}" for k, v in model.config.items()),
        "channels in → classes": f"{model.in_channels} → {model.num_classes} ({', '.join(classes)})",
        "parameters": f"{info.parameters:,}",
        "border": f"{info.border} px",
        "size divisor": str(info.size_divisor),
        "receptive field": f"radius {info.receptive_field} px",
        "deep-supervision outputs": str(info.deep_supervision_outputs),
        "exact tiling": "yes" if info.tile_exact else "no (Gaussian-blended tiles)",
        "device": why,
        "runtime": runtime_text(model, device),
    }
    summary = model.training_summary
    if summary:
        rows["training"] = training_text(summary)
    if model.levels:
        rows["UNet++ levels"] = levels_text(model)
    return rows


def levels_text(model: Any) -> str:
    """Parameters per level ``forward(x, level=L)`` accepts. A UNet++ built without deep
    supervision has only the head on ``X[0][depth]``: it runs whole, never pruned."""
    if not model.deep_supervision:
        top = model.levels
        return f"L{top} only (no deep supervision: not prunable): {model.level_parameters(top):,}"
    return ", ".join(f"L{L}: {model.level_parameters(L):,}" for L in range(1, model.levels + 1))
