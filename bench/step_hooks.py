"""What wrapping ``AsFTAdamW.step`` for the step hooks costs: our wrapper, torch.optim's, none.

``torch.optim.Optimizer`` wraps every optimizer class's ``step`` (``profile_hook_step``):
the global and per-optimizer step pre-hooks, the step, the profiler's step-code marker and
the post-hooks, all inside a ``torch.autograd.profiler.record_function`` range that is
entered (two dispatched ``profiler`` ops) whether or not a profiler runs. Variants, each
``AsFTAdamW(..., backend=B).step()`` on its own copy of the parameters (a step that saw
another optimizer's writes would recompute its cached statistics):

* ``ours``: ``AsFTAdamW`` with ``asft_kernels.optim._step_with_hooks``, which runs the same
  hooks itself and enters the range only while a profiler runs (measured only while that
  wrapper exists);
* ``torch``: a subclass named ``AsFTAdamW`` whose ``step`` is the unwrapped function, so
  that torch.optim wraps it;
* ``bare``: the unwrapped ``step`` function called directly: no hooks, no range (what any
  wrapper could at best reach).

Shapes: the tiny Llama layouts of ``bench/host_overhead.py`` (2, 8, 32 layers: 14, 56, 224
pairs of r 8, k 8, where host work dominates) and ``--shape`` (default 4 pairs of
2048 × 2048, r 16, k 64), all fp32 on the CPU, for the backends ``cpp`` (when built) and
``eager``. Per configuration the variants are sampled round-robin (the order rotating from
round to round) ``--repeats`` times, each sample either after writing 64 MiB
(``bench/cpp_step.py``'s cache flush, as a step runs after forward/backward) or, with
``--warm``, right after a call of the same variant. Printed per configuration: the medians
in µs, and what our wrapper saves, ``torch − ours``, and torch's wrapper costs,
``torch − bare``, each as the median of the per-round differences (more robust on a shared
machine than the difference of the medians), in µs and as a percentage of the ``torch``
step. The garbage collector is off while timing.

    python bench/step_hooks.py                       # caches flushed, then warm
    python bench/step_hooks.py --warm --repeats 400  # warm only

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asft_kernels

from bench import cpp_step, host_overhead  # noqa: E402


def _variants() -> dict[str, type]:
    """The optimizer class of every variant (``bare`` steps through ``torch``'s class)."""
    from asft_kernels import AsFTAdamW, optim

    unwrapped = type("AsFTAdamW", (AsFTAdamW,), {"step": inspect.unwrap(AsFTAdamW.step)})
    classes = {"ours": AsFTAdamW} if hasattr(optim, "_step_with_hooks") else {}
    return {**classes, "torch": unwrapped, "bare": unwrapped}


def _optimizers(make_setup, backend: str) -> dict:
    """The step of one ``AsFTAdamW`` per variant, each on a fresh copy of the parameters
    from ``make_setup() -> (params, binding)`` (same seed, so the same values)."""
    steps = {}
    for variant, cls in _variants().items():
        params, binding = make_setup()
        opt = cls(params, lr=1e-4, weight_decay=0.01, anchor=binding, anchor_lambda=1.0, backend=backend)
        bare = inspect.unwrap(cls.step)
        steps[variant] = (lambda opt=opt, bare=bare: bare(opt)) if variant == "bare" else opt.step
    return steps


def _tiny(layers: int):
    def setup():
        _, binding, params = host_overhead.anchored_model(layers)
        return params, binding

    return setup


def _shape(m: int, n: int, r: int, k: int, pairs: int):
    def setup():
        params, binding, _ = cpp_step._model(m, n, r, k, pairs)
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
        return params, binding

    return setup


def measure(steps: dict, repeats: int, warmup: int, flush: bool) -> dict[str, list[float]]:
    """Seconds per sample of every variant, sampled round-robin."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    flush_caches = cpp_step.cache_flusher() if flush else None
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                fn = steps[name]
                if flush_caches:
                    flush_caches()
                else:
                    fn()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def row(config: str, backend: str, times: dict[str, list[float]]) -> dict:
    """Medians (µs) of every variant; ``torch − V`` for the other variants V as the median of
    the per-round differences, in µs and in % of the ``torch`` median."""
    med = {v: statistics.median(ts) * 1e6 for v, ts in times.items()}
    out = {"config": config, "backend": backend, **{f"{v}_us": round(t, 1) for v, t in med.items()}}
    for v in times:
        if v != "torch":
            diff = statistics.median(t - o for t, o in zip(times["torch"], times[v])) * 1e6
            out[f"torch-{v}_us"] = round(diff, 1)
            out[f"torch-{v}_pct"] = round(100 * diff / med["torch"], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="tiny Llama layers (7 pairs each)")
    ap.add_argument("--shape", type=int, nargs=5, default=[2048, 2048, 16, 64, 4], metavar=("M", "N", "R", "K", "P"),
                    help="the realistic shape: P pairs of B (M, R), A (R, N), U (M, K)")
    ap.add_argument("--backends", nargs="+", default=["cpp", "eager"])
    ap.add_argument("--repeats", type=int, default=300, help="samples per variant and configuration")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--warm", action="store_true", help="only warm caches (default: flushed, then warm)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from asft_kernels.ops import cpp

    backends = [b for b in args.backends if b != "cpp" or cpp.is_available()]
    if backends != args.backends:
        print("# the C++ backend is not available here: cpp left out")
    m, n, r, k, p = args.shape
    configs = [(f"{7 * n_}x tiny (L{n_})", _tiny(n_)) for n_ in args.layers]
    configs.append((f"{p}x {m}x{n} r{r} k{k}", _shape(m, n, r, k, p)))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"1-minute load average {os.getloadavg()[0]:.2f}, repeats {args.repeats}")
    for flush in ([False] if args.warm else [True, False]):
        print(f"\n## caches {'flushed before each sample' if flush else 'warm'}")
        for i, (label, setup) in enumerate(configs):
            for j, backend in enumerate(backends):
                out = row(label, backend, measure(_optimizers(setup, backend), args.repeats, args.warmup, flush))
                if i == j == 0:
                    print(" | ".join(out))
                print(" | ".join(str(v) for v in out.values()), flush=True)
    print(f"# 1-minute load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
