"""What every ``napari-unet`` command shares: the stop signal, the progress bar, ``-m``."""

from __future__ import annotations

import sys
import threading

STOP = threading.Event()
"""Set by the first Ctrl-C / SIGTERM: the engine stops at its next batch (cancel token)."""


def on_stop_signal(signum: int, frame: object) -> None:
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()
    print("napari-unet: stopping (again to force)", file=sys.stderr)


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


class ProgressBar:
    """tqdm progress bar fed by the engine's ``progress(done, total)`` callback."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="tile", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cli_model(spec: str | None, untrained: bool):
    """``-m``: None → the bundled default; a bundled name → its trained weights
    (``unetpp``, ``unet3p``, ``u2netp``, ``swin_unet``, ``unet_valid``, ``unet``); a
    ``.safetensors`` path → that checkpoint; ``--untrained`` → a fresh 3-class network."""
    from ..inference.resolve import resolve_model
    from ..models import build_model

    if untrained:
        if spec is None or str(spec).endswith(".safetensors"):
            raise ValueError("--untrained needs a variant name: -m unetpp --untrained")
        model = build_model(str(spec), 1, 3)
        print(f"warning: {spec!r}: a fresh, untrained {model.name}", file=sys.stderr)
        return model
    model, trained = resolve_model(spec)
    if not trained:
        print(
            f"warning: {spec!r} has no bundled weights: an untrained {model.name}; "
            "pass a checkpoint",
            file=sys.stderr,
        )
    return model


def model_path(spec: str | None) -> str | None:
    """``-m`` when it names a file (an input the outputs must not touch)."""
    return (
        spec if spec is not None and (str(spec).endswith(".safetensors") or "/" in spec) else None
    )
