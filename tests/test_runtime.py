"""Engine runtime policy: torch threads for a job, OpenMP waiting, bf16 choice."""

from __future__ import annotations

import pytest
import torch

from napari_unet.runtime import (
    THREADS_ENV,
    choose_precision,
    choose_threads,
    configure_openmp,
    cpu_has_bf16,
    gui_running,
    physical_cores,
    torch_threads,
    usable_cpus,
)


def test_thread_policy():
    assert choose_threads(gui=False, environ={}, cores=4, cpus=8) == 4
    assert choose_threads(gui=True, environ={}, cores=4, cpus=8) == 3  # napari keeps a core
    assert choose_threads(gui=True, environ={}, cores=3, cpus=8) == 2
    # 2 CPUs: the GUI shares them (passive waiting; bench/hitl.py: 0.98× vs 0.55× under load)
    assert choose_threads(gui=True, environ={}, cores=8, cpus=2) == 2
    assert choose_threads(gui=True, environ={}, cores=1, cpus=1) == 1  # never 0
    assert choose_threads(gui=False, environ={THREADS_ENV: "3"}, cores=8, cpus=8) == 3
    assert choose_threads(gui=True, environ={"OMP_NUM_THREADS": "2"}, cores=8, cpus=8) == 2
    env = {THREADS_ENV: "5", "OMP_NUM_THREADS": "1"}
    assert choose_threads(gui=False, environ=env, cores=2, cpus=2) == 5  # ours wins
    assert choose_threads(gui=False, environ={"OMP_NUM_THREADS": "4,2"}, cores=2, cpus=2) == 2
    with pytest.raises(ValueError, match=THREADS_ENV):
        choose_threads(environ={THREADS_ENV: "zero"})
    assert 1 <= physical_cores() and 1 <= usable_cpus()
    assert choose_threads(environ={}) >= 1


def test_no_gui_in_a_headless_process():
    assert gui_running() is False


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with torch_threads(0):
            pass


def test_configure_openmp_only_sets_a_default():
    env: dict[str, str] = {}
    assert configure_openmp(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not configure_openmp(env) and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_precision_choice():
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "fp32").dtype is None
    assert choose_precision(cpu, "bf16").dtype is torch.bfloat16
    auto = choose_precision(cpu, "auto")
    assert auto.name == ("bf16" if cpu_has_bf16() else "fp32") and auto.reason
    with pytest.raises(ValueError, match="precision"):
        choose_precision(cpu, "fp16")
