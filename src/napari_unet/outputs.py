"""Write safety: the one place that decides whether, where and how an output is written.

Every output path of the package goes through here — the CLI's labels / probabilities
(TIFF or zarr) and checkpoints, ``predict(..., out=...)``, the distributed store and the
demo's folder:

* **before any computation** (:func:`plan_outputs`): the format is known from the name;
  an output is never an input, never contains an input and is never inside one (paths are
  resolved through symbolic links; a path inside a zarr store such as ``proj.zarr/raw``
  stands for the whole store); two outputs never share a path; an existing output is
  refused without ``overwrite``, and with it only when it is of the same kind (a file for
  a ``.tif``, a zarr folder for a ``.zarr``, never a symbolic link to a store); the folder
  exists and a file can be created in it (read-only folders are found here);
* **while writing** (:class:`Target`): data goes to a uniquely named partial path beside
  the output (``.NAME.<random>.part``) and is moved into place only when complete
  (:func:`commit_all`), so an existing output is untouched until then; on any failure —
  disk full, read-only, cancel, Ctrl-C — :func:`writing` removes every partial path.

Errors are :class:`OutputError` (a ``ValueError``) with one line naming the problem.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OutputError",
    "OutputExistsError",
    "Target",
    "commit_all",
    "fresh_folder",
    "input_location",
    "is_zarr",
    "plan_output",
    "plan_outputs",
    "write_data",
    "writing",
]

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr", ".zr")
CHECKPOINT_SUFFIXES = (".safetensors",)
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


class OutputError(ValueError):
    """An output that cannot or must not be written (one line, names the problem)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` was not given (also a ``FileExistsError``)."""


def is_zarr(path: str | os.PathLike[str]) -> bool:
    return str(path).rstrip("/").lower().endswith(ZARR_SUFFIXES)


def _kind_of_name(path: Path) -> str | None:
    name = str(path).rstrip("/").lower()
    if name.endswith(ZARR_SUFFIXES):
        return "zarr"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(CHECKPOINT_SUFFIXES):
        return "safetensors"
    return None


def _resolve(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _store_root(path: Path) -> Path:
    """The outermost zarr store containing ``path`` (itself included), else ``path``."""
    root = path
    for parent in [path, *path.parents]:
        if is_zarr(parent.name) or any((parent / m).exists() for m in _ZARR_MARKERS):
            if parent.is_dir() or is_zarr(parent.name):
                root = parent
    return root


def input_location(obj: Any) -> Path | None:
    """The resolved file-system location an input occupies (a whole zarr store for a path
    inside one, or for a zarr array), or None for in-memory data (numpy, dask)."""
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        text = os.fspath(obj)
        if "://" in text:
            return None
        return _store_root(_resolve(Path(text)))
    store = getattr(obj, "store", None)
    root = getattr(store, "root", None) or getattr(store, "path", None)
    if isinstance(root, (str, os.PathLike)) and "://" not in os.fspath(root):
        return _store_root(_resolve(Path(os.fspath(root))))
    filename = getattr(obj, "filename", None) or getattr(obj, "napari_unet_source", None)
    if isinstance(filename, (str, os.PathLike)):
        return _store_root(_resolve(Path(os.fspath(filename))))
    return None


def _overlaps(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    try:  # another name for the same file (a hard link, a bind mount)
        if os.path.samefile(a, b):
            return "is"
    except OSError:
        pass
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "contains"
    return None


@dataclass
class Target:
    """One planned output: its final path, its kind and its partial path while written."""

    path: Path
    kind: str  # "tiff", "zarr" or "safetensors"
    overwrite: bool = False
    partial: Path | None = None
    _old: list[Path] = field(default_factory=list)

    def begin(self) -> Path:
        """A new, unique partial path beside the output (created empty for a zarr store)."""
        if self.partial is None:
            tag = uuid.uuid4().hex[:8]
            suffix = self.path.suffix if self.kind == "zarr" else ""
            self.partial = self.path.with_name(f".{self.path.name}.{tag}.part{suffix}")
        return self.partial

    def abort(self) -> None:
        """Remove the partial output (nothing else)."""
        if self.partial is not None:
            _remove(self.partial)
            self.partial = None

    def commit(self) -> Path:
        """Move the complete partial output into place (replacing an existing output
        of the same kind, checked again here)."""
        if self.partial is None or not os.path.lexists(self.partial):
            raise OutputError(f"{self.path}: nothing was written")
        if os.path.lexists(self.path):
            if not self.overwrite:
                raise OutputExistsError(
                    f"{self.path} appeared while computing; choose another name or pass --overwrite"
                )
            _check_kind(self.path, self.kind)
            if self.partial.is_dir() or self.path.is_dir():
                old = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.old")
                os.replace(self.path, old)
                self._old.append(old)
        try:
            os.replace(self.partial, self.path)
        except BaseException:
            for old in self._old:  # put the earlier output back
                os.replace(old, self.path)
            self._old.clear()
            raise
        self.partial = None
        for old in self._old:
            _remove(old)
        self._old.clear()
        return self.path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _check_kind(path: Path, kind: str) -> None:
    """An existing ``path`` may be replaced only by an output of the same kind."""
    if kind == "zarr":
        if path.is_symlink():
            raise OutputError(
                f"{path} is a symbolic link; refusing to replace what it points to — "
                "remove the link or choose another name"
            )
        if not path.is_dir():
            raise OutputError(
                f"{path} exists and is a file, not a zarr store; refusing to replace it"
            )
        if not any((path / m).exists() for m in _ZARR_MARKERS) and any(path.iterdir()):
            raise OutputError(
                f"{path} exists and is a folder that is not a zarr store; refusing to replace it"
            )
    else:
        if path.is_dir():
            raise OutputError(
                f"{path} exists and is a folder, not a {kind} file; refusing to replace it"
            )
        if path.exists() and not path.is_file():
            raise OutputError(f"{path} exists and is not a regular file; refusing to replace it")


def _check_folder(folder: Path, what: Path) -> None:
    if not folder.exists():
        raise OutputError(f"cannot write {what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what}: {folder} is not a folder")
    try:  # the only reliable test (ACLs, read-only mounts, quotas of zero)
        fd, probe = tempfile.mkstemp(prefix=f".{what.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        raise OutputError(
            f"cannot write {what}: folder {folder} is not writable ({err.strerror})"
        ) from None
    try:
        os.close(fd)
    finally:
        os.unlink(probe)


def plan_output(
    path: str | os.PathLike[str],
    kinds: Sequence[str] = ("tiff", "zarr"),
    *,
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
    others: Iterable[Target] = (),
    what: str = "output",
    kind: str | None = None,
    resume: bool = False,
) -> Target:
    """Check one output before anything is computed (see the module docstring).
    ``kind`` forces the kind instead of reading it from the name's suffix; ``resume``
    accepts an existing zarr folder without ``overwrite`` (the distributed store, which
    a rerun continues and which checks its own contents)."""
    raw = Path(os.fspath(path))
    kind = kind or _kind_of_name(raw)
    if kind not in kinds:
        names = {"tiff": ".tif", "zarr": ".zarr", "safetensors": ".safetensors"}
        allowed = " or ".join(names.get(k, k) for k in kinds)
        raise OutputError(f"{raw}: unsupported {what} format; use a {allowed} name")
    real = _resolve(raw)
    for inp in inputs:
        loc = input_location(inp)
        if loc is None:
            continue
        rel = _overlaps(real, loc)
        if rel is not None:
            shown = raw if Path(os.path.abspath(raw)) == real else f"{raw} (→ {real})"
            source = loc
            if isinstance(inp, (str, os.PathLike)) and _resolve(Path(os.fspath(inp))) != loc:
                source = f"{loc} (the store of {os.fspath(inp)})"
            raise OutputError(
                f"{what} {shown} {rel} the input {source}; an output must never be, contain "
                "or be inside an input — choose another name"
            )
    for other in others:
        rel = _overlaps(real, _resolve(other.path))
        if rel is not None:
            raise OutputError(
                f"{what} {raw} {rel} another output ({other.path}); give each output its own name"
            )
    if os.path.lexists(raw) and resume and not overwrite:
        if not raw.is_dir():
            raise OutputError(f"{raw} exists and is not a zarr store (not a folder)")
    elif os.path.lexists(raw):
        if not overwrite:
            raise OutputExistsError(f"{raw} exists; choose another name or pass --overwrite")
        _check_kind(raw, kind)
    _check_folder(real.parent, raw)
    return Target(raw, kind, overwrite)


def plan_outputs(
    outputs: Sequence[tuple[str | os.PathLike[str] | None, Sequence[str], str]],
    *,
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
) -> list[Target | None]:
    """:func:`plan_output` for several outputs ``(path or None, kinds, what)`` that must
    not overlap each other either."""
    inputs = list(inputs)
    planned: list[Target] = []
    result: list[Target | None] = []
    for path, kinds, what in outputs:
        if path is None:
            result.append(None)
            continue
        target = plan_output(
            path, kinds, overwrite=overwrite, inputs=inputs, others=planned, what=what
        )
        planned.append(target)
        result.append(target)
    return result


@contextmanager
def writing(targets: Iterable[Target | None]) -> Iterator[list[Target]]:
    """Remove every partial output when the block fails (any exception, Ctrl-C)."""
    live = [t for t in targets if t is not None]
    try:
        yield live
    except BaseException:
        for t in live:
            t.abort()
        raise


def commit_all(targets: Iterable[Target | None]) -> list[Path]:
    return [t.commit() for t in targets if t is not None]


def describe_os_error(err: OSError, path: Any = None) -> str:
    """One line for a failed write: 'cannot write PATH: No space left on device'."""
    where = path or err.filename or "output"
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (partial output removed)"
    return f"cannot write {where}: {reason}"


def write_data(target: Target, data: Any) -> Path:
    """Write an array to the target's partial path (TIFF zlib-compressed, or a zarr
    array); :meth:`Target.commit` moves it into place."""
    tmp = target.begin()
    try:
        if target.kind == "zarr":
            import zarr

            arr = zarr.create_array(
                store=str(tmp), shape=data.shape, dtype=data.dtype, chunks="auto"
            )
            arr[...] = np.asarray(data)
        elif target.kind == "tiff":
            import tifffile

            arr = np.asarray(data)
            tifffile.imwrite(
                tmp, arr, compression="zlib", bigtiff=arr.nbytes > 2**31, photometric="minisblack"
            )  # minisblack: 3 classes are not an RGB image
        else:  # pragma: no cover - checkpoints are written by checkpoint.save_model
            raise OutputError(f"{target.path}: cannot write {target.kind} data here")
    except OSError as err:
        target.abort()
        raise OutputError(describe_os_error(err, target.path)) from None
    except BaseException:
        target.abort()
        raise
    return tmp


def fresh_folder(folder: str | os.PathLike[str], names: Sequence[str]) -> Path:
    """``folder`` when none of ``names`` exist in it, else the first ``folder-2``,
    ``folder-3``, … without them (an earlier run's results are never overwritten)."""
    base = Path(os.fspath(folder))
    candidate, n = base, 1
    while candidate.exists() and (
        not candidate.is_dir() or any(os.path.lexists(candidate / name) for name in names)
    ):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
