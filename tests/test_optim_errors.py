"""Bad input gets a clear ValueError subclass and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import odd_anchor, odd_lora, odd_task_loss, trainable

import asft_kernels as asft


def _snapshot(model, opt):
    params = [p.detach().clone() for p in trainable(model)]
    state = copy.deepcopy({id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})
    return params, state


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(trainable(model), params):
        assert torch.equal(p.detach(), q)
    now = {id(p): st for p, st in opt.state.items()}
    assert set(now) == set(state)
    for pid, st in state.items():
        for k, v in st.items():
            assert torch.equal(now[pid][k], v)


def _swap(opt, lora, old, new):
    """Puts ``new`` where ``old`` is, in the LoRA layer (``lora["default"].weight``) and in the
    optimizer's param groups, as a parameter swap (accelerate, FSDP) does."""
    lora["default"].weight = new
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new


def _stepped(backend="eager", lam=1.0):
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(model), lr=1e-2, anchor=anchor.bind(model), anchor_lambda=lam, backend=backend)
    odd_task_loss(model, 0, torch.float64).backward()
    opt.step()
    odd_task_loss(model, 1, torch.float64).backward()
    return model, opt


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf"), "x"])
def test_bad_lambda_at_construction(lam):
    model = odd_lora(r=2)
    with pytest.raises(asft.OptimizerInputError, match="anchor_lambda"):
        asft.AsFTAdamW(trainable(model), anchor=odd_anchor(rank=2).bind(model), anchor_lambda=lam)


def test_bad_lambda_set_later_changes_nothing():
    model, opt = _stepped()
    snap = _snapshot(model, opt)
    opt.param_groups[0]["anchor_lambda"] = -0.5
    with pytest.raises(asft.OptimizerInputError, match="anchor_lambda"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_unknown_backend():
    model = odd_lora(r=2)
    with pytest.raises(asft.OptimizerInputError, match="backend"):
        asft.AsFTAdamW(trainable(model), anchor=odd_anchor(rank=2).bind(model), backend="cuda")


def test_unbound_anchor_is_refused():
    model = odd_lora(r=2)
    with pytest.raises(asft.OptimizerInputError, match="bind"):
        asft.AsFTAdamW(trainable(model), anchor=odd_anchor(rank=2))


def test_incompatible_flags():
    model = odd_lora(r=2)
    with pytest.raises(asft.OptimizerInputError, match="amsgrad"):
        asft.AsFTAdamW(trainable(model), anchor=odd_anchor(rank=2).bind(model), amsgrad=True)


def test_half_a_pair_in_the_optimizer():
    model = odd_lora(r=2)
    binding = odd_anchor(rank=2).bind(model)
    params = [p for p in trainable(model) if p is not binding["up"].B]
    with pytest.raises(asft.OptimizerInputError, match="up.*lora_B"):
        asft.AsFTAdamW(params, anchor=binding)


def test_pair_split_across_groups_with_different_lambda():
    model = odd_lora(r=2)
    binding = odd_anchor(rank=2).bind(model)
    a_params = [p for n, p in model.named_parameters() if "lora_A" in n]
    b_params = [p for n, p in model.named_parameters() if "lora_B" in n]
    with pytest.raises(asft.OptimizerInputError, match="need one λ"):
        asft.AsFTAdamW([{"params": a_params, "anchor_lambda": 0.5}, {"params": b_params}], anchor=binding)
    # other hyperparameters may differ (LoRA+); the pairs are recorded in B's group
    opt = asft.AsFTAdamW([{"params": a_params, "lr": 1e-3}, {"params": b_params}], lr=1e-2, anchor=binding)
    assert len(opt.param_groups[1]["anchor_pairs"]) == 3


def test_mixed_dtype_pair_changes_nothing():
    model, opt = _stepped()
    pair = opt.anchor["down"]
    snap = _snapshot(model, opt)
    # swap lora_A of one pair for a float32 tensor, in module and optimizer
    old = pair.A
    new = torch.nn.Parameter(old.detach().float())
    new.grad = torch.zeros_like(new)
    _swap(opt, pair.module.lora_A, old, new)
    with pytest.raises(asft.OptimizerInputError, match=r"down.*float32.*float64"):
        opt.step()
    params, state = snap
    for group in opt.param_groups:
        for p in group["params"]:
            if p is not new:
                assert any(torch.equal(p.detach(), q) for q in params)


def test_wrong_shape_parameter_changes_nothing():
    model, opt = _stepped()
    pair = opt.anchor["up"]
    snap = _snapshot(model, opt)
    bad = torch.nn.Parameter(torch.zeros(pair.B.shape[0] + 1, pair.B.shape[1], dtype=torch.float64))
    bad.grad = torch.zeros_like(bad)
    old_b = pair.B
    _swap(opt, pair.module.lora_B, old_b, bad)
    with pytest.raises(asft.OptimizerInputError, match=r"up.*\(38, 2\)"):
        opt.step()
    _swap(opt, pair.module.lora_B, bad, old_b)
    _assert_unchanged(model, opt, snap)


def test_sparse_gradient_in_a_later_group_changes_nothing():
    """A sparse gradient on a plain parameter of group 1 is refused before group 0's plain
    params, the anchored pairs or any counter is written."""
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    bias = model.base_model.model.up.bias
    bias.requires_grad_(True)
    emb = torch.nn.Embedding(7, 3, sparse=True).double()
    opt = asft.AsFTAdamW([{"params": trainable(model)}, {"params": list(emb.parameters())}], lr=1e-2,
                         anchor=anchor.bind(model), anchor_lambda=1.0)
    for s in range(2):
        opt.zero_grad()
        odd_task_loss(model, s, torch.float64).backward()
        if s == 1:
            emb(torch.tensor([1, 4])).sum().backward()
            assert emb.weight.grad.is_sparse
        snap = _snapshot(model, opt)
        emb_before = emb.weight.detach().clone()
        if s == 0:
            opt.step()  # no gradient on the embedding yet
            continue
        with pytest.raises(asft.OptimizerInputError, match=r"param group 1, parameter 0 \(shape \(7, 3\).*sparse"):
            opt.step()
        _assert_unchanged(model, opt, snap)
        assert torch.equal(emb.weight.detach(), emb_before) and len(opt.state[emb.weight]) == 0


@pytest.mark.parametrize("factor", ["lora_A", "lora_B", "both"])
def test_factor_replaced_in_params_only_is_refused_naming_the_module(factor):
    """A param_groups entry replaced by a tensor that is not the model's factor: refused,
    naming the module, before anything is written (never a silent unanchored or mispaired step)."""
    model, opt = _stepped()
    pair = opt.anchor["down"]
    snap = _snapshot(model, opt)
    targets = {"lora_A": [pair.A], "lora_B": [pair.B], "both": [pair.A, pair.B]}[factor]
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if any(p is t for t in targets):
                group["params"][i] = torch.nn.Parameter(p.detach().clone())
                group["params"][i].grad = torch.zeros_like(p)
    pattern = "down" + (r".*lora_[AB] is not among" if factor != "both" else r".*no longer among")
    with pytest.raises(asft.OptimizerInputError, match=pattern):
        opt.step()
    _assert_unchanged(model, opt, snap)
