"""Host work of one optimizer step on a model with many adapted layers (pytest-benchmark rows).

The layout of :mod:`bench.host_overhead` (tiny Llama, all 7 linear targets per layer, r 8,
anchor k 8): ``torch.optim.AdamW`` fused and foreach against ``AsFTAdamW`` with the C++ and
the eager backend. ``extra_info`` holds the number of pairs and the torch ops one step
dispatches. ``python bench/host_overhead.py`` prints the same comparison as ratios.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import rounds_for, suite_name
from bench.host_overhead import VARIANTS, anchored_model, make_optimizer, ops_per_step

SUITE = suite_name()
LAYERS = {"cpu": (2, 8, 32), "gpu": (), "smoke": (1,)}[SUITE]
CASES = [(layers, variant) for layers in LAYERS for variant in VARIANTS]

_models: dict = {}


def _model(layers: int):
    if layers not in _models:
        _models.clear()
        _models[layers] = anchored_model(layers)
    return _models[layers]


@pytest.mark.parametrize(("layers", "variant"), CASES, ids=[f"host-L{n}-{v}" for n, v in CASES])
def test_host_step(benchmark, layers, variant):
    _, binding, params = _model(layers)
    if variant == "cpp":
        from asft_kernels.ops import _compiled_backend

        if _compiled_backend("cpp") is None:
            pytest.skip("the C++ backend is not built here")
    opt = make_optimizer(variant, params, binding)
    ops = ops_per_step(opt)  # also the warm-up: plan built, statistics cached
    for _ in range(3):
        opt.step()
    rounds = 1 if SUITE == "smoke" else 200
    benchmark.group = f"host-llama-L{layers}"
    benchmark.extra_info.update({"kind": "host", "variant": variant, "layers": layers, "pairs": len(binding),
                                 "params": len(params), "ops_per_step": ops, "threads": torch.get_num_threads()})
    benchmark.pedantic(opt.step, rounds=rounds_for(0.0, SUITE, fixed=rounds), iterations=1, warmup_rounds=0)
