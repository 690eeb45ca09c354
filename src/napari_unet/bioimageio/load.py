"""Import bioimage.io model packages: napari-unet's own through the attached checkpoint,
foreign 2-D ONNX ones through ONNX Runtime; pickled weights are never read."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..models.base import SegmentationModel
from .onnx_model import OnnxSegmentationModel

MAX_PACKAGE_BYTES = 2 * 1024**3
"""Largest package (or member) read on import: bigger ones are refused unread."""


def is_bioimageio_package(path: str | os.PathLike[str]) -> bool:
    """True for a ``.zip`` holding an ``rdf.yaml`` / ``bioimageio.yaml`` at its root."""
    path = Path(path)
    if path.suffix.lower() != ".zip" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n in zf.namelist() for n in ("rdf.yaml", "bioimageio.yaml"))
    except (zipfile.BadZipFile, OSError):
        return False


def _read_member(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        member = zf.getinfo(name)
    except KeyError:
        raise ValueError(f"{path}: the package lists {name!r} but does not contain it") from None
    if member.file_size > MAX_PACKAGE_BYTES:
        raise ValueError(
            f"{path}: {name} declares {member.file_size / 1e9:.1f} GB; refusing to read it"
        )
    return zf.read(member)


def _rdf(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    import yaml

    name = "rdf.yaml" if "rdf.yaml" in zf.namelist() else "bioimageio.yaml"
    try:
        rdf = yaml.safe_load(_read_member(zf, name, path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {name} is not valid YAML ({err})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise ValueError(f"{path}: not a bioimage.io model package (type is not 'model')")
    return rdf


def _source(entry: Any) -> str:
    src = entry.get("source") if isinstance(entry, dict) else entry
    if not isinstance(src, str) or "://" in src or src.startswith(("/", "..")):
        raise ValueError(f"package file reference {src!r} is not a file inside the package")
    return src


def load_bioimageio(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, prefer: str = "auto"
) -> SegmentationModel:
    """Import a bioimage.io model package (``.zip``) as a napari-unet model.

    Args:
        path: the package zip.
        device: where the model runs (ONNX models always run on the CPU).
        prefer: ``"auto"`` (the attached napari-unet checkpoint when there is one, else
            ONNX), ``"onnx"`` (always the ONNX weights) or ``"checkpoint"``.

    Returns:
        A model usable by :func:`napari_unet.predict`: the rebuilt napari-unet network, or
        an :class:`OnnxSegmentationModel` for foreign ONNX packages.

    Raises:
        ValueError: not a model package, not 2-D with one input, or weights that exist
        only as pickles (pytorch_state_dict / torchscript are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such bioimage.io package: {path}")
    if path.stat().st_size > MAX_PACKAGE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 1e9:.1f} GB package; refusing it")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a zip file") from None
    with zf:
        rdf = _rdf(zf, path)
        ours = (rdf.get("config") or {}).get("napari_unet") if isinstance(rdf, dict) else None
        if prefer in ("auto", "checkpoint") and isinstance(ours, dict) and ours.get("checkpoint"):
            from ..checkpoint import load_model

            data = _read_member(zf, _source(ours["checkpoint"]), path)
            with tempfile.TemporaryDirectory(prefix="napari-unet-import-") as tmpdir:
                ckpt = Path(tmpdir) / "model.safetensors"
                ckpt.write_bytes(data)
                model = load_model(ckpt, device=device)
            model.checkpoint_path = path
            return model
        if prefer == "checkpoint":
            raise ValueError(f"{path}: no napari-unet checkpoint attached to this package")
        weights = rdf.get("weights") or {}
        if "onnx" not in weights:
            kinds = ", ".join(sorted(weights)) or "none"
            raise ValueError(
                f"{path}: weights are {kinds}; napari-unet imports ONNX weights (or its own "
                "attached checkpoint) and never unpickles pytorch_state_dict/torchscript files"
            )
        onnx_bytes = _read_member(zf, _source(weights["onnx"]), path)
    return OnnxSegmentationModel.from_rdf(rdf, onnx_bytes, source=path)
