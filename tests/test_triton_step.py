"""The prepared Triton step (``prepare`` + ``step``, docs/triton.md "Prepared steps").

Numerics against the anchored AdamW step evaluated in float64 from the published formula
(the anchoring gradient by autograd of ``λ·coef·‖(I − C) B A‖²_F`` with a dense ``C``),
with per-factor hyperparameters, a tensor ``lr``, a gradient scale and a skipped step; both
ways of computing ``P' = Uᵀ B'`` (split-m partials and tiles); the precision option of the
U products; no host reads and a constant number of torch ops per warm step. Without a GPU
the kernels run under the Triton interpreter; the tests marked ``gpu`` need CUDA
(synchronisation-free warm step, CUDA-graph capture).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from helpers import OpCounter, refuse_host_reads, rel_err
from torch.utils._python_dispatch import _disable_current_modes

from asft_kernels.errors import OptimizerInputError
from asft_kernels.ops import AdamWHyper, AnchoredBatch

T = pytest.importorskip("asft_kernels.ops.triton")
L = pytest.importorskip("asft_kernels.ops.triton.launch")
if T.UNSUPPORTED is not None:
    pytest.skip(T.UNSUPPORTED, allow_module_level=True)

# (m, n, r, k): split-m (m ≥ 32·max(k, r)) and tile buckets, ranks in both padded buckets
SHAPES = [(37, 53, 3, 5), (70, 20, 4, 40), (65, 17, 17, 4), (300, 9, 3, 5), (1, 9, 2, 1)]
HYPER_A = AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.1, False)
HYPER_B = AdamWHyper(4e-2, 0.8, 0.99, 1e-6, 0.0, False)  # LoRA+: B's own lr, betas, decay


class Bucket:
    """The tensors of one bucket as the plan keeps them, plus a float64 copy (the reference)."""

    def __init__(self, shapes, device, dtype=torch.float32, seed=0, basis_dtype=torch.float32, stacked=False):
        g = torch.Generator().manual_seed(seed)
        self.shapes, self.device, self.dtype = shapes, device, dtype
        n_pairs = len(shapes)
        self.U, self.c, self.A, self.B = [], [], [], []
        for m, n, r, k in shapes:
            self.U.append(torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0].to(basis_dtype))
            self.c.append(torch.rand(k, generator=g, dtype=torch.float64) * 1.4 - 0.2)  # some c outside [0, 1]
            self.B.append(torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype))
            self.A.append(torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype))
        self.coef = torch.rand(n_pairs, generator=g, dtype=torch.float64) + 0.5
        zeros = lambda ts: [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in ts]  # noqa: E731
        dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        self.batch = AnchoredBatch(
            dev(self.A), dev(self.B), zeros(self.A), zeros(self.A), zeros(self.B), zeros(self.B), [], [], [], [], [],
            [u.contiguous().to(device) for u in self.U], [], [], [], [], [])
        if stacked:  # the plan's layout: views of (L, k, r) / (L, r, r) buffers
            (m, n, r, k), = set(shapes)
            bufs = {name: torch.zeros((n_pairs, *shape), device=device) for name, shape in
                    (("P", (k, r)), ("G", (r, r)), ("M", (r, r)), ("Q_B", (r, r)), ("R_B", (k, r)), ("H", (r, r)))}
            for name, buf in bufs.items():
                setattr(self.batch, name, list(buf.unbind(0)))
            self.w = (2 * torch.stack(self.c) - torch.stack(self.c) ** 2).float().to(device)[:, :, None]
        else:
            for name, shape in (("P", lambda r, k: (k, r)), ("G", lambda r, k: (r, r)), ("M", lambda r, k: (r, r)),
                                ("Q_B", lambda r, k: (r, r)), ("R_B", lambda r, k: (k, r)),
                                ("H", lambda r, k: (r, r))):
                setattr(self.batch, name, [torch.zeros(shape(r, k), device=device) for _, _, r, k in shapes])
            self.w = [(2 * c - c * c).float().to(device) for c in self.c]
        P, G, M = T.stats_pass(self.batch.U, self.batch.B, self.batch.A)
        for name, values in (("P", P), ("G", G), ("M", M)):
            for dst, src in zip(getattr(self.batch, name), values):
                dst.copy_(src)
        self.counters = torch.zeros(2 * n_pairs, device=device)
        # float64 reference state
        self.ref = {"A": [a.double() for a in self.A], "B": [b.double() for b in self.B],
                    "mA": zeros(self.A), "vA": zeros(self.A), "mB": zeros(self.B), "vB": zeros(self.B)}
        for key in ("mA", "vA", "mB", "vB"):
            self.ref[key] = [t.cpu().double() for t in self.ref[key]]
        self.ref_t = [0.0, 0.0]

    def grads(self, step, seed=0):
        g = torch.Generator().manual_seed(1000 * seed + step)
        gA = [torch.randn(a.shape, generator=g).to(self.dtype).to(self.device) for a in self.A]
        gB = [torch.randn(b.shape, generator=g).to(self.dtype).to(self.device) for b in self.B]
        return gA, gB

    def scale(self, lam):
        return (2 * lam * self.coef).float().to(self.device)

    def reference_step(self, gA, gB, lam, hyper_A, hyper_B, grad_scale=1.0):
        """One step of the published formula in float64; returns R before the step."""
        total = 0.0
        new_grads = []
        for j, (m, _, _, _) in enumerate(self.shapes):
            A = self.ref["A"][j].clone().requires_grad_(True)
            B = self.ref["B"][j].clone().requires_grad_(True)
            U = self.U[j].double()
            C = (U * self.c[j]) @ U.T
            reg = lam * float(self.coef[j]) * ((torch.eye(m, dtype=torch.float64) - C) @ B @ A).pow(2).sum()
            dA, dB = torch.autograd.grad(reg, (A, B))
            total += float(reg.detach())
            new_grads.append((gA[j].cpu().double() / grad_scale + dA, gB[j].cpu().double() / grad_scale + dB))
        for f, (hyper, key) in enumerate(((hyper_A, "A"), (hyper_B, "B"))):
            self.ref_t[f] += 1
            t = self.ref_t[f]
            lr = float(hyper.lr)
            for j in range(len(self.shapes)):
                g = new_grads[j][f] * (-1.0 if hyper.maximize else 1.0)
                p, mom, var = self.ref[key][j], self.ref["m" + key][j], self.ref["v" + key][j]
                p.mul_(1 - lr * hyper.weight_decay)
                mom.mul_(hyper.beta1).add_(g, alpha=1 - hyper.beta1)
                var.mul_(hyper.beta2).addcmul_(g, g, value=1 - hyper.beta2)
                denom = var.sqrt() / (1 - hyper.beta2 ** t) ** 0.5 + hyper.eps
                p.addcdiv_(mom, denom, value=-lr / (1 - hyper.beta1 ** t))
                if self.dtype != torch.float32:  # stored in the parameter dtype
                    p.copy_(p.to(self.dtype).double())
        return total

    def check(self, tol):
        b = self.batch
        self.check_stats()
        for key, got in (("A", b.A), ("B", b.B), ("mA", b.exp_avg_A), ("vA", b.exp_avg_sq_A), ("mB", b.exp_avg_B),
                         ("vB", b.exp_avg_sq_B)):
            for j, (x, want) in enumerate(zip(got, self.ref[key])):
                assert rel_err(x, want) < tol, (key, j, self.shapes[j], rel_err(x, want))

    def check_stats(self):
        """P, G, M describe the parameters as stored (float64 products)."""
        b = self.batch
        for j, (u, bb, a) in enumerate(zip(b.U, b.B, b.A)):
            u, bb, a = u.cpu().double(), bb.cpu().double(), a.cpu().double()
            for name, want in (("P", u.T @ bb), ("G", bb.T @ bb), ("M", a @ a.T)):
                assert rel_err(getattr(b, name)[j], want) < 1e-5, (name, j, self.shapes[j])

    def snapshot(self):
        b = self.batch
        return [t.clone() for name in ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B", "P", "G",
                                       "M") for t in getattr(b, name)] + [self.counters.clone()]


def test_split_rule_covers_both_paths():
    """The test shapes exercise both ways of computing P' (``layout.p_split``)."""
    assert T.p_split([(300, 9, 3, 5)]) and not T.p_split([(37, 53, 3, 5)])
    assert T.p_split([(4096, 4096, 8, 64)]) and not T.p_split([(4096, 4096, 8, 256)])
    buckets = L._buckets([torch.empty(m, k) for m, _, _, k in SHAPES], [torch.empty(m, r) for m, _, r, _ in SHAPES])
    paths = {T.p_split([SHAPES[j] for j in idx]) for idx in buckets.values()}
    assert paths == {False}  # mixed buckets take the tiles; a split-only bucket is tested below
    assert T.p_split([SHAPES[3]])


@pytest.mark.parametrize("split", [False, True], ids=["tiles", "split-m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prepared_step_matches_float64_published_formula(device, monkeypatch, split, dtype):
    """Four steps with per-factor hyperparameters, B's lr a 0-d device tensor from step 2,
    a gradient scale at step 3: parameters, moments, statistics, R and counters against the
    published formula in float64."""
    monkeypatch.setattr(L, "p_split", lambda shapes: split)
    bucket = Bucket(SHAPES, device, dtype, seed=1)
    handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
    assert all(launch.constexprs["P_SPLIT"] is split for launch in handle.prep.launches)
    lam = 0.35
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for t in range(1, 5):
        gA, gB = bucket.grads(t, seed=1)
        hyper_B = HYPER_B if t == 1 else AdamWHyper(torch.tensor(HYPER_B.lr / t, device=device), *HYPER_B.op_args()[1:])
        gs = 1024.0 if t == 3 else None
        if gs is not None:  # as a GradScaler leaves them: scaled gradients, divided inside the step
            gA = [g * gs for g in gA]
            gB = [g * gs for g in gB]
        want = bucket.reference_step(gA, gB, lam, HYPER_A, AdamWHyper(HYPER_B.lr / (1 if t == 1 else t),
                                                                      *HYPER_B.op_args()[1:]), gs or 1.0)
        R = L.step(handle, gA, gB, bucket.scale(lam), HYPER_A, hyper_B,
                   grad_scale=None if gs is None else torch.tensor(gs, device=device))
        assert R.shape == () and R.dtype == torch.float32
        assert abs(float(R) - want) <= 1e-4 * abs(want), (t, float(R), want)
        bucket.check(tol)
        assert torch.equal(bucket.counters.cpu(), torch.full((2 * len(SHAPES),), float(t)))


def test_found_inf_skips_every_write(device):
    """found_inf != 0: parameters, moments, statistics and counters bitwise unchanged, R
    still returned; the next step with found_inf = 0 is an ordinary step."""
    bucket = Bucket(SHAPES, device, seed=2)
    handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
    gA, gB = bucket.grads(1, seed=2)
    want = bucket.reference_step(gA, gB, 0.5, HYPER_A, HYPER_B)
    L.step(handle, gA, gB, bucket.scale(0.5), HYPER_A, HYPER_B, found_inf=torch.zeros((), device=device))
    before = bucket.snapshot()
    bad = [g * float("inf") for g in gA]
    R = L.step(handle, bad, gB, bucket.scale(0.5), HYPER_A, HYPER_B, grad_scale=torch.tensor(2.0, device=device),
               found_inf=torch.ones((), device=device))
    assert torch.isfinite(R)
    for x, y in zip(before, bucket.snapshot()):
        assert torch.equal(x, y)
    gA, gB = bucket.grads(2, seed=2)
    want = bucket.reference_step(gA, gB, 0.5, HYPER_A, HYPER_B)
    R = L.step(handle, gA, gB, bucket.scale(0.5), HYPER_A, HYPER_B, found_inf=torch.zeros((), device=device))
    assert abs(float(R) - want) <= 1e-4 * abs(want)
    bucket.check(1e-5)


def test_bf16_basis_on_split_bf16_products(device):
    """A bf16 U with a tensor-core precision: the fp32 operand of each U product is split
    into three bf16 parts. Two steps agree with the same steps at ``"ieee"`` (fp32 products
    of the bf16 values) to fp32 accuracy, and P' = Uᵀ B' with float64 products."""
    allowed = T.u_precisions()
    runs = []
    for precision in ("ieee", "tf32x3" if "tf32x3" in allowed else "tf32"):
        bucket = Bucket(SHAPES[:3], device, seed=3, basis_dtype=torch.bfloat16)
        handle = L.prepare(bucket.batch, bucket.counters, bucket.w, precision=precision)
        assert {launch.constexprs["U_PRECISION"] for launch in handle.prep.launches} == {precision}
        for t in (1, 2):
            L.step(handle, *bucket.grads(t, seed=3), bucket.scale(0.4), HYPER_A, HYPER_B)
            bucket.check_stats()
        runs.append(bucket.snapshot())
    for x, y in zip(*runs):
        assert rel_err(x, y) < 1e-5


def test_u_precision_option(device, monkeypatch):
    """Every precision the installed Triton offers is accepted (and runs under the
    interpreter); another is refused naming the offered ones; the environment variable sets
    the default."""
    allowed = T.u_precisions()
    assert "ieee" in allowed and "tf32x3" in allowed
    assert L.u_precision() == L.DEFAULT_U_PRECISION
    monkeypatch.setenv(L.U_PRECISION_ENV, "tf32x3")
    assert L.u_precision() == "tf32x3"
    with pytest.raises(OptimizerInputError, match=r"'fp8' is not offered .*'ieee'"):
        L.u_precision("fp8")
    bucket = Bucket(SHAPES[:2], device, seed=4)
    with pytest.raises(OptimizerInputError, match="not offered"):
        L.prepare(bucket.batch, bucket.counters, bucket.w, precision="fp8")
    if device.type == "cpu":  # the interpreter computes every precision in fp32
        handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
        gA, gB = bucket.grads(1, seed=4)
        bucket.reference_step(gA, gB, 0.4, HYPER_A, HYPER_B)
        L.step(handle, gA, gB, bucket.scale(0.4), HYPER_A, HYPER_B)
        bucket.check(1e-5)


def test_bad_inputs_are_refused_before_any_write(device):
    bucket = Bucket(SHAPES[:2], device, seed=5)
    with pytest.raises(OptimizerInputError, match=r"counters must be .*shape \(4,\)"):
        L.prepare(bucket.batch, torch.zeros(3, device=device), bucket.w)
    with pytest.raises(OptimizerInputError, match=r"w\[1\] must be .*40 elements"):
        L.prepare(bucket.batch, bucket.counters, [bucket.w[0], bucket.w[1][:3]])
    with pytest.raises(OptimizerInputError, match="no anchor weights"):
        L.prepare(bucket.batch, bucket.counters)
    saved = bucket.batch.P
    bucket.batch.P = [p.double() for p in saved]
    with pytest.raises(OptimizerInputError, match=r"P\[0\] is torch.float64, expected torch.float32"):
        L.prepare(bucket.batch, bucket.counters, bucket.w)
    bucket.batch.P = saved
    handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
    before = bucket.snapshot()
    gA, gB = bucket.grads(1, seed=5)
    with pytest.raises(OptimizerInputError, match=r"grad_B\[1\] is torch.float64"):
        L.step(handle, gA, [gB[0], gB[1].double()], bucket.scale(0.3), HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match=r"grad_A has 1 entries"):
        L.step(handle, gA[:1], gB, bucket.scale(0.3), HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match=r"scale must be .*shape \(2,\)"):
        L.step(handle, gA, gB, bucket.scale(0.3)[:1], HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match=r"found_inf must be a one-element"):
        L.step(handle, gA, gB, bucket.scale(0.3), HYPER_A, HYPER_B, found_inf=torch.zeros(2, device=device))
    for x, y in zip(before, bucket.snapshot()):
        assert torch.equal(x, y)


_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(T.__file__)))


def test_warm_step_reads_nothing_back_and_dispatches_a_constant_number_of_ops(device, monkeypatch):
    """A warm step of 2 and of 12 pairs (the plan's stacked layout, a tensor lr, a gradient
    scale and found_inf): no ``.item()``/``.tolist()``/``.cpu()`` from the project's code, the
    same kernel launches and the same torch ops, op by op."""
    counts = {}
    for n_pairs in (2, 12):
        bucket = Bucket([(40, 24, 4, 8)] * n_pairs, device, seed=6, stacked=True)
        handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
        lr = torch.tensor(1e-3, device=device)
        args = (bucket.scale(0.2), HYPER_A, AdamWHyper(lr, *HYPER_B.op_args()[1:]))
        flags = dict(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.zeros((), device=device))
        gA, gB = bucket.grads(1)
        L.step(handle, gA, gB, *args, **flags)  # cold: tables uploaded
        gA, gB = bucket.grads(2)  # new gradient tensors: the pair table is uploaded again
        launches: list[str] = []

        def counting(fn, launches=launches, real=L.jitted):
            kernel = real(fn)

            class Recorder:
                def __getitem__(self, grid):
                    def launch(*call_args, **kwargs):
                        launches.append(fn.__name__)
                        with _disable_current_modes():  # the launch itself (the interpreter's copies)
                            return kernel[grid](*call_args, **kwargs)

                    return launch

            return Recorder()

        with monkeypatch.context() as patch:
            refuse_host_reads(patch, _PROJECT)
            patch.setattr(L, "jitted", counting)
            with OpCounter() as ops:
                L.step(handle, gA, gB, *args, **flags)
            counted = collections.Counter(launches)
            with pytest.raises(AssertionError, match="tolist called from"):  # the guard works
                L._read_steps([torch.tensor(1.0)])
            with OpCounter() as again:  # the same gradient tensors: no table upload at all
                L.step(handle, gA, gB, *args, **flags)
        assert sum(again.ops.values()) < sum(ops.ops.values()) and "aten.lift_fresh.default" not in again.ops
        counts[n_pairs] = (counted, ops.ops)
        assert torch.equal(bucket.counters.cpu(), torch.full((2 * n_pairs,), 3.0))
    assert counts[2] == counts[12]
    launches, ops = counts[2]
    assert launches == collections.Counter({"_terms_kernel": 1, "_factor_kernel": 2, "_p_tile_kernel": 1,
                                            "_reduce_kernel": 1})
    # the pair table (new gradient tensors), lr into the hyperparameter table, the scratch
    # slices of the two factor launches, R: nothing per pair
    assert sum(ops.values()) <= 10, ops
    assert ops["aten.sum.default"] == 1 and ops["aten.copy_.default"] <= 2, ops


gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_warm_step_does_not_synchronize_on_cuda(monkeypatch):
    """A warm step (tensor lr, grad_scale, found_inf, new gradient tensors) under
    ``torch.cuda.set_sync_debug_mode("error")``: any device → host synchronisation raises."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bucket = Bucket([(256, 128, 8, 64)] * 3 + [(128, 64, 32, 512)] * 2, torch.device("cuda"), seed=7)
    handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
    lr = torch.tensor(1e-3, device="cuda")
    args = (bucket.scale(0.2), HYPER_A, AdamWHyper(lr, *HYPER_B.op_args()[1:]))
    flags = dict(grad_scale=torch.tensor(4.0, device="cuda"), found_inf=torch.zeros((), device="cuda"))
    L.step(handle, *bucket.grads(1), *args, **flags)
    grads = bucket.grads(2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        L.step(handle, *grads, *args, **flags)
        L.step(handle, *grads, *args, **flags)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(bucket.counters.cpu(), torch.full((10,), 3.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_match_the_uncaptured_trajectory_bitwise(monkeypatch):
    """The step captured once in a ``torch.cuda.CUDAGraph`` and replayed 3 times (new
    gradient values copied into the static gradients, lr a device tensor changed between
    replays) gives bitwise the same parameters, moments, statistics, counters and R as 3
    uncaptured steps."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda")
    shapes = [(256, 128, 8, 64)] * 2 + [(300, 64, 32, 512)]
    runs = []
    for captured in (False, True):
        bucket = Bucket(shapes, dev, seed=8)
        handle = L.prepare(bucket.batch, bucket.counters, bucket.w)
        lr = torch.tensor(1e-3, device=dev)
        static_A, static_B = bucket.grads(0)
        scale = bucket.scale(0.3)
        found_inf = torch.zeros((), device=dev)
        hyper_B = AdamWHyper(lr, *HYPER_B.op_args()[1:])
        # one warm step (compiles, uploads tables) on both runs, then a fresh start
        L.step(handle, static_A, static_B, scale, HYPER_A, hyper_B, found_inf=found_inf)
        losses = []
        if captured:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = L.step(handle, static_A, static_B, scale, HYPER_A, hyper_B, found_inf=found_inf)
        for t in range(1, 4):
            gA, gB = bucket.grads(t)
            for dst, src in zip(static_A + static_B, gA + gB):
                dst.copy_(src)
            lr.fill_(1e-3 / t)
            if captured:
                graph.replay()
                losses.append(out.clone())
            else:
                losses.append(L.step(handle, static_A, static_B, scale, HYPER_A, hyper_B, found_inf=found_inf))
        torch.cuda.synchronize()
        runs.append(bucket.snapshot() + losses)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_llama_sized_prepared_step_matches_float64(monkeypatch, precision):
    """Pairs of 4096 × 4096 with k = 4096 (P' tiles) and k = 64 (split m), three prepared
    steps at ``precision`` against the same steps in float64 on the device (the eager math
    of bench/triton_suite.py): within the fp32 trajectory tolerance. The k = 4096 case is
    the one the default precision is chosen by."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from bench.triton_suite import Bucket as SuiteBucket
    from bench.triton_suite import Shape, eager_step_fn, triton_step_fn

    dev = torch.device("cuda")
    for r, k in ((64, 4096), (8, 64)):
        shape = Shape(4096, 4096, r, k, 2, "float32")
        got = SuiteBucket(shape, dev, seed=3, orthonormal=True)
        ref = SuiteBucket(shape, dev, seed=3, math_dtype=torch.float64, U=got.U.double())
        step, ref_step = triton_step_fn(got, precision), eager_step_fn(ref, compiled=False)
        for _ in range(3):
            step()
            ref_step()
        for name, a, b in zip(("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M"), got.state(), ref.state()):
            assert rel_err(a, b) < 1e-5, (precision, r, k, name, rel_err(a, b))
