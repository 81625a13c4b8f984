"""AsFTAdamW against the ground truth: AdamW on task_loss + λ·R (published formula)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import device_for, lora, tiny_llama
from helpers import (
    TOLERANCE,
    asft_and_reference,
    clone_model,
    lockstep,
    max_rel_err,
    model_device,
    odd_anchor,
    odd_lora,
    odd_task_loss,
    run_asft,
    run_reference,
    swap_parameters,
    trainable,
)

import asft_kernels as asft
from asft_kernels.reference import paper_regularizer

MODES = ["paper", "projector", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [1, 4, None], ids=["k1", "k4", "kfull"])
def test_trajectory_float64_odd_shapes(backend, mode, rank):
    anchor = odd_anchor(rank=rank)
    dtype = torch.float64
    m1, m2 = odd_lora(r=3, device=device_for(backend)), odd_lora(r=3)
    b1, b2 = anchor.bind(m1, mode=mode), anchor.bind(m2, mode=mode)
    loss = lambda m, s: odd_task_loss(m, s, dtype)  # noqa: E731
    _, l1 = run_asft(m1, b1, 6, loss, backend=backend)
    _, l2 = run_reference(m2, b2, 6, loss)
    assert max_rel_err(trainable(m1), trainable(m2)) < TOLERANCE[dtype]
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-10)


@pytest.mark.parametrize("r", [1, 2, 5])
def test_trajectory_rank_one_and_odd_r(r):
    anchor = odd_anchor(rank=2)
    m1, m2 = odd_lora(r=r), odd_lora(r=r)
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    run_asft(m1, anchor.bind(m1), 4, loss)
    run_reference(m2, anchor.bind(m2), 4, loss)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["paper", "projector"])
def test_trajectory_low_precision(backend, dtype, mode):
    """Low-precision parameters against the float64 ground truth, tolerance per dtype."""
    device = device_for(backend)
    anchor = odd_anchor(rank=4)
    m1 = odd_lora(r=3).to(device=device, dtype=dtype)
    m2 = odd_lora(r=3)
    steps, lr = 3, 1e-3
    run_asft(m1, anchor.bind(m1, mode=mode), steps, lambda m, s: odd_task_loss_on(m, s, dtype, device),
             backend=backend, lr=lr, eps=1e-6)
    run_reference(m2, anchor.bind(m2, mode=mode), steps, lambda m, s: odd_task_loss(m, s, torch.float64),
                  lr=lr, eps=1e-6)
    assert max_rel_err([p.cpu() for p in trainable(m1)], trainable(m2)) < TOLERANCE[dtype]


def odd_task_loss_on(model, step, dtype, device):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
    return (model(x).float() - y.float()).pow(2).mean()


def test_lambda_zero_is_adamw_bit_for_bit():
    anchor = odd_anchor(rank=4)
    for dtype in (torch.float32, torch.float64):
        m1, m2, m3 = (odd_lora(r=3, dtype=dtype) for _ in range(3))
        loss = lambda m, s, dt=dtype: odd_task_loss(m, s, dt)  # noqa: E731
        o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.0)
        o2 = asft.AsFTAdamW(trainable(m2), lr=1e-2, anchor=None)
        o3 = torch.optim.AdamW(trainable(m3), lr=1e-2)
        for s in range(4):
            for m, o in ((m1, o1), (m2, o2), (m3, o3)):
                o.zero_grad()
                loss(m, s).backward()
                o.step()
        for p1, p2, p3 in zip(trainable(m1), trainable(m2), trainable(m3)):
            assert torch.equal(p1, p3) and torch.equal(p2, p3)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(o1.state[p1][key], o3.state[p3][key])
        loss = o1.anchor_loss  # R = 0 at λ = 0, still a 0-d tensor (a λ warm-up from 0 reads it)
        assert torch.is_tensor(loss) and loss.ndim == 0 and float(loss) == 0.0 and loss.dtype == dtype
        assert o2.anchor_loss is None  # no anchor at all


def _llama_pair(dtype=torch.float64, r=4):
    base = tiny_llama(dtype=dtype)
    names = {n for n, _ in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    g = torch.Generator().manual_seed(3)
    deltas = {n: torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.05
              for n, mod in base.named_modules() if n in names}
    anchor = asft.AlignmentAnchor.from_deltas(deltas, rank=6, dtype=torch.float64)
    return base, anchor


def _llama_loss(model, step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (2, 9), generator=g).to(model_device(model))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("mode", MODES)
def test_trajectory_tiny_llama(backend, mode):
    base, anchor = _llama_pair()
    m1, m2 = lora(base).to(device_for(backend)), lora(base)
    run_asft(m1, anchor.bind(m1, mode=mode), 4, _llama_loss, backend=backend, lam=2.0)
    run_reference(m2, anchor.bind(m2, mode=mode), 4, _llama_loss, lam=2.0)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_trajectory_gpt2_conv1d(backend):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=24, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
    # Conv1D stores weights in × out; the anchor is out × in.
    g = torch.Generator().manual_seed(5)
    deltas = {n: torch.randn(mod.weight.shape, generator=g, dtype=torch.float64).T
              for n, mod in base.named_modules() if n.endswith(("attn.c_attn", "attn.c_proj"))}
    anchor = asft.AlignmentAnchor.from_deltas(deltas, rank=5, dtype=torch.float64)
    m1, m2 = (lora(base, r=3, targets=("attn.c_attn", "attn.c_proj"), fan_in_fan_out=True)
              for _ in range(2))
    m1.to(device_for(backend))
    b1 = anchor.bind(m1)
    assert all(p.conv1d for p in b1)

    def loss(model, step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 50, (2, 8), generator=g).to(model_device(model))
        return model(input_ids=ids, labels=ids).loss

    run_asft(m1, b1, 3, loss, backend=backend)
    run_reference(m2, anchor.bind(m2), 3, loss)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_reference_matches_lora_forward_delta_for_conv1d():
    """For Conv1D the anchored B A is the same ΔW (out × in) that PEFT adds in the forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=24, n_layer=1, n_head=4)).double()
    model = lora(base, r=3, targets=("c_attn",), fan_in_fan_out=True)
    mod = model.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(4, 24, dtype=torch.float64)
    lora_out = mod(x) - mod.base_layer(x)
    pair_delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight  # out × in
    torch.testing.assert_close(lora_out, mod.scaling["default"] * x @ pair_delta.T)


def test_state_dict_round_trip_mid_run_weights_only(backend, tmp_path):
    anchor = odd_anchor(rank=3)
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    device = device_for(backend)
    # uninterrupted
    m_ref = odd_lora(r=2, device=device)
    run_asft(m_ref, anchor.bind(m_ref), 6, loss, backend=backend)
    # interrupted after 3 steps: save, rebuild everything, load with weights_only, continue
    m1 = odd_lora(r=2, device=device)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, weight_decay=0.01, anchor=anchor.bind(m1), anchor_lambda=0.5,
                        backend=backend)
    for s in range(3):
        o1.zero_grad()
        loss(m1, s).backward()
        o1.step()
    torch.save({"model": m1.state_dict(), "optim": o1.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True, map_location="cpu")
    assert not any(torch.is_tensor(v) and v.numel() > 1 and v.shape == anchor["up"].U.shape
                   for v in _flat(ckpt["optim"])), "anchor tensors must stay out of the state dict"
    m2 = odd_lora(r=2, seed=7, device=device)
    m2.load_state_dict(ckpt["model"])
    o2 = asft.AsFTAdamW(trainable(m2), lr=1e-2, weight_decay=0.01, anchor=anchor.bind(m2), anchor_lambda=0.5,
                        backend=backend)
    o2.load_state_dict(ckpt["optim"])
    for s in range(3, 6):
        o2.zero_grad()
        loss(m2, s).backward()
        o2.step()
    assert max_rel_err(trainable(m2), trainable(m_ref)) < 1e-12


def _flat(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flat(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flat(v)
    else:
        yield obj


def test_state_dict_moves_between_adamw_and_asft():
    anchor = odd_anchor(rank=3)
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    m1 = odd_lora(r=2)
    torch_opt = torch.optim.AdamW(trainable(m1), lr=1e-2)
    for s in range(2):
        torch_opt.zero_grad()
        loss(m1, s).backward()
        torch_opt.step()
    ours = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.0)
    ours.load_state_dict(torch_opt.state_dict())
    back = torch.optim.AdamW(trainable(m1), lr=1e-2)
    back.load_state_dict(ours.state_dict())
    for p in trainable(m1):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[p][key], torch_opt.state[p][key])


def test_scheduler_closure_and_param_groups():
    anchor = odd_anchor(rank=3)
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    lam = 0.3
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=lam)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda e: 1.0 / (1 + e))
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda e: 1.0 / (1 + e))
    b2 = anchor.bind(m2)
    for s in range(4):
        def closure1(s=s):
            o1.zero_grad()
            out = loss(m1, s)
            out.backward()
            return out

        def closure2(s=s):
            o2.zero_grad()
            out = loss(m2, s) + paper_regularizer(b2, lam)
            out.backward()
            return out

        returned = o1.step(closure1)
        assert torch.is_tensor(returned)
        o2.step(closure2)
        s1.step()
        s2.step()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "anchor_none"])
def test_step_hooks_run_once_and_the_profiler_sees_the_step(anchored):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # torch wraps AdamW.step once one exists
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(model), lr=1e-2, anchor=anchor.bind(model) if anchored else None,
                         anchor_lambda=0.3)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o, len(a)))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o, len(a)))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o, len(a)))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o, len(a)))),
    ]
    try:
        odd_task_loss(model, 0, torch.float64).backward()
        opt.step()
        # the order and arguments of torch.optim (args: the optimizer itself, no closure)
        assert calls == [("global pre", opt, 1), ("pre", opt, 1), ("post", opt, 1), ("global post", opt, 1)]
        # a pre-hook may replace the arguments: here it adds a closure, whose loss step() returns
        opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": lambda: torch.tensor(7.0)}))
        assert float(opt.step()) == 7.0
    finally:
        for h in handles:
            h.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#AsFTAdamW.step" in [e.name for e in prof.events()]

    class Logged(asft.AsFTAdamW):  # a subclass with its own step: torch wraps that one
        def step(self, closure=None):
            return super().step(closure)

    sub = Logged(trainable(model), lr=1e-2, anchor=anchor.bind(model) if anchored else None)
    calls.clear()
    sub.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    sub.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sub.step()
    assert calls == ["pre", "post"]


def test_gradient_accumulation_applies_regularizer_once_per_step():
    m1, o1, m2, o2, b2 = asft_and_reference()
    for s in range(3):
        o1.zero_grad()
        o2.zero_grad()
        for micro in range(2):
            (odd_task_loss(m1, 10 * s + micro, torch.float64) / 2).backward()
            (odd_task_loss(m2, 10 * s + micro, torch.float64) / 2).backward()
        paper_regularizer(b2, 1.0).backward()  # once per optimizer step
        o1.step()
        o2.step()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_grad_scaler():
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2, dtype=torch.float32), odd_lora(r=2, dtype=torch.float32)
    anchor32 = asft.AlignmentAnchor({k: v for k, v in anchor.items()})
    b2 = anchor32.bind(m2)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor32.bind(m1), anchor_lambda=1.0)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    sc1, sc2 = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for s in range(3):
        o1.zero_grad()
        o2.zero_grad()
        sc1.scale(odd_task_loss(m1, s, torch.float32)).backward()
        sc1.step(o1)
        sc1.update()
        # reference: the regularizer's gradient is not scaled by GradScaler's factor after unscale
        sc2.scale(odd_task_loss(m2, s, torch.float32) + paper_regularizer(b2, 1.0).float()).backward()
        sc2.step(o2)
        sc2.update()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-4


def test_unanchored_params_and_missing_grads():
    """Biases get plain AdamW; a param without grad is untouched and gets no state."""
    anchor = odd_anchor(rank=3)
    m1 = odd_lora(r=2)
    m1.base_model.model.up.bias.requires_grad_(True)
    m1.base_model.model.out.bias.requires_grad_(True)
    m2 = clone_model(m1)
    b2 = anchor.bind(m2)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=1.0)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    frozen1 = m1.base_model.model.out.bias
    for s in range(3):
        o1.zero_grad()
        o2.zero_grad()
        odd_task_loss(m1, s, torch.float64).backward()
        (odd_task_loss(m2, s, torch.float64) + paper_regularizer(b2, 1.0)).backward()
        frozen1.grad = None
        m2.base_model.model.out.bias.grad = None
        o1.step()
        o2.step()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert len(o1.state[frozen1]) == 0


def test_outside_edit_invalidates_cached_statistics():
    m1, o1, m2, o2, b2 = asft_and_reference()
    for s in range(4):
        if s == 2:
            with torch.no_grad():
                for m in (m1, m2):
                    m.base_model.model.up.lora_B["default"].weight.mul_(0.5)
        lockstep(m1, o1, m2, o2, b2, s)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_pairing_survives_parameter_swap():
    """accelerate/FSDP2 swap parameter objects in place; the pairing is positional."""
    m1, o1, m2, o2, b2 = asft_and_reference()
    for s in range(4):
        if s == 2:  # swap every parameter object of m1 for a copy, in module and optimizer
            swap_parameters(m1, o1)
        lockstep(m1, o1, m2, o2, b2, s)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_use_lora_scaling_option():
    anchor = odd_anchor(rank=3)
    m1 = odd_lora(r=2)
    binding = anchor.bind(m1, use_lora_scaling=True)
    plain = anchor.bind(m1)
    s = m1.base_model.model.up.scaling["default"]
    assert s != 1.0
    with torch.no_grad():
        assert float(paper_regularizer(binding)) == pytest.approx(s * s * float(paper_regularizer(plain)), rel=1e-12)


def test_anchor_loss_equals_reference_value():
    anchor = odd_anchor(rank=4)
    m1 = odd_lora(r=3)
    binding = anchor.bind(m1, mode="paper")
    expected = float(paper_regularizer(binding, 0.25).detach())
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-3, anchor=binding, anchor_lambda=0.25)
    odd_task_loss(m1, 0, torch.float64).backward()
    opt.step()
    assert float(opt.anchor_loss) == pytest.approx(expected, rel=1e-12)


def test_state_dict_is_plain_tensors():
    anchor = odd_anchor(rank=3)
    m1 = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-3, anchor=anchor.bind(m1))
    odd_task_loss(m1, 0, torch.float64).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for st in sd["state"].values():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
    assert all("anchor_pairs" in g and "anchor_lambda" in g for g in sd["param_groups"])


def test_per_group_lambda():
    """anchor_lambda is a per-group option: pairs of one shape (down, out) with different λ."""
    from asft_kernels.reference import pair_regularizer

    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)

    def groups(model):
        up = [p for n, p in model.named_parameters() if p.requires_grad and ".down." in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and ".down." not in n]
        return up, rest

    up1, rest1 = groups(m1)
    o1 = asft.AsFTAdamW([{"params": up1, "anchor_lambda": 3.0}, {"params": rest1}], lr=1e-2,
                        anchor=anchor.bind(m1), anchor_lambda=0.5)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    b2 = anchor.bind(m2)
    for s in range(3):
        o1.zero_grad()
        o2.zero_grad()
        odd_task_loss(m1, s, torch.float64).backward()
        reg = sum(pair_regularizer(p, 3.0 if p.key == "down" else 0.5) for p in b2)
        (odd_task_loss(m2, s, torch.float64) + reg).backward()
        o1.step()
        o2.step()
        assert float(o1.anchor_loss) == pytest.approx(float(reg.detach()), rel=1e-12)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_trajectory_mixed_ranks_in_one_batch(backend):
    """A wide pair (r = 40) beside narrow ones: backends may route ranks differently."""
    anchor = odd_anchor(rank=4)
    m1 = odd_lora(r=3, rank_pattern={"up": 40}, device=device_for(backend))
    m2 = odd_lora(r=3, rank_pattern={"up": 40})
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    run_asft(m1, anchor.bind(m1), 3, loss, backend=backend)
    run_reference(m2, anchor.bind(m2), 3, loss)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


# ----------------------------------------------------------------------------- GradScaler with fused=True
def _statistics(opt):
    return [t for b in opt._plan.buckets for t in (b.tensors.P, b.tensors.G, b.tensors.M)]


def _lora_a_up(model):
    return model.base_model.model.up.lora_A["default"].weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inf_step", [None, 1], ids=["finite", "inf"])
def test_fused_grad_scaler_matches_fused_adamw(backend, inf_step, dtype):
    """fused=True: GradScaler hands the optimizer grad_scale/found_inf instead of unscaling.
    Anchored pairs unscale inside the step (their .grad untouched) and, on an inf, skip
    everything (parameters, moments, counters, statistics), as torch.optim.AdamW(fused=True)
    with the same scaler on task + R does."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2, dtype=dtype), odd_lora(r=2, dtype=dtype)
    b2 = anchor.bind(m2)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=1.0, fused=True,
                        backend=backend)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2, fused=True)
    assert o1._step_supports_amp_scaling
    sc1, sc2 = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    anchored = {id(t) for pair in o1.anchor for t in (pair.A, pair.B)}
    for s in range(4):
        o1.zero_grad()
        o2.zero_grad()
        sc1.scale(odd_task_loss(m1, s, dtype)).backward()
        sc2.scale(odd_task_loss(m2, s, dtype) + paper_regularizer(b2, 1.0).to(dtype)).backward()
        if s == inf_step:
            _lora_a_up(m1).grad[0, 0] = float("inf")
            _lora_a_up(m2).grad[0, 0] = float("inf")
            params = [p.detach().clone() for p in trainable(m1)]
            state = [{k: v.clone() for k, v in o1.state[p].items()} for p in trainable(m1)]
            stats = [t.clone() for t in _statistics(o1)]
        grads = [p.grad.clone() for p in trainable(m1)]
        sc1.step(o1)
        sc1.update()
        sc2.step(o2)
        sc2.update()
        for p, g in zip(trainable(m1), grads):
            if id(p) in anchored:  # left scaled: the step divides its own copy
                assert torch.equal(p.grad, g)
        if s == inf_step:  # nothing written
            assert all(torch.equal(p, q) for p, q in zip(trainable(m1), params))
            for p, st in zip(trainable(m1), state):
                assert all(torch.equal(o1.state[p][k], v) for k, v in st.items())
            assert all(torch.equal(t, u) for t, u in zip(_statistics(o1), stats))
            assert torch.isfinite(o1.anchor_loss)
        assert sc1.get_scale() == sc2.get_scale()
        assert max_rel_err(trainable(m1), trainable(m2)) < TOLERANCE[dtype]
        for p1, p2 in zip(trainable(m1), trainable(m2)):
            assert float(o1.state[p1]["step"]) == float(o2.state[p2]["step"])
    assert float(o1.state[_lora_a_up(m1)]["step"]) == (3 if inf_step is not None else 4)


# ----------------------------------------------------------------------------- A and B in different groups
def _split_groups(model, hyper_A, hyper_B):
    """Param groups with every lora_A in one group and everything else in another."""
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n]
    return [dict(params=a, **hyper_A), dict(params=rest, **hyper_B)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factors_in_groups_of_different_hyperparameters(backend, dtype):
    """Each factor steps with its own group's lr, betas, eps, weight_decay and maximize, also
    after the groups are edited between steps (as a per-group scheduler does)."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2, dtype=dtype), odd_lora(r=2, dtype=dtype)
    b2 = anchor.bind(m2)
    hyper_A = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, maximize=False)
    hyper_B = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)
    o1 = asft.AsFTAdamW(_split_groups(m1, hyper_A, hyper_B), anchor=anchor.bind(m1), anchor_lambda=0.7,
                        backend=backend)
    o2 = torch.optim.AdamW(_split_groups(m2, hyper_A, hyper_B))
    for s in range(4):
        if s == 2:  # a scheduler's edit of A's group only
            for opt in (o1, o2):
                opt.param_groups[0]["lr"] *= 0.5
                opt.param_groups[0]["weight_decay"] = 0.05
        o1.zero_grad()
        o2.zero_grad()
        odd_task_loss(m1, s, dtype).backward()
        (odd_task_loss(m2, s, dtype) + paper_regularizer(b2, 0.7).to(dtype)).backward()
        o1.step()
        o2.step()
        assert max_rel_err(trainable(m1), trainable(m2)) < TOLERANCE[dtype], s


def test_factors_maximize_per_group(backend):
    """``maximize`` of A's group applies to A only."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    b2 = anchor.bind(m2)
    hyper_A = dict(lr=1e-2, maximize=True)
    hyper_B = dict(lr=1e-2, maximize=False)
    o1 = asft.AsFTAdamW(_split_groups(m1, hyper_A, hyper_B), anchor=anchor.bind(m1), anchor_lambda=0.5,
                        backend=backend)
    o2 = torch.optim.AdamW(_split_groups(m2, hyper_A, hyper_B))
    for s in range(3):
        lockstep(m1, o1, m2, o2, b2, s, lam=0.5)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_loraplus_end_to_end(backend):
    """peft's LoRA+ recipe (create_loraplus_optimizer, lr of B 16× lr of A) with AsFTAdamW
    equals the same recipe with torch.optim.AdamW on task + R."""
    from peft.optimizers import create_loraplus_optimizer

    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    b2 = anchor.bind(m2)
    kw = dict(lr=2e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.05)
    o1 = create_loraplus_optimizer(m1, optimizer_cls=asft.AsFTAdamW, anchor=anchor.bind(m1), anchor_lambda=0.5,
                                   backend=backend, **kw)
    o2 = create_loraplus_optimizer(m2, optimizer_cls=torch.optim.AdamW, **kw)
    assert isinstance(o1, asft.AsFTAdamW)
    assert sum(len(g["anchor_pairs"]) for g in o1.param_groups) == 3
    assert {g["lr"] for g in o1.param_groups if g["params"]} == {2e-3, 2e-3 * 16}
    for s in range(4):
        lockstep(m1, o1, m2, o2, b2, s, lam=0.5)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def test_factors_in_groups_of_different_lambda_are_refused_before_any_write():
    """λ is one number per pair: a differing anchor_lambda in A's group is refused at
    construction, and at the next step when set afterwards (nothing written)."""
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    with pytest.raises(asft.OptimizerInputError, match=r"anchor_lambda=0.5.*anchor_lambda=1.0"):
        asft.AsFTAdamW(_split_groups(model, dict(anchor_lambda=0.5), dict(anchor_lambda=1.0)),
                       anchor=anchor.bind(model))
    opt = asft.AsFTAdamW(_split_groups(model, {}, {}), anchor=anchor.bind(model), anchor_lambda=1.0)
    odd_task_loss(model, 0, torch.float64).backward()
    opt.step()
    opt.param_groups[0]["anchor_lambda"] = 0.25
    params = [p.detach().clone() for p in trainable(model)]
    steps = [float(opt.state[p]["step"]) for p in trainable(model)]
    with pytest.raises(asft.OptimizerInputError, match=r"up: lora_A is in param group 0 with anchor_lambda=0.25"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(trainable(model), params))
    assert [float(opt.state[p]["step"]) for p in trainable(model)] == steps


def test_capturable_is_accepted_with_an_anchor(backend):
    """``capturable=True`` (torch's keyword) no longer refuses an anchor; on the CPU the
    trajectory is the ground truth's."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2, device=device_for(backend)), odd_lora(r=2)
    loss = lambda m, s: odd_task_loss(m, s, torch.float64)  # noqa: E731
    opt, _ = run_asft(m1, anchor.bind(m1), 3, loss, backend=backend, capturable=True)
    run_reference(m2, anchor.bind(m2), 3, loss)
    assert opt.param_groups[0]["capturable"] is True
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


def _drop_grads(model, layer):
    for name, p in model.named_parameters():
        if f".{layer}." in name and "lora_" in name:
            p.grad = None


@pytest.mark.parametrize("frozen", ["none", "A"], ids=["both_trainable", "A_frozen"])
def test_pair_without_task_gradient_is_stepped_on_the_regularizer(backend, frozen):
    """A pair that gets no task gradient (an unused layer, conditional compute, MoE) is
    stepped on ∇R, as AdamW on task + R steps it; a factor with requires_grad=False stays
    frozen, and a pair frozen whole is never written nor given state."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    for m in (m1, m2):
        for name, p in m.named_parameters():
            if ".down." in name and "lora_" in name:
                p.requires_grad_(False)  # a pair frozen whole
            if frozen == "A" and ".out." in name and "lora_A" in name:
                p.requires_grad_(False)
    lora = [p for n, p in m1.named_parameters() if "lora_" in n]
    o1 = asft.AsFTAdamW(lora, lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=1.0, backend=backend)
    b2 = anchor.bind(m2)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    out = m1.base_model.model.out
    before = {n: p.detach().clone() for n, p in m1.named_parameters() if "lora_" in n}
    for s in range(4):
        o1.zero_grad()
        o2.zero_grad()
        odd_task_loss(m1, s, torch.float64).backward()
        _drop_grads(m1, "out")  # "out" takes no part in this step's task loss
        odd_task_loss(m2, s, torch.float64).backward()
        _drop_grads(m2, "out")
        paper_regularizer(b2, 1.0).backward()  # the ground truth: AdamW on task + R
        o1.step()
        o2.step()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    after = dict(m1.named_parameters())
    moved = not torch.equal(before["base_model.model.out.lora_B.default.weight"], out.lora_B["default"].weight)
    assert moved  # stepped on ∇R alone
    for name, p in before.items():
        if ".down." in name or (frozen == "A" and ".out." in name and "lora_A" in name):
            assert torch.equal(after[name], p) and len(o1.state[after[name]]) == 0
    assert all(float(o1.state[p]["step"]) == 4.0 for p in trainable(m1))


def test_reordered_params_list_keeps_each_layers_pairing():
    """Two same-shaped lora_A swapped by hand in the params list (and a different-shaped
    pair moved): the pairs are found again by parameter identity, so every layer's A stays
    with its own B and basis, as the float64 ground truth shows."""
    base, anchor = _llama_pair()
    m1, m2 = lora(base), lora(base)
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=2.0)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    b2 = anchor.bind(m2)
    names = [n for n, p in m1.named_parameters() if p.requires_grad]
    for s in range(5):
        if s == 2:
            params = o1.param_groups[0]["params"]
            i = names.index("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
            j = names.index("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight")
            assert params[i].shape == params[j].shape
            params[i], params[j] = params[j], params[i]
            params.append(params.pop(names.index("base_model.model.model.layers.0.self_attn.v_proj.lora_B"
                                                 ".default.weight")))
        for m, o, reg in ((m1, o1, None), (m2, o2, b2)):
            o.zero_grad()
            loss = _llama_loss(m, s)
            if reg is not None:
                loss = loss + paper_regularizer(reg, 2.0)
            loss.backward()
            o.step()
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert o1.plan_builds == 2
