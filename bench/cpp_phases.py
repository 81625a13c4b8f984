"""Where the C++ step spends its time: the phase clock of the CPU kernels.

Builds (or loads from the cache) the C++ kernels with the phase clock
(``ASFT_CPU_PHASE_CLOCK=1``: every phase of every block adds its wall time to a per-phase
sum; a build of its own, in its own cache directory, so the normal build is untouched),
runs ``--calls`` calls on the configurations of ``bench/cpp_step.py`` and prints per phase
the milliseconds per call and the share of the call:

* ``kernel`` (default): ``fused_step`` of the C++ backend, as ``cpp kernel`` of cpp_step.py;
* ``--step``: ``AsFTAdamW(..., backend="cpp").step()``, which adds the checks and the
  anchoring terms of ``asft::anchored_adamw_step_`` (and the optimizer's Python, which no
  phase covers: it is the call's time minus the phases).

The phases of blocks are summed over threads, so with ``--threads 2`` their shares of the
call's wall time add up to about 2. ``U R_B`` and ``Pᵀ += B'ᵀ U`` also print their
multiply-adds per second (``m k r`` each per pair). Caches are flushed before every call
(64 MiB written, as in cpp_step.py) unless ``--warm``. Timing each phase costs two clock
reads per phase and sub-tile, so the calls run a little slower than in cpp_step.py.

Usage: ``python bench/cpp_phases.py [--config I] [--shape M N R K PAIRS] [--threads T]
[--calls N] [--warm] [--step]``. Not part of the test suite (its smoke test runs a tiny
shape).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asft_kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpp_step  # noqa: E402

from asft_kernels.ops.cpp_build import PHASE_CLOCK_ENV  # noqa: E402  (imports no library)

os.environ[PHASE_CLOCK_ENV] = "1"  # read when the C++ library is first built or loaded


def measure(label: str, m: int, n: int, r: int, k: int, layers: int, calls: int, flush: bool, step: bool) -> None:
    """Run ``calls`` calls after 3 warm-up calls and print the table of phases."""
    import asft_kernels as asft
    from asft_kernels.ops import cpp

    if not cpp.is_available():
        raise SystemExit("C++ backend unavailable")
    params, binding, pairs = cpp_step._model(m, n, r, k, layers)
    for p in params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    if step:
        fn = asft.AsFTAdamW(params, lr=1e-4, anchor=binding, backend="cpp").step
    else:
        batch, hyper = cpp_step.kernel_batch(cpp_step.kernel_columns(pairs, binding, k, r))

        def fn():
            cpp.fused_step(batch, hyper)

    flush_caches = cpp_step.cache_flusher() if flush else None
    for _ in range(3):
        fn()
    cpp.phase_times(reset=True)
    total = 0.0
    for _ in range(calls):
        if flush_caches:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    phases = {name: sec / calls for name, sec in cpp.phase_times(reset=True).items()}
    call = total / calls
    print(f"\n{label}: {'AsFTAdamW.step()' if step else 'fused_step'}, {layers} pair(s), "
          f"threads={torch.get_num_threads()}, {calls} calls, "
          f"caches {'flushed before each call' if flush else 'warm'}")
    print(f"  {'phase':28s} {'ms / call':>10s} {'of call':>8s}")
    print(f"  {'(whole call)':28s} {call * 1e3:10.3f} {1:8.1%}")
    fmas = {cpp.PHASES[2]: layers * m * k * r, cpp.PHASES[4]: layers * m * k * r}
    for name, sec in phases.items():
        line = f"  {name:28s} {sec * 1e3:10.3f} {sec / call:8.1%}"
        if name in fmas and sec > 0:
            line += f"   {fmas[name] / sec / 1e9:6.1f} G multiply-adds/s"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=int, default=None, help="run only cpp_step.CONFIGS[i]")
    parser.add_argument("--shape", type=int, nargs=5, metavar=("M", "N", "R", "K", "PAIRS"),
                        help="one shape instead of the configurations")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warm", action="store_true", help="keep caches warm instead of flushing them")
    parser.add_argument("--step", action="store_true", help="time AsFTAdamW.step() instead of fused_step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        m, n, r, k, layers = args.shape
        configs = [(f"m={m} n={n} r={r} k={k} x{layers}", m, n, r, k, layers)]
    else:
        configs = [c for i, c in enumerate(cpp_step.CONFIGS) if args.config is None or args.config == i]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"1-minute load average {load:.2f} on {os.cpu_count()} CPUs")
    for cfg in configs:
        measure(*cfg, calls=args.calls, flush=not args.warm, step=args.step)


if __name__ == "__main__":
    main()
