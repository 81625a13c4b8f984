"""The benchmark harness shared by the CPU suite, the GPU suite and the CI smoke run.

One *group* is one shape of anchored LoRA layers; every group holds the same variants of
one optimizer step (docs/method.md):

=============  ===============================================================================
variant        what one step does
=============  ===============================================================================
paper_eager    the published training loop: dense ``C`` (m, m) per layer held between steps,
               ``R = λ Σ ‖(I − C) B A‖²_F`` through :mod:`asft_kernels.reference` with ΔW
               materialized, autograd, then ``torch.optim.AdamW``
eager          ``AsFTAdamW(backend="eager")``: the low-rank math in plain torch
cpp            ``AsFTAdamW(backend="cpp")``: the fused C++ kernel (CPU, when built)
triton         ``AsFTAdamW(backend="triton")``: the fused Triton kernels (CUDA only)
adamw_fused    ``torch.optim.AdamW(fused=True)`` on the same parameters, no anchoring
               (``foreach=True`` where fused is unsupported; ``extra_info["adamw_impl"]``)
floor          ``dst.copy_(src)`` moving as many bytes as one anchored step must move:
               plain-AdamW traffic of the LoRA parameters plus one read of every ``U``
=============  ===============================================================================

The task gradients are fixed random tensors, so a step is the optimizer's work only.
Every benchmark records in ``extra_info`` the shape, the backend that ran, the peak bytes
allocated during one step (``torch.profiler`` memory events on CPU,
``torch.cuda.max_memory_allocated`` on CUDA, both above what was allocated before the
step) and the bytes held between steps by the variant (``C`` or ``U`` and statistics).

Suites are picked by the environment variable ``ASFT_BENCH_SUITE`` (``cpu``, ``gpu``,
``smoke``); ``ASFT_BENCH_DTYPE`` sets the LoRA parameter dtype (default ``float32``).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from asft_kernels import AlignmentAnchor, AnchorBinding, AnchorEntry, AsFTAdamW
from asft_kernels.errors import AsFTError
from asft_kernels.ops import _compiled_backend
from asft_kernels.reference import dense_projection, pair_regularizer

SUITE_ENV = "ASFT_BENCH_SUITE"
DTYPE_ENV = "ASFT_BENCH_DTYPE"
SUITES = ("cpu", "gpu", "smoke")

STEP_VARIANTS = ("paper_eager", "eager", "cpp", "triton", "adamw_fused", "floor")
ANCHOR_LAMBDA = 1.0
LR = 1e-3
WEIGHT_DECAY = 0.01

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StepShape:
    """``layers`` anchored LoRA pairs, each with ``A`` (r, n), ``B`` (m, r), ``U`` (m, k).

    Attributes:
        paper_rounds: timed rounds of ``paper_eager`` (None: chosen from the time budget
            like every other variant; 0: ``paper_eager`` is skipped at this shape).
    """

    m: int
    n: int
    r: int
    k: int
    layers: int
    paper_rounds: int | None = None

    @property
    def group(self) -> str:
        """Benchmark group name, e.g. ``step-m2048-n2048-r16-k64-L1``."""
        return f"step-m{self.m}-n{self.n}-r{self.r}-k{self.k}-L{self.layers}"

    def floor_bytes(self, param_dtype: torch.dtype, basis_dtype: torch.dtype = torch.float32) -> int:
        """Bytes one anchored step must move: AdamW reads param, grad, exp_avg, exp_avg_sq and
        writes param, exp_avg, exp_avg_sq for every LoRA element, and ``U`` (m, k) is read
        once per layer (the r×r / k×r statistics are negligible and left out)."""
        p = torch.empty((), dtype=param_dtype).element_size()
        s = 8 if param_dtype == torch.float64 else 4  # optimizer state is fp32 (fp64 for fp64)
        u = torch.empty((), dtype=basis_dtype).element_size()
        lora = self.layers * self.r * (self.m + self.n)
        return lora * (3 * p + 4 * s) + self.layers * self.m * self.k * u


# m = n are Llama-2-7B q/v widths scaled to a CPU. paper_eager costs O(L·m²n) per step
# (on one idle core about 0.06 s per layer at m = 1024, 0.4 s at 2048 and 3.5 s at 4096),
# so its timed rounds are fixed where a step takes seconds, and m = 4096 with 16 layers
# (about a minute per paper_eager step) is left out of the CPU suite.
_CPU_SHAPES = [
    StepShape(m, m, r, k, 1, paper_rounds=3 if m == 4096 else None)
    for k in (64, 256)
    for r in (8, 16, 64)
    for m in (1024, 2048, 4096)
] + [StepShape(1024, 1024, 16, 64, 16), StepShape(2048, 2048, 16, 64, 16, paper_rounds=3)]
# Llama-2-7B q_proj/v_proj: 4096 × 4096, 32 layers × 2 modules = 64 anchored pairs.
_GPU_SHAPES = [StepShape(4096, 4096, r, k, 64) for r in (8, 64) for k in (64, 256, 4096)]
# CI smoke: m ≠ n and nothing a multiple of a block size.
_SMOKE_SHAPES = [StepShape(67, 45, 3, 5, 2)]


def suite_name() -> str:
    """The suite selected by ``$ASFT_BENCH_SUITE`` (default ``cpu``)."""
    name = os.environ.get(SUITE_ENV, "cpu")
    if name not in SUITES:
        raise AsFTError(f"{SUITE_ENV}={name!r}; expected one of {SUITES}")
    return name


def suite_shapes(suite: str) -> list[StepShape]:
    """Step shapes of ``suite``."""
    return {"cpu": _CPU_SHAPES, "gpu": _GPU_SHAPES, "smoke": _SMOKE_SHAPES}[suite]


def suite_device(suite: str) -> torch.device:
    """``cuda`` for the GPU suite, ``cpu`` otherwise."""
    return torch.device("cuda") if suite == "gpu" else torch.device("cpu")


def bench_dtype() -> torch.dtype:
    """LoRA parameter dtype from ``$ASFT_BENCH_DTYPE`` (default float32)."""
    name = os.environ.get(DTYPE_ENV, "float32")
    if name not in _DTYPES:
        raise AsFTError(f"{DTYPE_ENV}={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def time_budget(suite: str) -> tuple[float, int, int]:
    """``(seconds of timed rounds per benchmark, min rounds, max rounds)`` of ``suite``."""
    return {"cpu": (0.6, 5, 200), "gpu": (1.0, 10, 500), "smoke": (0.0, 1, 1)}[suite]


#: minimum timed rounds of the end-to-end benchmarks (steps of ~0.1 s on a CPU, so a short
#: burst of load from another process cannot move the median)
E2E_MIN_ROUNDS = 30


def default_threads(suite: str) -> int:
    """torch threads of ``suite`` unless ``$ASFT_BENCH_THREADS`` says otherwise.

    The CPU suite runs single-threaded: on a shared 2-core machine, two OpenMP threads
    stall whenever another process takes a core (a 0.1 ms AdamW step was measured with a
    median of 48 ms that way), which would make the ratios meaningless.
    """
    env = os.environ.get("ASFT_BENCH_THREADS")
    if env:
        return int(env)
    return 1 if suite in ("cpu", "smoke") else max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- model


class LoraLayerStub(nn.Module):
    """The attributes :meth:`AlignmentAnchor.bind` reads from a PEFT LoRA layer.

    ``base_layer`` lives on the meta device: the optimizer step never touches the base
    weight, and a real one would cost ``layers·m·n`` floats the benchmark does not use.

    Args:
        m, n: base weight shape (out, in). r: LoRA rank.
    """

    def __init__(self, m: int, n: int, r: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.base_layer = nn.Linear(n, m, bias=False, device="meta")
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False, device=device, dtype=dtype)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False, device=device, dtype=dtype)})


def random_anchor(shape: StepShape, seed: int = 0) -> AlignmentAnchor:
    """An anchor with one entry ``layers.{i}`` per layer: ``U`` (m, k) orthonormal (fp32),
    decaying singular values, ``‖V‖_F`` such that the entry holds 90 % of the energy.

    One QR per shape; each layer's basis is a row permutation with random signs of it
    (still orthonormal), so k = m = 4096 with 64 layers costs one factorization.
    """
    g = torch.Generator().manual_seed(seed)
    k = min(shape.k, shape.m)
    Q, _ = torch.linalg.qr(torch.randn(shape.m, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, k, dtype=torch.float64)
    s = s / s.norm() * math.sqrt(0.9)
    fro = 1.0  # c_i = s_i² / ‖V‖_F ∈ (0, 0.9]: w = 2c − c² > 0
    entries = {}
    for i in range(shape.layers):
        perm = torch.randperm(shape.m, generator=g)
        signs = torch.randint(0, 2, (k,), generator=g, dtype=torch.float64) * 2 - 1
        U = (Q[perm] * signs).to(torch.float32).contiguous()
        entries[f"layers.{i}"] = AnchorEntry(U=U, s=s.to(torch.float32), fro_norm=fro, shape=(shape.m, shape.n),
                                             energy=0.9)
    return AlignmentAnchor(entries, {"built_by": "bench.harness.random_anchor", "seed": seed})


@dataclass
class AnchoredLayers:
    """``layers`` LoRA stubs bound to an anchor, with fixed task gradients.

    Attributes:
        params: ``[A₀, B₀, A₁, B₁, …]`` with ``A`` (r, n), ``B`` (m, r).
        task_grads: matching fixed gradients (what the task loss would have produced).
    """

    model: nn.Module
    binding: AnchorBinding
    params: list[nn.Parameter]
    task_grads: list[Tensor]


def anchored_layers(shape: StepShape, anchor: AlignmentAnchor, device: torch.device, dtype: torch.dtype,
                    seed: int = 1) -> AnchoredLayers:
    """Fresh LoRA parameters (B ≠ 0) and gradients, the same for every call with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.layers = nn.ModuleList([LoraLayerStub(shape.m, shape.n, shape.r, device, dtype)
                                  for _ in range(shape.layers)])
    params, grads = [], []
    with torch.no_grad():
        for layer in model.layers:
            for lin, fan in ((layer.lora_A["default"], shape.n), (layer.lora_B["default"], shape.r)):
                w = lin.weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64) / math.sqrt(fan))
                params.append(w)
                grads.append((torch.randn(w.shape, generator=g, dtype=torch.float64) * 1e-2).to(device, dtype))
    binding = anchor.bind(model, mode="paper")
    for p, gr in zip(params, grads):
        p.grad = gr
    return AnchoredLayers(model, binding, params, grads)


# ---------------------------------------------------------------------------- variants


@dataclass
class StepCase:
    """One variant ready to run: ``step()`` performs one optimizer step.

    Attributes:
        extra: facts recorded in the benchmark's ``extra_info`` (backend, resident bytes, …).
        params: the parameters the step updates (for correctness checks), may be empty.
        warmup: what runs before the measured steps (default: ``step``); a cheaper call
            that allocates the same state for variants whose step takes seconds.
        optimizer: the optimizer ``step`` calls, where the case has one (the end-to-end cases).
    """

    variant: str
    step: Callable[[], None]
    extra: dict = field(default_factory=dict)
    params: list[Tensor] = field(default_factory=list)
    warmup: Callable[[], None] | None = None
    optimizer: torch.optim.Optimizer | None = None


class VariantUnavailable(Exception):
    """The variant cannot run on this machine (the benchmark is skipped, with the reason)."""


def backend_available(name: str, device: torch.device) -> bool:
    """Whether ``AsFTAdamW(backend=name)`` can run tensors on ``device``."""
    if name == "eager":
        return True
    if name == "cpp":
        return device.type == "cpu" and _compiled_backend("cpp") is not None
    if name == "triton":
        return device.type == "cuda" and _compiled_backend("triton") is not None
    return False


def _anchored_bytes(shape: StepShape) -> int:
    # U (m, k) fp32 cached on the device, plus P (k, r), G and M (r, r) in fp32
    return shape.layers * 4 * (shape.m * shape.k + shape.k * shape.r + 2 * shape.r * shape.r)


def build_step_case(variant: str, shape: StepShape, device: torch.device, dtype: torch.dtype,
                    anchor: AlignmentAnchor | None = None) -> StepCase:
    """Set up ``variant`` at ``shape`` (fresh parameters from a fixed seed).

    Raises:
        VariantUnavailable: the backend of ``variant`` cannot run here.
        AsFTError: unknown variant.
    """
    if variant not in STEP_VARIANTS:
        raise AsFTError(f"unknown benchmark variant {variant!r}; expected one of {STEP_VARIANTS}")
    if variant == "floor":
        return _floor_case(shape, device, dtype)
    if variant in ("eager", "cpp", "triton") and not backend_available(variant, device):
        raise VariantUnavailable(f"backend {variant!r} is not available for {device.type} tensors here")
    anchor = anchor if anchor is not None else random_anchor(shape)
    setup = anchored_layers(shape, anchor, device, dtype)
    if variant == "paper_eager":
        return _paper_case(setup)
    if variant == "adamw_fused":
        return _adamw_fused_case(setup)
    opt = AsFTAdamW(setup.params, lr=LR, weight_decay=WEIGHT_DECAY, anchor=setup.binding,
                    anchor_lambda=ANCHOR_LAMBDA, backend=variant)
    return StepCase(variant, opt.step, {"backend": variant, "resident_bytes": _anchored_bytes(shape)},
                    setup.params)


def _paper_case(setup: AnchoredLayers) -> StepCase:
    # The published code builds C = V Vᵀ / ‖V‖_F once before training and keeps it.
    Cs = [dense_projection(pair) for pair in setup.binding]
    opt = torch.optim.AdamW(setup.params, lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        with torch.enable_grad():
            reg = None
            for pair, C in zip(setup.binding, Cs):
                term = pair_regularizer(pair, ANCHOR_LAMBDA, C=C)
                reg = term if reg is None else reg + term
            reg_grads = torch.autograd.grad(reg, setup.params)
        # what loss.backward() leaves in .grad for task_loss + R
        for p, task, extra in zip(setup.params, setup.task_grads, reg_grads):
            p.grad = task + extra
        opt.step()

    resident = sum(C.numel() * C.element_size() for C in Cs)
    # warm-up: a plain AdamW step allocates the optimizer state; the regularizer allocates
    # afresh in every step anyway
    return StepCase("paper_eager", step, {"backend": "reference+torch.optim.AdamW", "resident_bytes": resident},
                    setup.params, warmup=opt.step)


def _adamw_fused_case(setup: AnchoredLayers) -> StepCase:
    impl = "fused"
    try:
        opt = torch.optim.AdamW(setup.params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        opt.step()  # fused support is checked on the first step for some devices/dtypes
    except (RuntimeError, ValueError):
        impl = "foreach"
        opt = torch.optim.AdamW(setup.params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    return StepCase("adamw_fused", opt.step, {"backend": f"torch.optim.AdamW({impl}=True)", "adamw_impl": impl,
                                              "resident_bytes": 0}, setup.params)


def _floor_case(shape: StepShape, device: torch.device, dtype: torch.dtype) -> StepCase:
    floor = shape.floor_bytes(dtype)
    numel = max(1, floor // 8)  # a copy of numel fp32 reads and writes 8·numel bytes
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    return StepCase("floor", lambda: dst.copy_(src), {"backend": "copy_", "copy_bytes": 8 * numel,
                                                      "resident_bytes": 0})


# ---------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True``, replayed in time order.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def rounds_for(seconds_per_step: float, suite: str, fixed: int | None = None, min_rounds: int | None = None) -> int:
    """Timed rounds for a step of ``seconds_per_step``: ``fixed`` if given, else enough to
    fill the suite's time budget, clamped to its min (or ``min_rounds``) and max rounds."""
    if fixed:
        return fixed
    budget, lo, hi = time_budget(suite)
    if min_rounds is not None and suite != "smoke":
        lo = max(lo, min_rounds)
        hi = max(hi, lo)
    if seconds_per_step <= 0:
        return hi
    return int(min(hi, max(lo, budget / seconds_per_step)))


def run_benchmark(benchmark, case: StepCase, device: torch.device, suite: str, group: str,
                  info: dict, fixed_rounds: int | None = None, min_rounds: int | None = None) -> None:
    """Warm up ``case``, record its peak step memory, then time it with ``benchmark``.

    First ``case.warmup`` (default: one step; allocates the optimizer state, runs the
    statistics pass, builds kernels), then, without ``fixed_rounds``, one step timed to
    size the number of rounds; then one step under the memory probe and the timed rounds.
    """

    def timed() -> None:
        case.step()
        synchronize(device)

    (case.warmup or case.step)()
    synchronize(device)
    probe = 0.0
    if not fixed_rounds:
        t0 = time.perf_counter()
        timed()
        probe = time.perf_counter() - t0
    peak = peak_step_bytes(case.step, device)
    rounds = rounds_for(probe, suite, fixed_rounds, min_rounds)
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(case.extra)
    benchmark.extra_info.update({"variant": case.variant, "peak_bytes": peak, "rounds": rounds,
                                 "device": str(device), "threads": torch.get_num_threads()})
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


def paired_overhead(step: Callable[[], object], baseline: Callable[[], object], device: torch.device,
                    pairs: int) -> float:
    """Median over ``pairs`` back-to-back runs of ``step_time / baseline_time − 1``.

    Running the two steps back to back makes both see the same load on a shared machine
    (the order alternates from pair to pair); the result is a second, drift-robust
    estimate next to the ratio of the two medians.
    """

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    ratios = []
    for i in range(pairs):
        if i % 2:
            t_base = timed(baseline)
            t_step = timed(step)
        else:
            t_step = timed(step)
            t_base = timed(baseline)
        ratios.append(t_step / max(t_base, 1e-12))
    ratios.sort()
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
    return median - 1.0


# ---------------------------------------------------------------------------- end to end

E2E_VARIANTS = ("adamw", "paper_eager", "eager", "cpp", "triton")


@dataclass(frozen=True)
class E2EConfig:
    """A tiny Llama (built from a config, random weights) with LoRA on q_proj and v_proj.

    One step is forward + backward + optimizer step + ``zero_grad`` on a fixed batch of
    ``batch`` × ``seq`` random tokens; the anchor keeps ``k`` directions of a random
    alignment delta per adapted module.
    """

    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 1024
    seq: int = 128
    batch: int = 2
    r: int = 16
    k: int = 64
    rank_pattern: tuple[tuple[str, int], ...] = ()  # PEFT's rank_pattern: (module name pattern, r) pairs

    @property
    def group(self) -> str:
        """Benchmark group name, e.g. ``e2e-llama-h256-L4-r16-k64-b2x128``."""
        return f"e2e-llama-h{self.hidden}-L{self.layers}-r{self.r}-k{self.k}-b{self.batch}x{self.seq}"

    def info(self) -> dict:
        """The configuration as ``extra_info`` entries (``kind="e2e"``)."""
        return {"kind": "e2e", **{f: getattr(self, f) for f in self.__dataclass_fields__
                                  if f != "rank_pattern" or self.rank_pattern}}


E2E_CONFIGS = {
    "cpu": E2EConfig(),
    "gpu": E2EConfig(hidden=1024, intermediate=2752, layers=8, heads=16, kv_heads=8, vocab=4096, seq=512,
                     batch=8, r=16, k=64),
    "smoke": E2EConfig(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, seq=8, batch=2,
                       r=4, k=4),
}


def build_e2e_case(variant: str, cfg: E2EConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> StepCase:
    """One training step of a tiny PEFT Llama with ``variant``'s optimizer.

    ``adamw`` is ``torch.optim.AdamW`` with its defaults; ``paper_eager`` adds
    :func:`asft_kernels.reference.paper_regularizer` to the loss before ``backward``;
    ``eager``/``cpp``/``triton`` are ``AsFTAdamW`` with that backend.

    Raises:
        VariantUnavailable: the backend cannot run on ``device`` here.
        AsFTError: unknown variant.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from asft_kernels.reference import paper_regularizer

    if variant not in E2E_VARIANTS:
        raise AsFTError(f"unknown end-to-end variant {variant!r}; expected one of {E2E_VARIANTS}")
    if variant in ("eager", "cpp", "triton") and not backend_available(variant, device):
        raise VariantUnavailable(f"backend {variant!r} is not available for {device.type} tensors here")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=max(cfg.seq, 64))
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    # the alignment delta of each adapted module, as if W_aligned − W_base
    g = torch.Generator().manual_seed(seed + 1)
    deltas = {name: torch.randn(mod.weight.shape, generator=g) * 1e-2
              for name, mod in base.named_modules() if name.endswith(("q_proj", "v_proj"))}
    anchor = AlignmentAnchor.from_deltas(deltas, rank=cfg.k)
    lora_cfg = LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False, rank_pattern=dict(cfg.rank_pattern))
    model = get_peft_model(base, lora_cfg)
    model.train()
    binding = anchor.bind(model, mode="paper")
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    if variant in ("adamw", "paper_eager"):
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    else:
        opt = AsFTAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, anchor=binding, anchor_lambda=ANCHOR_LAMBDA,
                        backend=variant)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if variant == "paper_eager":
            loss = loss + paper_regularizer(binding, ANCHOR_LAMBDA)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    backend = {"adamw": "torch.optim.AdamW", "paper_eager": "reference+torch.optim.AdamW"}.get(variant, variant)
    return StepCase(variant, step, {"backend": backend, "trainable_params": sum(p.numel() for p in params)}, params,
                    optimizer=opt)


def machine_facts() -> dict:
    """Versions and hardware facts stored in the results' ``machine_info``."""
    import importlib.metadata as md

    facts = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "platform": platform.platform(), "suite": suite_name(), "dtype": str(bench_dtype())}
    for pkg in ("torch", "triton", "transformers", "peft", "asft-kernels", "pytest-benchmark"):
        try:
            facts[f"{pkg}_version"] = md.version(pkg)
        except md.PackageNotFoundError:
            facts[f"{pkg}_version"] = None
    facts["cpp_backend"] = _compiled_backend("cpp") is not None
    facts["triton_backend"] = _compiled_backend("triton") is not None
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name()
        facts["cuda_version"] = torch.version.cuda
        facts["cuda_driver"] = _driver_version()
    return facts


def _driver_version() -> str | None:
    """The NVIDIA driver version as ``nvidia-smi`` reports it (None where it cannot be read)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None
