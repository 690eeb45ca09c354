"""Foreign bioimage.io ONNX networks behind napari-unet's tiler (CPU, ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.base import SegmentationModel
from ..postprocess import default_class_names


def _axes_ids(tensor: dict[str, Any]) -> list[str]:
    axes = tensor.get("axes")
    if isinstance(axes, str):  # spec 0.4: "bcyx"
        return list(axes)
    short = {"batch": "b", "channel": "c"}
    return [short.get(str(a.get("type")), str(a.get("id"))) for a in axes or []]


def _axes_list(tensor: dict[str, Any]) -> list[Any]:
    axes = tensor.get("axes")
    return axes if isinstance(axes, list) else []


def _session(onnx_bytes: bytes, source: Path) -> tuple[Any, int, int]:
    """(ONNX Runtime session on the CPU, input channels, output channels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{source}: ONNX Runtime cannot load the weights ({err})") from None
    c_in, k = session.get_inputs()[0].shape[1], session.get_outputs()[0].shape[1]
    if not isinstance(c_in, int) or not isinstance(k, int):
        raise ValueError(f"{source}: the ONNX graph has no fixed channel count")
    return session, c_in, k


def _grid(inputs: list[Any], outputs: list[Any], source: Path) -> tuple[int, int]:
    """(size step, halo in pixels) the package declares (halo at least 32)."""
    step, halo = 1, 32
    for axis in _axes_list(inputs[0]):
        size = axis.get("size")
        if axis.get("type") == "space" and isinstance(size, dict):
            step = max(step, int(size.get("step") or 1))
    for axis in _axes_list(outputs[0]):
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
    return step, halo


def _normalization(inputs: list[Any], source: Path) -> dict[str, Any]:
    """The input pre-processing as a napari-unet normalisation dict."""
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
    return norm


def _class_names(outputs: list[Any], k: int) -> list[str]:
    names: list[str] = []
    for axis in outputs[0].get("axes") or []:
        if isinstance(axis, dict) and axis.get("type") == "channel":
            names = [str(n) for n in axis.get("channel_names") or []]
    return names if len(names) == k else default_class_names(k)


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
        """The model of a package's ``rdf.yaml`` (a dict) and its ONNX weights (bytes).

        Raises:
            ValueError: not one 2-D (batch, channel, y, x) input and output of equal size,
            unsupported pre-/post-processing, or weights ONNX Runtime cannot load.
        """
        inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{source}: napari-unet imports models with one input tensor")
        in_ids, out_ids = _axes_ids(inputs[0]), _axes_ids(outputs[0])
        if in_ids != ["b", "c", "y", "x"] or out_ids != ["b", "c", "y", "x"]:
            raise ValueError(
                f"{source}: napari-unet imports 2-D models with axes (batch, channel, y, x); "
                f"this one has input {in_ids} and output {out_ids}"
            )
        session, c_in, k = _session(onnx_bytes, source)
        step, halo = _grid(inputs, outputs, source)
        post = [p.get("id") for p in outputs[0].get("postprocessing") or []]
        if post:
            raise ValueError(f"{source}: output post-processing {post} is not supported")
        model = cls(
            session, c_in, k, size_divisor=step, halo=halo, activation="none",
            normalization=_normalization(inputs, source), class_names=_class_names(outputs, k),
        )  # fmt: skip
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
