"""Time one bucket's C++ call on the host-overhead layout (many small pairs).

Builds the tiny Llama of ``bench/host_overhead.py`` (every linear layer adapted, r 8, k 8),
steps an ``AsFTAdamW(backend="cpp")`` once so that its plan and prepared handles exist, and
reports medians over ``--samples`` calls of:

* ``call``: ``asft_kernels.ops.cpp.step`` on the bucket's handle (the whole C++ step);
* ``checks + terms``: the same call with a GradScaler's ``found_inf`` set, which checks its
  inputs and computes the anchoring terms but writes nothing: the per-call cost that does
  not depend on the parameters' size;
* ``opt.step()``: the optimizer's whole step.

Works on any checkout whose C++ backend has ``prepare``/``step`` (run it from each one to
compare them). Usage: ``python bench/cpp_call.py [--layers 2 32] [--samples 500]``. Not part
of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asft_kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_us(fn, samples: int) -> float:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(layers: int, samples: int) -> tuple[int, float, float, float]:
    """``(pairs, call µs, checks + terms µs, opt.step() µs)`` for ``layers`` decoder layers."""
    from host_overhead import anchored_model

    from asft_kernels import AsFTAdamW
    from asft_kernels.ops import cpp
    from asft_kernels.plan import hyper_of

    _, binding, params = anchored_model(layers)
    opt = AsFTAdamW(params, lr=1e-4, weight_decay=0.01, anchor=binding, anchor_lambda=1.0, backend="cpp")
    opt.step()
    (bucket,) = opt._plan.buckets
    grad_A, grad_B = bucket.grads()
    hyper = hyper_of(opt.param_groups[0])
    scale = bucket.scale_for(1.0)
    inf = torch.ones((), dtype=torch.float32)
    call = _median_us(lambda: cpp.step(bucket.handle, grad_A, grad_B, scale, hyper, hyper), samples)
    checks = _median_us(lambda: cpp.step(bucket.handle, grad_A, grad_B, scale, hyper, hyper, None, inf), samples)
    return len(bucket), call, checks, _median_us(opt.step, samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 32], help="decoder layers (7 pairs each)")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), 1-minute load average {os.getloadavg()[0]:.2f}")
    print("pairs | call_us | checks_and_terms_us | opt_step_us")
    for layers in args.layers:
        pairs, call, checks, whole = measure(layers, args.samples)
        print(f"{pairs} | {call:.0f} | {checks:.0f} | {whole:.0f}")
    print(f"# 1-minute load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
