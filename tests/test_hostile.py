"""Hostile and odd inputs (issue #16): nothing lost, nothing hung, one line per failure.

Every hostile file is generated here, small. Each CLI case runs ``napari-unet`` in a
subprocess under an address-space limit (``RLIMIT_AS``, :data:`AS_LIMIT`) and a time limit
and checks: exit code 2 and one line ``napari-unet: error: ...`` naming the problem (or
exit code 0 and the correct result), no traceback, the input's bytes unchanged, nothing
else in the folder changed and no partial output left. Cases that cannot hang or blow
memory run ``main()`` in-process the same way (faster).

Each case is recorded (category, outcome); with ``NAPARI_UNET_HOSTILE_REPORT=path`` the
module writes them to ``path`` as JSON (``bench/hostile.py`` prints the table).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_unet.checkpoint import METADATA_KEY, save_model
from napari_unet.models import build_model

AS_LIMIT = 3 * 2**30
"""Address space of a CLI subprocess: a normal small run needs < 2 GiB (torch included)."""
TIMEOUT = 90
RESULTS: list[dict] = []


# ----------------------------------------------------------------------------- harness
def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256 or 'dir' or 'link->target'} of everything under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = f"link->{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def _preexec(fsize: int | None = None):
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
        if fsize is not None:  # "disk full": writes beyond fsize bytes fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        os.setsid()

    return setup


# The child's own peak (VmHWM of its memory map, KiB): ru_maxrss after fork + exec starts at
# the parent's peak, so a pytest process grown past 1.5 GB failed the memory checks here.
_WRAPPER = (
    "import sys, atexit\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return line.split()[1]\n"
    "    return ''\n"
    "atexit.register(lambda: open(sys.argv[1], 'w').write(_peak()))\n"
    "from napari_unet.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


class Outcome:
    def __init__(self, rc, stderr, seconds, peak_mib=None, hung=False):
        self.rc, self.stderr, self.seconds = rc, stderr, seconds
        self.peak_mib, self.hung = peak_mib, hung

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def cli(args, cwd: Path, *, env=None, fsize=None, timeout=TIMEOUT, prefix=()) -> Outcome:
    """``napari-unet ARGS`` in a subprocess under the address-space limit."""
    peak = cwd / f".peak-{os.getpid()}-{time.monotonic_ns()}"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NAPARI_UNET_CONNECT_TIMEOUT": "3"}
    full_env.update(env or {})
    full_env.pop("DISPLAY", None)
    cmd = [*prefix, sys.executable, "-c", _WRAPPER, str(peak), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_preexec(fsize),
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        hung = True
    seconds = time.perf_counter() - t0
    peak_mib = None
    if peak.exists():
        peak_mib = int(peak.read_text() or 0) / 1024
        peak.unlink()
    return Outcome(proc.returncode, err, seconds, peak_mib, hung)


def cli_inproc(args, capsys, cwd: Path | None = None) -> Outcome:
    """``main(ARGS)`` in this process, in ``cwd`` (cases that cannot hang or blow memory)."""
    from napari_unet.cli import main

    here = os.getcwd()
    t0 = time.perf_counter()
    try:
        if cwd is not None:
            os.chdir(cwd)
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        os.chdir(here)
    return Outcome(rc, capsys.readouterr().err, time.perf_counter() - t0)


def record(category: str, case: str, out: Outcome, *, expect: str | None, before: dict,
           after: dict, allowed_new=(), kept=()) -> None:  # fmt: skip
    """Classify one case, record it, and assert that it was handled cleanly.

    ``expect``: a regular expression the single error line must match (exit code 2), or
    None when the run must succeed (exit code 0). ``before``/``after``: snapshots of the
    case folder; files may appear only if listed in ``allowed_new`` (glob patterns), files
    in ``kept`` (default: all that existed) must be unchanged."""
    import fnmatch
    import re

    traceback = "Traceback" in out.stderr
    crash = not out.hung and out.rc not in (0, 2)
    kept = list(kept) if kept else list(before)
    lost = [k for k in kept if before.get(k) != after.get(k)]
    new = [
        k for k in after
        if k not in before and not any(fnmatch.fnmatch(k, pat) for pat in allowed_new)
        and not k.startswith(".peak-")
    ]  # fmt: skip
    if expect is None:
        message_ok = out.rc == 0
    else:
        lines = out.errors
        message_ok = (
            out.rc == 2
            and len(lines) == 1
            and lines[0].startswith("napari-unet: error: ")
            and re.search(expect, lines[0], re.IGNORECASE) is not None
        )
    clean = message_ok and not (traceback or crash or out.hung or lost or new)
    RESULTS.append(
        {
            "category": category, "case": case, "clean": clean, "data_lost": bool(lost),
            "partial_left": bool(new), "crash": crash, "hang": out.hung,
            "traceback": traceback, "rc": out.rc, "seconds": round(out.seconds, 2),
            "peak_mib": None if out.peak_mib is None else round(out.peak_mib),
            "message": (out.errors or [""])[-1][:300],
        }
    )  # fmt: skip
    assert not out.hung, f"{case}: hung (killed after the time limit)"
    assert not traceback, f"{case}: traceback\n{out.stderr[-3000:]}"
    assert not crash, f"{case}: exit code {out.rc}\n{out.stderr[-3000:]}"
    assert not lost, f"{case}: changed or lost {lost}"
    assert not new, f"{case}: left {new}"
    assert message_ok, f"{case}: rc {out.rc}, stderr:\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("NAPARI_UNET_HOSTILE_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(RESULTS, indent=1))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny 3-class checkpoint and a small image, shared read-only by the cases."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    ckpt = save_model(model, root / "m.safetensors")
    rng = np.random.default_rng(0)
    image = (rng.random((48, 64)) * 1000).astype(np.uint16)
    return {"ckpt": ckpt, "image": image, "model": model}


@pytest.fixture
def case(tmp_path, assets):
    """A folder with ``in.tif`` and ``m.safetensors``."""
    tifffile.imwrite(tmp_path / "in.tif", assets["image"])
    shutil.copy(assets["ckpt"], tmp_path / "m.safetensors")
    return tmp_path


def _rewrite(src: Path, dst: Path, *, meta=None, tensors=None) -> Path:
    """Copy a checkpoint with edited metadata (dict → JSON) and/or tensors."""
    with safe_open(str(src), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
        text = fh.metadata()[METADATA_KEY]
    m = json.loads(text)
    if meta is not None:
        meta(m)
    if tensors is not None:
        tensors(state)
    save_file(state, str(dst), metadata={METADATA_KEY: json.dumps(m)})
    return dst


def _first_weight(state):
    return next(k for k in state if k.endswith("weight") and state[k].ndim == 4)


# ------------------------------------------------------------------------- checkpoints
def _set(path, value):
    def edit(m):
        *keys, last = path
        node = m
        for k in keys:
            node = node[k]
        node[last] = value

    return edit


def _nan(state):
    state[_first_weight(state)][0, 0, 0, 0] = float("nan")


def _inf(state):
    state[_first_weight(state)][0, 0, 0, 0] = float("inf")


def _as(dtype):
    def edit(state):
        k = _first_weight(state)
        state[k] = state[k].to(dtype)

    return edit


def _drop(state):
    del state[_first_weight(state)]


def _reshape(state):
    k = _first_weight(state)
    state[k] = torch.zeros(state[k].shape[0] + 1, *state[k].shape[1:])


CHECKPOINT_CASES = {
    # name: (how to make it, expected message)
    "pickle_pt": (lambda d: (d / "x.pt").write_bytes(b"\x80\x04K\x01."), r"pickle"),
    "torch_zip": (lambda d: (d / "x.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64), r"pickle|zip"),
    "empty_file": (lambda d: (d / "x.safetensors").write_bytes(b""), r"empty|not a safetensors"),
    "truncated": (lambda d: (d / "x.safetensors").write_bytes((d / "m.safetensors").read_bytes()[:600]), r"corrupt|truncated|not a"),
    "random_bytes": (lambda d: (d / "x.safetensors").write_bytes(os.urandom(4096)), r"not a safetensors|corrupt"),
    "directory": (lambda d: (d / "x.safetensors").mkdir(), r"folder"),
    "no_metadata": (lambda d: save_file({"a": torch.zeros(2)}, str(d / "x.safetensors")), r"without napari-unet metadata"),
    "unknown_variant": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["variant"], "resnet")), r"cannot rebuild|resnet"),
    "depth_30": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["config", "depth"], 30)), r"depth=30"),
    "base_1024": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["config", "base_channels"], 1024)), r"shape|lacks|has tensor"),
    "base_string": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["config", "base_channels"], "4")), r"base_channels"),
    "classes_1e9": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["num_classes"], 10**9)), r"num_classes"),
    "norm_low_string": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["normalization", "low"], "1")), r"normalisation"),
    "norm_method_unknown": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["normalization", "method"], "zscore")), r"normalisation method"),
    "norm_not_dict": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["normalization"], [1, 2])), r"normalisation"),
    "classes_wrong": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", meta=_set(["classes"], ["a"])), r"class names"),
    "nan_weights": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_nan), r"NaN or infinite"),
    "inf_weights": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_inf), r"NaN or infinite"),
    "bool_weights": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_as(torch.bool)), r"BOOL.*floating point"),
    "int_weights": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_as(torch.int32)), r"I32.*floating point"),
    "complex_weights": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_as(torch.complex64)), r"C64.*floating point"),
    "missing_tensor": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_drop), r"lacks tensor"),
    "wrong_shape": (lambda d: _rewrite(d / "m.safetensors", d / "x.safetensors", tensors=_reshape), r"has shape"),
    "json_not_object": (lambda d: save_file({"a": torch.zeros(2)}, str(d / "x.safetensors"), metadata={METADATA_KEY: "[1]"}), r"not a JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_checkpoint(name, case, capsys):
    make, expect = CHECKPOINT_CASES[name]
    make(case)
    model = next(p for p in case.iterdir() if p.name.startswith("x."))
    before = _snapshot(case)
    args = ["predict", "in.tif", "-m", model.name, "-o", "out.tif"]
    if name in ("depth_30", "base_1024", "classes_1e9"):  # memory bombs: under the limit
        out = cli(args, case)
        assert out.seconds < 30, f"{name} took {out.seconds:.0f} s"
    else:
        out = cli_inproc(args, capsys, case)
    record("checkpoints", name, out, expect=expect, before=before, after=_snapshot(case))


def test_checkpoint_fifo_and_device(case):
    """A FIFO (would block forever when opened) and a device are refused unopened."""
    os.mkfifo(case / "fifo.safetensors")
    before = _snapshot(case)
    out = cli(["predict", "in.tif", "-m", "fifo.safetensors", "-o", "o.tif"], case, timeout=60)
    record(
        "checkpoints",
        "fifo",
        out,
        expect=r"not a regular file",
        before=before,
        after=_snapshot(case),
    )
    out = cli(["predict", "in.tif", "-m", "/dev/zero", "-o", "o.tif"], case, timeout=60)
    record(
        "checkpoints",
        "device",
        out,
        expect=r"not a regular file",
        before=before,
        after=_snapshot(case),
    )


# ------------------------------------------------------------------------------ images
def _tiff_bomb(path: Path, shape: tuple[int, ...]) -> Path:
    """A tiny TIFF whose header declares ``shape`` (tags rewritten after writing)."""
    small = (64, 64, 3) if len(shape) == 3 else (64, 64)
    tifffile.imwrite(path, np.zeros(small, np.uint8), compression="zlib", tile=(16, 16))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        page.tags["ImageWidth"].overwrite(shape[1])
        page.tags["ImageLength"].overwrite(shape[0])
    assert path.stat().st_size < 20_000
    return path


@pytest.mark.parametrize(
    "name,shape", [("tiff_bomb_100000sq", (100000, 100000)), ("tiff_bomb_32768sq_rgb", (32768, 32768, 3))]
)  # fmt: skip
def test_tiff_bomb(name, shape, case):
    _tiff_bomb(case / "bomb.tif", shape)
    before = _snapshot(case)
    out = cli(["predict", "bomb.tif", "-m", "m.safetensors", "-o", "out.tif"], case, timeout=60)
    size = "×".join(map(str, shape))
    record(
        "images", name, out, expect=rf"{size}.*GiB.*--dask", before=before, after=_snapshot(case)
    )
    assert out.peak_mib is None or out.peak_mib < 1500


def _ome(case):
    tifffile.imwrite(case / "img.ome.tif", np.random.default_rng(1).random((2, 40, 48)).astype(np.float32), metadata={"axes": "CYX"})  # fmt: skip


def _ome_czyx(case):
    tifffile.imwrite(case / "img.ome.tif", np.random.default_rng(1).random((2, 3, 40, 48)).astype(np.float32), metadata={"axes": "CZYX"})  # fmt: skip


def _two_channel_model(case):
    save_model(build_model("unet", 2, 3, base_channels=4, depth=2), case / "m2.safetensors")


def test_ome_axes_are_honoured(case, capsys):
    """CYX and CZYX recorded in the file: channels stay channels (not planes)."""
    _two_channel_model(case)
    for name, make, shape in (
        ("ome_cyx", _ome, (40, 48)),
        ("ome_czyx", _ome_czyx, (3, 40, 48)),
    ):
        make(case)
        before = _snapshot(case)
        out = cli_inproc(["predict", "img.ome.tif", "-m", "m2.safetensors", "-o", "o.tif", "--probabilities", "p.tif"], capsys, case)  # fmt: skip
        record("images", name, out, expect=None, before=before, after=_snapshot(case), allowed_new=("o.tif", "p.tif"))  # fmt: skip
        assert tifffile.imread(case / "o.tif").shape == shape
        assert tifffile.imread(case / "p.tif").shape == (3, *shape)
        os.remove(case / "o.tif")
        os.remove(case / "p.tif")
        # a one-channel model on it: a clear error asking for a channel
        before = _snapshot(case)
        out = cli_inproc(
            ["predict", "img.ome.tif", "-m", "m.safetensors", "-o", "o.tif"], capsys, case
        )
        record("images", f"{name}_one_channel_model", out, expect=r"2 channel.*channel=", before=before, after=_snapshot(case))  # fmt: skip


def _mixed_tiff(case):
    with tifffile.TiffWriter(case / "mixed.tif") as w:
        w.write(np.zeros((40, 48), np.uint16))
        w.write(np.ones((32, 32, 3), np.uint8))


def _zarr_group(case):
    import zarr

    g = zarr.open_group(str(case / "proj.zarr"), mode="w")
    g.create_array("raw", shape=(40, 48), dtype="uint16")[...] = np.arange(40 * 48).reshape(40, 48)
    g.create_array("mask", shape=(40, 48), dtype="uint8")


def _zarr_empty_group(case):
    import zarr

    zarr.open_group(str(case / "proj.zarr"), mode="w").create_group("sub")


def _huge_values(case):
    x = np.random.default_rng(0).random((40, 48))
    x[5, 5] = 1e300
    tifffile.imwrite(case / "img.tif", x)


def _scaled_values(case):
    tifffile.imwrite(case / "img.tif", np.random.default_rng(0).random((40, 48)) * 1e300)


def _nan_image(case):
    x = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    x[3, 3] = np.nan
    tifffile.imwrite(case / "img.tif", x)


def _complex_image(case):
    tifffile.imwrite(case / "img.tif", np.zeros((40, 48), np.complex64))


def _complex_zarr(case):
    import zarr

    zarr.create_array(str(case / "proj.zarr"), shape=(40, 48), dtype="complex64")


IMAGE_CASES = {
    # name: (make, image argument, extra args, expected message or None, allowed new files)
    "mixed_multipage": (_mixed_tiff, "mixed.tif", [], r"2 different images.*--series", ()),
    "mixed_multipage_series_1": (_mixed_tiff, "mixed.tif", ["--series", "1"], None, ("out.tif",)),
    "mixed_multipage_series_9": (_mixed_tiff, "mixed.tif", ["--series", "9"], r"series 9", ()),
    "zarr_group_several_arrays": (_zarr_group, "proj.zarr", [], r"2 arrays.*proj.zarr/mask.*proj.zarr/raw", ()),
    "zarr_group_array_chosen": (_zarr_group, "proj.zarr/raw", [], None, ("out.tif",)),
    "zarr_group_no_arrays": (_zarr_empty_group, "proj.zarr", [], r"without arrays", ()),
    "finite_1e300_outlier": (_huge_values, "img.tif", [], r"beyond the float32 range", ()),
    "finite_1e300_scaled": (_scaled_values, "img.tif", [], None, ("out.tif",)),
    "nan_pixel": (_nan_image, "img.tif", [], r"NaN or infinite", ()),
    "complex_tiff": (_complex_image, "img.tif", [], r"complex", ()),
    "complex_zarr": (_complex_zarr, "proj.zarr", [], r"complex", ()),
    "not_a_tiff": (lambda c: (c / "img.tif").write_bytes(b"hello" * 100), "img.tif", [], r"not a readable TIFF", ()),
    "empty_tiff": (lambda c: (c / "img.tif").write_bytes(b""), "img.tif", [], r"not a readable TIFF", ()),
    "folder_as_image": (lambda c: (c / "imgdir").mkdir(), "imgdir", [], r"folder|inside the input", ()),
    "missing_image": (lambda c: None, "nope.tif", [], r"no such image", ()),
    "png_image": (lambda c: (c / "img.png").write_bytes(b"\x89PNG"), "img.png", [], r"unsupported image format", ()),
    "one_pixel": (lambda c: tifffile.imwrite(c / "img.tif", np.zeros((1, 1), np.uint8)), "img.tif", [], r"at least 2", ()),
    "bad_axes": (lambda c: None, "in.tif", ["--axes", "QQ"], r"invalid axes", ()),
    "five_d_no_axes": (lambda c: tifffile.imwrite(c / "img.tif", np.zeros((2, 2, 2, 8, 8), np.uint8)), "img.tif", [], r"axes", ()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image(name, case, capsys):
    make, image, extra, expect, allowed = IMAGE_CASES[name]
    make(case)
    before = _snapshot(case)
    out = cli_inproc(
        ["predict", image, "-m", "m.safetensors", "-o", "out.tif", *extra], capsys, case
    )
    record("images", name, out, expect=expect, before=before, after=_snapshot(case), allowed_new=allowed)  # fmt: skip
    if expect is None:
        assert tifffile.imread(case / "out.tif").dtype == np.uint32


def test_fifo_image(case):
    os.mkfifo(case / "pipe.tif")
    before = _snapshot(case)
    out = cli(["predict", "pipe.tif", "-m", "m.safetensors", "-o", "o.tif"], case, timeout=60)
    record("images", "fifo_image", out, expect=r"not a regular file", before=before, after=_snapshot(case))  # fmt: skip


# ----------------------------------------------------------------------------- outputs
def _zarr_input(case):
    import zarr

    zarr.create_array(str(case / "in.zarr"), shape=(48, 64), dtype="uint16")[...] = tifffile.imread(case / "in.tif")  # fmt: skip


def _symlink_to_input(case):
    os.symlink(case / "in.tif", case / "link.tif")


def _hardlink_to_input(case):
    os.link(case / "in.tif", case / "hard.tif")


def _existing(case, *names):
    for n in names:
        (case / n).write_bytes(b"precious")


def _store(case, name):
    import zarr

    zarr.create_array(str(case / name), shape=(4,), dtype="uint8")[...] = 7


OUTPUT_CASES = {
    # name: (setup, args after `predict`, expected message or None, allowed new, kept-check)
    "output_is_input": (None, ["in.tif", "-o", "in.tif", "--overwrite"], r"is the input", ()),
    "probabilities_is_input": (None, ["in.tif", "-o", "o.tif", "--probabilities", "in.tif", "--overwrite"], r"is the input", ()),
    "zarr_output_is_input": (_zarr_input, ["in.zarr", "-o", "in.zarr", "--overwrite"], r"is the input", ()),
    "zarr_output_inside_input": (_zarr_input, ["in.zarr", "-o", "in.zarr/labels.zarr"], r"inside the input", ()),
    "symlink_to_input": (_symlink_to_input, ["in.tif", "-o", "link.tif", "--overwrite"], r"is the input", ()),
    "hardlink_to_input": (_hardlink_to_input, ["in.tif", "-o", "hard.tif", "--overwrite"], r"is the input", ()),
    "output_is_model": (None, ["in.tif", "-o", "m.safetensors", "--overwrite"], r"unsupported|is the input", ()),
    "same_two_outputs": (None, ["in.tif", "-o", "x.tif", "--probabilities", "x.tif"], r"another output", ()),
    "png_output": (None, ["in.tif", "-o", "out.png"], r"unsupported labels output format", ()),
    "missing_folder": (None, ["in.tif", "-o", "nofolder/out.tif"], r"does not exist", ()),
    "exists_no_overwrite": (lambda c: _existing(c, "out.tif"), ["in.tif", "-o", "out.tif"], r"exists.*--overwrite", ()),
    "overwrite_dir_named_tif": (lambda c: (c / "d.tif").mkdir(), ["in.tif", "-o", "d.tif", "--overwrite"], r"is a folder", ()),
    "overwrite_file_named_zarr": (lambda c: _existing(c, "f.zarr"), ["in.tif", "-o", "f.zarr", "--overwrite"], r"is a file, not a zarr store", ()),
    "overwrite_symlinked_store": (lambda c: (_store(c, "real.zarr"), os.symlink(c / "real.zarr", c / "s.zarr")), ["in.tif", "-o", "s.zarr", "--overwrite"], r"symbolic link", ()),
    "overwrite_plain_folder_as_zarr": (lambda c: ((c / "data.zarr").mkdir(), _existing(c, "data.zarr/notes.txt")), ["in.tif", "-o", "data.zarr", "--overwrite"], r"not a zarr store", ()),
    "overwrite_tif_ok": (lambda c: _existing(c, "out.tif"), ["in.tif", "-o", "out.tif", "--overwrite"], None, ()),
    "overwrite_zarr_probabilities": (lambda c: _store(c, "p.zarr"), ["in.tif", "-o", "out.tif", "--probabilities", "p.zarr", "--overwrite"], None, ("out.tif",)),
    "zarr_probabilities_exists": (lambda c: _store(c, "p.zarr"), ["in.tif", "-o", "out.tif", "--probabilities", "p.zarr"], r"exists", ()),
    "dask_with_probabilities": (None, ["in.tif", "-o", "o.zarr", "--probabilities", "p.zarr", "--dask", "local:1"], r"drop --probabilities", ()),
    "dask_tif_output": (None, ["in.tif", "-o", "o.tif", "--dask", "local:1"], r"unsupported output store format", ()),
    "dask_output_is_file": (lambda c: _existing(c, "o.zarr"), ["in.tif", "-o", "o.zarr", "--dask", "local:1"], r"not a zarr store", ()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_output(name, case, capsys):
    setup, args, expect, allowed = OUTPUT_CASES[name]
    if setup is not None:
        setup(case)
    before = _snapshot(case)
    replaced = {"overwrite_tif_ok": ["out.tif"], "overwrite_zarr_probabilities": [k for k in before if k.startswith("p.zarr")]}.get(name, [])  # fmt: skip
    out = cli_inproc(["predict", *args[:1], "-m", "m.safetensors", *args[1:]], capsys, case)
    after = _snapshot(case)
    kept = [k for k in before if k not in replaced]
    allowed = (*allowed, *(["p.zarr*"] if name == "overwrite_zarr_probabilities" else []))
    record("outputs", name, out, expect=expect, before=before, after=after, allowed_new=allowed, kept=kept)  # fmt: skip
    if name == "overwrite_tif_ok":
        assert tifffile.imread(case / "out.tif").shape == (48, 64)
    if name == "overwrite_zarr_probabilities":
        import zarr

        assert zarr.open_array(str(case / "p.zarr"), mode="r").shape == (3, 48, 64)


def _proj(case):
    import zarr

    g = zarr.open_group(str(case / "proj.zarr"), mode="w")
    g.create_array("raw", shape=(48, 64), dtype="uint16")[...] = tifffile.imread(case / "in.tif")
    g.create_array("other", shape=(4,), dtype="uint8")[...] = 3


def test_dask_overwrite_never_deletes_the_input(case):
    """``proj.zarr/raw -o proj.zarr --dask ... --overwrite`` (and in.zarr -o in.zarr) used to
    delete the whole project before reading the input."""
    _proj(case)
    _zarr_input(case)
    before = _snapshot(case)
    for name, args in (
        ("dask_overwrite_store_of_input", ["proj.zarr/raw", "-o", "proj.zarr"]),
        ("dask_overwrite_input_store", ["in.zarr", "-o", "in.zarr"]),
        ("dask_output_inside_input_store", ["proj.zarr/raw", "-o", "proj.zarr/out.zarr"]),
    ):
        out = cli(["predict", args[0], "-m", "m.safetensors", *args[1:], "--dask", "local:1", "--overwrite"], case, timeout=60)  # fmt: skip
        record("outputs", name, out, expect=r"input", before=before, after=_snapshot(case))
        assert out.seconds < 30  # refused before any cluster starts


def _readonly_prefix(folder: Path) -> list[str] | None:
    """A command prefix under which ``folder`` is read-only, or None (then chmod works)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"', "sh"]  # fmt: skip


def test_read_only_folder(case):
    """Refused before computing, nothing left."""
    ro = case / "ro"
    ro.mkdir()
    prefix = _readonly_prefix(ro)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here")
    before = _snapshot(case)
    try:
        out = cli(["predict", "in.tif", "-m", "m.safetensors", "-o", "ro/out.tif"], case, prefix=prefix)  # fmt: skip
    finally:
        ro.chmod(0o755)
    record("outputs", "read_only_folder", out, expect=r"not writable", before=before, after=_snapshot(case))  # fmt: skip
    assert out.seconds < 60


@pytest.mark.parametrize("fmt", ["tif", "zarr"])
def test_disk_full(fmt, case):
    """Writes fail mid-way (file size limit: EFBIG, like a full disk): one line, an existing
    output is left as it was, no partial file or store."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(case / "big.tif", (rng.random((256, 256)) * 60000).astype(np.uint16))
    old = case / f"p.{fmt}"
    if fmt == "tif":
        old.write_bytes(b"earlier result")
    else:
        _store(case, "p.zarr")
    before = _snapshot(case)
    out = cli(
        ["predict", "big.tif", "-m", "m.safetensors", "-o", f"o.{fmt}", "--probabilities", old.name, "--overwrite"],
        case, fsize=60_000,
    )  # fmt: skip
    record("outputs", f"disk_full_{fmt}", out, expect=r"cannot write.*(too large|space)", before=before, after=_snapshot(case))  # fmt: skip


def test_demo_headless_keeps_earlier_results(case):
    """A second ``demo --headless`` writes beside the first, never over it."""
    folder = case / "demo-output"
    folder.mkdir()
    for name in ("labels.tif", "probabilities.tif"):
        (folder / name).write_bytes(b"earlier demo")
    before = _snapshot(case)
    out = cli(["demo", "--headless", "-m", "m.safetensors"], case, timeout=180)
    record("outputs", "demo_headless_twice", out, expect=None, before=before, after=_snapshot(case), allowed_new=("demo-output-2", "demo-output-2/*"))  # fmt: skip
    assert (case / "demo-output-2" / "labels.tif").exists()


def test_train_output_checks(case, capsys):
    tifffile.imwrite(case / "ann.tif", np.zeros((48, 64), np.uint16))
    for name, args, expect in (
        ("train_output_is_image", ["in.tif", "ann.tif", "-o", "in.tif", "--overwrite"], r"unsupported model output format"),
        ("train_output_is_init", ["in.tif", "ann.tif", "-o", "m.safetensors", "--init", "m.safetensors", "--overwrite"], r"is the input"),
        ("train_output_exists", ["in.tif", "ann.tif", "-o", "m.safetensors"], r"exists"),
    ):  # fmt: skip
        before = _snapshot(case)
        out = cli_inproc(["train", *args], capsys, case)
        record("outputs", name, out, expect=expect, before=before, after=_snapshot(case))


# -------------------------------------------------------------------------------- dask
@pytest.mark.parametrize(
    "name,address,expect",
    [
        ("garbage_address", "garbage", r"bad scheduler 'garbage'"),
        ("local_zero", "local:0", r"at least one worker"),
        ("local_words", "local:two", r"local:N"),
        ("unreachable", "tcp://127.0.0.1:9", r"cannot reach the dask scheduler"),
        ("unresolvable", "tcp://no-such-host.invalid:8786", r"cannot reach the dask scheduler"),
    ],
)
def test_bad_scheduler(name, address, expect, case, capsys):
    before = _snapshot(case)
    args = ["predict", "in.tif", "-m", "m.safetensors", "-o", "o.zarr", "--dask", address]
    if address.startswith("local:"):  # refused by parsing alone: in-process
        out = cli_inproc(args, capsys, case)
    else:  # could connect, hang or time out: a subprocess under the limits
        out = cli(args, case, timeout=60)
    record("dask", name, out, expect=expect, before=before, after=_snapshot(case))
    assert out.seconds < 30


def test_two_runs_on_one_store(case):
    """The second run on the same output refuses at its start; the first finishes."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(case / "big.tif", (rng.random((512, 512)) * 60000).astype(np.uint16))
    before = _snapshot(case)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISPLAY", None)
    args = [sys.executable, "-m", "napari_unet.cli", "predict", "big.tif", "-m", "m.safetensors",
            "-o", "res.zarr", "--dask", "local:1"]  # fmt: skip
    first = subprocess.Popen(args, cwd=case, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_preexec())  # fmt: skip
    try:
        lock = case / ".res.zarr.napari-unet.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first run did not take the lock"
        # hold the first run while the second starts (deterministic, however fast it is)
        first.send_signal(signal.SIGSTOP)
        try:
            second = cli(["predict", "big.tif", "-m", "m.safetensors", "-o", "res.zarr", "--dask", "local:1"], case, timeout=60)  # fmt: skip
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    record("dask", "second_run_same_store", second, expect=r"being written by another run", before=before, after=_snapshot(case), allowed_new=("res.zarr", "res.zarr/*", ".res.zarr.napari-unet.lock"))  # fmt: skip
    assert first.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert not (case / ".res.zarr.napari-unet.lock").exists()
    import zarr

    assert zarr.open_group(str(case / "res.zarr"), mode="r")["labels"].shape == (512, 512)


def test_stale_lock_is_taken_over(tmp_path):
    from napari_unet.distributed import store_lock

    out = str(tmp_path / "r.zarr")
    lock = tmp_path / ".r.zarr.napari-unet.lock"
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    with store_lock(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match="another run"), store_lock(out):
            pass
    assert not lock.exists()


# --------------------------------------------------------------------------------- API
def test_package_predict_is_always_the_function(assets):
    """``napari_unet.predict(model, x)`` twice, after importing the submodule, and
    ``from napari_unet import predict``."""
    import importlib

    import napari_unet

    x = assets["image"].astype(np.float32)
    ok = 0
    for _ in range(2):
        importlib.import_module("napari_unet.inference.predict")
        assert napari_unet.predict(assets["model"], x).shape == (3, 48, 64)
        from napari_unet import predict

        assert callable(predict) and predict.__name__ == "predict"
        ok += 1
    from napari_unet.inference import DEFAULT_TILE, tile_plan_for  # the submodule still works

    assert DEFAULT_TILE and tile_plan_for
    RESULTS.append({"category": "API", "case": "predict_called_twice", "clean": ok == 2, "data_lost": False,
                    "partial_left": False, "crash": False, "hang": False, "traceback": False})  # fmt: skip


def _api_case(name, fn, expect):
    import re

    try:
        fn()
        raised = None
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raised = str(exc)
    clean = raised is not None and re.search(expect, raised, re.IGNORECASE) is not None
    RESULTS.append({"category": "API", "case": name, "clean": clean, "data_lost": False,
                    "partial_left": False, "crash": False, "hang": False, "traceback": False,
                    "message": raised})  # fmt: skip
    assert clean, f"{name}: {raised}"


def test_api_outputs_and_inputs(assets, tmp_path):
    import threading

    import zarr

    import napari_unet

    model = assets["model"]
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), shape=(48, 64), dtype="uint16")[...] = assets["image"]
    arr = zarr.open_array(str(src), mode="r")
    before = _snapshot(tmp_path)
    _api_case("api_out_is_input", lambda: napari_unet.predict(model, arr, out=src), r"is the input")
    _api_case("api_out_inside_input", lambda: napari_unet.predict(model, arr, out=src / "p.zarr"), r"inside the input")  # fmt: skip
    _api_case(
        "api_out_exists", lambda: napari_unet.predict(model, assets["image"], out=src), r"exists"
    )
    _api_case("api_complex_image", lambda: napari_unet.predict(model, np.zeros((8, 8), np.complex64)), r"complex")  # fmt: skip
    _api_case("api_object_image", lambda: napari_unet.predict(model, np.zeros((8, 8), object)), r"not numbers")  # fmt: skip
    stop = threading.Event()
    stop.set()
    _api_case("api_cancel_removes_store", lambda: _cancelled(napari_unet, model, assets["image"], tmp_path / "c.zarr", stop), r"cancelled")  # fmt: skip
    assert _snapshot(tmp_path) == before  # nothing changed, nothing left
    probs = napari_unet.predict(model, arr, out=tmp_path / "ok.zarr")
    assert probs.shape == (3, 48, 64) and (tmp_path / "ok.zarr").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def _cancelled(napari_unet, model, image, out, stop):
    from napari_unet.runtime import Cancelled

    try:
        napari_unet.predict(model, image, out=out, cancel=stop)
    except Cancelled:
        assert not out.exists()
        raise ValueError("cancelled") from None


def _timeout(*_):
    raise TimeoutError("the tile plan did not finish")


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_valid_unet_any_tile_size(depth):
    """The valid U-Net's plan at every small window: a correct plan, never a zero step."""
    from napari_unet.inference.plan import tile_plan_for
    from napari_unet.inference.predict import predict

    model = build_model("unet", 1, 2, padding="valid", base_channels=2, depth=depth, norm="none")
    x = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    full = predict(model, x, tile_size=4096, exact=True)
    for tile in (1, 2, 50, 92, 96, 100, 140, 189, 300):
        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(30)
        try:
            if tile < 2:
                with pytest.raises(ValueError, match="tile_size"):
                    tile_plan_for(model, x.shape, tile_size=tile)
                continue
            got = predict(model, x, tile_size=tile, exact=True)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert np.abs(got - full).max() < 1e-5, tile
    RESULTS.append({"category": "API", "case": f"valid_unet_depth{depth}_tile_sizes", "clean": True, "data_lost": False,
                    "partial_left": False, "crash": False, "hang": False, "traceback": False})  # fmt: skip


def test_argparse_errors_are_one_line(case, capsys):
    before = _snapshot(case)
    out = cli_inproc(["predict"], capsys, case)
    record("API", "cli_missing_argument", out, expect=r"required", before=before, after=_snapshot(case))  # fmt: skip
    out = cli_inproc(["predict", "in.tif", "-o", "x.tif", "--tile", "big"], capsys, case)
    record("API", "cli_bad_int", out, expect=r"invalid int value", before=before, after=_snapshot(case))  # fmt: skip


# --------------------------------------------------------------------------- GUI close
GUI_SNIPPET = """
import napari
v = napari.Viewer()
v.window.add_plugin_dock_widget("napari-unet", "Predict")
v.close()
print("closed")
"""


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs xvfb-run")
def test_viewer_closed_while_loading_never_aborts(tmp_path):
    """Issue item 4 (fixed in the widgets): closing the viewer while the default model
    loads must not abort the process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, "-c", GUI_SNIPPET]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        rc, err, hung = r.returncode, r.stderr, False
    except subprocess.TimeoutExpired:
        rc, err, hung = None, "", True
    crash = not hung and rc != 0
    RESULTS.append({"category": "GUI close", "case": "close_viewer_while_loading", "clean": not (crash or hung),
                    "data_lost": False, "partial_left": False, "crash": crash, "hang": hung,
                    "traceback": "Traceback" in err, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    assert not hung and rc == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# ------------------------------------------------------------------- the write-safety unit
def test_target_replaces_only_when_complete(tmp_path):
    """The earlier output stays until the new one is complete; a failed move puts it back."""
    import zarr

    from napari_unet.outputs import OutputError, plan_output, write_data

    _store(tmp_path, "p.zarr")
    target = plan_output(tmp_path / "p.zarr", overwrite=True)
    write_data(target, np.ones((2, 3), np.float32))
    assert zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[0] == 7  # untouched so far
    target.commit()
    assert zarr.open_array(str(tmp_path / "p.zarr"), mode="r").shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]

    (tmp_path / "o.tif").write_bytes(b"old")
    target = plan_output(tmp_path / "o.tif", overwrite=True)
    with pytest.raises(OutputError, match="nothing was written"):
        target.commit()
    assert (tmp_path / "o.tif").read_bytes() == b"old"


def test_fresh_folder(tmp_path):
    from napari_unet.outputs import fresh_folder

    assert fresh_folder(tmp_path / "d", ["a.tif"]) == tmp_path / "d"
    (tmp_path / "d").mkdir()
    assert fresh_folder(tmp_path / "d", ["a.tif"]) == tmp_path / "d"  # empty: reused
    (tmp_path / "d" / "a.tif").write_bytes(b"x")
    assert fresh_folder(tmp_path / "d", ["a.tif"]) == tmp_path / "d-2"


def test_terminated_run_leaves_nothing(case):
    """SIGTERM (or Ctrl-C) while predicting: exit 130, no partial output, input intact."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(case / "big.tif", (rng.random((1024, 1024)) * 60000).astype(np.uint16))
    before = _snapshot(case)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "napari_unet.cli", "predict", "big.tif", "-m", "m.safetensors",
           "-o", "o.tif", "--probabilities", "p.zarr", "--tile", "128"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=case, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_preexec())  # fmt: skip
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(".part" in p.name for p in case.iterdir()):
            break
        time.sleep(0.02)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        hung = True
    out = Outcome(proc.returncode, err, time.perf_counter() - t0, hung=hung)
    after = _snapshot(case)
    if out.rc == 130:  # interrupted: the expected line is not an error line
        out.rc = 2
        out.stderr = err.replace("napari-unet: interrupted", "napari-unet: error: interrupted")
    record("outputs", "sigterm_mid_prediction", out, expect=r"interrupted", before=before, after=after)  # fmt: skip
