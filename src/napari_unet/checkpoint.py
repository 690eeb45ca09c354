"""Save and load models as ``.safetensors`` checkpoints — never pickles.

A checkpoint is one safetensors file: the model's state dict (parameters and
persistent buffers such as BatchNorm running statistics) plus a JSON string under the
metadata key ``"napari_unet"``::

    {"format": "napari-unet/1", "variant": "unet", "in_channels": 1, "num_classes": 2,
     "config": {...}, "normalization": {...}, "classes": [...], "training": {...} | null,
     "extra": {...} | null, "package_version": "...", "torch_version": "..."}

``variant`` + ``in_channels`` + ``num_classes`` + ``config`` rebuild the network with
:func:`napari_unet.models.build_model`; the tensors are then loaded strictly. Nothing
here calls ``torch.load`` or ``pickle``: unpickling can execute arbitrary code, so
pickle-based files (``.pt``, ``.pth``, ``.ckpt``, torch zip archives, raw pickles) are
refused with a clear message.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .models import SegmentationModel, build_model, canonical_name, list_models
from .normalize import DEFAULT_NORMALIZATION, get_normalization
from .postprocess import default_class_names

__all__ = [
    "FORMAT",
    "default_model_path",
    "load_default_model",
    "load_model",
    "read_metadata",
    "save_model",
]

FORMAT = "napari-unet/1"
METADATA_KEY = "napari_unet"
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save (zip-based format since torch 1.6)
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header size (bytes)


# ----------------------------------------------------------------------------- save
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict (parameters + persistent buffers, e.g. BatchNorm ``running_mean``/
    ``running_var``/``num_batches_tracked``) as detached, contiguous, unshared CPU tensors."""
    return {
        key: value.detach().to("cpu").clone().contiguous()
        for key, value in model.state_dict().items()
    }


def _is_checkpoint(path: Path) -> bool:
    """True when ``path`` is a readable napari-unet safetensors checkpoint."""
    try:
        read_metadata(path)
    except (OSError, ValueError):
        return False
    return True


def save_model(
    model: SegmentationModel,
    path: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``; added when the name has no suffix).

    ``training``: a JSON-able summary of how the model was trained (epochs, losses, data
    …); ``extra``: any further JSON-able dict. numpy scalars/arrays and Paths are
    converted. The model must come from :func:`build_model` (it needs ``name`` and
    ``config``). Class names come from ``model.class_names`` or
    :func:`default_class_names`; normalisation from ``model.normalization`` or the default.

    The file is written to a temporary file in the same folder and moved into place
    with ``os.replace``, so an interrupted save never leaves a partial checkpoint. An
    existing napari-unet checkpoint is replaced; any other existing file raises
    ``FileExistsError`` unless ``overwrite=True``. Returns the path written.
    """
    path = Path(path)
    if path.suffix == "":
        path = path.with_name(path.name + SUFFIX)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(
            f"checkpoints are safetensors files; use a '{SUFFIX}' file name, not {path.name!r}"
        )
    try:
        variant = canonical_name(getattr(model, "name", ""))
    except ValueError:
        raise ValueError(
            f"cannot save a model named {getattr(model, 'name', None)!r}: build it with "
            f"napari_unet.models.build_model (known variants: {', '.join(list_models())})"
        ) from None
    classes = list(getattr(model, "class_names", None) or default_class_names(model.num_classes))
    if len(classes) != model.num_classes:
        raise ValueError(
            f"model.class_names has {len(classes)} names but the model has "
            f"{model.num_classes} classes"
        )
    meta = {
        "format": FORMAT,
        "variant": variant,
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "config": dict(model.config),
        "normalization": get_normalization(model),
        "classes": [str(c) for c in classes],
        "training": training,
        "extra": extra,
        "package_version": _package_version(),
        "torch_version": str(torch.__version__),
    }
    try:
        text = json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {err}") from err

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name ending in {SUFFIX}")
    mode = 0o644
    if path.exists():
        if not overwrite and not _is_checkpoint(path):
            raise FileExistsError(
                f"{path} exists and is not a napari-unet checkpoint; refusing to overwrite it "
                "(pass overwrite=True to replace it)"
            )
        mode = path.stat().st_mode & 0o777
    path.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(_state_tensors(model), str(tmp), metadata={METADATA_KEY: text})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _package_version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- load
def _pickle_error(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is a pickle-based file ({why}); napari-unet only loads safetensors "
        "checkpoints because unpickling can execute arbitrary code. If you trust the "
        "file, convert it once outside napari-unet (torch.load(..., weights_only=True) "
        "into a napari-unet model, then checkpoint.save_model)."
    )


def _check_file(path: Path) -> None:
    """Refuse missing, pickle-based and structurally invalid files without parsing them."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path, f"'{path.suffix}' file name")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file: u64 little-endian header length n, then n bytes of JSON "{...".
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(size - 8, _HEADER_LIMIT) and head[8:9] == b"{":
            return
    if head.startswith(_ZIP_MAGIC):
        raise _pickle_error(path, "a zip archive as written by torch.save")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickle_error(path, f"pickle protocol {head[1]}")
    with open(path, "rb") as fh:
        fh.seek(max(size - 1, 0))
        last = fh.read(1)
    hint = " (it ends like a pickle)" if last == b"." else ""
    raise ValueError(
        f"{path} is not a safetensors checkpoint, or it is corrupt/truncated{hint}: "
        f"{'empty file' if size == 0 else 'invalid header'}"
    )


def _open_error(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a valid safetensors file (corrupt or truncated?): {err}")


def _parse_metadata(path: Path, raw: dict[str, str] | None) -> dict[str, Any]:
    if not raw or METADATA_KEY not in raw:
        raise ValueError(
            f"{path} is a safetensors file without napari-unet metadata; it was not written "
            "by napari_unet.checkpoint.save_model"
        )
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: napari-unet metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: napari-unet metadata is not a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ValueError(
            f"{path}: unsupported checkpoint format {fmt!r} (this napari-unet reads {FORMAT!r}; "
            "a newer napari-unet may be needed)"
        )
    missing = [k for k in ("variant", "in_channels", "num_classes", "config") if k not in meta]
    if missing:
        raise ValueError(f"{path}: napari-unet metadata lacks {missing}")
    return meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's napari-unet metadata dict (see the module docstring); no weights
    are read. Raises like :func:`load_model` for missing, pickle or invalid files."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata()
    except Exception as err:  # safetensors raises its own SafetensorError
        raise _open_error(path, err) from err
    return _parse_metadata(path, raw)


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (configs use tuples, e.g. Swin-UNet ``depths``)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> SegmentationModel:
    """Rebuild and load a checkpoint written by :func:`save_model`; eval mode, on ``device``.

    A bioimage.io model package (``.zip`` with an ``rdf.yaml``) is imported with
    :func:`napari_unet.bioimageio.load_bioimageio` (never unpickled).

    The model gets ``normalization`` (dict), ``class_names`` (list[str]),
    ``training_summary`` (dict or None), ``checkpoint_extra`` and ``checkpoint_path``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for pickle-based
    files (refused without being unpickled), non-safetensors/corrupt/truncated files,
    missing metadata, unknown variants or config, and tensors that do not match the
    rebuilt model (naming the first mismatching key).
    """
    path = Path(path)
    if path.suffix.lower() == ".zip":  # a bioimage.io model package
        from .bioimageio import is_bioimageio_package, load_bioimageio

        if is_bioimageio_package(path):
            return load_bioimageio(path, device=device)
    _check_file(path)
    try:
        fh_ctx = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:
        raise _open_error(path, err) from err
    with fh_ctx as fh:
        meta = _parse_metadata(path, fh.metadata())
        variant = meta["variant"]
        try:
            model = build_model(
                str(variant),
                int(meta["in_channels"]),
                int(meta["num_classes"]),
                **_tuples(dict(meta["config"])),
            )
        except (ValueError, TypeError) as err:
            known = ", ".join(list_models())
            raise ValueError(
                f"{path}: cannot rebuild model variant {variant!r} with config "
                f"{meta['config']} ({err}); this napari-unet knows: {known}"
            ) from err
        expected = model.state_dict()
        stored = set(fh.keys())
        missing = [k for k in expected if k not in stored]
        if missing:
            raise ValueError(
                f"{path}: checkpoint lacks tensor {missing[0]!r} needed by the rebuilt "
                f"{model.name} ({len(missing)} missing in total)"
            )
        unexpected = sorted(stored - set(expected))
        if unexpected:
            raise ValueError(
                f"{path}: checkpoint has tensor {unexpected[0]!r} that the rebuilt "
                f"{model.name} does not have ({len(unexpected)} unexpected in total)"
            )
        for key, ref in expected.items():
            shape = tuple(fh.get_slice(key).get_shape())
            if shape != tuple(ref.shape):
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {shape} in the checkpoint but "
                    f"{tuple(ref.shape)} in the rebuilt {model.name} (config {meta['config']})"
                )
        try:
            state = {key: fh.get_tensor(key) for key in expected}
        except Exception as err:
            raise _open_error(path, err) from err
    model.load_state_dict(state, strict=True)
    classes = meta.get("classes") or default_class_names(model.num_classes)
    model.normalization = dict(meta.get("normalization") or DEFAULT_NORMALIZATION)
    model.class_names = [str(c) for c in classes]
    model.training_summary = meta.get("training")
    model.checkpoint_extra = meta.get("extra")
    model.checkpoint_path = path
    return model.to(device).eval()


# -------------------------------------------------------------------------- default
def default_model_path() -> Path:
    """Where the bundled default model lives: ``napari_unet/weights/default.safetensors``
    (the file may be absent in installations without weights)."""
    return Path(str(importlib.resources.files("napari_unet") / "weights" / "default.safetensors"))


def load_default_model(device: str | torch.device = "cpu") -> SegmentationModel:
    """Load the bundled default model; ``FileNotFoundError`` when it is not installed."""
    path = default_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing ({path}); this napari-unet installation "
            "ships without default weights — train a model or load a .safetensors "
            "checkpoint instead"
        )
    return load_model(path, device=device)
