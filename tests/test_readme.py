"""Every Python block of the README, run as a user would — each one twice.

The blocks use names a user has at hand (``x``, ``image``, ``annotation``, ``labels``,
``stack``) and files
(``huge.zarr``, ``model.safetensors``); they are provided here, small. The only edit to
the text is the training budget (``seconds=60`` → a few seconds).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
SHELL = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.fixture
def user_files(tmp_path, monkeypatch, nuclei):
    import zarr

    from napari_unet.checkpoint import save_model
    from napari_unet.models import build_model

    monkeypatch.chdir(tmp_path)
    image, labels = nuclei
    z = zarr.open_array(
        "huge.zarr", mode="w", shape=(192, 256), chunks=(96, 128), dtype=image.dtype
    )
    z[...] = image[:192, :256]
    save_model(build_model("unet", 1, 3, base_channels=4, depth=2), "model.safetensors")
    annotation = labels.copy()  # all nuclei annotated inside the rectangle (0:128, 0:128)
    annotation[128:] = 0
    annotation[:, 128:] = 0
    return {
        "x": torch.rand(1, 1, 64, 64),
        "image": image,
        "annotation": annotation,
        "labels": labels,  # the ground truth (Compare scores against it)
        "stack": np.stack([image[:64, :96]] * 3),
    }


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_twice(index, user_files):
    code = BLOCKS[index].replace("seconds=60", "seconds=2")
    for _ in range(2):
        namespace = dict(user_files, __name__="__main__")  # run as a script runs it
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        if "probs" in namespace and "labels" in namespace:
            probs, labels = namespace["probs"], namespace["labels"]
            assert probs.shape[-2:] == labels.shape[-2:]


def test_blocks_starting_local_workers_guard_main():
    """``scheduler="local:N"`` starts worker processes that import the user's script: run
    as written in a script, an unguarded block failed ("Nanny failed to start")."""
    local = [b for b in BLOCKS if '"local:' in b]
    assert local
    for block in local:
        assert 'if __name__ == "__main__":' in block, block


def _cli_lines(block: str) -> list[list[str]]:
    import shlex

    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.startswith("napari-unet ")]  # fmt: skip


def test_shell_blocks_run_in_order():
    """Each README shell block, run top to bottom in one folder: no command writes an
    output an earlier one wrote (it would stop with "exists"; ``--dask`` runs resume
    instead), and `compare` scores
    against an annotation, not against a prediction written above it."""
    assert SHELL
    for block in SHELL:
        written: set[str] = set()
        for argv in _cli_lines(block):
            if argv[1] == "compare":
                assert argv[3] not in written, f"compare's ground truth was predicted: {argv}"
            if "--dask" in argv:  # a rerun into the same store resumes it, by design
                continue
            outs = [argv[i + 1] for i, a in enumerate(argv) if a in ("-o", "--output")]
            for out in outs:
                assert out not in written, f"{out} is written twice in one block: {argv}"
                written.add(out)


@pytest.mark.slow
def test_distributed_block_runs_as_a_script(tmp_path, user_files):
    """The dask block saved as a file and run with python, as a user would."""
    import os
    import subprocess
    import sys

    (block,) = [b for b in BLOCKS if '"local:' in b]
    script = tmp_path / "predict_huge.py"
    script.write_text(block + "    print(probs.shape, labels.shape)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(3, 192, 256) (192, 256)" in r.stdout
