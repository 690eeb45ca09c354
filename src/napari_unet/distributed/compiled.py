"""Which runtime the dask workers run (issue #12): decided once, in the client.

The client applies the rule of single-process ``predict``
(:func:`~napari_unet.inference.backends.compiled_precision`: ``runtime=`` /
``$NAPARI_UNET_RUNTIME`` / ``"auto"``: OpenVINO on the CPU when installed, for jobs large
enough or weights already exported) to the run's one window shape. For OpenVINO it exports
the model once, into its own cache (keyed by the weights hash, window and versions), and
the export travels to the workers with the model (:class:`~.worker.ModelPlugin`). Each
worker writes it into its cache when missing and compiles it — it never exports. A worker
that cannot load it (no OpenVINO, another version, …) runs torch and says so in one line;
a worker on a GPU runs torch. The chunk tasks report what they ran on; the run records it
in the store's attributes (:data:`~.store.RUNTIME_ATTR`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CompiledModel:
    """An OpenVINO export shipped to the workers: its cache key, precision and files."""

    key: str
    precision: str
    xml: bytes
    bin: bytes


def client_device(device: Any) -> Any:
    """The device the runtime rule is applied to, seen from the client (never raises for a
    GPU the client itself lacks: the workers choose theirs)."""
    import torch

    from ..runtime import select_device

    if str(device) == "auto":
        return select_device("auto")[0]
    return torch.device(str(device))


def choose_runtime(
    model: Any, plan: Any, *, windows: int, device: Any, runtime: str | None, exact: bool,
    amp: bool | None, level: int | None,
) -> tuple[str, CompiledModel | None]:  # fmt: skip
    """("openvino" or "torch", the export to ship) for a run of ``windows`` windows of
    ``plan``'s shape; an export that fails leaves the run on torch with a one-line warning."""
    from ..inference.backends import compiled_precision

    window = (model.in_channels, *plan.window_shape)
    precision = compiled_precision(
        model, window, windows=windows, device=client_device(device), runtime=runtime,
        exact=exact, amp=amp, level=level,
    )  # fmt: skip
    if precision is None:
        return "torch", None
    exported = _export(model, window, level)
    if isinstance(exported, str):
        warnings.warn(f"napari-unet: running on torch: {exported}", RuntimeWarning, stacklevel=3)
        return "torch", None
    xml, _ = exported
    data = CompiledModel(
        xml.stem, precision, xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    )
    return "openvino", data


def _export(model: Any, window: tuple[int, int, int], level: int | None) -> Any:
    """:func:`~napari_unet.inference.backends.export_ir` of the model in eval mode on the
    CPU; the model's mode and device are restored."""
    from ..inference.backends import export_ir

    training = model.training
    device = next(model.parameters()).device
    try:
        return export_ir(model.eval().cpu(), window, level=level)
    finally:
        model.to(device).train(training)


def _into_cache(compiled: CompiledModel) -> Path:
    """The export's ``.xml`` in this machine's cache, written there when missing."""
    from ..inference.backends import cache_dir

    xml = cache_dir() / "openvino" / f"{compiled.key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    xml.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((xml.with_suffix(".bin"), compiled.bin), (xml, compiled.xml)):
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, path)  # the .xml last: a complete pair once it exists
    return xml


def load_on_worker(compiled: CompiledModel | None, device: Any, threads: int) -> tuple[Any, str]:
    """(compiled backend or None, the runtime this worker runs: "openvino" or "torch")."""
    if compiled is None or device.type != "cpu":
        return None, "torch"
    try:
        from ..inference.backends import compile_ir

        backend = compile_ir(_into_cache(compiled), precision=compiled.precision, threads=threads)
    except Exception as err:  # noqa: BLE001 - any failure: this worker runs torch
        text = " ".join(str(err).split())[:200] or type(err).__name__
        warnings.warn(
            f"napari-unet: this worker runs on torch: cannot load the OpenVINO model ({text})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, "torch"
    return backend, "openvino"
