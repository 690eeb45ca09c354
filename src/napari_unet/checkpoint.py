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
import math
import os
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from .inference.normalize import DEFAULT_NORMALIZATION, check_normalization, get_normalization
from .models import SegmentationModel, build_model, canonical_name, list_models
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
    """Write ``model`` to a ``.safetensors`` checkpoint, atomically.

    The file is written to a temporary file in the same folder and moved into place
    with ``os.replace``, so an interrupted save never leaves a partial checkpoint.

    Args:
        model: a network from :func:`build_model` (it needs ``name`` and ``config``); its
            class names come from ``model.class_names`` (else :func:`default_class_names`),
            its normalisation from ``model.normalization`` (else the default).
        path: the file; ``.safetensors`` is added when the name has no suffix.
        training: a JSON-able summary of how the model was trained (epochs, losses,
            data …); numpy scalars/arrays and Paths are converted. Default: the model's
            ``training_summary`` (set by :func:`napari_unet.train`), so a save after
            training keeps its record.
        extra: any further JSON-able dict.
        overwrite: replace any existing file; without it only an existing napari-unet
            checkpoint is replaced and any other file raises ``FileExistsError``.

    Returns:
        The path written.
    """
    path = _checkpoint_path(path)
    text = _metadata_json(model, model.training_summary if training is None else training, extra)
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


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``.safetensors`` added when it has no suffix; other suffixes refused."""
    path = Path(path)
    if path.suffix == "":
        path = path.with_name(path.name + SUFFIX)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(
            f"checkpoints are safetensors files; use a '{SUFFIX}' file name, not {path.name!r}"
        )
    return path


def _metadata_json(
    model: SegmentationModel, training: dict[str, Any] | None, extra: dict[str, Any] | None
) -> str:
    """The ``napari_unet`` metadata string of ``model`` (see the module docstring)."""
    try:
        variant = canonical_name(getattr(model, "name", ""))
    except ValueError:
        raise ValueError(
            f"cannot save a model named {getattr(model, 'name', None)!r}: build it with "
            f"napari_unet.models.build_model (known variants: {', '.join(list_models())})"
        ) from None
    classes = model.class_names
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
        return json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {err}") from err


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
    try:
        st = os.stat(path)  # never open() before knowing it is a regular file (a FIFO blocks)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read checkpoint {path}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{path} is not a regular file (a pipe, socket or device?); refusing to read it"
        )
    size = st.st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file: u64 little-endian header length n, then n bytes of JSON "{...".
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(size - 8, _HEADER_LIMIT) and head[8:9] == b"{":
            return
    if head.startswith(_ZIP_MAGIC):
        if _is_model_package(path):
            raise ValueError(
                f"{path} is a bioimage.io model package, not a checkpoint; load it with "
                "napari_unet.load_model"
            )
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


def _is_model_package(path: Path) -> bool:
    """A zip with an ``rdf.yaml`` / ``bioimageio.yaml`` (names only, nothing unpickled)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return bool({"rdf.yaml", "bioimageio.yaml"} & set(zf.namelist()))
    except (zipfile.BadZipFile, OSError):
        return False


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


_INT_RANGES = {
    "in_channels": (1, 256),
    "num_classes": (1, 1024),
    "base_channels": (1, 1024),
    "depth": (1, 8),
    "embed_dim": (1, 1024),
    "img_size": (8, 8192),
    "window_size": (1, 64),
    "patch_size": (1, 64),
}
_INT_LIST_RANGES = {"depths": (0, 32), "num_heads": (1, 128)}
_FLOAT_RANGES = {"width": (1e-3, 16.0), "drop_path_rate": (0.0, 1.0)}
_MAX_CHANNELS = 1 << 16
"""Widest layer (base_channels · 2^depth) a checkpoint config may ask for."""
_FLOAT_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_config(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Types and ranges of the rebuild recipe, before anything is built."""
    config = meta["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{path}: napari-unet metadata 'config' is not a JSON object")
    if not isinstance(meta["variant"], str):
        raise ValueError(f"{path}: napari-unet metadata 'variant' is not a name")
    values = {"in_channels": meta["in_channels"], "num_classes": meta["num_classes"], **config}
    for key, value in values.items():
        if key in _INT_RANGES:
            lo, hi = _INT_RANGES[key]
            if not _is_int(value) or not lo <= value <= hi:
                raise ValueError(
                    f"{path}: checkpoint config {key}={value!r} is not an integer in {lo}..{hi}"
                )
        elif key in _INT_LIST_RANGES:
            lo, hi = _INT_LIST_RANGES[key]
            if (
                not isinstance(value, list)
                or not 1 <= len(value) <= 8
                or not all(_is_int(v) and lo <= v <= hi for v in value)
            ):
                raise ValueError(
                    f"{path}: checkpoint config {key}={value!r} is not a list of 1..8 "
                    f"integers in {lo}..{hi}"
                )
        elif key in _FLOAT_RANGES:
            lo, hi = _FLOAT_RANGES[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(
                    f"{path}: checkpoint config {key}={value!r} is not a number in {lo}..{hi}"
                )
        elif isinstance(value, (dict, list)) or (isinstance(value, str) and len(value) > 64):
            raise ValueError(f"{path}: checkpoint config {key}={value!r} is not a setting")
    base, depth = config.get("base_channels", 64), config.get("depth", 4)
    if _is_int(base) and _is_int(depth) and base * 2**depth > _MAX_CHANNELS:
        raise ValueError(
            f"{path}: checkpoint config base_channels={base}, depth={depth} asks for "
            f"{base * 2**depth} channels in the deepest layer (at most {_MAX_CHANNELS})"
        )
    norm = meta.get("normalization")
    if norm is not None:
        try:
            check_normalization(norm)
        except ValueError as err:
            raise ValueError(f"{path}: checkpoint {err}") from None
    classes = meta.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or len(classes) != meta["num_classes"]
        or not all(isinstance(c, str) and len(c) <= 200 for c in classes)
    ):
        raise ValueError(
            f"{path}: checkpoint 'classes' must be {meta['num_classes']} class names, "
            f"got {str(classes)[:80]}"
        )
    return config


class _LargeOnMeta(TorchFunctionMode):
    """Puts every large tensor a constructor creates on the ``meta`` device (no memory),
    small ones stay real (some constructors compute with them, e.g. ``linspace(...).tolist()``)."""

    LIMIT = 1 << 16
    FACTORIES = frozenset(
        {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and args:
            size = args[0] if isinstance(args[0], (tuple, list, torch.Size)) else args
            if func is torch.full:
                size = args[0]
            try:
                n = math.prod(int(v) for v in size)
            except (TypeError, ValueError):
                n = 0
            if n > self.LIMIT:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build(path: Path, meta: dict[str, Any], *, on_meta: bool) -> SegmentationModel:
    variant = meta["variant"]
    try:
        if on_meta:
            with _LargeOnMeta():
                return build_model(
                    variant, meta["in_channels"], meta["num_classes"],
                    **_tuples(dict(meta["config"])),
                )  # fmt: skip
        return build_model(
            variant, meta["in_channels"], meta["num_classes"], **_tuples(dict(meta["config"]))
        )
    except (ValueError, TypeError, RuntimeError, NotImplementedError, OverflowError) as err:
        known = ", ".join(list_models())
        raise ValueError(
            f"{path}: cannot rebuild model variant {variant!r} with config "
            f"{meta['config']} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            f"; this napari-unet knows: {known}"
        ) from None


def _check_tensors(path: Path, fh: Any, skeleton: SegmentationModel, config: Any) -> None:
    """Every tensor's name, shape and dtype in the file header against the model."""
    expected = skeleton.state_dict()
    stored = set(fh.keys())
    missing = [k for k in expected if k not in stored]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks tensor {missing[0]!r} needed by the rebuilt "
            f"{skeleton.name} ({len(missing)} missing in total)"
        )
    unexpected = sorted(stored - set(expected))
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has tensor {unexpected[0]!r} that the rebuilt "
            f"{skeleton.name} does not have ({len(unexpected)} unexpected in total)"
        )
    for key, ref in expected.items():
        sl = fh.get_slice(key)
        shape = tuple(sl.get_shape())
        if shape != tuple(ref.shape):
            raise ValueError(
                f"{path}: tensor {key!r} has shape {shape} in the checkpoint but "
                f"{tuple(ref.shape)} in the rebuilt {skeleton.name} (config {config})"
            )
        dtype = str(sl.get_dtype()).upper()
        want = _DTYPE_NAMES.get(ref.dtype, str(ref.dtype))
        if ref.dtype.is_floating_point:
            if dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{path}: tensor {key!r} holds {dtype} values; weights must be floating "
                    f"point ({want}) — the checkpoint is corrupt or not a napari-unet model"
                )
        elif dtype != want:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {dtype} in the checkpoint but {want} in "
                f"the rebuilt {skeleton.name}"
            )


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> SegmentationModel:
    """Rebuild and load a checkpoint written by :func:`save_model`; eval mode, on ``device``.

    Checkpoints only: :func:`napari_unet.load_model` (:mod:`napari_unet.loader`) also
    imports bioimage.io model packages (``.zip``).

    Everything is checked before memory is committed: the file must be a regular file
    (a pipe or a device is refused without being opened), the metadata's types and
    ranges (variant, channels, classes, config, normalisation, class names); the model
    is first built with its large tensors on the ``meta`` device and every tensor's
    name, shape and dtype in the file header is compared with it; only then is the model
    built and the tensors read, each of which must be finite floating point (integer
    buffers such as BatchNorm's counter excepted).

    Args:
        path: the ``.safetensors`` file.
        device: where the model goes (``"cpu"``, ``"cuda"`` or a torch device).

    Returns:
        The model, with ``normalization`` (dict), ``class_names`` (list[str]),
        ``training_summary`` (dict or None), ``checkpoint_extra`` and ``checkpoint_path``.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: everything else: pickle-based files (refused without being
            unpickled), non-safetensors / corrupt / truncated files, missing or invalid
            metadata, unknown variants or config, and tensors that do not match the model
            (naming the first mismatching key).
    """
    path = Path(path)
    _check_file(path)
    try:
        fh_ctx = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:
        raise _open_error(path, err) from err
    with fh_ctx as fh:
        meta = _parse_metadata(path, fh.metadata())
        config = _check_config(path, meta)
        _check_tensors(path, fh, _build(path, meta, on_meta=True), config)
        model = _build(path, meta, on_meta=False)
        state = {}
        for key, ref in model.state_dict().items():
            try:
                tensor = fh.get_tensor(key)
            except Exception as err:
                raise _open_error(path, err) from err
            if ref.dtype.is_floating_point:
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(
                        f"{path}: tensor {key!r} holds NaN or infinite values; the checkpoint "
                        "is corrupt (or its training diverged)"
                    )
                tensor = tensor.to(ref.dtype)
            state[key] = tensor
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
