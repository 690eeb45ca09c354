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
in this package, inside the functions: ``pip install "napari-unet[bioimageio]"``.

Modules: :mod:`.export` (the files and the zip), :mod:`.spec` (the model description),
:mod:`.net` (:class:`ProbabilityNet`, named by the packages' ``pytorch_state_dict``
architecture as ``napari_unet.bioimageio.ProbabilityNet``), :mod:`.load` (import) and
:mod:`.onnx_model` (:class:`OnnxSegmentationModel`).
"""

from __future__ import annotations

from .export import export_bioimageio
from .load import MAX_PACKAGE_BYTES, is_bioimageio_package, load_bioimageio
from .net import ProbabilityNet
from .onnx_model import OnnxSegmentationModel

__all__ = [
    "MAX_PACKAGE_BYTES",
    "OnnxSegmentationModel",
    "ProbabilityNet",
    "export_bioimageio",
    "is_bioimageio_package",
    "load_bioimageio",
]
