"""Shared test fixtures: deterministic seeds and the bundled nuclei data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002  (legacy global seed for libraries that use it)


@pytest.fixture(scope="session")
def nuclei():
    """(image uint16 (256, 512), labels uint16 (256, 512)) — DSB 2018 nuclei, CC0."""
    from napari_unet._sample_data import nuclei_image, nuclei_labels

    return nuclei_image(), nuclei_labels()


def pytest_configure(config):
    # Tiny networks run fastest on one thread; also keeps timings stable on shared CPUs.
    torch.set_num_threads(1)
    # The suite's many fresh networks run on torch: an OpenVINO export per random network
    # would cost seconds each. tests/test_backends.py exercises the OpenVINO runtime (the
    # CPU default for users) explicitly, with its own cache folder.
    os.environ.setdefault("NAPARI_UNET_RUNTIME", "torch")
