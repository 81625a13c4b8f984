"""The optimizer never silently stops anchoring, and a failing step writes nothing:
low-precision resume, bindings of another model, frozen factors, duplicated parameters,
λ on resume, copies and pickles, ``differentiable``."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import device_for
from helpers import asft_and_reference, lockstep, max_rel_err, odd_anchor, odd_lora, odd_task_loss, trainable

import asft_kernels as asft
from asft_kernels.errors import OptimizerInputError
from asft_kernels.reference import paper_regularizer


def _steps(model, opt, first, last, dtype):
    for s in range(first, last):
        opt.zero_grad()
        odd_task_loss(model, s, dtype).backward()
        opt.step()


# ------------------------------------------------------------------ 1. low-precision resume
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_resume_is_bitwise_and_keeps_fp32_moments(backend, dtype):
    anchor = odd_anchor(rank=3)
    kw = dict(lr=1e-3, weight_decay=0.01, anchor_lambda=0.5, backend=backend)
    device = device_for(backend)
    m_ref = odd_lora(r=2, dtype=dtype, device=device)
    o_ref = asft.AsFTAdamW(trainable(m_ref), anchor=anchor.bind(m_ref), **kw)
    _steps(m_ref, o_ref, 0, 6, dtype)

    m1 = odd_lora(r=2, dtype=dtype, device=device)
    o1 = asft.AsFTAdamW(trainable(m1), anchor=anchor.bind(m1), **kw)
    _steps(m1, o1, 0, 3, dtype)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "optim": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = odd_lora(r=2, dtype=dtype, seed=5, device=device)
    m2.load_state_dict(ckpt["model"])
    o2 = asft.AsFTAdamW(trainable(m2), anchor=anchor.bind(m2), **kw)
    o2.load_state_dict(ckpt["optim"])
    binding = o2.anchor
    for pair in binding:
        for p in (pair.A, pair.B):
            assert o2.state[p]["exp_avg"].dtype == torch.float32
            assert o2.state[p]["exp_avg_sq"].dtype == torch.float32
    _steps(m2, o2, 3, 6, dtype)
    for p, q in zip(trainable(m2), trainable(m_ref)):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ 2. binding of another model
def test_binding_of_another_model_instance_is_refused():
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    binding = anchor.bind(model)
    copy_ = copy.deepcopy(model)
    with pytest.raises(OptimizerInputError, match="another model instance.*anchor.bind"):
        asft.AsFTAdamW(trainable(copy_), lr=1e-3, anchor=binding)
    recreated = odd_lora(r=2)
    with pytest.raises(OptimizerInputError, match="matches none of the optimizer's parameters"):
        asft.AsFTAdamW(trainable(recreated), lr=1e-3, anchor=binding)
    # an optimizer over the bound model's parameters is accepted
    asft.AsFTAdamW(trainable(model), lr=1e-3, anchor=binding)


# ------------------------------------------------------------------ 3. frozen factors
@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_frozen_factor_is_never_written_and_the_other_gets_task_plus_R(backend, frozen):
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2, device=device_for(backend)), odd_lora(r=2)
    for m in (m1, m2):
        for name, p in m.named_parameters():
            if f"{frozen}." in name:
                p.requires_grad_(False)
    frozen_params = [p for n, p in m1.named_parameters() if f"{frozen}." in n]
    before = [p.detach().clone() for p in frozen_params]
    o1 = asft.AsFTAdamW(list(m1.parameters()), lr=1e-2, weight_decay=0.1, anchor=anchor.bind(m1),
                        anchor_lambda=2.0, backend=backend)
    o2 = torch.optim.AdamW(list(m2.parameters()), lr=1e-2, weight_decay=0.1)
    b2 = anchor.bind(m2)
    b1 = anchor.bind(m1)
    for s in range(4):
        expected = float(paper_regularizer(b1, 2.0).detach())  # R before this step
        lockstep(m1, o1, m2, o2, b2, s, lam=2.0)
        assert float(o1.anchor_loss) == pytest.approx(expected, rel=1e-10)
    for p, b in zip(frozen_params, before):
        assert torch.equal(p, b)
        assert len(o1.state[p]) == 0
    assert max_rel_err(list(m1.parameters()), list(m2.parameters())) < 1e-10


# ------------------------------------------------------------------ 4. duplicated parameters
def test_anchored_factor_listed_twice_is_refused():
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    ps = trainable(model)
    with pytest.raises(OptimizerInputError, match="listed more than once"), pytest.warns(UserWarning):
        asft.AsFTAdamW(ps + ps, lr=1e-3, anchor=anchor.bind(model))


# ------------------------------------------------------------------ 5. nothing written by a failing step
def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    return params, state


def _unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        assert all(torch.equal(st[k], state[id(p)][k]) for k in st)


def test_failing_step_writes_nothing_and_a_retry_steps_once(backend):
    anchor = odd_anchor(rank=3)
    device = device_for(backend)
    m1, m2 = odd_lora(r=2, device=device), odd_lora(r=2, device=device)
    params1 = list(m1.parameters())  # biases included: plain AdamW in the same step
    o1 = asft.AsFTAdamW(params1, lr=1e-2, anchor=anchor.bind(m1), backend=backend)
    o2 = asft.AsFTAdamW(list(m2.parameters()), lr=1e-2, anchor=anchor.bind(m2), backend=backend)
    _steps(m1, o1, 0, 2, torch.float64)
    _steps(m2, o2, 0, 2, torch.float64)
    o1.zero_grad()
    odd_task_loss(m1, 2, torch.float64).backward()
    # a pair whose factors no longer share a dtype
    a = m1.base_model.model.up.lora_A["default"].weight
    good, good_grad = a.data, a.grad
    a.data = good.float()
    a.grad = good_grad.float()
    snap = _snapshot(m1, o1)
    with pytest.raises(OptimizerInputError, match="up.*lora_A is torch.float32 but lora_B is torch.float64"):
        o1.step()
    _unchanged(m1, o1, snap)
    # a negative λ set by hand
    a.data = good
    a.grad = good_grad
    o1.param_groups[0]["anchor_lambda"] = -1.0
    snap = _snapshot(m1, o1)
    with pytest.raises(OptimizerInputError, match="anchor_lambda"):
        o1.step()
    _unchanged(m1, o1, snap)
    o1.param_groups[0]["anchor_lambda"] = 1.0
    o1.step()  # the retry steps everything exactly once
    _steps(m2, o2, 2, 3, torch.float64)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_explicit_backend_for_the_wrong_device_is_refused_at_construction(monkeypatch):
    from asft_kernels import ops

    monkeypatch.setattr(ops, "_triton_interpreting", lambda: False)
    model = odd_lora(r=2)
    with pytest.raises(OptimizerInputError, match="backend 'triton' runs CUDA tensors"):
        asft.AsFTAdamW(trainable(model), lr=1e-3, anchor=odd_anchor(rank=3).bind(model), backend="triton")


def test_load_state_dict_of_other_shapes_is_refused_at_load():
    anchor = odd_anchor(rank=3)
    small, big = odd_lora(r=2), odd_lora(r=4)
    o_small = asft.AsFTAdamW(trainable(small), lr=1e-3, anchor=anchor.bind(small))
    _steps(small, o_small, 0, 1, torch.float64)
    o_big = asft.AsFTAdamW(trainable(big), lr=1e-3, anchor=anchor.bind(big))
    _steps(big, o_big, 0, 1, torch.float64)
    snap = _snapshot(big, o_big)
    with pytest.raises(OptimizerInputError, match=r"load_state_dict.*shape \(2, 123\).*\(4, 123\)"):
        o_big.load_state_dict(o_small.state_dict())
    _unchanged(big, o_big, snap)


# ------------------------------------------------------------------ 6. λ on resume from AdamW
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_resume_from_a_plain_adamw_checkpoint_keeps_lambda(lam):
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    torch_opt = torch.optim.AdamW(trainable(m1), lr=1e-2)
    _steps(m1, torch_opt, 0, 2, torch.float64)
    m2.load_state_dict(m1.state_dict())
    ours = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=lam)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert all(g["anchor_lambda"] == lam for g in ours.param_groups)
    ref = torch.optim.AdamW(trainable(m2), lr=1e-2)
    ref.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    b2 = anchor.bind(m2)
    for s in range(2, 4):
        lockstep(m1, ours, m2, ref, b2, s, lam=lam)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


# ------------------------------------------------------------------ 7. copies and pickles
def test_deepcopy_of_model_and_optimizer_stays_anchored():
    m1, o1, m2, o2, b2 = asft_and_reference()
    for s in range(2):
        lockstep(m1, o1, m2, o2, b2, s)
    m3, o3 = copy.deepcopy((m1, o1))
    assert o3.anchor is not None and len(o3.anchor) == len(o1.anchor)
    copied = {id(p) for p in m3.parameters()}
    assert all(id(pair.A) in copied and id(pair.B) in copied for pair in o3.anchor)
    for s in range(2, 4):
        lockstep(m3, o3, m2, o2, b2, s)
        assert o3.anchor_loss is not None
    assert max_rel_err(trainable(m3), trainable(m2)) < 1e-10


def test_unpickled_optimizer_without_its_model_refuses_to_step():
    model = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(model), lr=1e-3, anchor=odd_anchor(rank=3).bind(model))
    _steps(model, opt, 0, 1, torch.float64)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.anchor.detached
    with pytest.raises(OptimizerInputError, match="rebind|anchor.bind"):
        restored.step()
    with pytest.raises(OptimizerInputError, match="anchor.bind"):
        asft.AsFTAdamW(trainable(model), lr=1e-3, anchor=restored.anchor)


# ------------------------------------------------------------------ 8. differentiable
def test_differentiable_without_anchor_behaves_as_adamw():
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    w.grad = torch.randn(3, dtype=torch.float64)
    errors = []
    for cls in (torch.optim.AdamW, asft.AsFTAdamW):
        opt = cls([w], lr=1e-2, differentiable=True)
        with pytest.raises(RuntimeError) as info:
            opt.step()  # a leaf that requires grad cannot be updated in place with grad enabled
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    # on a non-leaf parameter the step is differentiable, as AdamW's
    outs = []
    for cls in (torch.optim.AdamW, asft.AsFTAdamW):
        torch.manual_seed(0)
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        p = x.clone()
        p.grad = torch.ones(3, dtype=torch.float64)
        opt = cls([p], lr=1e-2, differentiable=True)
        opt.step()
        p.sum().backward()
        outs.append((p.detach().clone(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_empty_binding_and_lenient_bind_are_not_silent():
    from conftest import lora, tiny_llama
    from helpers import random_deltas

    from asft_kernels.anchor import AnchorBinding

    model = odd_lora(r=2)
    with pytest.raises(OptimizerInputError, match="holds no pairs"):
        asft.AsFTAdamW(trainable(model), lr=1e-3, anchor=AnchorBinding([], mode="paper", adapter_name="default"))
    deltas = random_deltas(tiny_llama(), {"model.layers.0.self_attn.q_proj"})
    llama = lora(tiny_llama())
    binding = asft.AlignmentAnchor.from_deltas(deltas, rank=2).bind(llama, strict=False)
    with pytest.warns(UserWarning, match=r"3 LoRA module\(s\) have no anchor entry.*v_proj"):
        asft.AsFTAdamW(trainable(llama), lr=1e-3, anchor=binding)
