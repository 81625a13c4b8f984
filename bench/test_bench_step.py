"""One optimizer step per variant and shape (see :mod:`bench.harness` for the variants).

``pytest bench --benchmark-only --benchmark-json RESULTS.json``; every group is one shape.
"""

from __future__ import annotations

import pytest

from bench.harness import (
    STEP_VARIANTS,
    VariantUnavailable,
    bench_dtype,
    build_step_case,
    random_anchor,
    run_benchmark,
    suite_name,
    suite_shapes,
)

SUITE = suite_name()
# shape-major order: the variants of one group run back to back, so load drift on a
# shared machine moves them together
CASES = [(shape, variant) for shape in suite_shapes(SUITE) for variant in STEP_VARIANTS]

_anchors: dict = {}


def _anchor_for(shape):
    key = (shape.m, shape.n, shape.k, shape.layers)
    if key not in _anchors:
        _anchors.clear()  # keep one shape's bases alive at a time
        _anchors[key] = random_anchor(shape)
    return _anchors[key]


@pytest.mark.parametrize(("shape", "variant"), CASES, ids=[f"{s.group}-{v}" for s, v in CASES])
def test_step(benchmark, bench_device, shape, variant):
    if variant == "paper_eager" and shape.paper_rounds == 0:
        pytest.skip(f"paper_eager is left out at {shape.group}: O(L·m²n) per step")
    dtype = bench_dtype()
    try:
        case = build_step_case(variant, shape, bench_device, dtype, anchor=_anchor_for(shape))
    except VariantUnavailable as exc:
        pytest.skip(str(exc))
    info = {"kind": "step", "m": shape.m, "n": shape.n, "r": shape.r, "k": shape.k, "layers": shape.layers,
            "dtype": str(dtype).removeprefix("torch."), "floor_bytes": shape.floor_bytes(dtype)}
    fixed = shape.paper_rounds if variant == "paper_eager" else None
    run_benchmark(benchmark, case, bench_device, SUITE, shape.group, info, fixed_rounds=fixed)
