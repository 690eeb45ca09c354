"""The bioimage.io model description (spec 0.5) of a napari-unet model.

:func:`model_descr` describes the files :mod:`.export` wrote into a folder: the test tensors,
the cover, the documentation, the ONNX and ``pytorch_state_dict`` weights and the attached
napari-unet checkpoint. ``bioimageio.spec`` is imported inside the functions only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models.base import SegmentationModel

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


def _identifier(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return out or "model"


def _inputs(bio: Any, model: SegmentationModel, folder: Path, norm: dict[str, Any]) -> list:
    """The one input tensor: (batch, channel, y, x), any size on the network's grid, with
    the model's percentile normalisation as ``scale_range``."""
    info = model.info
    div = int(info.size_divisor)
    min_out = max(div, 16)
    in_min = model.valid_input_size(min_out) if info.border else min_out  # type: ignore[attr-defined]
    space = [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=in_min, step=div))
        for a in ("y", "x")
    ]
    channels = [bio.Identifier(f"channel{i}") for i in range(model.in_channels)]
    in_axes = [bio.BatchAxis(), bio.ChannelAxis(channel_names=channels), *space]
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
    return [
        bio.InputTensorDescr(
            id=bio.TensorId("input"),
            axes=in_axes,
            test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
            preprocessing=pre,
            description="raw image, any intensity range",
        )
    ]


def _outputs(bio: Any, model: SegmentationModel, folder: Path, classes: list[str]) -> list:
    """The probabilities: (batch, class, y, x), the input's size less the valid border."""
    border = model.info.border

    def out_axis(axis: str) -> Any:
        ref = bio.SizeReference(
            tensor_id=bio.TensorId("input"), axis_id=bio.AxisId(axis), offset=-2 * border
        )
        return bio.SpaceOutputAxis(id=bio.AxisId(axis), size=ref)

    channels = [bio.Identifier(_identifier(c)) for c in classes]
    return [
        bio.OutputTensorDescr(
            id=bio.TensorId("probabilities"),
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=channels)]
            + [out_axis("y"), out_axis("x")],
            test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            description="probability per class: " + ", ".join(classes),
        )
    ]


def _weights(bio: Any, model: SegmentationModel, folder: Path) -> Any:
    """ONNX, and a ``pytorch_state_dict`` whose architecture is :class:`ProbabilityNet`."""
    return bio.WeightsDescr(
        onnx=bio.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=18),
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt",
            architecture=bio.ArchitectureFromLibraryDescr(
                callable=bio.Identifier("ProbabilityNet"),
                import_from="napari_unet.bioimageio",
                kwargs={
                    "variant": model.name,
                    "in_channels": int(model.in_channels),
                    "num_classes": int(model.num_classes),
                    "config": json.loads(json.dumps(dict(model.config))),
                },
            ),
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        ),
    )


def model_descr(
    model: SegmentationModel,
    folder: Path,
    *,
    name: str,
    description: str | None,
    authors: list[str] | None,
    license: str,
    classes: list[str],
    norm: dict[str, Any],
) -> Any:
    """The ``bioimageio.spec`` v0.5 ``ModelDescr`` of ``model`` and the files in ``folder``.

    Args:
        model: the napari-unet network.
        folder: where :func:`napari_unet.bioimageio.export.write_files` put the files.
        name, description, authors, license: as :func:`export_bioimageio`.
        classes: the K class names (the output channels).
        norm: the model's normalisation dict (``percentile`` or ``none``).

    Returns:
        A ``bioimageio.spec.model.v0_5.ModelDescr``.
    """
    from bioimageio.spec.model import v0_5 as bio

    variant = model.name
    cite_text, doi = _CITATIONS.get(variant, _CITATIONS["unet"])
    return bio.ModelDescr(
        name=name,
        description=description
        or f"{variant} for 2-D segmentation ({', '.join(classes)}), made with napari-unet.",
        authors=[bio.Author(name=a) for a in (authors or ["napari-unet user"])],
        cite=[bio.CiteEntry(text=cite_text, doi=bio.Doi(doi))],
        license=bio.LicenseId(license),
        documentation=bio.FileDescr(source=folder / "README.md"),
        covers=[bio.FileDescr(source=folder / "cover.png")],
        tags=["napari-unet", variant, "segmentation", "2d"],
        inputs=_inputs(bio, model, folder, norm),
        outputs=_outputs(bio, model, folder, classes),
        weights=_weights(bio, model, folder),
        attachments=[bio.FileDescr(source=folder / "napari_unet.safetensors")],
        config={
            "napari_unet": {
                "checkpoint": "napari_unet.safetensors",
                "variant": variant,
                "classes": classes,
                "normalization": norm,
            }
        },
    )
