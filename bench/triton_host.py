"""Host work of the triton backend, without a GPU.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors), after one real step the
kernel launches are replaced by a counter, so what is timed is the Python and torch work
around the kernels: ``AsFTAdamW(backend="triton").step()`` (the plan's prepared step), and
``fused_step`` alone on a batch of the bucket's tensors (the direct op call, which validates
and builds its tables on every call). Also printed: kernel launches and torch ops per step.
Shapes are small on purpose (64 × 64, r 8, k 16, all pairs in one bucket).

    python bench/triton_host.py --pairs 64 224 --calls 300 --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import StepShape, anchored_layers, random_anchor  # noqa: E402
from bench.host_overhead import OpCounter  # noqa: E402


class _Stub:
    """Stands in for a jitted kernel: counts launches, runs nothing."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Stub.launches += 1

        return launch


def _best_ms(fn, calls: int, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def measure(pairs: int, calls: int, runs: int) -> dict:
    from asft_kernels import AsFTAdamW
    from asft_kernels.ops import AdamWHyper
    from asft_kernels.ops.triton import launch as L

    shape = StepShape(64, 64, 8, 16, pairs)
    setup = anchored_layers(shape, random_anchor(shape), torch.device("cpu"), torch.float32)
    opt = AsFTAdamW(setup.params, lr=1e-3, weight_decay=0.01, anchor=setup.binding, anchor_lambda=1.0,
                    backend="triton")
    opt.step()  # real kernels: the statistics pass and one update
    real = L.jitted
    L.jitted = lambda fn: _Stub()
    try:
        for _ in range(3):
            opt.step()
        bucket = opt._current_plan().buckets[0]
        batch = bucket.tensors.as_batch(bucket.counters)[0]  # fused_step alone, on the bucket's tensors
        batch.grad_A, batch.grad_B = bucket.grads()
        hyper = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.01, False)
        before = _Stub.launches
        with OpCounter() as ops:
            opt.step()
        row = {"pairs": pairs, "launches_per_step": _Stub.launches - before, "torch_ops_per_step": ops.count,
               "step_ms": _best_ms(opt.step, calls, runs),
               "fused_step_ms": _best_ms(lambda: L.fused_step(batch, hyper), calls, runs)}
    finally:
        L.jitted = real
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--calls", type=int, default=300, help="calls per timed run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the fastest is kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = ("pairs", "step_ms", "fused_step_ms", "launches_per_step", "torch_ops_per_step")
    print(" | ".join(head))
    for pairs in args.pairs:
        row = measure(pairs, args.calls, args.runs)
        print(" | ".join(f"{row[h]:.3f}" if isinstance(row[h], float) else str(row[h]) for h in head))
    print(f"# torch {torch.__version__}, {os.cpu_count()} cores, 1 torch thread, "
          f"1-min load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
