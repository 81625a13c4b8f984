"""End-to-end training step on a tiny Llama: forward + backward + step, per optimizer.

Shows the anchoring cost against a whole step: ``AsFTAdamW`` (each available backend)
and the published loop (``paper_eager``) against ``torch.optim.AdamW``. Each anchored
variant also records ``paired_overhead``: the median of step-time ratios against a
separate AdamW model, the two stepped alternately.
"""

from __future__ import annotations

import pytest

from bench.harness import (
    E2E_CONFIGS,
    E2E_MIN_ROUNDS,
    E2E_VARIANTS,
    VariantUnavailable,
    build_e2e_case,
    paired_overhead,
    run_benchmark,
    suite_name,
)

SUITE = suite_name()
CONFIG = E2E_CONFIGS[SUITE]
PAIRS = {"cpu": 30, "gpu": 50, "smoke": 1}[SUITE]


@pytest.mark.parametrize("variant", E2E_VARIANTS, ids=[f"{CONFIG.group}-{v}" for v in E2E_VARIANTS])
def test_e2e_step(benchmark, bench_device, variant):
    try:
        case = build_e2e_case(variant, CONFIG, bench_device)
    except VariantUnavailable as exc:
        pytest.skip(str(exc))
    info = CONFIG.info()
    if variant != "adamw":
        baseline = build_e2e_case("adamw", CONFIG, bench_device)
        baseline.step()
        case.step()
        info["paired_overhead"] = paired_overhead(case.step, baseline.step, bench_device, PAIRS)
        info["paired_pairs"] = PAIRS
        del baseline
    run_benchmark(benchmark, case, bench_device, SUITE, CONFIG.group, info, min_rounds=E2E_MIN_ROUNDS)
