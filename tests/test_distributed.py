"""Distributed prediction on a dask cluster: equal to the single-process result, stitched
instance labels, worker loss, resume, store checks, Z-stacks, CLI, the workers' runtime."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.slow  # dask clusters: a 4096² reference and worker processes

from napari_unet import distributed as dist  # noqa: E402
from napari_unet.checkpoint import load_model, save_model  # noqa: E402
from napari_unet.distributed.stitch import face_pairs  # noqa: E402
from napari_unet.distributed.store import create_array  # noqa: E402
from napari_unet.inference.layout import resolve_layout  # noqa: E402
from napari_unet.inference.normalize import get_normalization  # noqa: E402
from napari_unet.inference.predict import predict  # noqa: E402
from napari_unet.inference.source import PlaneSource  # noqa: E402
from napari_unet.models import build_model  # noqa: E402
from napari_unet.postprocess import segment  # noqa: E402
from napari_unet.runtime import Cancelled  # noqa: E402
from napari_unet.synthetic import synthetic_nuclei  # noqa: E402

SIZE = 4096
CHUNK = 1024


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-class U-Net (base 4, depth 2) trained for a few seconds: it finds nuclei."""
    from napari_unet.training import train

    torch.manual_seed(0)
    model = build_model("unet", 1, 3, base_channels=4, depth=2)
    image, labels = synthetic_nuclei((256, 256), seed=1, density=0.3)
    train(model, image, labels, epochs=3, lr=5e-3, device="cpu", seed=0)
    return save_model(model.eval(), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """(numpy, zarr path) of a 4096² image: a 512² synthetic tile repeated 8×8."""
    tile, _ = synthetic_nuclei((512, 512), seed=0)
    image = np.tile(tile, (SIZE // 512, SIZE // 512))
    path = tmp_path_factory.mktemp("input") / "image.zarr"
    z = zarr.open_array(str(path), mode="w", shape=image.shape, chunks=(1024, 1024), dtype="uint16")
    z[...] = image
    return image, path


@pytest.fixture(scope="module")
def reference(tiny_model, big_image):
    """Single-process exact tiled probabilities and their instance labels."""
    model = load_model(tiny_model)
    probs = predict(model, big_image[0], exact=True, device="cpu")
    return probs, segment(probs, class_names=model.class_names)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two single-threaded worker processes, with their own runtime cache folder
    (``NAPARI_UNET_CACHE``, inherited by the worker processes): (client, that folder)."""
    cache = tmp_path_factory.mktemp("worker-cache")
    old = os.environ.get("NAPARI_UNET_CACHE")
    os.environ["NAPARI_UNET_CACHE"] = str(cache)
    try:
        lc = distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        )
        client = distributed.Client(lc, set_as_default=False)
    finally:
        if old is None:
            del os.environ["NAPARI_UNET_CACHE"]
        else:
            os.environ["NAPARI_UNET_CACHE"] = old
    yield client, cache
    client.close()
    lc.close()


class DieBeforeMarking(distributed.WorkerPlugin):
    """Test-only fault: the first worker to remove the file ``arm`` exits at once in a
    chunk task, after writing the chunk's data and before its completion mark
    (:func:`napari_unet.distributed.store.mark_chunk`, the task's last write) — as if the
    machine had died there. Set up on every worker (also restarted ones); its teardown
    puts the real function back."""

    name = "napari-unet-test-die-before-marking"

    def __init__(self, arm: str) -> None:
        self.arm = arm

    def setup(self, worker) -> None:
        from napari_unet.distributed import tasks

        real, arm = tasks.mark_chunk, self.arm
        self.real = getattr(real, "real", real)

        def mark_or_die(*args, **kwargs):
            try:
                os.remove(arm)
            except OSError:
                return real(*args, **kwargs)
            os._exit(1)

        mark_or_die.real = self.real
        tasks.mark_chunk = mark_or_die

    def teardown(self, worker) -> None:
        from napari_unet.distributed import tasks

        tasks.mark_chunk = self.real


@pytest.fixture(scope="module")
def first_run(cluster, tiny_model, big_image, tmp_path_factory):
    client, _ = cluster
    out = tmp_path_factory.mktemp("run") / "result.zarr"
    probs, labels, calls = predict_big_zarr(client, tiny_model, big_image[1], out)
    return out, probs, labels, calls


def predict_big_zarr(client, model, image_path, out):
    """``predict`` of the 4096² zarr on the cluster → (probabilities, labels, progress calls)."""
    calls = []
    probs, labels = predict(
        model,
        zarr.open_array(str(image_path), mode="r"),
        scheduler=client,
        out=out,
        device="cpu",
        progress=lambda done, total: calls.append((done, total)),
    )
    return probs, labels, calls


def unmatched_objects(labels: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(objects of ``ref`` without an identical object in ``labels``, objects of ``ref``).

    Identical = the same pixel set under some renumbering; 0 unmatched means identical
    foreground and a bijection between the ids.
    """
    a = np.asarray(ref).ravel().astype(np.int64)
    b = np.asarray(labels).ravel().astype(np.int64)
    keep = (a > 0) | (b > 0)
    a, b = a[keep], b[keep]
    pairs = np.unique(a * (int(b.max(initial=0)) + 1) + b)
    pa, pb = pairs // (int(b.max(initial=0)) + 1), pairs % (int(b.max(initial=0)) + 1)
    ids_a, n_a = np.unique(pa, return_counts=True)
    ids_b, n_b = np.unique(pb, return_counts=True)
    one_a = set(ids_a[n_a == 1].tolist())  # ref ids meeting a single label (or background)
    one_b = set(ids_b[n_b == 1].tolist())
    exact = sum(
        1 for x, y in zip(pa.tolist(), pb.tolist()) if x > 0 and y > 0 and x in one_a and y in one_b
    )
    n_ref = int((ids_a > 0).sum())
    return n_ref - exact, n_ref


def assert_same_instances(labels: np.ndarray, ref: np.ndarray, tolerance: float = 0.0) -> None:
    """Equal up to renumbering: identical foreground and a bijection between the ids.

    ``tolerance``: fraction of objects that may differ. skimage's watershed breaks exact
    ties between seeds of equal height by its heap order, which depends on every seed
    of the image, so a perfectly symmetric object split between two seeds can be cut
    differently in a chunk than in the whole image (about 1 object in 1000 on 512²
    synthetic planes; none in the 4096² tests).
    """
    labels, ref = np.asarray(labels), np.asarray(ref)
    assert labels.shape == ref.shape
    bad, total = unmatched_objects(labels, ref)
    assert total > 10
    assert bad <= tolerance * total, f"{bad} of {total} objects differ"


# ----------------------------------------------------------- geometry (in process)
def _assemble(model, image, chunk):
    layout = resolve_layout(image, model.in_channels)
    spec = dist.build_spec(model, layout, out="unused", key="k", chunk_size=chunk, margin=8)
    source = PlaneSource.open(layout, 0, get_normalization(model))
    out = np.zeros((model.num_classes, *layout.spatial), np.float32)
    ny, nx = spec.grid
    assert ny * nx > 4
    for i in range(ny):
        for j in range(nx):
            probs, r0, c0 = dist.chunk_probabilities(model, source, spec, i, j, torch.device("cpu"))
            assert probs.shape[1:] == spec.block_shape  # one window shape per run
            a, b, c, d = spec.core(i, j)
            out[:, a:b, c:d] = probs[:, a - r0 : b - r0, c - c0 : d - c0]
    return out


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("unet", {"base_channels": 4, "depth": 3}),
        ("unet", {"base_channels": 2, "depth": 2, "padding": "valid", "norm": "none"}),
        ("unetpp", {"base_channels": 4, "depth": 3}),
    ],
)
def test_chunks_equal_the_whole_image(name, cfg):
    model = build_model(name, 1, 2, **cfg).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (203, 181)).astype(np.float32)
    image[50:90, 30:140] += 300
    whole = predict(model, image, tile_size=4096, device="cpu")
    chunked = _assemble(model, image, chunk=48)
    assert np.abs(chunked - whole).max() <= 1e-5


def test_face_matching_keeps_touching_objects_apart():
    # a strip across a face at row 8: X crosses it; Y (above) touches Z (below)
    above = np.zeros((16, 20), np.uint32)  # chunk above owns X=1, Y=2; sees Z as foreign 3
    above[:, :10] = 1
    above[:8, 10:] = 2
    above[8:, 10:] = 3
    below = np.zeros((16, 20), np.uint32)  # chunk below owns X=1, Z=2; sees Y as foreign 3
    below[:, :10] = 1
    below[:8, 10:] = 3
    below[8:, 10:] = 2
    pairs = face_pairs(above, below, 2, 2)
    assert pairs.tolist() == [[1, 1]]


# ------------------------------------------------------------------- on the cluster
def test_distributed_equals_single_process(first_run, reference):
    out, probs, labels, calls = first_run
    ref_probs, ref_labels = reference
    assert probs.dtype == np.float32 and probs.shape == (3, SIZE, SIZE)
    assert labels.dtype == np.uint32 and labels.shape == (SIZE, SIZE)
    assert tuple(probs.chunks) == (3, CHUNK, CHUNK)
    assert np.abs(probs[...] - ref_probs).max() <= 1e-5
    labels = labels[...]
    assert_same_instances(labels, ref_labels)
    assert labels.max() == len(np.unique(labels)) - 1  # ids 1..K
    n_chunks = (SIZE // CHUNK) ** 2
    assert calls[-1] == (2 * n_chunks, 2 * n_chunks)  # each chunk: one predict + one relabel
    # objects cut by chunk borders got one id: many ids span two chunks
    rows = labels[CHUNK - 1], labels[CHUNK]
    crossing = (rows[0] > 0) & (rows[0] == rows[1])
    assert crossing.sum() > 100
    assert "scratch" not in zarr.open_group(str(out), mode="r")["_work"]


def test_killed_worker_does_not_change_the_result(
    first_run, cluster, tiny_model, big_image, reference, tmp_path
):
    out, _, _, _ = first_run
    client, _ = cluster
    group = zarr.open_group(str(out), mode="r+")
    redo = [0, 5, 10, 15]
    for lin in redo:  # recompute four chunks...
        group["_work/counts"][lin] = 0
        group["_work/labelled"][lin] = 0
    arm = tmp_path / "kill-one-worker"
    arm.touch()  # ...and the first worker to finish writing one dies before marking it
    pids = set(client.run(os.getpid).values())
    client.register_plugin(DieBeforeMarking(str(arm)), name=DieBeforeMarking.name)
    try:
        probs, labels = dist.predict_distributed(
            tiny_model, zarr.open_array(str(big_image[1]), mode="r"), scheduler=client, out=out
        )
    finally:
        client.unregister_worker_plugin(DieBeforeMarking.name)
    assert not arm.exists(), "no worker was killed"
    assert set(client.run(os.getpid).values()) != pids  # the nanny started a new worker
    assert (group["_work/counts"][...] > 0).all() and (group["_work/labelled"][...] > 0).all()
    assert np.abs(probs[...] - reference[0]).max() <= 1e-5
    assert_same_instances(labels[...], reference[1])


def _chunk_files(path: Path, name: str) -> dict[str, int]:
    root = path / name
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(("zarr.json", ".z"))
    }


def test_resume_recomputes_only_unfinished_chunks(
    first_run, cluster, tiny_model, big_image, reference
):
    out, _, _, _ = first_run
    client, _ = cluster
    group = zarr.open_group(str(out), mode="r+")
    undone = [1, 6, 11]
    for lin in undone:  # as if the run had stopped before these chunks were marked
        group["_work/counts"][lin] = 0
        group["_work/labelled"][lin] = 0
    before = {n: _chunk_files(out, n) for n in ("probabilities", "labels")}
    probs, labels, calls = predict_big_zarr(client, tiny_model, big_image[1], out)
    assert calls[-1] == (2 * len(undone), 2 * len(undone))
    for name in ("probabilities", "labels"):
        after = _chunk_files(out, name)
        assert after.keys() == before[name].keys()
        rewritten = [k for k in after if after[k] != before[name][k]]
        assert len(rewritten) == len(undone), (name, rewritten)
    assert np.abs(probs[...] - reference[0]).max() <= 1e-5
    assert_same_instances(labels[...], reference[1])
    # a finished store is returned as is
    calls.clear()
    predict(
        tiny_model,
        big_image[0],
        scheduler=client,
        out=out,
        device="cpu",
        progress=lambda *a: calls.append(a),
    )
    assert calls == []


def test_store_mismatch_is_a_clear_error(cluster, tiny_model, tmp_path):
    client, _ = cluster
    image, _ = synthetic_nuclei((256, 256), seed=3)
    out = tmp_path / "small.zarr"
    dist.predict_distributed(tiny_model, image, scheduler=client, out=out, chunk_size=128)
    with pytest.raises(ValueError, match=r"cannot be continued.*shape \(3, 256, 256\)"):
        dist.predict_distributed(tiny_model, image[:200], scheduler=client, out=out, chunk_size=128)
    with pytest.raises(ValueError, match="chunks"):
        dist.predict_distributed(tiny_model, image, scheduler=client, out=out, chunk_size=64)
    with pytest.raises(ValueError, match="another run.*min_size"):
        dist.predict_distributed(
            tiny_model, image, scheduler=client, out=out, chunk_size=128, min_size=30
        )
    group = zarr.open_group(str(out), mode="r+")
    del group["labels"]
    create_array(group, "labels", (256, 256), (128, 128), "int32")
    with pytest.raises(ValueError, match="dtype int32"):
        dist.predict_distributed(tiny_model, image, scheduler=client, out=out, chunk_size=128)
    array = tmp_path / "array.zarr"
    zarr.open_array(str(array), mode="w", shape=(4,), dtype="uint8")
    with pytest.raises(ValueError, match="not a zarr group"):
        dist.predict_distributed(tiny_model, image, scheduler=client, out=array)
    with pytest.raises(ValueError, match="out="):
        predict(tiny_model, image, scheduler=client)


def test_zstack_is_distributed_along_z_and_resumes_after_cancel(cluster, tiny_model, tmp_path):
    client, _ = cluster
    volume = np.stack([synthetic_nuclei((512, 512), seed=s)[0] for s in (4, 5, 6)])
    path = tmp_path / "stack.zarr"
    zarr.open_array(str(path), mode="w", shape=volume.shape, chunks=(1, 256, 256), dtype="uint16")[
        ...
    ] = volume
    model = load_model(tiny_model)
    ref = predict(model, volume, exact=True, device="cpu")
    ref_labels = segment(ref, class_names=model.class_names)

    out = tmp_path / "stack-result.zarr"
    stop = threading.Event()
    first = []

    def on_progress(done, total):
        first.append(done)
        if done >= 2:
            stop.set()

    src = zarr.open_array(str(path), mode="r")
    with pytest.raises(Cancelled):
        dist.predict_distributed(
            tiny_model,
            src,
            scheduler=client,
            out=out,
            chunk_size=256,
            progress=on_progress,
            cancel=stop,
        )
    counts = zarr.open_group(str(out), mode="r")["_work/counts"][...]
    assert counts.shape == (12,) and 2 <= (counts > 0).sum() < 12
    second = []
    probs, labels = dist.predict_distributed(
        tiny_model, src, scheduler=client, out=out, chunk_size=256,
        progress=lambda done, total: second.append(total),
    )  # fmt: skip
    # the unfinished chunks (a task running at the cancel may still have finished) + relabels
    assert 12 < second[-1] <= int((counts == 0).sum()) + 12
    assert probs.shape == (3, 3, 512, 512) and tuple(probs.chunks) == (3, 1, 256, 256)
    assert np.abs(probs[...] - ref).max() <= 1e-5
    labels = labels[...]
    assert_same_instances(labels, ref_labels, tolerance=0.005)
    planes = [set(np.unique(p[p > 0])) for p in labels]
    assert not (planes[0] & planes[1]) and not (planes[1] & planes[2])


def test_cli_predict_dask(cluster, tiny_model, tmp_path, capsys):
    from napari_unet.cli import main

    client, _ = cluster
    image, _ = synthetic_nuclei((384, 384), seed=7)
    src = tmp_path / "in.zarr"
    zarr.open_array(str(src), mode="w", shape=image.shape, chunks=(128, 128), dtype="uint16")[
        ...
    ] = image
    out = tmp_path / "out.zarr"
    address = client.scheduler.address
    argv = ["predict", str(src), "-m", str(tiny_model), "-o", str(out), "--dask", address]
    assert main(argv) == 0
    group = zarr.open_group(str(out), mode="r")
    assert group["probabilities"].shape == (3, 384, 384) and group["labels"].dtype == np.uint32
    model = load_model(tiny_model)
    ref = predict(model, image, exact=True, device="cpu")
    assert np.abs(group["probabilities"][...] - ref).max() <= 1e-5
    assert_same_instances(group["labels"][...], segment(ref, class_names=model.class_names))
    assert main(argv[:-4] + ["-o", str(tmp_path / "x.tif"), "--dask", address]) == 2
    capsys.readouterr()
    assert main(argv) == 0  # run again: complete, nothing computed, and it says so
    assert "out.zarr is already complete (nothing computed" in capsys.readouterr().err


def test_costly_exact_context_warns_with_the_shorter_halo(tmp_path, capsys):
    """U²-Net's 3296 px receptive field makes exact chunks read ~57× what they write: one
    line says so and names the halo of predict's default; that halo is taken without a
    warning (API and CLI), and --halo without --dask is refused."""
    import warnings

    from napari_unet.cli import main
    from napari_unet.models.pretrained import load_pretrained

    layout = resolve_layout(np.zeros((4096, 4096), np.uint16), 1)
    u2 = load_pretrained("u2netp")
    with pytest.warns(RuntimeWarning, match=r"u2netp: exact chunks need \d+ px") as caught:
        spec = dist.build_spec(u2, layout, out="x", key="k")
    assert spec.halo == u2.receptive_field and len(caught) == 1
    fast = int(str(caught[0].message).split("halo=")[1].split(" ")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = dist.build_spec(u2, layout, out="x", key="k", exact=False, halo=fast)
        dist.build_spec(build_model("unet", 1, 3), layout, out="x", key="k")  # small field
    assert short.halo == fast and short.context < spec.context / 4
    image = tmp_path / "in.tif"
    import tifffile

    tifffile.imwrite(image, np.zeros((64, 64), np.uint16))
    assert main(["predict", str(image), "-o", str(tmp_path / "o.tif"), "--halo", "32"]) == 2
    assert "--halo sets the context of --dask chunks" in capsys.readouterr().err


def test_semantic_mode_from_a_dask_array(cluster, tiny_model, tmp_path):
    import dask.array as da

    client, _ = cluster
    image, _ = synthetic_nuclei((384, 320), seed=8)
    probs, labels = dist.predict_distributed(
        tiny_model,
        da.from_array(image, chunks=(128, 128)),
        scheduler=client,
        out=tmp_path / "semantic.zarr",
        chunk_size=128,
        mode="semantic",
    )
    model = load_model(tiny_model)
    ref = predict(model, image, exact=True, device="cpu")
    assert np.abs(probs[...] - ref).max() <= 1e-5
    assert np.array_equal(labels[...], segment(ref, mode="semantic"))


# --------------------------------------------------------------- the workers' runtime
def test_workers_run_the_openvino_export_of_the_client(cluster, tiny_model, tmp_path, monkeypatch):
    """runtime='openvino': decided and exported once in the client, compiled by every
    worker from that export (into the workers' own cache), recorded in the store; the
    probabilities agree with torch as the single-process OpenVINO fp32 runtime does."""
    pytest.importorskip("openvino")
    from napari_unet.inference import backends

    client, worker_cache = cluster
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "client-cache"))
    image, _ = synthetic_nuclei((512, 512), seed=9)
    ref = predict(load_model(tiny_model), image, exact=True, device="cpu", runtime="torch")
    runs = {}
    for runtime in ("openvino", "torch"):
        out = tmp_path / f"{runtime}.zarr"
        probs, _ = dist.predict_distributed(
            tiny_model, image, scheduler=client, out=out, chunk_size=256, device="cpu",
            runtime=runtime,
        )  # fmt: skip
        runs[runtime] = np.asarray(probs[...])
        assert dict(zarr.open_group(str(out), mode="r").attrs)[dist.RUNTIME_ATTR] == {
            "chosen": runtime,
            "precision": "f32" if runtime == "openvino" else None,
            "ran": {runtime: 4},  # the four 256² chunks
        }
    exported = [p.name for p in (tmp_path / "client-cache" / "openvino").glob("*.xml")]
    assert len(exported) == 1  # exported once, by the client
    assert (worker_cache / "openvino" / exported[0]).is_file()  # shipped to the workers
    # napari_unet.predict passes runtime= through to the cluster
    predict(tiny_model, image, scheduler=client, out=tmp_path / "p.zarr", runtime="openvino")
    ran = dict(zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs)[dist.RUNTIME_ATTR]
    assert ran["ran"] == {"openvino": 1}
    assert np.abs(runs["openvino"] - ref).max() <= 1e-4  # as tests/test_backends.py
    assert np.abs(runs["torch"] - ref).max() <= 1e-5
    assert not np.array_equal(runs["openvino"], runs["torch"])  # it did run on OpenVINO


def test_a_worker_that_cannot_load_the_export_runs_torch_with_one_line():
    from napari_unet.distributed.compiled import CompiledModel, load_on_worker

    broken = CompiledModel("not-an-export", "f32", b"<net>", b"")
    with pytest.warns(RuntimeWarning, match="runs on torch") as caught:
        assert load_on_worker(broken, torch.device("cpu"), 1) == (None, "torch")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert load_on_worker(None, torch.device("cpu"), 1) == (None, "torch")
