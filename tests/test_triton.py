"""Triton backend: kernel numerics, grouped launches, determinism, dispatch, opcheck.

Without a GPU every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``) on
CPU tensors; the backend wraps its kernels with ``triton.jit`` at launch time, so switching
the interpreter on inside a test works even though this module was imported before. With
CUDA present the same tests run on the device.
"""

from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from helpers import (
    TOLERANCE,
    OpCounter,
    max_rel_err,
    odd_anchor,
    odd_lora,
    odd_task_loss,
    rel_err,
    run_asft,
    run_reference,
    trainable,
)

from asft_kernels.errors import OptimizerInputError
from asft_kernels.ops import EAGER, AdamWHyper, AnchoredBatch, eager, resolve_backend, route

T = pytest.importorskip("asft_kernels.ops.triton")
L = pytest.importorskip("asft_kernels.ops.triton.launch")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (m, n, r, k): m and n never multiples of a block size; ranks in two padded-rank buckets;
# k = 40 spans several chunks of U columns.
SHAPES = [(37, 53, 3, 5), (37, 53, 1, 1), (70, 20, 4, 40), (65, 17, 17, 4), (1, 9, 2, 1)]


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


def _steps(n, t, dtype=torch.float32):
    """Per-pair step counters as the optimizer keeps them: one-element CPU tensors."""
    return [torch.tensor(float(t), dtype=dtype) for _ in range(n)]


def _batch(cols, P, G, M, gA, gB, Q, R, H, t):
    n = len(cols["A"])
    return AnchoredBatch(cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], P, G, M, gA, gB,
                         cols["U"], Q, R, H, _steps(n, t), _steps(n, t, torch.float64))


def _trajectory(fused, stats, cols, steps, hyper, seed=0):
    """``steps`` contract steps with the statistics carried between steps (as the optimizer)."""
    P, G, M = (list(x) for x in stats(cols["U"], cols["B"], cols["A"]))
    for t in range(1, steps + 1):
        gA, gB = _grads(cols, t, seed)
        Q, R, H = _derived(P, G, M, cols["w"])
        fused(_batch(cols, P, G, M, gA, gB, Q, R, H, t), hyper)
    return P, G, M


def _float64_copy(cols):
    out = {k: [t.detach().cpu().double() for t in v] for k, v in cols.items()}
    return out


HYPER = AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.1, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_pass_matches_float64(device, dtype):
    cols = _pairs(SHAPES, dtype, device, seed=1, basis_dtype=torch.bfloat16 if dtype == torch.bfloat16 else
                  torch.float32)
    P, G, M = T.stats_pass(cols["U"], cols["B"], cols["A"])
    for j, (u, b, a) in enumerate(zip(cols["U"], cols["B"], cols["A"])):
        u, b, a = u.cpu().double(), b.cpu().double(), a.cpu().double()
        for got, want in ((P[j], u.T @ b), (G[j], b.T @ b), (M[j], a @ a.T)):
            assert got.dtype == torch.float32 and got.device.type == device.type
            assert rel_err(got, want) < 1e-6, (j, SHAPES[j])


@pytest.mark.parametrize(("dtype", "maximize"), [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp32", "fp32-maximize", "bf16", "fp16-maximize"])
def test_fused_step_trajectory_matches_float64(device, dtype, maximize):
    """Three steps of several pairs of different shapes in the same launches, against the
    same contract evaluated in float64."""
    cols = _pairs(SHAPES, dtype, device, seed=2)
    ref = _float64_copy(cols)
    hyper = AdamWHyper(*HYPER.op_args()[:-1], maximize)
    P, G, M = _trajectory(T.fused_step, T.stats_pass, cols, 3, hyper)
    Pr, Gr, Mr = _trajectory(eager.fused_step, eager.stats_pass, ref, 3, hyper)
    tol = TOLERANCE[dtype]
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for j, (got, want) in enumerate(zip(cols[name], ref[name])):
            assert rel_err(got, want) < tol, (name, j, SHAPES[j])
    # the carried statistics describe the parameters as stored
    for j, (u, b, a) in enumerate(zip(cols["U"], cols["B"], cols["A"])):
        u, b, a = u.cpu().double(), b.cpu().double(), a.cpu().double()
        assert rel_err(P[j], u.T @ b) < 1e-6 and rel_err(G[j], b.T @ b) < 1e-6 and rel_err(M[j], a @ a.T) < 1e-6, j


def test_bf16_basis_and_bf16_params_round_to_nearest_even(device):
    """bf16 parameters are stored rounded to nearest even, as torch rounds: one step from
    zero state with no anchoring term equals the eager step bit for bit."""
    cols = _pairs([(37, 53, 3, 5), (70, 20, 4, 2)], torch.bfloat16, device, seed=3, basis_dtype=torch.bfloat16)
    ref = {k: [t.clone() for t in v] for k, v in cols.items()}
    gA, gB = _grads(cols, 1, seed=3)
    zero = lambda shapes: [torch.zeros(s, device=device) for s in shapes]  # noqa: E731
    for impl, c in ((T.fused_step, cols), (eager.fused_step, ref)):
        P, G, M = zero([(5, 3), (2, 4)]), zero([(3, 3), (4, 4)]), zero([(3, 3), (4, 4)])
        batch = _batch(c, P, G, M, gA, gB, zero([(3, 3), (4, 4)]), zero([(5, 3), (2, 4)]), zero([(3, 3), (4, 4)]), 1)
        impl(batch, AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.0, False))
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
    counter = _LaunchCounter(L.jitted)
    monkeypatch.setattr(L, "jitted", counter)
    _trajectory(T.fused_step, T.stats_pass, cols, 1, HYPER, seed=5)
    launches = counter.launches
    buckets = {}
    for shape in shapes:
        buckets.setdefault(T.padded_rank(shape[2]), []).append(shape)
    assert len(buckets) == 2
    tiled = sum(not T.p_split(group) for group in buckets.values())  # buckets whose P' is tiled
    assert tiled == 2
    assert len(launches) == 2 * (2 * len(buckets) + tiled + 1)  # stats pass + fused step
    assert [name for name, *_ in launches].count("_reduce_kernel") == 2
    longest = 0
    for name, grid, args, kw in launches:
        if name != "_factor_kernel":
            continue
        pair_table, tiles = args[0].cpu(), args[2].cpu()
        assert grid == (tiles.shape[0],)
        assert kw["num_stages"] == T.kernel_config(kw["BLOCK_R"], kw["FACTOR_A"], kw["UPDATE"])["num_stages"]
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


def test_launches_and_torch_ops_do_not_grow_with_the_number_of_pairs(device, monkeypatch):
    """2 and 12 pairs of the same shapes (two buckets: r = 3 and r = 20): the fused step
    makes the same kernel launches and the same torch ops, op by op; the stats pass the same
    launches, and only its three output allocations per pair more."""
    counts = {}
    for copies in (1, 6):
        shapes = [(37, 53, 3, 5), (33, 31, 20, 3)] * copies
        cols = _pairs(shapes, torch.float32, device, seed=11)
        P, G, M = (list(x) for x in T.stats_pass(cols["U"], cols["B"], cols["A"]))
        gA, gB = _grads(cols, 1)
        Q, R, H = _derived(P, G, M, cols["w"])
        batch = _batch(cols, P, G, M, gA, gB, Q, R, H, 1)
        T.fused_step(batch, HYPER)  # warm: strip tables cached, kernels compiled
        counter = _LaunchCounter(L.jitted)
        monkeypatch.setattr(L, "jitted", counter)
        with OpCounter() as ops:
            T.stats_pass(cols["U"], cols["B"], cols["A"])
        stats_ops, stats_launches = ops.ops, len(counter.launches)
        with OpCounter() as ops:
            T.fused_step(batch, HYPER)
        step_launches = len(counter.launches) - stats_launches
        monkeypatch.undo()
        if device.type == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        counts[copies] = (stats_launches, stats_ops, step_launches, ops.ops)
    (stats_launches, stats_ops, step_launches, step_ops), more = counts[1], counts[6]
    # 2 buckets x (2 factor launches + 1 of P' tiles: m < 32·max(k, r)) + 1 reduction
    assert stats_launches == step_launches == 7
    assert more[0] == stats_launches and more[2] == step_launches
    assert more[3] == step_ops
    assert step_ops["aten.stack.default"] == 1  # all step counters read at once
    assert more[1] - stats_ops == collections.Counter({"aten.empty.memory_format": 3 * 10})


def test_repeated_direct_calls_build_their_tables_each_call_and_keep_nothing(device, monkeypatch):
    """Direct calls with the same parameters, state, statistics, terms and counters (views of
    one buffer, as the plan keeps them) follow the float64 contract step by step, with new
    gradient tensors or the very same ones again; every call validates and builds its own
    tables and reads all counters at once; nothing module-wide keeps a call's tables or
    tensors afterwards; a bad gradient after that is still refused before anything is written."""
    cols = _pairs(SHAPES, torch.float32, device, seed=12)
    ref = _float64_copy(cols)
    runs = []
    for impl, stats, c in ((T.fused_step, T.stats_pass, cols), (eager.fused_step, eager.stats_pass, ref)):
        P, G, M = (list(x) for x in stats(c["U"], c["B"], c["A"]))
        Q, R, H = _derived(P, G, M, c["w"])  # kept fixed: the same tensors in every call
        n = len(c["A"])
        # counters that differ between pairs and factors (pairs that joined later); for the
        # triton calls views of one buffer, A's first, as the plan keeps them
        first = [float(j % 3) for j in range(n)] + [float(j % 2) for j in range(n)]
        if impl is T.fused_step:
            buffer = torch.tensor(first)
            step_A, step_B = list(buffer[:n]), list(buffer[n:])
        else:
            step_A, step_B = [torch.tensor(v) for v in first[:n]], [torch.tensor(v) for v in first[n:]]
        runs.append((impl, c, P, G, M, Q, R, H, step_A, step_B))
    built = []  # a weak reference to each set of tables built

    def recording(*args, _prepare=L._prepare, **kwargs):
        prep = _prepare(*args, **kwargs)
        built.append(weakref.ref(prep))
        return prep

    kept, gone = None, []
    with monkeypatch.context() as patch:
        patch.setattr(L, "_prepare", recording)
        for t in (1, 2, 3, 4):
            for impl, c, P, G, M, Q, R, H, step_A, step_B in runs:
                if t == 4 and impl is T.fused_step:
                    gA, gB = kept  # the very tensors of step 3: the same addresses
                else:
                    gA, gB = _grads(c, min(t, 3), seed=12)  # step 4 reuses step 3's values
                    kept = (gA, gB) if impl is T.fused_step else kept
                for s in step_A + step_B:
                    s.add_(1)
                batch = AnchoredBatch(c["A"], c["B"], c["mA"], c["vA"], c["mB"], c["vB"], P, G, M, gA, gB, c["U"],
                                      Q, R, H, step_A, step_B)
                if impl is T.fused_step:
                    with OpCounter() as ops:
                        impl(batch, HYPER)
                    assert ops.ops["aten.stack.default"] == 1  # all counters read at once
                    if t < 3:  # gradients nobody holds after the call
                        gone += [weakref.ref(g) for g in gA + gB]
                else:
                    impl(batch, HYPER)
                del batch, gA, gB
            for name in ("A", "B", "mA", "vA", "mB", "vB"):
                for j, (got, want) in enumerate(zip(cols[name], ref[name])):
                    assert rel_err(got, want) < TOLERANCE[torch.float32], (t, name, j)
    assert len(built) == 4  # one set of tables per call
    # nothing module-wide holds a call's tables or tensors: no cache of prepared calls, and
    # the tables and the gradients of steps 1 and 2 (unreferenced here) are freed
    gc.collect()
    assert all(ref() is None for ref in built)
    assert gone and all(ref() is None for ref in gone)
    for name, value in vars(L).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else ()
        assert not any(isinstance(x, (torch.Tensor, L._Prepared, L._Launch)) for x in items), name
    impl, c, P, G, M, Q, R, H, step_A, step_B = runs[0]
    gA, gB = _grads(c, 5, seed=12)
    gB[1] = gB[1].double()
    saved = [t.clone() for name in ("A", "B", "mA", "vA", "mB", "vB") for t in c[name]] + [t.clone() for t in P]
    with pytest.raises(OptimizerInputError, match=r"grad_B\[1\]"):
        impl(AnchoredBatch(c["A"], c["B"], c["mA"], c["vA"], c["mB"], c["vB"], P, G, M, gA, gB, c["U"], Q, R, H,
                           step_A, step_B), HYPER)
    after = [t for name in ("A", "B", "mA", "vA", "mB", "vB") for t in c[name]] + P
    assert all(torch.equal(a, b) for a, b in zip(saved, after))


def test_direct_call_copies_strided_inputs_and_reduces_statistics_through_stand_ins(device):
    """A direct call with a strided U and strided gradients (read-only: copied), a strided P
    and an fp64 G (written: reduced into fp32 stand-ins and copied back) steps exactly as the
    same call on contiguous fp32 tensors; a statistic of the wrong shape is refused, naming
    it, before anything is written."""
    shapes = SHAPES[:3]
    plain = _pairs(shapes, torch.float32, device, seed=9)
    odd = {name: [t.clone() for t in ts] for name, ts in plain.items()}
    odd["U"] = [u.T.contiguous().T for u in odd["U"]]  # same values, column-major
    stats = {}
    for c, key in ((plain, "plain"), (odd, "odd")):
        P, G, M = (list(x) for x in T.stats_pass(c["U"], c["B"], c["A"]))
        if key == "odd":
            P, G = [p.T.contiguous().T for p in P], [g.double() for g in G]
        stats[key] = (P, G, M)
    for t in (1, 2):
        for c, key in ((plain, "plain"), (odd, "odd")):
            P, G, M = stats[key]
            gA, gB = _grads(c, t, seed=9)
            if key == "odd":
                gA, gB = [g.T.contiguous().T for g in gA], [g.T.contiguous().T for g in gB]
                assert not any(g.is_contiguous() for g in gA if min(g.shape) > 1)
            Q, R, H = _derived([p.contiguous() for p in P], [g.float() for g in G], M, c["w"])
            T.fused_step(_batch(c, P, G, M, gA, gB, Q, R, H, t), HYPER)
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for got, want in zip(odd[name], plain[name]):
            assert torch.equal(got, want), name
    (P1, G1, M1), (P2, G2, M2) = stats["plain"], stats["odd"]
    for j in range(len(shapes)):
        assert G2[j].dtype == torch.float64 and torch.equal(G2[j], G1[j].double())
        assert torch.equal(P2[j], P1[j]) and torch.equal(M2[j], M1[j])
    assert not all(p.is_contiguous() for p in P2)  # written in place, layout kept
    gA, gB = _grads(odd, 3, seed=9)
    Q, R, H = _derived([p.contiguous() for p in P2], [g.float() for g in G2], M2, odd["w"])
    before = [t.clone() for name in ("A", "B", "mA", "vA", "mB", "vB") for t in odd[name]] + [t.clone() for t in P2]
    bad = [P2[0], torch.zeros(P2[1].shape[0] + 1, P2[1].shape[1], device=device), P2[2]]
    with pytest.raises(OptimizerInputError, match=r"P\[1\] has shape"):
        T.fused_step(_batch(odd, bad, G2, M2, gA, gB, Q, R, H, 3), HYPER)
    after = [t for name in ("A", "B", "mA", "vA", "mB", "vB") for t in odd[name]] + P2
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fp64_and_large_rank_are_refused_and_routed_to_eager(device):
    """fp64 pairs and r > MAX_TRITON_RANK: ``supports`` is False, ``ops.route`` sends them to
    the eager backend, and handed to this backend anyway they raise before any write."""
    backend = resolve_backend("triton", device)
    assert backend.name == "triton"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert route(backend, dtype, T.MAX_TRITON_RANK) is backend
    assert route(backend, torch.float64, 3) is EAGER
    assert route(backend, torch.float32, T.MAX_TRITON_RANK + 1) is EAGER
    wide = T.MAX_TRITON_RANK + 1
    for dtype, shapes, message in ((torch.float64, [(37, 53, 3, 5)], "torch.float64 parameters of rank 3"),
                                   (torch.float32, [(9, 7, wide, 2)], f"float32 parameters of rank {wide}")):
        assert not T.supports(dtype, shapes[0][2])
        cols = _pairs(shapes, dtype, device, seed=6, basis_dtype=dtype)
        P, G, M = eager.stats_pass(cols["U"], cols["B"], cols["A"])
        with pytest.raises(OptimizerInputError, match=message):
            T.stats_pass(cols["U"], cols["B"], cols["A"])
        before = [t.clone() for t in cols["A"] + cols["B"] + P]
        gA, gB = _grads(cols, 1, seed=6)
        Q, R, H = _derived(P, G, M, cols["w"])
        with pytest.raises(OptimizerInputError, match=message):
            T.fused_step(_batch(cols, P, G, M, gA, gB, Q, R, H, 1), HYPER)
        for got, want in zip(cols["A"] + cols["B"] + P, before):
            assert torch.equal(got, want)


def test_bad_input_raises_and_changes_nothing(device):
    cols = _pairs([(37, 53, 3, 5), (20, 9, 2, 4)], torch.float32, device, seed=7)
    P, G, M = (list(x) for x in T.stats_pass(cols["U"], cols["B"], cols["A"]))
    before = {k: [t.clone() for t in v] for k, v in cols.items()}
    stats_before = [t.clone() for t in P + G + M]
    gA, gB = _grads(cols, 1)
    Q, R, H = _derived(P, G, M, cols["w"])

    def call(**over):
        batch = _batch(cols, P, G, M, over.pop("gA", gA), gB, Q, R, H, 1)
        for name, value in over.items():
            setattr(batch, name, value)
        T.fused_step(batch, HYPER)

    with pytest.raises(OptimizerInputError, match=r"exp_avg_B\[1\] has shape \(21, 2\), expected \(20, 2\)"):
        call(exp_avg_B=[cols["mB"][0], torch.zeros(21, 2, device=device)])
    with pytest.raises(OptimizerInputError, match=r"grad_A\[0\] is torch.float64, expected torch.float32"):
        call(gA=[gA[0].double(), gA[1]])
    with pytest.raises(OptimizerInputError, match=r"B\[0\] \(37, 3\) must be contiguous"):
        call(B=[torch.randn(3, 37, device=device).T, cols["B"][1]])
    with pytest.raises(OptimizerInputError, match=r"exp_avg_A\[1\] is torch.bfloat16"):
        call(exp_avg_A=[cols["mA"][0], cols["mA"][1].bfloat16()])
    with pytest.raises(OptimizerInputError, match=r"step_A\[1\] must be a one-element float CPU tensor"):
        call(step_A=[torch.tensor(1.0), torch.ones(2)])
    with pytest.raises(OptimizerInputError, match=r"step_B\[0\] must be a one-element float CPU tensor.*float"):
        call(step_B=[1.0, torch.tensor(1.0)])
    with pytest.raises(OptimizerInputError, match=r"H has 1 entries, A has 2"):
        call(H=H[:1])
    with pytest.raises(OptimizerInputError, match=r"U\[0\] \(37, 5\), B\[0\] \(36, 3\)"):
        T.stats_pass(cols["U"], [torch.zeros(36, 3, device=device), cols["B"][1]], cols["A"])
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for got, want in zip(cols[name], before[name]):
            assert torch.equal(got, want), name
    for got, want in zip(P + G + M, stats_before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimizer_trajectory_against_published_formula(device, dtype, monkeypatch):
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

    built = []  # per set of tables built: whether it was an update's

    def recording(*args, update, _prepare=L._prepare, **kwargs):
        built.append(update)
        return _prepare(*args, update=update, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(L, "_prepare", recording)
        opt, _ = run_asft(m1, anchor.bind(m1), 3, loss_low, backend="triton", lr=1e-3, eps=1e-6)
    run_reference(m2, anchor.bind(m2), 3, lambda m, s: odd_task_loss(m, s, torch.float64), lr=1e-3, eps=1e-6)
    assert max_rel_err([p.cpu() for p in trainable(m1)], trainable(m2)) < TOLERANCE[dtype]
    assert resolve_backend("triton", device).name == "triton"
    # each triton bucket steps through the handle its prepare made (TritonStep), kept by the
    # plan, with its tables on the handle: the three steps built update tables once per
    # bucket (no direct fused_step call, which builds them every call)
    buckets = [b for b in opt._current_plan().buckets if b.backend.name == "triton"]
    assert buckets and all(isinstance(b.handle, T.TritonStep) for b in buckets)
    assert built.count(True) == len(buckets)
    for b in buckets:
        assert b.handle.prep.launches and all(launch.pair_table is not None for launch in b.handle.prep.launches)


def test_cuda_impls_are_registered():
    """``torch.ops.asft.*`` dispatch CUDA tensors to this backend."""
    for op in ("asft::stats_pass", "asft::fused_anchored_adamw_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_opcheck_default_and_fake_impls():
    """Schema, mutation annotations and fake impls (CPU tensors: the default impl)."""
    cols = _pairs([(37, 53, 3, 5), (1, 7, 2, 1)], torch.float32, torch.device("cpu"), seed=8)
    P, G, M = eager.stats_pass(cols["U"], cols["B"], cols["A"])
    Q, R, H = _derived(P, G, M, cols["w"])
    gA, gB = _grads(cols, 1)
    torch.library.opcheck(torch.ops.asft.stats_pass.default, (cols["U"], cols["B"], cols["A"]))
    batch = _batch(cols, P, G, M, gA, gB, Q, R, H, 1)
    args = (*batch.op_args(), 1e-3, 0.9, 0.999, 1e-8, 0.01, False, 2e-3, 0.8, 0.99, 1e-7, 0.0, True)
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
    batch = _batch(cols, list(P), list(G), list(M), gA, gB, Q, R, H, 1)
    args = (*batch.op_args(), 1e-3, 0.9, 0.999, 1e-8, 0.01, False, 2e-3, 0.8, 0.99, 1e-7, 0.0, True)
    torch.library.opcheck(torch.ops.asft.fused_anchored_adamw_.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llama_sized_pairs_match_float64(monkeypatch):
    """Pairs of Llama-2-7B sizes in one bucket per padded rank: thousands of programs,
    strips of many blocks, U of 4096 columns (phase 2 re-reads it from DRAM). Three steps
    against the same contract in float64."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shapes = [(4096, 4096, 8, 64), (4096, 11008, 16, 4096), (11008, 4096, 8, 256), (4096, 4096, 64, 256)]
    cols = _pairs(shapes, torch.float32, torch.device("cuda"), seed=11)
    ref = _float64_copy(cols)
    P, G, M = _trajectory(T.fused_step, T.stats_pass, cols, 3, HYPER)
    Pr, Gr, Mr = _trajectory(eager.fused_step, eager.stats_pass, ref, 3, HYPER)
    for name in ("A", "B", "mA", "vA", "mB", "vB"):
        for j, (got, want) in enumerate(zip(cols[name], ref[name])):
            assert rel_err(got, want) < TOLERANCE[torch.float32], (name, j, shapes[j])
    for j, (u, b, a) in enumerate(zip(cols["U"], cols["B"], cols["A"])):
        u, b, a = u.cpu().double(), b.cpu().double(), a.cpu().double()
        # sums of up to 11008 fp32 products
        assert rel_err(P[j], u.T @ b) < 2e-5 and rel_err(G[j], b.T @ b) < 2e-5 and rel_err(M[j], a @ a.T) < 2e-5, j


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
        _trajectory(T.fused_step, T.stats_pass, cols, 2, AdamWHyper(lr, *HYPER.op_args()[1:]))
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


def test_supported_triton_range_is_the_one_pyproject_declares():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    assert f'triton = ["{T.TRITON_REQUIREMENT}"]' in pyproject  # the `triton` extra
    assert f'"{T.TRITON_REQUIREMENT}; platform_system' in pyproject  # the `test` extra
    assert T.UNSUPPORTED is None  # the installed Triton is in the range
    from asft_kernels.ops.triton.version import version_problem

    assert version_problem("3.6.0") is None and version_problem("3.9.1+git12ab") is None
    for old_or_new in ("3.5.1", "3.10.0", "4.0.0", "nightly"):
        assert f"Triton {old_or_new} is not supported" in version_problem(old_or_new)


def test_unsupported_triton_warns_once_and_auto_runs_eager():
    """Another Triton release: importing the backend gives one TritonVersionWarning naming
    the range; the backend is unavailable, ``auto`` resolves CUDA tensors to eager and an
    explicit ``triton`` is refused."""
    code = (
        "import warnings, torch, triton\n"
        "triton.__version__ = '3.5.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from asft_kernels import ops\n"
        "    from asft_kernels.ops import triton as T\n"
        "    assert ops.resolve_backend('auto', torch.device('cuda')).name == 'eager'\n"
        "    assert not T.is_available() and not T.supports(torch.float32, 8)\n"
        "    try:\n"
        "        ops.resolve_backend('triton', torch.device('cuda'))\n"
        "        raise SystemExit('explicit triton accepted')\n"
        "    except ValueError as exc:\n"
        "        assert 'not available' in str(exc), exc\n"
        "msgs = [str(w.message) for w in caught if type(w.message).__name__ == 'TritonVersionWarning']\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    assert "Triton 3.5.0 is not supported" in out.stdout and "triton>=3.6,<3.10" in out.stdout
