"""Triton backend: kernel numerics, grouped launches, determinism, dispatch, opcheck.

Without a GPU every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``) on
CPU tensors; the backend wraps its kernels with ``triton.jit`` at launch time, so switching
the interpreter on inside a test works even though this module was imported before. With
CUDA present the same tests run on the device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import TOLERANCE, max_rel_err, odd_anchor, odd_lora, odd_task_loss, run_asft, run_reference, trainable

from asft_kernels.errors import OptimizerInputError
from asft_kernels.ops import eager, resolve_backend

T = pytest.importorskip("asft_kernels.ops.triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (m, n, r, k): m and n never multiples of a block size; ranks in two padded-rank buckets;
# k = 40 spans several chunks of U columns.
SHAPES = [(37, 53, 3, 5), (37, 53, 1, 1), (70, 20, 4, 40), (65, 17, 17, 4), (1, 9, 2, 1)]


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """CUDA when present, else CPU tensors under the Triton interpreter."""
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _pairs(shapes, dtype, device, seed=0, basis_dtype=torch.float32):
    """Per-pair contract inputs: params of ``dtype``, fp32 state, orthonormal U."""
    g = torch.Generator().manual_seed(seed)
    cols = {name: [] for name in ("A", "B", "mA", "vA", "mB", "vB", "U", "w")}
    for m, n, r, k in shapes:
        U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
        cols["U"].append(U.to(basis_dtype).contiguous().to(device))
        cols["B"].append(torch.randn(m, r, generator=g).to(dtype).to(device))
        cols["A"].append(torch.randn(r, n, generator=g).to(dtype).to(device))
        for name, shape in (("mA", (r, n)), ("vA", (r, n)), ("mB", (m, r)), ("vB", (m, r))):
            cols[name].append(torch.zeros(shape, device=device))
        # anchor weights w = 2c − c², some negative as for the published C
        cols["w"].append((torch.rand(k, generator=g, dtype=torch.float64) * 2.4 - 0.4).to(device))
    return cols


def _derived(P, G, M, w, lam=0.7):
    """``Q_B, R_B, H`` from the statistics, in their dtype (as the optimizer does)."""
    Q, R, H = [], [], []
    for p, gg, mm, ww in zip(P, G, M, w):
        ww = ww.to(p.dtype)
        Q.append((2 * lam) * mm)
        R.append((2 * lam) * ((ww[:, None] * p) @ mm))
        H.append((2 * lam) * (gg - p.T @ (ww[:, None] * p)))
    return Q, R, H


def _grads(cols, step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    dev = cols["A"][0].device
    gA = [torch.randn(a.shape, generator=g).to(a.dtype).to(dev) for a in cols["A"]]
    gB = [torch.randn(b.shape, generator=g).to(b.dtype).to(dev) for b in cols["B"]]
    return gA, gB


def _trajectory(fused, stats, cols, steps, hyper, seed=0):
    """``steps`` contract steps with the statistics carried between steps (as the optimizer)."""
    P, G, M = (list(x) for x in stats(cols["U"], cols["B"], cols["A"]))
    for t in range(1, steps + 1):
        gA, gB = _grads(cols, t, seed)
        Q, R, H = _derived(P, G, M, cols["w"])
        n = len(cols["A"])
        fused(cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], P, G, M, gA, gB, cols["U"],
              Q, R, H, [float(t)] * n, [float(t)] * n, *hyper)
    return P, G, M


def _float64_copy(cols):
    out = {k: [t.detach().cpu().double() for t in v] for k, v in cols.items()}
    return out


HYPER = (1e-2, 0.9, 0.999, 1e-8, 0.1, False)


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_pass_matches_float64(device, dtype):
    cols = _pairs(SHAPES, dtype, device, seed=1, basis_dtype=torch.bfloat16 if dtype == torch.bfloat16 else
                  torch.float32)
    P, G, M = T.stats_pass(cols["U"], cols["B"], cols["A"])
    for j, (u, b, a) in enumerate(zip(cols["U"], cols["B"], cols["A"])):
        u, b, a = u.cpu().double(), b.cpu().double(), a.cpu().double()
        for got, want in ((P[j], u.T @ b), (G[j], b.T @ b), (M[j], a @ a.T)):
            assert got.dtype == torch.float32 and got.device == device
            assert _rel(got, want) < 1e-6, (j, SHAPES[j])


@pytest.mark.parametrize(("dtype", "maximize"), [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp32", "fp32-maximize", "bf16", "fp16-maximize"])
def test_fused_step_trajectory_matches_float64(device, dtype, maximize):
    """Three steps of several pairs of different shapes in the same launches, against the
    same contract evaluated in float64."""
    cols = _pairs(SHAPES, dtype, device, seed=2)
    ref = _float64_copy(cols)
    hyper = HYPER[:-1] + (maximize,)
    P, G, M = _trajectory(T.fused_step, T.stats_pass, cols, 3, hyper)
    Pr, Gr, Mr = _trajectory(eager.fused_step_impl, eager.stats_pass_impl, ref, 3, hyper)
    tol = TOLERANCE[dtype]
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for j, (got, want) in enumerate(zip(cols[name], ref[name])):
            assert _rel(got, want) < tol, (name, j, SHAPES[j])
    # the carried statistics describe the parameters as stored
    for j, (u, b, a) in enumerate(zip(cols["U"], cols["B"], cols["A"])):
        u, b, a = u.cpu().double(), b.cpu().double(), a.cpu().double()
        assert _rel(P[j], u.T @ b) < 1e-6 and _rel(G[j], b.T @ b) < 1e-6 and _rel(M[j], a @ a.T) < 1e-6, j


def test_bf16_basis_and_bf16_params_round_to_nearest_even(device):
    """bf16 parameters are stored rounded to nearest even, as torch rounds: one step from
    zero state with no anchoring term equals the eager step bit for bit."""
    cols = _pairs([(37, 53, 3, 5), (70, 20, 4, 2)], torch.bfloat16, device, seed=3, basis_dtype=torch.bfloat16)
    ref = {k: [t.clone() for t in v] for k, v in cols.items()}
    gA, gB = _grads(cols, 1, seed=3)
    zero = lambda shapes: [torch.zeros(s, device=device) for s in shapes]  # noqa: E731
    for impl, c in ((T.fused_step, cols), (eager.fused_step_impl, ref)):
        P, G, M = zero([(5, 3), (2, 4)]), zero([(3, 3), (4, 4)]), zero([(3, 3), (4, 4)])
        impl(c["A"], c["B"], c["mA"], c["vA"], c["mB"], c["vB"], P, G, M, gA, gB, c["U"],
             zero([(3, 3), (4, 4)]), zero([(5, 3), (2, 4)]), zero([(3, 3), (4, 4)]), [1.0, 1.0], [1.0, 1.0],
             1e-2, 0.9, 0.999, 1e-8, 0.0, False)
    for name in ("A", "B"):
        for got, want in zip(cols[name], ref[name]):
            assert torch.equal(got, want), name


def test_fused_step_is_deterministic(device):
    runs = []
    for _ in range(2):
        cols = _pairs(SHAPES, torch.float32, device, seed=4)
        P, G, M = _trajectory(T.fused_step, T.stats_pass, cols, 2, HYPER, seed=4)
        runs.append([*cols["A"], *cols["B"], *cols["mB"], *cols["vA"], *P, *G, *M])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class _LaunchCounter:
    """Records the grid and arguments of every kernel launch made through ``jitted``."""

    def __init__(self, jitted):
        self.jitted = jitted
        self.launches: list[tuple[str, tuple, tuple, dict]] = []

    def __call__(self, fn):
        kernel = self.jitted(fn)
        launches = self.launches

        class _Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((fn.__name__, grid, args, kwargs))
                    return kernel[grid](*args, **kwargs)

                return launch

        return _Recorder()


def test_all_pairs_go_in_a_few_grouped_launches(device, monkeypatch):
    """Nine pairs in two padded-rank buckets: 2 launches per bucket + 1 reduction, whatever
    the number of pairs; the strips of each launch cover every row of B / column of A of
    every pair exactly once, one program per strip."""
    shapes = SHAPES + [(41, 23, 2, 5), (33, 31, 20, 3), (19, 45, 4, 1), (64, 16, 16, 2)]
    cols = _pairs(shapes, torch.float32, device, seed=5)
    counter = _LaunchCounter(T.jitted)
    monkeypatch.setattr(T, "jitted", counter)
    _trajectory(T.fused_step, T.stats_pass, cols, 1, HYPER, seed=5)
    launches = counter.launches
    buckets = {T.padded_rank(r) for _, _, r, _ in shapes}
    assert len(buckets) == 2
    assert len(launches) == 2 * (2 * len(buckets) + 1)  # stats pass + fused step
    assert [name for name, *_ in launches].count("_reduce_kernel") == 2
    longest = 0
    for name, grid, args, kw in launches:
        if name != "_factor_kernel":
            continue
        pair_table, tiles = args[0].cpu(), args[2].cpu()
        assert grid == (tiles.shape[0],)
        block = kw["BLOCK_COLS"] if kw["FACTOR_A"] else kw["BLOCK_ROWS"]
        size_field = int(T._N_COLS if kw["FACTOR_A"] else T._M_ROWS)
        for j in range(pair_table.shape[0]):
            strips = sorted((start, blocks) for p, start, blocks, _ in tiles.tolist() if p == j)
            covered = 0
            for start, blocks in strips:
                assert start == covered and blocks >= 1
                covered += blocks * block
                longest = max(longest, blocks)
            size = int(pair_table[j, size_field])
            assert covered >= size > covered - block
    if device.type == "cpu":
        assert longest > 1  # strips of several blocks were exercised


def test_fp64_and_large_rank_fall_back_to_eager(device):
    """fp64 pairs and r > MAX_TRITON_RANK give exactly the eager result."""
    for dtype, shapes in ((torch.float64, [(37, 53, 3, 5)]), (torch.float32, [(9, 7, T.MAX_TRITON_RANK + 1, 2)])):
        cols = _pairs(shapes, dtype, device, seed=6, basis_dtype=torch.float64 if dtype == torch.float64 else
                      torch.float32)
        if dtype == torch.float64:
            for name in ("mA", "vA", "mB", "vB"):
                cols[name] = [t.double() for t in cols[name]]
        ref = {k: [t.clone() for t in v] for k, v in cols.items()}
        P, G, M = _trajectory(T.fused_step, T.stats_pass, cols, 2, HYPER, seed=6)
        Pr, Gr, Mr = _trajectory(eager.fused_step_impl, eager.stats_pass_impl, ref, 2, HYPER, seed=6)
        for got, want in zip([*cols["A"], *cols["B"], *P, *G, *M], [*ref["A"], *ref["B"], *Pr, *Gr, *Mr]):
            assert torch.equal(got, want)


def test_bad_input_raises_and_changes_nothing(device):
    cols = _pairs([(37, 53, 3, 5), (20, 9, 2, 4)], torch.float32, device, seed=7)
    P, G, M = (list(x) for x in T.stats_pass(cols["U"], cols["B"], cols["A"]))
    before = {k: [t.clone() for t in v] for k, v in cols.items()}
    stats_before = [t.clone() for t in P + G + M]
    gA, gB = _grads(cols, 1)
    Q, R, H = _derived(P, G, M, cols["w"])

    def call(**over):
        args = dict(A=cols["A"], B=cols["B"], mA=cols["mA"], vA=cols["vA"], mB=cols["mB"], vB=cols["vB"])
        args.update(over)
        T.fused_step(args["A"], args["B"], args["mA"], args["vA"], args["mB"], args["vB"], P, G, M,
                     over.get("gA", gA), gB, cols["U"], Q, R, H, [1.0, 1.0], [1.0, 1.0], *HYPER)

    with pytest.raises(OptimizerInputError, match=r"exp_avg_B\[1\] has shape \(21, 2\), expected \(20, 2\)"):
        call(mB=[cols["mB"][0], torch.zeros(21, 2, device=device)])
    with pytest.raises(OptimizerInputError, match=r"grad_A\[0\] is torch.float64, expected torch.float32"):
        call(gA=[gA[0].double(), gA[1]])
    with pytest.raises(OptimizerInputError, match=r"B\[0\] \(37, 3\) must be contiguous"):
        call(B=[torch.randn(3, 37, device=device).T, cols["B"][1]])
    with pytest.raises(OptimizerInputError, match=r"exp_avg_A\[1\] is torch.bfloat16"):
        call(mA=[cols["mA"][0], cols["mA"][1].bfloat16()])
    with pytest.raises(OptimizerInputError, match=r"U\[0\] \(37, 5\), B\[0\] \(36, 3\)"):
        T.stats_pass(cols["U"], [torch.zeros(36, 3, device=device), cols["B"][1]], cols["A"])
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for got, want in zip(cols[name], before[name]):
            assert torch.equal(got, want), name
    for got, want in zip(P + G + M, stats_before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimizer_trajectory_against_published_formula(device, dtype):
    """AsFTAdamW(backend="triton") on a PEFT model (ranks 3 and 17: two buckets) against
    torch.optim.AdamW on task_loss + λ·paper_regularizer in float64."""
    anchor = odd_anchor(rank=4)
    pattern = {"down": 17}
    m1 = odd_lora(r=3, rank_pattern=pattern).to(device=device, dtype=dtype)
    m2 = odd_lora(r=3, rank_pattern=pattern)

    def loss_low(model, step):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
        y = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
        return (model(x).float() - y.float()).pow(2).mean()

    opt, _ = run_asft(m1, anchor.bind(m1), 3, loss_low, backend="triton", lr=1e-3, eps=1e-6)
    run_reference(m2, anchor.bind(m2), 3, lambda m, s: odd_task_loss(m, s, torch.float64), lr=1e-3, eps=1e-6)
    assert max_rel_err([p.cpu() for p in trainable(m1)], trainable(m2)) < TOLERANCE[dtype]
    assert resolve_backend("triton", device).name == "triton"


def test_cuda_impls_are_registered():
    """``torch.ops.asft.*`` dispatch CUDA tensors to this backend."""
    for op in ("asft::stats_pass", "asft::fused_anchored_adamw_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_opcheck_default_and_fake_impls():
    """Schema, mutation annotations and fake impls (CPU tensors: the default impl)."""
    cols = _pairs([(37, 53, 3, 5), (1, 7, 2, 1)], torch.float32, torch.device("cpu"), seed=8)
    P, G, M = eager.stats_pass_impl(cols["U"], cols["B"], cols["A"])
    Q, R, H = _derived(P, G, M, cols["w"])
    gA, gB = _grads(cols, 1)
    torch.library.opcheck(torch.ops.asft.stats_pass.default, (cols["U"], cols["B"], cols["A"]))
    args = (cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], P, G, M, gA, gB, cols["U"],
            Q, R, H, [1.0, 1.0], [1.0, 1.0], 1e-3, 0.9, 0.999, 1e-8, 0.01, False)
    torch.library.opcheck(torch.ops.asft.fused_anchored_adamw_.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_and_dispatch_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda")
    cols = _pairs([(37, 53, 3, 5), (1, 7, 2, 1)], torch.float32, dev, seed=9)
    P, G, M = torch.ops.asft.stats_pass(cols["U"], cols["B"], cols["A"])
    Pt, Gt, Mt = T.stats_pass(cols["U"], cols["B"], cols["A"])
    for a, b in zip(P + G + M, Pt + Gt + Mt):
        assert torch.equal(a, b)  # the op ran this backend
    Q, R, H = _derived(P, G, M, cols["w"])
    gA, gB = _grads(cols, 1)
    torch.library.opcheck(torch.ops.asft.stats_pass.default, (cols["U"], cols["B"], cols["A"]))
    args = (cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], P, G, M, gA, gB, cols["U"],
            Q, R, H, [1.0, 1.0], [1.0, 1.0], 1e-3, 0.9, 0.999, 1e-8, 0.01, False)
    torch.library.opcheck(torch.ops.asft.fused_anchored_adamw_.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_changing_lr_does_not_recompile(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cols = _pairs([(37, 53, 3, 5)], torch.float32, torch.device("cuda"), seed=10)
    kernel = T.jitted(T._factor_kernel)

    def compiled() -> int:
        # JITFunction.device_caches: device -> tuple whose first dict is the kernel cache
        return sum(len(next(x for x in c if isinstance(x, dict))) for c in kernel.device_caches.values())

    _trajectory(T.fused_step, T.stats_pass, cols, 1, HYPER)
    before = compiled()
    assert before >= 2  # stats pass and update variants
    for lr in (3e-3, 1e-4):
        _trajectory(T.fused_step, T.stats_pass, cols, 2, (lr,) + HYPER[1:])
    assert compiled() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_availability_follows_the_interpreter_switch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not T.is_available()
    with pytest.raises(OptimizerInputError, match="triton"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.is_available()
    assert resolve_backend("triton", torch.device("cpu")).name == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_interpreter_set_before_import_lists_triton_backend():
    """With ``TRITON_INTERPRET=1`` in the environment from the start, the shared ``backend``
    fixture offers "triton" and a fused step runs through the optimizer."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import torch, conftest\n"
        "from asft_kernels.ops import triton as T\n"
        "assert 'triton' in conftest.available_backends(), conftest.available_backends()\n"
        "U = torch.linalg.qr(torch.randn(37, 2, dtype=torch.float64))[0].float().contiguous()\n"
        "B, A = torch.randn(37, 3), torch.randn(3, 53)\n"
        "(P,), (G,), (M,) = T.stats_pass([U], [B], [A])\n"
        "assert torch.allclose(P, U.T @ B, atol=1e-5) and torch.allclose(M, A @ A.T, atol=1e-4)\n"
        "print(type(T.jitted(T._factor_kernel)).__name__)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("InterpretedFunction")
