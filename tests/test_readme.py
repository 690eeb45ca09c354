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
        namespace = dict(user_files)
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        if "probs" in namespace and "labels" in namespace:
            probs, labels = namespace["probs"], namespace["labels"]
            assert probs.shape[-2:] == labels.shape[-2:]
