"""Export any napari-unet model as a bioimage.io model package (spec 0.5) zip."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.normalize import get_normalization
from ..models.base import SegmentationModel
from .net import ProbabilityNet
from .spec import model_descr


def _check_output_path(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() != ".zip":
        raise ValueError(f"a bioimage.io package is a .zip file; got {path.name!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name ending in .zip")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"folder {parent} is not writable")


def _sample_input(model: SegmentationModel, size: int) -> np.ndarray:
    """A (1, C_in, S, S) float32 crop of the bundled sample image (channels repeated)."""
    from .._sample_data import nuclei_image

    image = nuclei_image().astype(np.float32)
    h, w = image.shape
    s = min(size, h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = image[y0 : y0 + s, x0 : x0 + s]
    return np.repeat(crop[None, None], model.in_channels, axis=1).copy()


def _scale_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """bioimage.io ``scale_range`` per sample and channel over (y, x), eps 1e-6."""
    lo = np.percentile(x, low, axis=(2, 3), keepdims=True)
    hi = np.percentile(x, high, axis=(2, 3), keepdims=True)
    return ((x - lo) / (hi - lo + 1e-6)).astype(np.float32)


def _cover(image: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """A 2:1 PNG: the input on the left, the foreground probability on the right."""
    import imageio.v3 as iio

    def to8(a: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(a, [1, 99.8])
        return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)

    margin = (image.shape[0] - probs.shape[-2]) // 2  # valid convolutions: output smaller
    if margin > 0:
        image = image[margin:-margin, margin:-margin]
    left = to8(image)
    fg = probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]
    right = (np.clip(fg, 0, 1) * 255).astype(np.uint8)
    rgb = np.zeros((*left.shape, 3), np.uint8)
    rgb[..., 0] = rgb[..., 1] = rgb[..., 2] = left
    over = np.stack([right, (0.6 * right).astype(np.uint8), np.zeros_like(right)], -1)
    iio.imwrite(path, np.concatenate([rgb, over], axis=1))


def _export_onnx(net: ProbabilityNet, example: torch.Tensor, path: Path) -> None:
    """ONNX (opset 18) with dynamic batch, height and width; equal to torch to ~1e-5."""
    import contextlib
    import logging

    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    quiet = io.StringIO()
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            torch.onnx.export(
                net,
                (example,),
                str(path),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes={"x": dims},
                opset_version=18,
                external_data=False,
            )
    finally:
        logging.getLogger("torch").setLevel(level)


def _documentation(model: SegmentationModel, name: str, classes: list[str]) -> str:
    summary = model.training_summary
    lines = [
        f"# {name}",
        "",
        f"A {model.name} from napari-unet ({model.in_channels} input channel(s), "
        f"{model.num_classes} output classes: {', '.join(classes)}).",
        "",
        "## Input",
        "One 2-D image (batch, channel, y, x), any size (the network pads internally).",
        "Pre-processing: each channel is scaled so that its percentiles "
        f"{get_normalization(model).get('low', 1.0)} / "
        f"{get_normalization(model).get('high', 99.8)} become 0 / 1 (`scale_range`).",
        "",
        "## Output",
        "Per-class probabilities (batch, channel, y, x); channel names are the classes.",
        "napari-unet turns them into instance labels (seeded watershed on the interior "
        "class); re-import the package in napari-unet to get labels directly.",
        "",
        "## Architecture",
        f"`napari_unet.models.build_model({model.name!r}, {model.in_channels}, "
        f"{model.num_classes}, **{dict(model.config)})` — "
        f"{sum(p.numel() for p in model.parameters()):,} parameters.",
        "",
        "## Training",
    ]
    if summary:
        lines += ["```json", json.dumps(summary, indent=1, default=str)[:4000], "```"]
    else:
        lines.append("No training summary is stored with this model (it may be untrained).")
    return "\n".join(lines) + "\n"


def _test_tensors(
    model: SegmentationModel, net: ProbabilityNet, norm: dict[str, Any], test_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw input, normalised input, output) of a crop of the sample image; a legal input
    size for valid-convolution networks (reflect-padded when the sample is too small)."""
    size = test_size
    if model.info.border:  # valid convolutions: a legal input size
        size = model.valid_input_size(max(model.output_size(test_size), 4))  # type: ignore[attr-defined]
    raw = _sample_input(model, size)
    if size > raw.shape[-1]:
        raw = np.pad(raw, [(0, 0), (0, 0)] + [(0, size - raw.shape[-1])] * 2, "reflect")
    if norm.get("method") == "none":
        x = raw
    else:
        x = _scale_range(raw, float(norm.get("low", 1.0)), float(norm.get("high", 99.8)))
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    return raw, x, out


def write_files(
    model: SegmentationModel,
    net: ProbabilityNet,
    folder: Path,
    *,
    name: str,
    classes: list[str],
    norm: dict[str, Any],
    test_size: int,
) -> None:
    """Every file of the package into ``folder``: test tensors, cover, README, the
    ``pytorch_state_dict`` and ONNX weights and the napari-unet checkpoint."""
    from ..checkpoint import save_model

    raw, x, out = _test_tensors(model, net, norm, test_size)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", out)
    _cover(raw[0, 0], out[0], folder / "cover.png")
    (folder / "README.md").write_text(_documentation(model, name, classes))
    torch.save(net.state_dict(), folder / "weights.pt")
    _export_onnx(net, torch.from_numpy(x), folder / "weights.onnx")
    save_model(
        model,
        folder / "napari_unet.safetensors",
        training=model.training_summary,
    )


def export_bioimageio(
    model: SegmentationModel,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license: str = "BSD-3-Clause",
    test_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bioimage.io model package (spec 0.5) zip.

    Args:
        model: a napari-unet network (from ``build_model``, ``load_model`` or
            ``load_pretrained``); its ``normalization``, ``class_names`` and
            ``training_summary`` go into the package.
        path: output ``.zip``; never overwritten unless ``overwrite``.
        name: the package's name (default: ``"napari-unet <variant>"``).
        description: one sentence (default: generated).
        authors: author names (default: ``["napari-unet user"]``).
        license: SPDX licence id of the weights.
        test_size: side in pixels of the test tensors cut from the sample image.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    from bioimageio.spec import save_bioimageio_package

    path = Path(path)
    _check_output_path(path, overwrite)
    model = model.eval().to("cpu")
    classes = model.class_names
    norm = get_normalization(model)
    if norm.get("method", "percentile") not in ("percentile", "none"):
        raise ValueError(f"cannot express normalisation {norm} as bioimage.io pre-processing")
    model.info  # noqa: B018  (measured before the export: border, size divisor)
    name = name or f"napari-unet {model.name}"
    net = ProbabilityNet(model.name, model.in_channels, model.num_classes, dict(model.config))
    net.net.load_state_dict(model.state_dict())
    net.eval()
    with tempfile.TemporaryDirectory(prefix="napari-unet-bioimageio-") as tmpdir:
        tmp = Path(tmpdir)
        write_files(model, net, tmp, name=name, classes=classes, norm=norm, test_size=test_size)
        descr = model_descr(
            model, tmp, name=name, description=description, authors=authors,
            license=license, classes=classes, norm=norm,
        )  # fmt: skip
        tmp_zip = path.with_name(f".{path.name}.part")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
            os.replace(tmp_zip, path)
        finally:
            tmp_zip.unlink(missing_ok=True)
    return path
