"""What went into a training run: :class:`TrainingSummary` (reported when training starts,
stored in the history and, compactly, with the model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MIN_VAL_OBJECTS = 5
"""No validation score is reported on fewer objects than this."""


@dataclass
class TrainingSummary:
    """What went into a training run (reported at start, stored in the history).

    ``objects``: annotated objects with pixels inside a training region (held-out objects
    excluded); ``pixels``: pixels the loss sees (inside regions, not held out).
    ``validation``: "none" | "objects" (held-out fraction) | "regions";
    ``val_objects``: objects scored; ``val_note``: what the score is, or why there is none.
    """

    images: int = 0
    regions: int = 0
    objects: int = 0
    pixels: int = 0
    validation: str = "none"
    val_objects: int = 0
    val_pixels: int = 0
    val_note: str = ""
    per_image: list[dict[str, Any]] = field(default_factory=list)
    # budget and runtime, filled by the trainer
    steps: int | None = None
    seconds: float | None = None
    precision: str = ""
    threads: int | None = None
    device: str = ""

    @property
    def scored(self) -> bool:
        """True when a validation score will be reported."""
        return self.validation != "none" and self.val_objects >= MIN_VAL_OBJECTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trained_on(self, before: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """``before`` and this run's images, once each: ``{"name", "shape": [Y, X]}`` (a
        Compare of the model on one of them is not a test)."""
        mine = [{"name": p["name"], "shape": list(p["shape"][-2:])} for p in self.per_image]
        seen = [dict(t) for t in (*before, *mine)]
        return [t for i, t in enumerate(seen) if t not in seen[:i]]

    def describe(self) -> str:
        """One plain-English line for a status bar or a log."""
        s = lambda n, w: f"{n:,} {w}" + ("" if n == 1 else "s")  # noqa: E731
        text = (
            f"{s(self.images, 'image')}, {s(self.regions, 'region')}, "
            f"{s(self.objects, 'object')}, {s(self.pixels, 'pixel')}"
        )
        budget = []
        if self.steps is not None:
            budget.append(s(self.steps, "step"))
        if self.seconds is not None:
            budget.append(f"at most {self.seconds:g} s")
        if budget:
            text += "; " + " / ".join(budget)
        if self.precision:
            text += f"; {self.precision}"
        if self.threads:
            text += f", {s(self.threads, 'thread')}"
        return text + ". " + self.val_note
