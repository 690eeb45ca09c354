"""bioimage.io model packages (spec 0.5): export any napari-unet model, import packages.

A package written by :func:`export_bioimageio` runs wherever bioimage.io models run
(bioimageio.core, Fiji/deepImageJ, QuPath, ilastik, CAREamics):

- ``weights``: ONNX (the network with its output activation, dynamic batch and size) and a
  ``pytorch_state_dict`` whose architecture is :class:`ProbabilityNet` from this package.
- pre-processing: the model's own normalisation as ``scale_range`` (percentiles per sample
  and channel); post-processing: none, the output is probabilities per class (softmax, or
  sigmoid for one class), with the class names as channel names.
- test tensors made from the bundled sample image, a cover image, a documentation page,
  the training summary, and the napari-unet checkpoint itself (safetensors, attached) so
  that napari-unet re-imports the model exactly.

:func:`load_bioimageio` imports a package: a napari-unet package through its attached
safetensors checkpoint; any other 2-D, one-input package through its ONNX weights
(:class:`OnnxSegmentationModel`, run with ONNX Runtime). Weights that only exist as
pickles (pytorch_state_dict, torchscript) are refused without being unpickled, and no
architecture source code from a package is ever executed.

The heavy dependencies (``bioimageio.spec``, ``onnx``, ``onnxruntime``) are imported only
here, inside the functions: ``pip install "napari-unet[bioimageio]"``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inference.normalize import get_normalization
from .models import build_model
from .models.base import SegmentationModel
from .postprocess import default_class_names

MAX_PACKAGE_BYTES = 2 * 1024**3
"""Largest package (or member) read on import: bigger ones are refused unread."""

_CITATIONS: dict[str, tuple[str, str]] = {
    "unet": (
        "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
        "Segmentation. MICCAI 2015.",
        "10.1007/978-3-319-24574-4_28",
    ),
    "wide_unet": (
        "Zhou et al. UNet++: A Nested U-Net Architecture for Medical Image Segmentation. "
        "DLMIA 2018.",
        "10.1007/978-3-030-00889-5_1",
    ),
    "unetpp": (
        "Zhou et al. UNet++: A Nested U-Net Architecture for Medical Image Segmentation. "
        "DLMIA 2018.",
        "10.1007/978-3-030-00889-5_1",
    ),
    "unet3p": (
        "Huang et al. UNet 3+: A Full-Scale Connected UNet for Medical Image Segmentation. "
        "ICASSP 2020.",
        "10.1109/ICASSP40776.2020.9053405",
    ),
    "u2net": (
        "Qin et al. U2-Net: Going deeper with nested U-structure for salient object "
        "detection. Pattern Recognition 106, 2020.",
        "10.1016/j.patcog.2020.107404",
    ),
    "u2netp": (
        "Qin et al. U2-Net: Going deeper with nested U-structure for salient object "
        "detection. Pattern Recognition 106, 2020.",
        "10.1016/j.patcog.2020.107404",
    ),
    "swin_unet": (
        "Cao et al. Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation. "
        "ECCV Workshops 2022.",
        "10.1007/978-3-031-25066-8_9",
    ),
}


class ProbabilityNet(torch.nn.Module):
    """A napari-unet network followed by its output activation (the exported graph).

    Args:
        variant: registry name (``"unet"``, ``"unetpp"``, …).
        in_channels: input channels C_in.
        num_classes: output classes K.
        config: the keyword configuration of :func:`napari_unet.models.build_model`.

    ``forward(x)``: x (N, C_in, H, W) float32, normalised → (N, K, H', W') probabilities in
    [0, 1] (softmax over K, sigmoid when K = 1); H' = H for padded networks.
    """

    def __init__(
        self, variant: str, in_channels: int, num_classes: int, config: dict[str, Any]
    ) -> None:
        super().__init__()
        self.net = build_model(variant, in_channels, num_classes, **config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)


# ------------------------------------------------------------------------------ export
def _identifier(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return out or "model"


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
    from ._sample_data import nuclei_image

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
    summary = getattr(model, "training_summary", None)
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
    from bioimageio.spec.model import v0_5 as bio

    from .checkpoint import save_model

    path = Path(path)
    _check_output_path(path, overwrite)
    model = model.eval().to("cpu")
    variant = model.name
    classes = [str(c) for c in (getattr(model, "class_names", None) or [])] or (
        default_class_names(model.num_classes)
    )
    norm = get_normalization(model)
    if norm.get("method", "percentile") not in ("percentile", "none"):
        raise ValueError(f"cannot express normalisation {norm} as bioimage.io pre-processing")
    info = model.info
    name = name or f"napari-unet {variant}"
    net = ProbabilityNet(variant, model.in_channels, model.num_classes, dict(model.config))
    net.net.load_state_dict(model.state_dict())
    net.eval()

    with tempfile.TemporaryDirectory(prefix="napari-unet-bioimageio-") as tmpdir:
        tmp = Path(tmpdir)
        size = test_size
        if info.border:  # valid convolutions: a legal input size
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
        np.save(tmp / "test_input.npy", raw)
        np.save(tmp / "test_output.npy", out)
        _cover(raw[0, 0], out[0], tmp / "cover.png")
        (tmp / "README.md").write_text(_documentation(model, name, classes))
        torch.save(net.state_dict(), tmp / "weights.pt")
        _export_onnx(net, torch.from_numpy(x), tmp / "weights.onnx")
        save_model(
            model,
            tmp / "napari_unet.safetensors",
            training=getattr(model, "training_summary", None),
        )

        div = int(info.size_divisor)
        min_out = max(div, 16)
        in_min = model.valid_input_size(min_out) if info.border else min_out  # type: ignore[attr-defined]
        in_axes = [
            bio.BatchAxis(),
            bio.ChannelAxis(
                channel_names=[bio.Identifier(f"channel{i}") for i in range(model.in_channels)]
            ),
            bio.SpaceInputAxis(
                id=bio.AxisId("y"), size=bio.ParameterizedSize(min=in_min, step=div)
            ),
            bio.SpaceInputAxis(
                id=bio.AxisId("x"), size=bio.ParameterizedSize(min=in_min, step=div)
            ),
        ]
        pre: list[Any] = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
        if norm.get("method") != "none":
            pre.append(
                bio.ScaleRangeDescr(
                    kwargs=bio.ScaleRangeKwargs(
                        axes=[bio.AxisId("y"), bio.AxisId("x")],
                        min_percentile=float(norm.get("low", 1.0)),
                        max_percentile=float(norm.get("high", 99.8)),
                    )
                )
            )
        inputs = [
            bio.InputTensorDescr(
                id=bio.TensorId("input"),
                axes=in_axes,
                test_tensor=bio.FileDescr(source=tmp / "test_input.npy"),
                preprocessing=pre,
                description="raw image, any intensity range",
            )
        ]

        def out_axis(axis: str) -> Any:
            ref = bio.SizeReference(
                tensor_id=bio.TensorId("input"), axis_id=bio.AxisId(axis), offset=-2 * info.border
            )
            return bio.SpaceOutputAxis(id=bio.AxisId(axis), size=ref)

        outputs = [
            bio.OutputTensorDescr(
                id=bio.TensorId("probabilities"),
                axes=[
                    bio.BatchAxis(),
                    bio.ChannelAxis(
                        channel_names=[bio.Identifier(_identifier(c)) for c in classes]
                    ),
                    out_axis("y"),
                    out_axis("x"),
                ],
                test_tensor=bio.FileDescr(source=tmp / "test_output.npy"),
                data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
                description="probability per class: " + ", ".join(classes),
            )
        ]
        cite_text, doi = _CITATIONS.get(variant, _CITATIONS["unet"])
        weights = bio.WeightsDescr(
            onnx=bio.OnnxWeightsDescr(source=tmp / "weights.onnx", opset_version=18),
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=tmp / "weights.pt",
                architecture=bio.ArchitectureFromLibraryDescr(
                    callable=bio.Identifier("ProbabilityNet"),
                    import_from="napari_unet.bioimageio",
                    kwargs={
                        "variant": variant,
                        "in_channels": int(model.in_channels),
                        "num_classes": int(model.num_classes),
                        "config": json.loads(json.dumps(dict(model.config))),
                    },
                ),
                pytorch_version=bio.Version(torch.__version__.split("+")[0]),
            ),
        )
        descr = bio.ModelDescr(
            name=name,
            description=description
            or f"{variant} for 2-D segmentation ({', '.join(classes)}), made with napari-unet.",
            authors=[bio.Author(name=a) for a in (authors or ["napari-unet user"])],
            cite=[bio.CiteEntry(text=cite_text, doi=bio.Doi(doi))],
            license=bio.LicenseId(license),
            documentation=bio.FileDescr(source=tmp / "README.md"),
            covers=[bio.FileDescr(source=tmp / "cover.png")],
            tags=["napari-unet", variant, "segmentation", "2d"],
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            attachments=[bio.FileDescr(source=tmp / "napari_unet.safetensors")],
            config={
                "napari_unet": {
                    "checkpoint": "napari_unet.safetensors",
                    "variant": variant,
                    "classes": classes,
                    "normalization": norm,
                }
            },
        )
        tmp_zip = path.with_name(f".{path.name}.part")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
            os.replace(tmp_zip, path)
        finally:
            tmp_zip.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------ import
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
            from .checkpoint import load_model

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


def _axes_ids(tensor: dict[str, Any]) -> list[str]:
    axes = tensor.get("axes")
    if isinstance(axes, str):  # spec 0.4: "bcyx"
        return list(axes)
    short = {"batch": "b", "channel": "c"}
    return [short.get(str(a.get("type")), str(a.get("id"))) for a in axes or []]


class OnnxSegmentationModel(SegmentationModel):
    """A foreign bioimage.io ONNX network behind napari-unet's tiler (CPU, ONNX Runtime).

    The ONNX graph is treated as (N, C_in, H, W) → (N, K, H, W) probabilities; ``forward``
    returns their logarithm as logits, so that the tiler's softmax/sigmoid gives back the
    probabilities. Its receptive field is unknown, so tiling blends (``tile_exact`` False)
    with the halo the package declares (default 32 px).
    """

    name = "onnx"
    size_divisor = 1

    def __init__(
        self,
        session: Any,
        in_channels: int,
        num_classes: int,
        *,
        size_divisor: int,
        halo: int,
        activation: str,
        normalization: dict[str, Any],
        class_names: list[str],
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.session = session
        self.size_divisor = max(1, int(size_divisor))
        self._halo = int(halo)
        self.activation = activation
        self.normalization = normalization
        self.class_names = class_names
        self.config: dict[str, Any] = {}
        self.training_summary = None
        self._receptive_field = int(halo)  # unknown: the declared halo stands in for it
        # the tiler reads the device from the first parameter; ONNX Runtime runs on the CPU
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    @classmethod
    def from_rdf(cls, rdf: dict[str, Any], onnx_bytes: bytes, *, source: Path) -> Any:
        import onnxruntime as ort

        inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{source}: napari-unet imports models with one input tensor")
        in_ids, out_ids = _axes_ids(inputs[0]), _axes_ids(outputs[0])
        if in_ids != ["b", "c", "y", "x"] or out_ids != ["b", "c", "y", "x"]:
            raise ValueError(
                f"{source}: napari-unet imports 2-D models with axes (batch, channel, y, x); "
                f"this one has input {in_ids} and output {out_ids}"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{source}: ONNX Runtime cannot load the weights ({err})") from None
        shape_in = session.get_inputs()[0].shape
        shape_out = session.get_outputs()[0].shape
        c_in, k = shape_in[1], shape_out[1]
        if not isinstance(c_in, int) or not isinstance(k, int):
            raise ValueError(f"{source}: the ONNX graph has no fixed channel count")
        step, halo = 1, 32
        for axis in inputs[0].get("axes") if isinstance(inputs[0].get("axes"), list) else []:
            size = axis.get("size")
            if axis.get("type") == "space" and isinstance(size, dict):
                step = max(step, int(size.get("step") or 1))
        for axis in outputs[0].get("axes") if isinstance(outputs[0].get("axes"), list) else []:
            if axis.get("type") != "space":
                continue
            if axis.get("halo"):
                halo = max(halo, int(axis["halo"]))
            size = axis.get("size")
            if isinstance(size, dict) and size.get("offset"):
                raise ValueError(
                    f"{source}: the output is smaller than the input (offset "
                    f"{size['offset']}); napari-unet imports ONNX models whose output has "
                    "the input's size"
                )
        post = [p.get("id") for p in outputs[0].get("postprocessing") or []]
        activation = "none" if not post else "unsupported"
        if activation == "unsupported":
            raise ValueError(f"{source}: output post-processing {post} is not supported")
        norm: dict[str, Any] = {"method": "none"}
        for p in inputs[0].get("preprocessing") or []:
            if p.get("id") == "scale_range":
                kw = p.get("kwargs") or {}
                norm = {
                    "method": "percentile",
                    "low": float(kw.get("min_percentile", 0.0)),
                    "high": float(kw.get("max_percentile", 100.0)),
                }
            elif p.get("id") not in ("ensure_dtype",):
                raise ValueError(f"{source}: input pre-processing {p.get('id')!r} is not supported")
        names = []
        for axis in outputs[0].get("axes") or []:
            if isinstance(axis, dict) and axis.get("type") == "channel":
                names = [str(n) for n in axis.get("channel_names") or []]
        if len(names) != k:
            names = default_class_names(k)
        model = cls(
            session,
            c_in,
            k,
            size_divisor=step,
            halo=halo,
            activation=activation,
            normalization=norm,
            class_names=names,
        )
        model.checkpoint_path = source
        return model

    @property
    def tile_exact(self) -> bool:
        return False

    def _forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        feed = {self.session.get_inputs()[0].name: x.detach().float().cpu().numpy()}
        probs = torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)
        probs = probs.clamp_min(1e-12)
        if self.num_classes == 1:  # sigmoid⁻¹ so the tiler's sigmoid gives p back
            p = probs.clamp_max(1 - 1e-7)
            return [torch.log(p) - torch.log1p(-p)]
        return [torch.log(probs)]
