"""The step plan: built once, reused on ordinary steps, rebuilt when what it depends on
changes, with trajectories exact across every rebuild; host work per step that does not
grow with the number of pairs."""

from __future__ import annotations

import pytest
import torch
from conftest import available_backends, device_for
from helpers import (
    asft_and_reference,
    lockstep,
    max_rel_err,
    odd_anchor,
    odd_lora,
    odd_task_loss,
    refuse_host_reads,
    swap_parameters,
    trainable,
)
from torch.utils._python_dispatch import TorchDispatchMode

import asft_kernels as asft
from asft_kernels.anchor import normalize_module_name
from asft_kernels.ops import cpp
from asft_kernels.reference import paper_regularizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _all_linear_llama(layers: int):
    """A tiny Llama with all 7 linear targets adapted per layer (7 · layers pairs), a
    random rank-4 anchor for every one, and fixed random gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=list(TARGETS),
                                                             init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    deltas = {normalize_module_name(n): torch.randn(m.base_layer.weight.shape, generator=g)
              for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    binding = asft.AlignmentAnchor.from_deltas(deltas, rank=4).bind(model)
    params = trainable(model)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return binding, params


@pytest.mark.skipif("cpp" not in available_backends(), reason="the C++ backend is not built here")
def test_cpp_step_dispatches_the_same_ops_at_14_and_224_pairs():
    counts = {}
    for layers in (2, 32):
        binding, params = _all_linear_llama(layers)
        assert len(binding) == 7 * layers
        opt = asft.AsFTAdamW(params, lr=1e-3, anchor=binding, backend="cpp")
        opt.step()
        with _OpCounter() as counter:
            opt.step()
        counts[len(binding)] = counter.ops
        assert opt.plan_builds == 1
    assert counts[14] == counts[224], (len(counts[14]), len(counts[224]))
    # the whole step of the bucket is one C++ call (the prepared bucket's step: the counters,
    # the anchoring terms, not a chain of small matmuls, and the fused pass), whose one
    # dispatched op is the allocation of the 0-d R it returns; outside a profiler no
    # record_function
    assert counts[14] == ["aten.empty.memory_format"], counts[14]


def _eager_step_ops(layers: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """The torch ops of one eager step (not the first) on ``_all_linear_llama(layers)`` in ``dtype``."""
    binding, params = _all_linear_llama(layers)
    for p in params:
        p.data = p.data.to(dtype)
        p.grad = p.grad.to(dtype)
    opt = asft.AsFTAdamW(params, lr=1e-3, anchor=binding, backend="eager")
    opt.step()
    with _OpCounter() as counter:
        opt.step()
    assert opt.plan_builds == 1
    return counter.ops


@pytest.mark.skipif(not hasattr(torch, "_foreach_mm"), reason="torch before 2.13 has no foreach matmul")
def test_eager_step_dispatches_the_same_ops_at_14_and_224_pairs():
    """fp32 (and fp64): the AdamW update, the anchoring products and the next statistics are
    foreach or batched ops over the bucket, so one step's ops do not depend on the pairs."""
    small, large = _eager_step_ops(2), _eager_step_ops(32)
    assert small == large, (len(small), len(large))
    assert small.count("aten._foreach_mm.default") == 3, small  # B Q_B and H A, U R_B, the statistics
    assert not any(op.startswith(("aten.mm", "aten.addmm")) for op in small), small
    assert len(small) <= 30, small


@pytest.mark.skipif(not hasattr(torch, "_foreach_mm"), reason="torch before 2.13 has no foreach matmul")
def test_eager_bf16_step_grows_only_by_the_math_dtype_copies():
    """A bf16 bucket adds per pair only its fp32 work copies of A and B and their transposes
    for the statistics."""
    per = {layers: _eager_step_ops(layers, torch.bfloat16) for layers in (1, 2)}
    extra = sorted(set(per[2]) - set(per[1]))
    assert extra == [], extra
    growth = (len(per[2]) - len(per[1])) / 7
    assert growth == 4, (growth, per)


def test_eager_step_without_foreach_mm_steps_the_same(monkeypatch):
    """Where torch has no ``_foreach_mm`` (before 2.13) the eager step makes the same products
    one ``torch.mm`` at a time: the same values, bit for bit."""
    from asft_kernels.ops import eager

    def run(model_params):
        binding, params = model_params
        opt = asft.AsFTAdamW(params, lr=1e-2, anchor=binding, backend="eager")
        for _ in range(3):
            opt.step()
        return [p.detach().clone() for p in params], opt

    with_foreach, _ = run(_all_linear_llama(1))
    monkeypatch.setattr(eager, "_FOREACH_MM", None)
    without, opt = run(_all_linear_llama(1))
    assert all(torch.equal(a, b) for a, b in zip(with_foreach, without))
    assert any(not torch.equal(a, p0) for a, p0 in zip(without, _all_linear_llama(1)[1]))  # it did step
    with _OpCounter() as counter:
        opt.step()
    assert "aten._foreach_mm.default" not in counter.ops and "aten.mm.default" in counter.ops


def test_plan_is_reused_on_ordinary_steps(backend):
    m1 = odd_lora(r=2, device=device_for(backend))
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=odd_anchor(rank=3).bind(m1), backend=backend)
    for s in range(5):
        opt.zero_grad()  # new gradient tensors every step
        odd_task_loss(m1, s, torch.float64).backward()
        opt.step()
    assert opt.plan_builds == 1


def _ground_truth_after(event):
    """Run 6 lockstep steps of AsFTAdamW and of AdamW on task + λR; before step 3 apply
    ``event(m1, o1, m2, o2) -> λ`` to both. Returns (max relative error, plan builds)."""
    m1, o1, m2, o2, b2 = asft_and_reference()
    lam = 1.0
    for s in range(6):
        if s == 3:
            lam = event(m1, o1, m2, o2)
        lockstep(m1, o1, m2, o2, b2, s, lam=lam)
    return max_rel_err(trainable(m1), trainable(m2)), o1.plan_builds


def test_rebuilt_after_add_param_group():
    def event(m1, o1, m2, o2):
        for m, o in ((m1, o1), (m2, o2)):
            extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
            m.register_parameter("extra", extra)
            o.add_param_group({"params": [extra]})
        return 1.0

    err, builds = _ground_truth_after(event)
    assert err < 1e-10 and builds == 2


def test_rebuilt_after_load_state_dict():
    def event(m1, o1, m2, o2):
        o1.load_state_dict(o1.state_dict())
        return 1.0

    err, builds = _ground_truth_after(event)
    assert err < 1e-10 and builds == 2


def test_rebuilt_after_parameter_swap():
    def event(m1, o1, m2, o2):
        swap_parameters(m1, o1)
        return 1.0

    err, builds = _ground_truth_after(event)
    assert err < 1e-10 and builds == 2


def test_rebuilt_after_requires_grad_toggle():
    def event(m1, o1, m2, o2):
        for m in (m1, m2):
            m.base_model.model.up.lora_A["default"].weight.requires_grad_(False)
        return 1.0

    m1, o1, m2, o2, b2 = asft_and_reference()
    frozen_before = None
    for s in range(6):
        if s == 3:
            event(m1, o1, m2, o2)
            a = m1.base_model.model.up.lora_A["default"].weight
            frozen_before = (a.detach().clone(), {k: v.clone() for k, v in o1.state[a].items()})
        lockstep(m1, o1, m2, o2, b2, s)
    a = m1.base_model.model.up.lora_A["default"].weight
    assert torch.equal(a, frozen_before[0])
    assert all(torch.equal(o1.state[a][k], v) for k, v in frozen_before[1].items())
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert o1.plan_builds == 2


def test_lambda_to_zero_and_back_by_a_scheduler():
    m1, o1, m2, o2, b2 = asft_and_reference()
    schedule = [1.0, 1.0, 0.0, 0.0, 0.5, 2.0]
    for s, lam in enumerate(schedule):
        for group in o1.param_groups:
            group["anchor_lambda"] = lam
        lockstep(m1, o1, m2, o2, b2, s, lam=lam)
        loss = o1.anchor_loss
        assert torch.is_tensor(loss) and loss.ndim == 0 and (float(loss) == 0.0) == (lam == 0.0)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert o1.plan_builds == 3  # first step, λ → 0, λ → 0.5 (0.5 → 2 moves nothing)


def test_rebuilt_after_dtype_change():
    """``model.to(dtype)`` keeps the parameter objects but replaces their storage."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=1.0)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    b2 = anchor.bind(m2)
    dtype = torch.float64
    for s in range(6):
        if s == 3:
            dtype = torch.float32
            m1.to(dtype)
            m2.to(dtype)
            for o in (o1, o2):  # AdamW's moments follow the parameters' dtype
                for st in o.state.values():
                    for key in ("exp_avg", "exp_avg_sq"):
                        st[key] = st[key].to(dtype)
        for m, o, extra in ((m1, o1, 0.0), (m2, o2, None)):
            o.zero_grad()
            loss = odd_task_loss(m, s, dtype)
            if extra is None:
                loss = loss + paper_regularizer(b2, 1.0)
            loss.backward()
            o.step()
    assert all(p.dtype == torch.float32 for p in trainable(m1))
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-5
    assert o1.plan_builds == 2


def test_cpp_bucket_beside_eager_and_frozen_factor_buckets():
    """A plan with a cpp bucket, a pair routed to eager (r = 80 > 64) and a pair with a
    frozen factor (an eager bucket): each bucket's step advances its own counters, every
    counter advances once per step, the frozen factor and its state are never written, and
    the trajectory is the float64 ground truth."""
    if not cpp.is_available():
        pytest.skip("no C++ compiler on this machine")
    anchor = odd_anchor(rank=4)
    models = [odd_lora(r=3, rank_pattern={"up": 80}) for _ in range(2)]
    for m in models:  # the "out" pair trains B only
        for name, p in m.named_parameters():
            if "out" in name and "lora_A" in name:
                p.requires_grad_(False)
    m1, m2 = models
    lora = [p for n, p in m1.named_parameters() if "lora_" in n]  # the frozen factor too: pairs stay whole
    o1 = asft.AsFTAdamW(lora, lr=1e-2, weight_decay=0.01, anchor=anchor.bind(m1), anchor_lambda=0.5,
                        backend="cpp")
    b2 = anchor.bind(m2)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2, weight_decay=0.01)
    for s in range(4):
        lockstep(m1, o1, m2, o2, b2, s, lam=0.5)
    plan = o1._plan
    assert sorted((b.backend.name, b.tensors.train_A is not None) for b in plan.buckets) == [
        ("cpp", False), ("eager", False), ("eager", True)]
    frozen = next(b for b in plan.buckets if b.tensors.train_A is not None)
    assert frozen.tensors.train_A == [False] and frozen.tensors.train_B == [True]
    assert all(float(o1.state[p]["step"]) == 4.0 for p in trainable(m1))
    frozen_A = m1.base_model.model.out.lora_A["default"].weight
    assert frozen_A not in o1.state and torch.equal(frozen_A, m2.base_model.model.out.lora_A["default"].weight)
    views = {p: o1.state[p]["step"] for p in trainable(m1)}
    assert all(v.untyped_storage().data_ptr() == plan.counters[0].untyped_storage().data_ptr()
               for v in views.values())
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert o1.plan_builds == 1


def test_sparse_or_strided_gradient_of_an_anchored_factor(backend):
    """A sparse gradient is refused naming the module, before anything is written; a
    non-contiguous one is stepped as its contiguous copy."""
    m1 = odd_lora(r=2, device=device_for(backend))
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=odd_anchor(rank=3).bind(m1), backend=backend)
    odd_task_loss(m1, 0, torch.float64).backward()
    opt.step()
    A = m1.base_model.model.up.lora_A["default"].weight
    before = [p.detach().clone() for p in trainable(m1)]
    A.grad = A.grad.to_sparse()
    with pytest.raises(asft.OptimizerInputError, match="up: sparse gradient for lora_A"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(trainable(m1), before))
    dense = A.grad.to_dense()
    A.grad = dense.T.contiguous().T  # same values, column-major
    assert not A.grad.is_contiguous()
    opt.step()
    assert not torch.equal(A, before[[i for i, p in enumerate(trainable(m1)) if p is A][0]])


def test_describe_and_the_first_step_log_say_which_backend_runs_which_pairs(caplog):
    """describe(): one row per bucket with backend, dtype, r, k and pair count; the first
    step logs it once at INFO; the rank the C++ backend does not run (r = 80) is routed to
    eager and said once (WARNING), not again at a rebuild or a later step."""
    import logging

    if not cpp.is_available():
        pytest.skip("no C++ compiler on this machine")
    anchor = odd_anchor(rank=4)
    model = odd_lora(r=3, rank_pattern={"up": 80})
    for name, p in model.named_parameters():
        if "out" in name and "lora_A" in name:
            p.requires_grad_(False)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = asft.AsFTAdamW(lora, lr=1e-2, anchor=anchor.bind(model), anchor_lambda=0.5, backend="cpp")
    with caplog.at_level(logging.INFO, logger="asft_kernels"):
        for s in range(3):
            opt.zero_grad()
            odd_task_loss(model, s, torch.float64).backward()
            if s == 2:
                opt._plan = None  # force a rebuild: the routed rank is not said again
            opt.step()
    rows = sorted(opt.describe(), key=lambda row: (row["backend"], row["frozen_factor"]))
    common = {"device": "cpu", "dtype": "float64", "basis_dtype": "float64", "group": 0}
    # down (1 × 37: k = 1) on cpp; up (r = 80, k = 4) routed to eager; out (frozen lora_A, k = 1)
    assert rows == [
        {**common, "backend": "cpp", "r": 3, "k": 1, "pairs": 1, "frozen_factor": False, "routed_from": None},
        {**common, "backend": "eager", "r": 80, "k": 4, "pairs": 1, "frozen_factor": False, "routed_from": "cpp"},
        {**common, "backend": "eager", "r": 3, "k": 1, "pairs": 1, "frozen_factor": True, "routed_from": None},
    ]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 1 and "cpp cpu float64 r=3 k=1: 1 pair;" in infos[0]
    assert "eager cpu float64 r=80 k=4: 1 pair (routed from cpp)" in infos[0]
    assert "eager cpu float64 r=3 k=1: 1 pair (frozen factor)" in infos[0]
    assert len(warns) == 1 and "'cpp' does not run float64 pairs of LoRA rank r = 80" in warns[0]


def test_describe_eager_and_unanchored():
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(model), lr=1e-2, anchor=anchor.bind(model), backend="eager")
    row = {"backend": "eager", "device": "cpu", "dtype": "float64", "basis_dtype": "float64", "r": 2, "group": 0,
           "frozen_factor": False, "routed_from": None}
    # up: k = 3; down (1 × 37) and out (123 × 1): k = 1
    assert sorted(opt.describe(), key=lambda r: r["k"]) == [{**row, "k": 1, "pairs": 2}, {**row, "k": 3, "pairs": 1}]
    assert asft.AsFTAdamW(trainable(model), anchor=None).describe() == []


def test_every_backend_step_follows_the_contract(backend):
    """Each bucket's ``backend.step(handle, ...)``: with ``found_inf`` set nothing is written
    (parameters, moments, statistics, counters) and R is returned; otherwise the bucket's
    counters advance by exactly one and R is the same value (it is taken before the step)."""
    m1 = odd_lora(r=2, device=device_for(backend))
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=odd_anchor(rank=3).bind(m1), backend=backend)
    odd_task_loss(m1, 0, torch.float64).backward()
    opt.step()
    plan = opt._plan
    groups = opt.param_groups
    from asft_kernels.plan import hyper_of

    for bucket in plan.buckets:
        t = bucket.tensors
        written = [*t.A, *t.B, *t.exp_avg_A, *t.exp_avg_sq_A, *t.exp_avg_B, *t.exp_avg_sq_B, t.P, t.G, t.M,
                   bucket.counters]
        snap = [x.clone() for x in written]
        grad_A, grad_B = bucket.grads()
        scale = bucket.scale_for(float(groups[bucket.group_B]["anchor_lambda"]))
        hyper = hyper_of(groups[bucket.group_B])
        one = torch.ones((), dtype=torch.float32, device=t.P.device)
        with torch.no_grad():  # as the optimizer calls it
            R_skip = bucket.backend.step(bucket.handle, grad_A, grad_B, scale, hyper, hyper, None, one)
        assert all(torch.equal(x, y) for x, y in zip(written, snap))
        with torch.no_grad():
            R = bucket.backend.step(bucket.handle, grad_A, grad_B, scale, hyper, hyper, None, one * 0)
        assert torch.equal(bucket.counters.cpu(), snap[-1].cpu() + 1)
        assert R.shape == () and torch.allclose(R, R_skip, rtol=1e-12, atol=0)
        assert not torch.equal(t.B[0], snap[len(t.A)])  # written


def test_warm_triton_step_reads_nothing_back(monkeypatch):
    """A warm ``AsFTAdamW.step()`` on the triton backend (through the plan and the backend's
    prepared step) calls no ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and no
    Python conversion of a tensor from the package's code."""
    import os

    if "triton" not in available_backends():
        pytest.skip("the triton backend does not run here (CUDA, or TRITON_INTERPRET=1)")
    package = os.path.dirname(os.path.abspath(asft.__file__))
    m1 = odd_lora(r=2, dtype=torch.float32, device=device_for("triton"))
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=odd_anchor(rank=3).bind(m1), backend="triton")
    for s in range(2):  # cold steps: the plan, its handles and the tables are built
        opt.zero_grad()
        odd_task_loss(m1, s, torch.float32).backward()
        opt.step()
    assert {b.backend.name for b in opt._plan.buckets} == {"triton"}
    odd_task_loss(m1, 2, torch.float32).backward()
    with monkeypatch.context() as patch:
        refuse_host_reads(patch, package)
        opt.step()
    assert opt.plan_builds == 1 and float(opt.state[trainable(m1)[0]]["step"]) == 3.0
