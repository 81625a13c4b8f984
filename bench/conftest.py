"""pytest configuration of the benchmark suites (collected only by ``pytest bench``)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench.harness import default_threads, machine_facts, suite_device, suite_name

# recorded in machine_info and in every benchmark's extra_info
torch.set_num_threads(default_threads(suite_name()))
_START = (time.time(), os.getloadavg()[0])


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine_facts())
    # how busy the (possibly shared) machine was: 1-minute load average at start and end
    machine_info["loadavg_start"] = round(_START[1], 2)
    machine_info["loadavg_end"] = round(os.getloadavg()[0], 2)
    machine_info["suite_wall_s"] = round(time.time() - _START[0], 1)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """Device of the selected suite; the GPU suite skips without CUDA."""
    device = suite_device(suite_name())
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("the gpu suite needs a CUDA device")
    return device
