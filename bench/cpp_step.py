"""Time the C++ CPU step against eager, fused AdamW and the copy-bandwidth floor.

For each configuration (fp32 LoRA pairs, B (m, r), A (r, n), basis U (m, k)) one run
measures, interleaved round-robin, medians of ``--repeats`` timings after warm-up (minimum
printed too; the ratios use medians). By default the caches are flushed before every sample
(``--warm``: each sample follows a call of the same provider instead):

* ``cpp kernel`` / ``eager kernel``: one ``fused_step`` call of the backend on all pairs;
* ``cpp step`` / ``eager step``: ``AsFTAdamW(..., backend=...).step()`` (what a user runs:
  kernel + the optimizer's r×r math and bookkeeping);
* "outside the C++ call": per ``cpp step`` sample, its time minus the time of its buckets'
  C++ calls (``asft_kernels.ops.cpp.step`` on the plan's prepared handles: counters,
  anchoring terms, fused pass), timed inside the same step; the median over the samples
  (Python, plan checks, gradient gathering, step hooks);
* ``adamw fused``: ``torch.optim.AdamW(fused=True).step()`` on the same parameters, no anchor;
* ``floor (copy_)``: the bytes a step must move (AdamW's 7 fp32 accesses per LoRA element: read
  p, g, m, v, write p, m, v; plus one read of every U) at the bandwidth of a ``copy_`` that
  moves the same number of bytes (half read, half written), timed in the same run.

The kernel's multiply-adds (per pair ``m (2kr + 2r²) + n · 2r²``: ``U R_B``, ``Uᵀ B'``,
``B Q_B``, ``B'ᵀ B'``, ``H A``, ``A' A'ᵀ``) per second are printed as a fraction of this
CPU's peak, and "step / floor at the FMA peak" is the least step / floor this machine
allows (those multiply-adds at the peak, overlapped entirely with the floor's traffic);
the peak is measured in the same run by a short loop of independent fp32 multiply-adds at
the vector width the kernel is compiled for (``at::vec::Vectorized<float>`` with the
kernel's ``-march=native`` flags), run on as many threads as the kernel uses.

Usage: ``python bench/cpp_step.py [--repeats 50] [--threads 2] [--config I]``; prints one
table per configuration and the ratios. The garbage collector is off while timing (as in
``timeit``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's asft_kernels

FLUSH_BYTES = 64 << 20  # twice the L3 cache of the machine the figures were taken on
CONFIGS = (
    # (label, m, n, r, k, layers)
    ("m=n=2048 r=16 k=64 x4", 2048, 2048, 16, 64, 4),
    ("m=n=4096 r=8 k=256 x2", 4096, 4096, 8, 256, 2),
    ("m=n=2048 r=64 k=256 x2", 2048, 2048, 64, 256, 2),
)

# A loop of independent multiply-adds at the kernel's vector width: the capability macros
# are those asft_kernels/csrc/asft_cpu.cpp sets from the compiler's -march=native flags.
_PEAK_SOURCE = r"""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY asft_bench
#include <ATen/cpu/vec/vec.h>
#include <chrono>
using V = at::vec::Vectorized<float>;
extern "C" int asft_vec_lanes() { return V::size(); }
// multiply-adds (one per fp32 lane) per second of one thread
extern "C" double asft_fma_rate(long iters) {
  constexpr int kChains = 16;  // independent chains: more than FMA latency x ports
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = V(1e-3f * i);
  const V a(0.999999f), b(1e-7f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = at::vec::fmadd(acc[i], a, b);  // registers, no memory
  }
  const auto t1 = std::chrono::steady_clock::now();
  float sink[V::size()] = {};
  for (int i = 0; i < kChains; ++i) acc[0] = acc[0] + acc[i];
  acc[0].store(sink);
  volatile float keep = sink[0];
  (void)keep;
  return double(iters) * kChains * V::size() / std::chrono::duration<double>(t1 - t0).count();
}
"""


def _model(m: int, n: int, r: int, k: int, layers: int):
    """A PEFT model of ``layers`` Linear(n, m) with rank-r LoRA, and an anchor of rank k."""
    from peft import LoraConfig, get_peft_model

    import asft_kernels as asft
    from asft_kernels.anchor import AnchorEntry

    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(n, m, bias=False) for _ in range(layers)])
    model = get_peft_model(base, LoraConfig(r=r, target_modules=[str(i) for i in range(layers)],
                                            init_lora_weights=False))
    entries = {}
    for i in range(layers):
        U = torch.linalg.qr(torch.randn(m, k))[0]
        s = torch.sort(torch.rand(k) + 0.1, descending=True).values
        entries[str(i)] = AnchorEntry(U=U, s=s, fro_norm=float(s.norm()), shape=(m, n), energy=1.0)
    binding = asft.AlignmentAnchor(entries).bind(model)
    pairs = {p.key: (p.A, p.B) for p in binding}
    params = [t for A, B in pairs.values() for t in (A, B)]
    return params, binding, pairs


COLUMNS = ("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M", "gA", "gB", "U", "Q", "R", "H")  # schema order


def kernel_columns(pairs, binding, k: int, r: int) -> dict[str, list[torch.Tensor]]:
    """The fp32 inputs of one ``fused_step`` call on copies of the pairs of :func:`_model`
    (their gradients set): per pair A, B, random moments, zero statistics, the gradients,
    U of the binding and random anchoring terms Q_B (r, r), R_B (k, r), H (r, r)."""
    cols = {key: [] for key in COLUMNS}
    for key, (A, B) in pairs.items():
        cols["A"].append(A.detach().clone())
        cols["B"].append(B.detach().clone())
        for name, like in (("mA", A), ("vA", A), ("mB", B), ("vB", B)):
            cols[name].append(torch.rand_like(like.detach()) * 1e-3)
        cols["P"].append(torch.zeros(k, r))
        cols["G"].append(torch.zeros(r, r))
        cols["M"].append(torch.zeros(r, r))
        cols["gA"].append(A.grad.clone())
        cols["gB"].append(B.grad.clone())
        cols["U"].append(binding[key].entry.U.to(torch.float32).contiguous())
        cols["Q"].append(torch.randn(r, r) * 1e-3)
        cols["R"].append(torch.randn(k, r) * 1e-3)
        cols["H"].append(torch.randn(r, r) * 1e-3)
    return cols


def kernel_batch(cols: dict[str, list[torch.Tensor]]):
    """``(AnchoredBatch, AdamWHyper)`` of :func:`kernel_columns`: step counters at 5, lr 1e-4."""
    from asft_kernels.ops import AdamWHyper, AnchoredBatch

    steps = [torch.tensor(5.0) for _ in cols["A"]]
    batch = AnchoredBatch(*(cols[key] for key in COLUMNS), steps, steps)
    return batch, AdamWHyper(1e-4, 0.9, 0.999, 1e-8, 0.0, False)


def _peak_library() -> ctypes.CDLL:
    """The multiply-add loop above, compiled once (cached by source, compiler and torch)."""
    cxx = os.environ.get("CXX", "c++")
    include = Path(torch.__file__).parent / "include"
    key = hashlib.sha256(f"{_PEAK_SOURCE}{cxx}{include}{torch.__version__}".encode()).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"asft_fma_peak_{key}.so"
    if not lib.exists():
        src = lib.with_suffix(".cpp")
        src.write_text(_PEAK_SOURCE)
        tmp = lib.with_suffix(f".{os.getpid()}.so")
        subprocess.run([cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(src),
                        "-o", str(tmp)], check=True)
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.asft_fma_rate.restype = ctypes.c_double
    dll.asft_fma_rate.argtypes = [ctypes.c_long]
    return dll


def fma_peak(threads: int, iters: int = 20_000_000, tries: int = 3) -> tuple[float, int]:
    """(multiply-adds per second on ``threads`` threads at once, fp32 lanes per vector):
    the best of ``tries`` runs, each summing the rates of the threads run concurrently."""
    dll = _peak_library()
    best = 0.0
    for _ in range(tries):
        rates = [0.0] * threads

        def work(i, rates=rates):
            rates[i] = dll.asft_fma_rate(iters)  # ctypes releases the GIL

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, sum(rates))
    return best, dll.asft_vec_lanes()


def cache_flusher() -> Callable[[], None]:
    """A call that writes ``FLUSH_BYTES`` (evicting the caches, as forward/backward do before
    a step); the buffer is allocated once, here."""
    scratch = torch.empty(FLUSH_BYTES // 4)
    return lambda: scratch.fill_(1.0)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(label, m, n, r, k, layers, repeats, warmup, flush=True, peak=None):
    import asft_kernels as asft
    from asft_kernels.ops import cpp, eager

    assert cpp.is_available(), "C++ backend unavailable"
    # every provider steps its own copy of the parameters: a step that sees another
    # provider's writes would (rightly) recompute its cached statistics
    optimizers = {}
    for backend in ("cpp", "eager"):
        params, binding, pairs = _model(m, n, r, k, layers)
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
        optimizers[backend] = asft.AsFTAdamW(params, lr=1e-4, anchor=binding, backend=backend)
    # the C++ call of each bucket inside the cpp step, timed where the plan makes it
    inside = [0.0]

    def recorded(step):
        def timed(*args):
            t0 = time.perf_counter()
            out = step(*args)
            inside[0] += time.perf_counter() - t0
            return out
        return timed

    optimizers["cpp"].step()  # builds the plan and its handles
    for bucket in optimizers["cpp"]._plan.buckets:
        bucket.backend = dataclasses.replace(bucket.backend, step=recorded(bucket.backend.step))

    plain = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, plain):
        q.grad = p.grad.clone()
    opt_adamw = torch.optim.AdamW(plain, lr=1e-4, fused=True)

    # kernel-level inputs (schema order), shared by both kernels
    cols = kernel_columns(pairs, binding, k, r)
    kernel_cols = {"cpp": cols, "eager": {key: [t.clone() for t in ts] for key, ts in cols.items()}}

    def kernel(impl, cols):
        batch, hyper = kernel_batch(cols)
        return lambda: impl(batch, hyper)

    lora_elems = sum(t.numel() for t in cols["A"] + cols["B"])
    floor_bytes = 7 * 4 * lora_elems + sum(u.numel() * u.element_size() for u in cols["U"])
    src = torch.rand(floor_bytes // 8)  # fp32: copy reads floor_bytes/2 and writes floor_bytes/2
    dst = torch.empty_like(src)

    providers = {
        "cpp kernel": kernel(cpp.fused_step, kernel_cols["cpp"]),
        "eager kernel": kernel(eager.fused_step, kernel_cols["eager"]),
        "cpp step": optimizers["cpp"].step,
        "eager step": optimizers["eager"].step,
        "adamw fused": opt_adamw.step,
        "floor (copy_)": lambda: dst.copy_(src),
    }
    times = {name: [] for name in providers}
    gc.collect()
    gc.disable()  # as timeit does: a collection of the whole heap must not land in one sample
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    # cold: every sample starts after writing a buffer twice the size of the L3 cache, as a
    # step does after forward/backward; warm: back-to-back calls of one provider
    flush_caches = cache_flusher() if flush else None
    outside = []  # per cpp step: its time minus its C++ calls'
    for _ in range(repeats):
        for name, fn in providers.items():
            if flush_caches:
                flush_caches()
            else:
                fn()
            inside[0] = 0.0
            times[name].append(_time(fn))
            if name == "cpp step":
                outside.append(times[name][-1] - inside[0])
    gc.enable()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    bw = floor_bytes / med["floor (copy_)"]
    print(f"\n{label}: fp32, {layers} pair(s), threads={torch.get_num_threads()}, repeats={repeats}, "
          f"caches {'flushed before each sample' if flush else 'warm (sample follows a call of the same provider)'}")
    print(f"  bytes a step must move: {floor_bytes / 1e6:.2f} MB; copy_ bandwidth {bw / 1e9:.1f} GB/s")
    print(f"  {'':14s} {'median':>9s}    {'min':>9s}")
    for name, t in med.items():
        print(f"  {name:14s} {t * 1e3:9.3f} ms {min(times[name]) * 1e3:9.3f} ms")
    med["outside"] = statistics.median(outside)
    print(f"  outside the C++ call         = {med['outside'] * 1e3:.3f} ms "
          f"({med['outside'] / med['cpp step'] * 100:.1f} % of the cpp step; median per step)")
    print(f"  cpp step / eager step        = {med['cpp step'] / med['eager step']:.3f}")
    print(f"  cpp kernel / eager kernel    = {med['cpp kernel'] / med['eager kernel']:.3f}")
    print(f"  cpp step / floor             = {med['cpp step'] / med['floor (copy_)']:.3f}")
    print(f"  cpp kernel / floor           = {med['cpp kernel'] / med['floor (copy_)']:.3f}")
    print(f"  cpp step / adamw fused       = {med['cpp step'] / med['adamw fused']:.3f}")
    print(f"  cpp kernel / adamw fused     = {med['cpp kernel'] / med['adamw fused']:.3f}")
    fmas = layers * (m * (2 * k * r + 2 * r * r) + n * 2 * r * r)
    rate = fmas / med["cpp kernel"]
    line = f"  cpp kernel multiply-adds     = {fmas / 1e6:.1f} M, {rate / 1e9:.1f} G/s"
    if peak:
        line += f" = {rate / peak:.3f} of peak ({peak / 1e9:.1f} G/s)"
    print(line)
    if peak:
        # the least step / floor this machine allows: the multiply-adds at the measured peak,
        # fully overlapped with the floor's memory traffic
        bound = max(fmas / peak, med["floor (copy_)"]) / med["floor (copy_)"]
        print(f"  step / floor at the FMA peak = {bound:.3f} (multiply-adds at peak {fmas / peak * 1e3:.3f} ms, "
              f"overlapped with the floor)")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--config", type=int, default=None, help="run only CONFIGS[i]")
    parser.add_argument("--warm", action="store_true", help="keep caches warm instead of flushing them")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"1-minute load average {load:.2f} on {os.cpu_count()} CPUs")
    peak, lanes = fma_peak(torch.get_num_threads())
    print(f"fp32 multiply-add peak: {peak / 1e9:.1f} G/s on {torch.get_num_threads()} thread(s), "
          f"{lanes} lanes per vector")
    for i, cfg in enumerate(CONFIGS):
        if args.config is None or args.config == i:
            run(*cfg, repeats=args.repeats, warmup=args.warmup, flush=not args.warm, peak=peak)
    if hasattr(os, "getloadavg"):
        print(f"\n1-minute load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
