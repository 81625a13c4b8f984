"""pytest configuration of the benchmark suites (collected only by ``pytest bench``)."""

from __future__ import annotations

import pytest
import torch

from bench.harness import default_threads, machine_facts, suite_device, suite_name

# recorded in machine_info and in every benchmark's extra_info
torch.set_num_threads(default_threads(suite_name()))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine_facts())


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """Device of the selected suite; the GPU suite skips without CUDA."""
    device = suite_device(suite_name())
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("the gpu suite needs a CUDA device")
    return device
