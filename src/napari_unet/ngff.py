"""OME-Zarr (OME-NGFF) metadata: read axes and scale, write images and NGFF labels.

Reading understands NGFF 0.4 (``multiscales`` in the group attributes, zarr v2) and 0.5
(the same under ``ome``, zarr v3). Writing produces NGFF 0.4 on zarr format 2, which every
current reader opens (ome-zarr-py, napari-ome-zarr, Fiji/MoBIE, QuPath): a one-level
multiscale group whose ``coordinateTransformations`` are the source's (scale and
translation of its full-resolution level).

Layout of the outputs (the same for one process and for ``--dask``):

- a new OME-Zarr ``out.zarr``: an NGFF image whose full resolution ``out.zarr/0`` holds
  the labels (the image's axes minus its channel axis) with the image's scale and
  translation;
- into an existing image (``--labels-into-image``): ``image.zarr/labels/<name>/0`` with
  ``image-label`` metadata, listed in ``image.zarr/labels`` attributes. Nothing else in
  the image's store is touched and an existing label image is never replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NGFF_VERSION = "0.4"
SPACE_UNITS = {"z": "micrometer", "y": "micrometer", "x": "micrometer"}


@dataclass(frozen=True)
class NgffAxes:
    """Axes and coordinate transformations of an OME-Zarr image's full resolution.

    ``axes``: letters in TCZYX order as stored (e.g. ``"CZYX"``); ``scale`` and
    ``translation``: one float per axis (physical units per pixel, offset); ``units``:
    the unit of each axis that has one.
    """

    axes: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    units: dict[str, str] = field(default_factory=dict)
    version: str = NGFF_VERSION

    def spatial(self, letters: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(scale, translation) restricted to ``letters`` (e.g. ``"ZYX"``), in that order."""
        idx = [self.axes.index(a) for a in letters if a in self.axes]
        return tuple(self.scale[i] for i in idx), tuple(self.translation[i] for i in idx)


def multiscales_of(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``multiscales`` list of NGFF 0.4 or 0.5 group attributes, else None."""
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _compose(transforms: Any, ndim: int) -> tuple[list[float], list[float]]:
    scale, trans = [1.0] * ndim, [0.0] * ndim
    for t in transforms or []:
        if not isinstance(t, dict):
            continue
        values = t.get(t.get("type", ""))
        if not isinstance(values, list) or len(values) != ndim:
            continue
        if t.get("type") == "scale":
            scale = [s * float(v) for s, v in zip(scale, values)]
            trans = [o * float(v) for o, v in zip(trans, values)]
        elif t.get("type") == "translation":
            trans = [o + float(v) for o, v in zip(trans, values)]
    return scale, trans


def read_axes(attrs: dict[str, Any], ndim: int) -> tuple[str, NgffAxes] | None:
    """(dataset path, axes) of the full resolution described by NGFF group attributes.

    Returns None when the attributes are not NGFF multiscales or their axes are not a
    subset of T, C, Z, Y, X (then the caller treats the group as plain zarr).
    """
    ms = multiscales_of(attrs)
    if ms is None:
        return None
    first = ms[0]
    datasets = first.get("datasets") or []
    if not datasets or not isinstance(datasets[0], dict) or "path" not in datasets[0]:
        return None
    raw_axes = first.get("axes") or []
    names = [str(a.get("name", "") if isinstance(a, dict) else a) for a in raw_axes]
    letters = "".join(n[:1].upper() for n in names)
    if len(letters) != ndim or not set(letters) <= set("TCZYX") or len(set(letters)) != ndim:
        return None
    units = {
        letters[i]: str(a["unit"])
        for i, a in enumerate(raw_axes)
        if isinstance(a, dict) and a.get("unit")
    }
    scale, trans = _compose(datasets[0].get("coordinateTransformations"), ndim)
    outer_s, outer_t = _compose(first.get("coordinateTransformations"), ndim)
    scale = [s * o for s, o in zip(scale, outer_s)]
    trans = [t * o + u for t, o, u in zip(trans, outer_s, outer_t)]
    version = str(first.get("version") or (attrs.get("ome") or {}).get("version") or "0.4")
    axes = NgffAxes(letters, tuple(scale), tuple(trans), units, version)
    return str(datasets[0]["path"]), axes


def _axes_json(letters: str, units: dict[str, str]) -> list[dict[str, str]]:
    kinds = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
    out = []
    for a in letters:
        entry = {"name": a.lower(), "type": kinds[a]}
        if a in units:
            entry["unit"] = units[a]
        out.append(entry)
    return out


def multiscales_attrs(
    letters: str,
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    *,
    units: dict[str, str] | None = None,
    name: str = "",
    dataset: str = "0",
) -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` attributes of a one-level image at path ``dataset``."""
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if any(translation):
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    return {
        "multiscales": [
            {
                "version": NGFF_VERSION,
                "name": name,
                "axes": _axes_json(letters, units or {}),
                "datasets": [{"path": dataset, "coordinateTransformations": transforms}],
            }
        ]
    }


def create_image(
    path: str | os.PathLike[str],
    shape: tuple[int, ...],
    dtype: Any,
    letters: str,
    *,
    scale: tuple[float, ...] | None = None,
    translation: tuple[float, ...] | None = None,
    units: dict[str, str] | None = None,
    chunks: tuple[int, ...] | None = None,
    name: str = "",
    label: bool = False,
    extra_attrs: dict[str, Any] | None = None,
    dataset: str = "0",
) -> Any:
    """Create a new OME-Zarr image group at ``path`` (which must not exist or be an empty
    folder) and return its full-resolution zarr array (``path/<dataset>``) for the caller
    to fill (lazily, chunk by chunk).

    Args:
        path: folder of the new group.
        shape: array shape, one entry per letter of ``letters``.
        dtype: numpy dtype (integer for labels).
        letters: axes, a subsequence of ``"TCZYX"``.
        scale, translation: physical size / offset per axis (default 1 / 0).
        units: units per axis letter (e.g. ``{"Y": "micrometer"}``).
        chunks: chunk shape (default: 1 along T/C/Z, 1024 along Y/X).
        name: the multiscale's name.
        label: add ``image-label`` metadata (an NGFF label image).
        extra_attrs: more group attributes.
        dataset: path of the full-resolution array inside the group.

    Returns:
        The writable ``zarr.Array`` of the full resolution.
    """
    import zarr

    ndim = len(letters)
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} does not match axes {letters!r}")
    scale = tuple(scale or (1.0,) * ndim)
    translation = tuple(translation or (0.0,) * ndim)
    if chunks is None:
        chunks = tuple(min(1024, s) if a in "YX" else 1 for a, s in zip(letters, shape))
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists; an OME-Zarr output is never written over data")
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    attrs = multiscales_attrs(letters, scale, translation, units=units, name=name, dataset=dataset)
    if label:
        attrs["image-label"] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    attrs.update(extra_attrs or {})
    group.attrs.update(attrs)
    return group.create_array(dataset, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)


def labels_axes(
    letters: str, source: NgffAxes | None
) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, str]]:
    """(scale, translation, units) for a label image with axes ``letters`` (no C) made from
    an image described by ``source`` (identity when the image has no NGFF metadata)."""
    if source is None:
        return (1.0,) * len(letters), (0.0,) * len(letters), {}
    scale, translation = source.spatial(letters)
    if len(scale) != len(letters):
        return (1.0,) * len(letters), (0.0,) * len(letters), {}
    units = {a: u for a, u in source.units.items() if a in letters}
    return scale, translation, units


def add_labels_metadata(
    store: str | os.PathLike[str], letters: str, source: NgffAxes | None
) -> None:
    """Make a results store (``labels`` array inside, as ``--dask`` writes it) an NGFF
    image whose full resolution is ``labels``, with the source image's scale."""
    import zarr

    group = zarr.open_group(str(store), mode="a")
    scale, translation, units = labels_axes(letters, source)
    attrs = multiscales_attrs(
        letters, scale, translation, units=units, name="labels", dataset="labels"
    )
    if group.metadata.zarr_format == 3:  # NGFF 0.5: the same under "ome", no per-item version
        ms = attrs["multiscales"]
        for item in ms:
            item.pop("version", None)
        attrs = {"ome": {"version": "0.5", "multiscales": ms}}
    group.attrs.update(attrs)


def create_labels(
    image_root: str | os.PathLike[str],
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    letters: str,
    *,
    scale: tuple[float, ...] | None = None,
    translation: tuple[float, ...] | None = None,
    units: dict[str, str] | None = None,
    chunks: tuple[int, ...] | None = None,
) -> Any:
    """Add an NGFF label image ``image_root/labels/<name>`` and return its zarr array.

    Only the ``labels`` group (its ``labels`` list gains ``name``) and the new label image
    are written; an existing label image of that name is never replaced.
    """
    import zarr

    root = Path(image_root)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"label image name {name!r} is not a plain name")
    labels = zarr.open_group(str(root / "labels"), mode="a", zarr_format=2)
    listed = list(labels.attrs.get("labels", []))
    if name in listed or name in labels:
        raise FileExistsError(f"{root}/labels/{name} exists; choose another name")
    try:
        array = create_image(
            root / "labels" / name,
            shape,
            dtype,
            letters,
            scale=scale,
            translation=translation,
            units=units,
            chunks=chunks,
            name=name,
            label=True,
        )
        labels.attrs["labels"] = [*listed, name]
    except BaseException:
        remove_labels(root, name, listed)
        raise
    return array


def remove_labels(image_root: str | os.PathLike[str], name: str, listed: list[str]) -> None:
    """Undo :func:`create_labels`: remove ``labels/<name>`` and restore the list."""
    import shutil

    import zarr

    root = Path(image_root)
    shutil.rmtree(root / "labels" / name, ignore_errors=True)
    try:
        zarr.open_group(str(root / "labels"), mode="a", zarr_format=2).attrs["labels"] = listed
    except Exception:  # noqa: BLE001 - best effort while unwinding another error
        pass
