"""The GPU benchmark of the triton backend in one short run (bench/gpu_suite.sh).

Three parts, each written to its own JSON under ``--out`` so that one running out of time
loses only itself:

``bench``
    At each shape (64 anchored pairs of 4096 × 4096 by default, issue #24's list), the
    median time of one step of each variant, host-timed (``torch.cuda.synchronize()`` after
    every step) and device-timed (CUDA events around back-to-back steps):

    ============== ==========================================================================
    triton         ``AsFTAdamW(backend="triton").step()`` (the optimizer, as it calls the
                   backend at this commit)
    triton_step    the bucket's prepared step alone: ``launch.step(handle, …)``, the call the
                   plan makes (tables on the device, no host reads)
    triton_graph   the same prepared step captured once in a ``torch.cuda.CUDAGraph``, replayed
    eager          ``AsFTAdamW(backend="eager").step()``
    eager_compiled the eager math of one bucket written on stacked tensors (counters, terms,
                   update, statistics) under ``torch.compile``: what a user would write
                   instead of the kernels
    adamw_fused    ``torch.optim.AdamW(fused=True)`` on the same parameters, no anchoring
    paper_eager    the published loop: dense ``C``, ΔW materialized, autograd, AdamW
    floor          ``copy_`` of the bytes one anchored step must move
    ============== ==========================================================================

``accuracy``
    Per ``tl.dot`` precision of the U products (:func:`launch.u_precisions`): three steps
    of a few pairs against the same steps in float64, the largest relative error of A, B,
    the moments and P, whether it is within the fp32 trajectory tolerance (1e-5), and the
    step time at the two k = 4096 shapes (64 pairs): the data for choosing the default.

``profile``
    For each shape, the host time of issuing one prepared step (no synchronisation) against
    its device time, and the device time per kernel (``torch.profiler``).

Usage (CUDA)::

    python bench/triton_suite.py --out bench/results/gpu --parts bench accuracy profile
    python bench/triton_suite.py --smoke [--out DIR]   # CPU, Triton interpreter: every code path, tiny shapes

``--smoke`` runs every part's code on a tiny shape under the Triton interpreter (no
timing worth reading) so that a broken script is found before GPU time is spent on it; it
writes into ``--out`` or, without it, a new temporary directory (never bench/results/gpu).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import synchronize as sync  # noqa: E402  (after the checkout is on sys.path)

#: (r, k, dtype) of the benchmark shapes, each with 64 pairs of 4096 × 4096 (issue #24).
SHAPES = [(8, 64, "float32"), (8, 256, "float32"), (64, 256, "float32"), (8, 4096, "float32"),
          (64, 4096, "float32"), (16, 64, "bfloat16")]
VARIANTS = ("triton", "triton_step", "triton_graph", "eager", "eager_compiled", "adamw_fused", "paper_eager", "floor")
LR, BETAS, EPS, WD, LAM = 1e-3, (0.9, 0.999), 1e-8, 0.01, 1.0
TOLERANCE = 1e-5  # the fp32 trajectory tests' relative tolerance (tests/helpers.py)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    m: int
    n: int
    r: int
    k: int
    pairs: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.pairs}x{self.m}x{self.n}-r{self.r}-k{self.k}-{self.dtype}"


# ---------------------------------------------------------------------------- timing


def time_step(step, device: torch.device, rounds: int, warmup: int = 3) -> dict:
    """``host_ms``: median wall time of one step ending with a synchronisation; ``device_ms``:
    CUDA-event time of ``rounds`` back-to-back steps, per step (= host_ms on CPU);
    ``issue_ms``: median wall time of issuing one step without waiting for it."""
    for _ in range(warmup):
        step()
    sync(device)
    host = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        sync(device)
        host.append(time.perf_counter() - t0)
    issue = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            issue.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        device_ms = start.elapsed_time(end) / rounds
    else:
        device_ms = statistics.median(host) * 1e3
        issue = host
    return {"host_ms": statistics.median(host) * 1e3, "device_ms": device_ms,
            "issue_ms": statistics.median(issue) * 1e3, "rounds": rounds}


# ---------------------------------------------------------------------------- one bucket


_BASIS: dict = {}


def random_basis(L: int, m: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A random (L, m, k) basis scaled by 1/√m, drawn on the device and shared by every bucket
    of that shape (read-only for the steps; at 64 × 4096 × 4096 it is 4.3 GB in fp32)."""
    key = (L, m, k, str(device), dtype)
    if key not in _BASIS:
        _BASIS.clear()  # one shape at a time
        g = torch.Generator(device=device).manual_seed(1)
        _BASIS[key] = torch.randn((L, m, k), generator=g, device=device, dtype=dtype) / math.sqrt(m)
    return _BASIS[key]


class Bucket:
    """The tensors of one bucket of ``shape.pairs`` equal pairs, stacked as the plan keeps
    them (``P``, ``G``, ``M``, terms, ``w``), with per-pair views for the backend. U is
    random with orthonormal columns up to scale (speed does not depend on it) unless
    ``orthonormal``."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0, orthonormal: bool = False,
                 math_dtype: torch.dtype = torch.float32, U: torch.Tensor | None = None):
        from asft_kernels.ops import AnchoredBatch

        g = torch.Generator(device="cpu").manual_seed(seed)
        L, m, n, r, k = shape.pairs, shape.m, shape.n, shape.r, shape.k
        pdt = _DTYPES[shape.dtype] if math_dtype == torch.float32 else math_dtype
        md = math_dtype

        def randn(*size, scale=1.0, dtype=md):
            return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

        self.A = randn(L, r, n, scale=1 / math.sqrt(n), dtype=pdt)
        self.B = randn(L, m, r, scale=1 / math.sqrt(r), dtype=pdt)
        self.gA = randn(L, r, n, scale=1e-2, dtype=pdt)
        self.gB = randn(L, m, r, scale=1e-2, dtype=pdt)
        c = torch.rand(L, k, 1, generator=g, dtype=torch.float64) * 0.9
        if U is None:  # drawn last: a bucket given U has the same A, B, gradients, w
            if orthonormal:  # QR on the device, in float64
                U = torch.linalg.qr(torch.randn(L, m, k, generator=g, dtype=torch.float64).to(device))[0].to(md)
            else:
                U = random_basis(L, m, k, device, md)
        self.U = U
        self.w = (2 * c - c * c).to(device=device, dtype=md)
        self.mA, self.vA = torch.zeros_like(self.A, dtype=md), torch.zeros_like(self.A, dtype=md)
        self.mB, self.vB = torch.zeros_like(self.B, dtype=md), torch.zeros_like(self.B, dtype=md)
        Bm, Am = self.B.to(md), self.A.to(md)
        self.P = (self.U.to(md).mT @ Bm).contiguous()
        self.G = Bm.mT @ Bm
        self.M = Am @ Am.mT
        self.Q_B, self.H = torch.empty_like(self.G), torch.empty_like(self.G)
        self.R_B = torch.empty_like(self.P)
        self.counters = torch.zeros(2 * L, device=device, dtype=md)
        self.scale = torch.full((L,), 2 * LAM, device=device, dtype=md)
        views = lambda t: list(t.unbind(0))  # noqa: E731
        self.batch = AnchoredBatch(views(self.A), views(self.B), views(self.mA), views(self.vA), views(self.mB),
                                   views(self.vB), views(self.P), views(self.G), views(self.M), [], [],
                                   views(self.U), views(self.Q_B), views(self.R_B), views(self.H), [], [])

    def state(self) -> list[torch.Tensor]:
        return [self.A, self.B, self.mA, self.vA, self.mB, self.vB, self.P, self.G, self.M]


def triton_step_fn(bucket: Bucket, precision: str | None = None):
    """The prepared step of ``bucket`` as a closure (prepared once here)."""
    from asft_kernels.ops import AdamWHyper
    from asft_kernels.ops.triton import launch

    handle = launch.prepare(bucket.batch, bucket.counters, bucket.w, precision=precision)
    hyper = AdamWHyper(LR, BETAS[0], BETAS[1], EPS, WD, False)
    gA, gB = list(bucket.gA.unbind(0)), list(bucket.gB.unbind(0))
    return lambda: launch.step(handle, gA, gB, bucket.scale, hyper, hyper)


def eager_bucket_step(A, B, mA, vA, mB, vB, P, G, M, gA, gB, U, w, scale, counters, lr: float, beta1: float,
                      beta2: float, eps: float, wd: float):
    """One anchored AdamW step of a bucket in torch ops on stacked tensors (the math of the
    backends; ``counters`` (2L,) A's then B's, advanced here). Returns R."""
    L = A.shape[0]
    s = scale.reshape(L, 1, 1)
    Pw = P * w
    H = s * (G - P.mT @ Pw)
    Q = s * M
    RB = Pw @ Q
    R = 0.5 * (H * M).sum()
    counters.add_(1)
    Af, Bf = A.to(P.dtype), B.to(P.dtype)
    gAt = gA.to(P.dtype) + H @ Af
    gBt = gB.to(P.dtype) + Bf @ Q - U.to(P.dtype) @ RB
    for p, work, g, m, v, t in ((A, Af, gAt, mA, vA, counters[:L]), (B, Bf, gBt, mB, vB, counters[L:])):
        t = t.reshape(L, 1, 1)
        work = work * (1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt() / (1 - beta2 ** t).sqrt() + eps
        work = work - (lr / (1 - beta1 ** t)) * m / denom
        p.copy_(work)
    Bs, As = B.to(P.dtype), A.to(P.dtype)
    P.copy_(U.to(P.dtype).mT @ Bs)
    G.copy_(Bs.mT @ Bs)
    M.copy_(As @ As.mT)
    return R


def eager_step_fn(bucket: Bucket, compiled: bool):
    # dynamic shapes: one compilation serves every shape of a dtype (each costs tens of seconds)
    fn = torch.compile(eager_bucket_step, dynamic=True) if compiled else eager_bucket_step
    b = bucket
    args = (b.A, b.B, b.mA, b.vA, b.mB, b.vB, b.P, b.G, b.M, b.gA, b.gB, b.U, b.w, b.scale, b.counters, LR,
            BETAS[0], BETAS[1], EPS, WD)
    return lambda: fn(*args)


def graph_step_fn(step, device: torch.device):
    """``step`` captured in a CUDA graph after warm-up; the replay as a closure."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# ---------------------------------------------------------------------------- parts


@contextmanager
def _recorded(rows: list[dict], row: dict, device: torch.device, skip: tuple = (), timed: bool = False):
    """Fill ``row`` in the ``with`` block, then keep it whatever happened: an exception of
    ``skip`` is recorded as ``row["skipped"]``, any other as ``row["error"]`` (traceback on
    stderr; one case failing must not lose the others); with ``timed`` the block's wall time
    as ``row["setup_and_run_s"]``. The row is appended to ``rows`` and printed as one JSON
    line, then the memory of the case is released."""
    t0 = time.perf_counter()
    try:
        yield row
    except skip as exc:
        row["skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if timed:
        row["setup_and_run_s"] = round(time.perf_counter() - t0, 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _harness_case(variant: str, shape: Shape, device: torch.device, anchor):
    from bench.harness import StepShape, build_step_case

    hs = StepShape(shape.m, shape.n, shape.r, shape.k, shape.pairs)
    return build_step_case(variant, hs, device, _DTYPES[shape.dtype], anchor=anchor)


def bench_shape(shape: Shape, device: torch.device, variants, rounds: int, paper_rounds: int) -> list[dict]:
    from bench.harness import StepShape, VariantUnavailable, random_anchor

    rows = []
    anchor = None
    for variant in variants:
        with _recorded(rows, {"shape": shape.name, "variant": variant}, device, skip=(VariantUnavailable,),
                       timed=True) as row:
            if variant in ("triton", "eager", "adamw_fused", "paper_eager", "floor"):
                if variant != "floor" and anchor is None:
                    anchor = random_anchor(StepShape(shape.m, shape.n, shape.r, shape.k, shape.pairs))
                case = _harness_case(variant, shape, device, anchor)
                if case.warmup is not None:
                    case.warmup()
                n = paper_rounds if variant == "paper_eager" else rounds
                row.update(time_step(case.step, device, n, warmup=1 if variant == "paper_eager" else 3))
                del case
            else:
                bucket = Bucket(shape, device)
                if variant == "triton_step":
                    step = triton_step_fn(bucket)
                elif variant == "triton_graph":
                    if device.type != "cuda":
                        raise RuntimeError("CUDA graphs need a CUDA device")
                    step = graph_step_fn(triton_step_fn(bucket), device)
                else:
                    step = eager_step_fn(bucket, compiled=True)
                    step()  # compiles
                row.update(time_step(step, device, rounds))
                del bucket, step
    return rows


def accuracy(device: torch.device, shapes: list[Shape], speed_shapes: list[Shape], rounds: int) -> list[dict]:
    """Per precision: errors after 3 steps against float64, and step times at ``speed_shapes``."""
    from asft_kernels.ops.triton import launch

    rows = []
    bases = {shape: Bucket(shape, device, seed=5, orthonormal=True).U for shape in shapes}  # one QR per shape
    for precision in launch.u_precisions():
        for shape in shapes:
            with _recorded(rows, {"precision": precision, "shape": shape.name}, device) as row:
                got = Bucket(shape, device, seed=5, U=bases[shape])
                ref = Bucket(shape, device, seed=5, math_dtype=torch.float64, U=bases[shape].double())
                step = triton_step_fn(got, precision)
                ref_step = eager_step_fn(ref, compiled=False)
                for _ in range(3):
                    step()
                    ref_step()
                sync(device)
                errs = {}
                for name, a, b in zip(("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M"), got.state(), ref.state()):
                    errs[name] = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
                row.update(max_rel_err=max(errs.values()), errors=errs, within_tolerance=max(errs.values()) < TOLERANCE)
                del got, ref, step, ref_step
        for shape in speed_shapes:
            with _recorded(rows, {"precision": precision, "shape": shape.name}, device) as row:
                bucket = Bucket(shape, device)
                row.update(time_step(triton_step_fn(bucket, precision), device, rounds))
                del bucket
    return rows


def profile(device: torch.device, shapes: list[Shape], rounds: int) -> list[dict]:
    """Host time of issuing a prepared step against its device time; device time per kernel."""
    rows = []
    for shape in shapes:
        with _recorded(rows, {"shape": shape.name}, device) as row:
            bucket = Bucket(shape, device)
            step = triton_step_fn(bucket)
            row.update(time_step(step, device, rounds))
            if device.type == "cuda":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(rounds):
                        step()
                    torch.cuda.synchronize(device)
                row["kernels_ms"] = {e.key[:80]: round(e.device_time_total / rounds / 1e3, 4)
                                     for e in prof.key_averages() if e.device_time_total > 0}
            del bucket, step
    return rows


# ---------------------------------------------------------------------------- report


def markdown(bench_rows: list[dict], accuracy_rows: list[dict], profile_rows: list[dict]) -> str:
    """The tables of docs/triton.md from the parts' rows (missing parts are left out)."""
    out = []
    if bench_rows:
        shapes = list(dict.fromkeys(r["shape"] for r in bench_rows))
        variants = list(dict.fromkeys(r["variant"] for r in bench_rows))
        out.append("| shape | " + " | ".join(variants) + " | triton ÷ adamw_fused | triton_graph ÷ floor | "
                   "triton ÷ eager_compiled |")
        out.append("|---|" + "---:|" * (len(variants) + 3))
        for s in shapes:
            ms = {r["variant"]: r.get("host_ms") for r in bench_rows if r["shape"] == s}

            def ratio(a, b, ms=ms):
                return f"{ms[a] / ms[b]:.2f}" if ms.get(a) and ms.get(b) else "-"

            cells = [f"{ms[v]:.3f}" if ms.get(v) else "-" for v in variants]
            out.append(f"| {s} | " + " | ".join(cells) + f" | {ratio('triton', 'adamw_fused')} | "
                       f"{ratio('triton_graph', 'floor')} | {ratio('triton', 'eager_compiled')} |")
        out.append("")
        out.append("Host-timed median ms per step (synchronised after every step).")
    if accuracy_rows:
        out.append("")
        out.append("| precision | shape | max rel. error (3 steps vs float64) | within 1e-5 | step ms |")
        out.append("|---|---|---:|---|---:|")
        for r in accuracy_rows:
            err = f"{r['max_rel_err']:.2e}" if "max_rel_err" in r else ""
            ok = {True: "yes", False: "no"}.get(r.get("within_tolerance"), "")
            t = f"{r['host_ms']:.3f}" if "host_ms" in r else ""
            out.append(f"| {r['precision']} | {r['shape']} | {err or r.get('error', '')[:60]} | {ok} | {t} |")
    if profile_rows:
        out.append("")
        out.append("| shape | issue ms (host) | device ms | host-timed ms | top kernels (device ms) |")
        out.append("|---|---:|---:|---:|---|")
        for r in profile_rows:
            top = sorted(r.get("kernels_ms", {}).items(), key=lambda kv: -kv[1])[:4]
            out.append(f"| {r['shape']} | {r.get('issue_ms', 0):.3f} | {r.get('device_ms', 0):.3f} | "
                       f"{r.get('host_ms', 0):.3f} | " + "; ".join(f"{k} {v}" for k, v in top) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="directory of the JSON and markdown results (default: bench/results/gpu; with "
                             "--smoke a new temporary directory, printed)")
    parser.add_argument("--parts", nargs="+", default=["bench", "accuracy", "profile"],
                        choices=["bench", "accuracy", "profile"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="subset of the shapes as r-k-dtype, e.g. 8-64-float32 64-4096-float32")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--paper-rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU under the Triton interpreter, tiny shapes: checks every code path, times nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        m, pairs, rounds = 40, 2, 1
        shapes = [Shape(m, 24, 4, 8, pairs, "float32"), Shape(m, 24, 4, 1, pairs, "float32")]
        variants = [v for v in args.variants if v not in ("triton_graph", "eager_compiled", "triton")]
        variants += ["triton"] if "triton" in args.variants else []
    else:
        if not torch.cuda.is_available():
            print("triton_suite.py: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        m, pairs, rounds = args.m, args.pairs, args.rounds
        chosen = [tuple(s.split("-")) for s in args.shapes] if args.shapes else None
        shapes = [Shape(m, m, r, k, pairs, dt) for r, k, dt in SHAPES
                  if chosen is None or (str(r), str(k), dt) in chosen]
        variants = args.variants
    if args.out is not None:
        out = Path(args.out)
    elif args.smoke:  # never over the published GPU results
        out = Path(tempfile.mkdtemp(prefix="triton_suite_smoke_"))
    else:
        out = Path("bench/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    print(f"triton_suite.py: results in {out}", file=sys.stderr, flush=True)
    facts = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
             "torch": torch.__version__}
    import triton

    facts["triton"] = triton.__version__
    results = {}
    if "bench" in args.parts:
        rows = []
        for shape in shapes:  # written after every shape: a stage cut short keeps what it measured
            rows += bench_shape(shape, device, variants, rounds, args.paper_rounds)
            (out / "triton_bench.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
        results["bench"] = rows
    if "accuracy" in args.parts:
        acc_shapes = [Shape(m, m, 64, min(m, 4096), 2, "float32"), Shape(m, m, 8, 256 if m >= 256 else 8, 2,
                                                                         "float32")]
        speed = [s for s in shapes if s.k >= 4096 and s.dtype == "float32"] or shapes[:1]
        rows = accuracy(device, acc_shapes, speed, rounds)
        results["accuracy"] = rows
        (out / "triton_accuracy.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    if "profile" in args.parts:
        rows = profile(device, shapes, rounds)
        results["profile"] = rows
        (out / "triton_profile.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    failed = [r for part in results.values() for r in part if "error" in r]
    for part in ("bench", "accuracy", "profile"):  # the tables of earlier runs into the same --out
        saved = out / f"triton_{part}.json"
        if part not in results and saved.exists():
            results[part] = json.loads(saved.read_text())["rows"]
    text = markdown(results.get("bench", []), results.get("accuracy", []), results.get("profile", []))
    (out / "triton_suite.md").write_text(f"{facts}\n\n{text}")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
