"""What the Train widget says about a run, in words: the data that went in, the name of
the validation score (or why there is none), the result line and the model's summary."""

from __future__ import annotations

from typing import Any


def val_name(summary: Any) -> str:
    """The validation score's name for the plot and the status (a ``TrainingSummary``)."""
    from ..training.data import MIN_VAL_OBJECTS

    s = summary
    if s is None:
        return "validation"
    if s.validation == "none":
        return "no validation (none chosen)"
    if not s.scored:
        n = s.val_objects
        return (
            f"no validation score: {n} object{'s' if n != 1 else ''}, fewer than {MIN_VAL_OBJECTS}"
        )
    where = "held-out" if s.validation == "objects" else "validation-region"
    return f"F1@0.5 on {s.val_objects} {where} objects"


def summary_line(summary: Any) -> str:
    """``"1 image, 2 regions, 31 objects, 26,112 pixels. "`` ("" before training starts)."""
    s = summary
    if s is None:
        return ""
    return (
        f"{s.images} image{'s' if s.images != 1 else ''}, {s.regions} "
        f"region{'s' if s.regions != 1 else ''}, {s.objects} objects, "
        f"{s.pixels:,} pixels. "
    )


def model_summary(model: Any, summary: Any) -> dict[str, Any]:
    """The trained model's summary for the model list: the engine's, with the data counts."""
    out = dict(model.training_summary or {})
    if summary is not None:
        out.update(
            images=summary.images,
            regions=summary.regions,
            objects=summary.objects,
            pixels=summary.pixels,
        )
    return out


def result_text(label: str, history: Any, summary: Any) -> str:
    """``"Done: unet (trained 1), 1 image, … 16 steps in 4.2 s; F1@0.5 …: 0.81"``."""
    steps, secs = len(history.losses), history.seconds
    text = f"Done: {label}, {summary_line(summary)}{steps} steps in {secs:.1f} s"
    last = history.epochs[-1] if history.epochs else {}
    if last.get("val_f1") is not None:
        text += f"; {val_name(summary)}: {last['val_f1']:.2f}"
    elif summary is not None and summary.val_note:
        text += f". {summary.val_note.rstrip('.')}"
    if history.diverged:
        text += " (loss diverged: kept the last good weights)"
    return text
