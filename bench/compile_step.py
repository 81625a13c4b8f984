"""A whole training step under ``torch.compile`` with ``AsFTAdamW``: what is traced and what it costs.

Every variant trains its own tiny PEFT Llama (``bench.harness.build_e2e_case``, same seed, CPU,
fp32; LoRA on q_proj and v_proj); one step is forward + backward + ``opt.step()`` +
``zero_grad``:

==============  ================================================================================
variant         what runs
==============  ================================================================================
uncompiled      the step as written
compiled        ``torch.compile(step)``: forward and backward compiled; ``AsFTAdamW._anchored_step``
                runs outside tracing (``torch.compiler.disable``), one ``asft::`` op per cpp
                bucket. This is the library as it is.
traced_whole    experiment: the same, with ``_anchored_step`` traced by dynamo (the undecorated
                function bound to the instance). Known to be wrong: dynamo drops the step's
                write of ``anchor_loss`` (docs/architecture.md, "torch.compile").
traced_ops      experiment: the checks, the plan, the gradients, the statistics refresh and the
                ``anchor_loss`` write run outside tracing (``torch.compiler.disable``); only each
                bucket's backend ``step`` call is traced (cpp: a method of the prepared C++
                bucket, which dynamo runs without tracing into it).
==============  ================================================================================

Reported per variant: the first call's time (compilation included), graphs and graph breaks
of one step (``torch._dynamo.explain``, on a separate model), recompiles over the next
``--check-steps`` steps (dynamo's recompile log; ``--lr-schedule`` changes the learning rate
every one of those steps), whether ``anchor_loss`` after each of those steps and the
parameters after them agree with the uncompiled run, and the steady median step time: the
median over ``--rounds`` round-robin rounds of the median of ``--steps`` steps (so a change
of load hits every variant alike). The load average is printed before and after.

The first call of the first compiled variant compiles the model's forward and backward; the
later variants reuse inductor's caches of the same graphs, so their first calls are not
comparable with it. For first-call times, run one variant per process with an empty cache
directory: ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_step.py --variants X``.
The default model has two buckets (v_proj at another LoRA rank than q_proj): with one bucket
the traced final frame of ``_anchored_step`` holds no tensor op, runs as plain Python, and
``traced_whole`` happens to keep ``anchor_loss``.

    python bench/compile_step.py                          # cpp backend, inductor
    python bench/compile_step.py --backend eager --compiler eager
    python bench/compile_step.py --variants compiled traced_ops --rounds 15 --no-explain
    python bench/compile_step.py --compiler eager --lr-schedule    # recompiles when lr changes

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asft_kernels

from asft_kernels import AsFTAdamW  # noqa: E402  (after the checkout is on sys.path)
from asft_kernels.optim import _check_lambda  # noqa: E402
from asft_kernels.plan import hyper_of  # noqa: E402
from bench.harness import LR, E2EConfig, build_e2e_case, machine_facts  # noqa: E402

VARIANTS = ("uncompiled", "compiled", "traced_whole", "traced_ops")
_RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"


# ----------------------------------------------------------------------------- the experiments
@torch.compiler.disable
def _begin_step(opt: AsFTAdamW):
    """``AsFTAdamW._anchored_step`` up to the bucket calls, outside tracing: the checks, the
    plan, the gradients, torch's AdamW on the plain parameters, the statistics refresh.
    Returns ``(plan, calls, grad_scale, found_inf)``, ``calls`` one tuple per bucket."""
    groups = opt.param_groups
    for group in groups:
        _check_lambda(group["anchor_lambda"])
    opt._check_pair_lambdas()
    plan = opt._current_plan()
    if any(plan.plain_fp32_state) or any(b.shards is not None for b in plan.buckets):
        raise NotImplementedError("traced_ops covers neither λ = 0 low-precision factors nor FSDP2 buckets")
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    grads = plan.gradients()
    opt._check_plain_grads(plan)
    for gi, group in enumerate(groups):
        opt._plain_adamw(group, plan.plain[gi])
    calls = []
    for bucket, (grad_A, grad_B) in zip(plan.buckets, grads):
        bucket.refresh_statistics()
        hyper_B = hyper_of(groups[bucket.group_B])
        hyper_A = hyper_B if bucket.group_A == bucket.group_B else hyper_of(groups[bucket.group_A])
        scale = bucket.scale_for(float(groups[bucket.group_B]["anchor_lambda"]))
        calls.append((bucket.backend.step, bucket.handle, grad_A, grad_B, scale, hyper_A, hyper_B))
    return plan, calls, grad_scale, found_inf


@torch.compiler.disable
def _finish_step(opt: AsFTAdamW, plan, losses) -> None:
    """The bookkeeping after the bucket calls, outside tracing: version counters, ``anchor_loss``."""
    for bucket in plan.buckets:
        bucket.versions = bucket.current_versions()
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    opt._anchor_loss = total


def _traced_ops_step(opt: AsFTAdamW) -> None:
    """``_anchored_step`` whose only traced part is each bucket's backend ``step`` call."""
    plan, calls, grad_scale, found_inf = _begin_step(opt)
    losses = [step(handle, grad_A, grad_B, scale, hyper_A, hyper_B, grad_scale, found_inf)
              for step, handle, grad_A, grad_B, scale, hyper_A, hyper_B in calls]
    _finish_step(opt, plan, losses)


def make_variant(variant: str, backend: str, cfg: E2EConfig, compiler: str):
    """``(step function, case)`` of ``variant`` on a fresh model."""
    case = build_e2e_case(backend, cfg, torch.device("cpu"))
    opt = case.optimizer
    if variant == "traced_whole":
        opt._anchored_step = MethodType(AsFTAdamW._anchored_step.__wrapped__, opt)
    elif variant == "traced_ops":
        opt._anchored_step = MethodType(_traced_ops_step, opt)
    if variant == "uncompiled":
        return case.step, case
    return torch.compile(case.step, backend=compiler), case


# ----------------------------------------------------------------------------- measuring
class _RecompileCounter(logging.Handler):
    """Counts dynamo's "Recompiling function" records, by function name."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_function: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        first = record.getMessage().splitlines()[0]
        if first.startswith("Recompiling function"):
            self.by_function[first.split()[2]] += 1

    def total(self) -> int:
        return sum(self.by_function.values())


def _recompile_counter() -> _RecompileCounter:
    torch._logging.set_logs(recompiles=True)
    log = logging.getLogger(_RECOMPILES_LOGGER)
    log.propagate = False  # counted here, not printed
    counter = _RecompileCounter()
    log.addHandler(counter)
    return counter


def explain(variant: str, backend: str, cfg: E2EConfig) -> dict:
    """Graphs and graph breaks of one step of ``variant`` (a model of its own; resets dynamo)."""
    fn, case = make_variant(variant, backend, cfg, "eager")
    out = torch._dynamo.explain(case.step)()
    reasons = Counter(r.reason.splitlines()[0][:90] for r in out.break_reasons)
    torch._dynamo.reset()
    return {"graphs": out.graph_count, "breaks": len(out.break_reasons), "reasons": reasons}


def loss_check(got: list[float], want: list[float], rtol: float = 1e-3) -> str:
    """``ok (max rel diff)`` or how many of the steps' ``anchor_loss`` values are wrong (NaN: None)."""
    diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want)]
    wrong = sum(not d <= rtol for d in diffs)  # NaN (anchor_loss None) counts as wrong
    return f"ok ({max(diffs):.0e})" if not wrong else f"WRONG at {wrong}/{len(diffs)} steps"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpp", choices=("cpp", "eager"), help="AsFTAdamW backend")
    ap.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager", "eager"),
                    help="torch.compile backend")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--check-steps", type=int, default=20, help="steps after the first call, counted and checked")
    ap.add_argument("--lr-schedule", action="store_true", help="change lr at every checked step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds; the median of their medians is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--v-rank", type=int, default=4,
                    help="LoRA rank of v_proj (PEFT rank_pattern): another rank than --r makes two buckets; 0: --r")
    ap.add_argument("--no-explain", action="store_true", help="skip the graph / graph break count")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # dynamo's graph-break and profiler warnings
    cfg = E2EConfig(hidden=args.hidden, intermediate=int(args.hidden * 2.6875), layers=args.layers, heads=4,
                    kv_heads=2, vocab=256, seq=args.seq, batch=2, r=args.r, k=args.k,
                    rank_pattern=(("v_proj", args.v_rank),) if args.v_rank else ())
    variants = list(dict.fromkeys(["uncompiled"] + args.variants))  # the reference run is always there
    print(f"# {cfg}, AsFTAdamW backend {args.backend}, torch.compile backend {args.compiler}, "
          f"threads {args.threads}, loadavg {os.getloadavg()}")

    rows = {v: {} for v in variants}
    if not args.no_explain:
        for v in variants[1:]:
            rows[v].update(explain(v, args.backend, cfg))
    torch._dynamo.reset()
    counter = _recompile_counter()

    fns, cases, losses = {}, {}, {}
    for v in variants:  # compile and check one variant after the other
        fn, case = make_variant(v, args.backend, cfg, args.compiler)
        fns[v], cases[v] = fn, case
        t0 = time.perf_counter()
        fn()
        rows[v]["first_s"] = time.perf_counter() - t0
        before = counter.total()
        seen = Counter(counter.by_function)
        losses[v] = []
        for i in range(args.check_steps):
            if args.lr_schedule:
                for group in case.optimizer.param_groups:
                    group["lr"] = LR * (1.0 - 0.01 * (i + 1))
            fn()
            loss = case.optimizer.anchor_loss
            losses[v].append(float("nan") if loss is None else float(loss))
        rows[v]["recompiles"] = counter.total() - before
        rows[v]["recompiled"] = counter.by_function - seen
    ref = cases["uncompiled"]
    for v in variants:
        rows[v]["anchor_loss"] = loss_check(losses[v], losses["uncompiled"])
        rows[v]["param_diff"] = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-30))
                                    for p, q in zip(cases[v].params, ref.params))

    samples = {v: [] for v in variants}
    gc.disable()
    try:
        for _ in range(args.rounds):
            for v in variants:
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fns[v]()
                    times.append(time.perf_counter() - t0)
                samples[v].append(statistics.median(times))
    finally:
        gc.enable()

    base = statistics.median(samples["uncompiled"])
    print("variant | first call s | graphs | breaks | recompiles | anchor_loss vs uncompiled | param rel diff | "
          "median step ms | / uncompiled")
    for v in variants:
        r = rows[v]
        med = statistics.median(samples[v])
        print(f"{v} | {r['first_s']:.2f} | {r.get('graphs', '-')} | {r.get('breaks', '-')} | {r['recompiles']} | "
              f"{r['anchor_loss']} | {r['param_diff']:.1e} | {1e3 * med:.2f} | {med / base:.3f}")
    for v in variants:
        if rows[v].get("reasons"):
            print(f"# {v} graph breaks: {dict(rows[v]['reasons'])}")
        if rows[v]["recompiled"]:
            print(f"# {v} recompiled: {dict(rows[v]['recompiled'])}")
    facts = machine_facts()
    print(f"# loadavg {os.getloadavg()}, torch {facts['torch_version']}, cpu_count {facts['cpu_count']}, "
          f"round medians ms: " + ", ".join(f"{v}: {[round(1e3 * s, 2) for s in samples[v]]}" for v in variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
