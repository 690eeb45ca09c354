"""The Train widget's workers: its engine setup (:func:`setup_work`) and a training run —
what the widget read from its controls and layers (:class:`TrainPlan`, built on the GUI
thread) and :func:`train_work`, which trains a copy of the model (or a new network) and,
when asked, predicts the image with it.

The engine's ``train(callback=)`` dicts become typed events here (:func:`~._events.train_event`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._events import PostProgress, Stage, train_event
from ._geometry import Request
from ._prediction import run_prediction


def setup_work() -> tuple[list[str], list[tuple[str, str]], dict[str, dict[str, Any]]]:
    """(variants, (loss, description) pairs, each variant's config defaults); also creates
    a torch optimizer once: the first one imports torch._dynamo (seconds, and GIL-heavy),
    which would otherwise happen on the first click on Train."""
    import torch

    from ..models import list_models
    from ..training.losses import get_loss, list_losses
    from ._model_info import variant_defaults

    names = list_models()
    losses = [(n, get_loss(n).description) for n in list_losses()]
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    return names, losses, {n: variant_defaults(n) for n in names}


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training run needs, captured when Train is clicked."""

    data: list[dict[str, Any]]
    """``TrainingEntry`` keyword dicts (arrays are snapshots of the layers)."""
    settings: dict[str, Any]
    """Keyword arguments of ``train`` (loss, budget, lr, batch, patch, validation…)."""
    device: str
    base: Any = None
    """The model fine-tuned (a copy of it), or None with ``fresh``."""
    fresh: str | None = None
    """Variant of a new network trained from scratch."""
    fresh_config: dict[str, Any] = field(default_factory=dict)
    classes: int = 3
    request: Request | None = None
    """What to predict when done (None: no prediction)."""

    @property
    def fresh_in(self) -> int:
        """Input channels of a new network: those of the first entry's image."""
        image, labels = self.data[0]["image"], self.data[0]["labels"]
        if labels.ndim == 3:  # a Z-stack: (Z, Y, X) or (Z, C, Y, X)
            return int(image.shape[1]) if image.ndim == 4 else 1
        return int(image.shape[0]) if image.ndim == 3 else 1


def fresh_config(defaults: dict[str, Any], width: int, depth: int) -> dict[str, Any]:
    """Config of a new network: ``width`` for its width key, ``depth`` if it has one."""
    cfg: dict[str, Any] = {}
    for key in ("base_channels", "embed_dim"):
        if key in defaults:
            cfg[key] = width
    if "depth" in defaults:
        cfg["depth"] = depth
    return cfg


def train_work(plan: TrainPlan, report: Any, cancel: Any) -> tuple[Any, Any, Any]:
    """(model, history, prediction or None): runs in the job's thread."""
    import copy

    from ..training import TrainingEntry, train

    if plan.fresh is None:
        model = copy.deepcopy(plan.base)  # Cancel or failure never touch the listed model
    else:
        from ..models import build_model

        model = build_model(plan.fresh, plan.fresh_in, plan.classes, **plan.fresh_config)
    history = train(
        model,
        [TrainingEntry(**d) for d in plan.data],
        device=plan.device,
        callback=lambda ev: report(train_event(ev)),
        cancel=cancel,
        **plan.settings,
    )
    prediction = None
    if plan.request is not None and not history.cancelled and not cancel.is_set():
        report(Stage("predicting"))
        prediction = run_prediction(
            model,
            plan.request,
            labels_mode="instance",
            probabilities=False,
            device=plan.device,
            report=lambda event: report(event) if isinstance(event, PostProgress) else None,
            cancel=cancel,
        )
    return model, history, prediction
