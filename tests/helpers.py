"""Test helpers: odd-shaped LoRA models, anchors, and the ground-truth trajectory."""

from __future__ import annotations

import collections
import copy
import math
import os
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import asft_kernels as asft
from asft_kernels.reference import paper_regularizer

# relative tolerance per parameter dtype (trajectory vs float64 ground truth)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class OddNet(nn.Module):
    """Linear layers of awkward shapes: (m, n) = (37, 123), (1, 37), (123, 1)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(123, 37)
        self.down = nn.Linear(37, 1)
        self.out = nn.Linear(1, 123)

    def forward(self, x):
        return self.out(torch.tanh(self.down(torch.tanh(self.up(x)))))


def odd_lora(r=3, seed=0, dtype=torch.float64, targets=("up", "down", "out"), rank_pattern=None, device=None):
    """PEFT LoRA model of :class:`OddNet`; initialized on the CPU (the same values on every
    machine) and then moved to ``device`` if given."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = OddNet().to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     rank_pattern=rank_pattern or {})
    torch.manual_seed(seed + 1)
    model = get_peft_model(net, cfg)
    return model if device is None else model.to(device)


def random_deltas(model: nn.Module, names, seed=0, dtype=torch.float64):
    """Random alignment deltas for the named (base) modules, out × in layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name in names:
            w = mod.weight
            out[name] = torch.randn(w.shape, generator=g, dtype=dtype)
    return out


def odd_anchor(rank=None, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    deltas = random_deltas(OddNet().double(), {"up", "down", "out"}, seed=seed)
    return asft.AlignmentAnchor.from_deltas(deltas, rank=rank, dtype=dtype)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameter: where its inputs must go."""
    return next(model.parameters()).device


def odd_task_loss(model, step, dtype):
    """Squared error of :class:`OddNet` on batch ``step`` (5 × 123): drawn on the CPU, so the
    same values on every device, then put on the model's device."""
    g = torch.Generator().manual_seed(100 + step)
    device = model_device(model)
    x = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(5, 123, generator=g).to(device=device, dtype=dtype)
    return (model(x) - y).pow(2).mean()


def run_asft(model, binding, steps, loss_fn, lam=0.5, backend="eager", lr=1e-2, weight_decay=0.01, **kw):
    opt = asft.AsFTAdamW(trainable(model), lr=lr, weight_decay=weight_decay, anchor=binding, anchor_lambda=lam,
                         backend=backend, **kw)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss_fn(model, s).backward()
        opt.step()
        losses.append(float(opt.anchor_loss))
    return opt, losses


def run_reference(model, binding, steps, loss_fn, lam=0.5, lr=1e-2, weight_decay=0.01, **kw):
    """Ground truth: torch.optim.AdamW on task_loss + λ·paper_regularizer (autograd)."""
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay, **kw)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        reg = paper_regularizer(binding, lam)
        (loss_fn(model, s) + reg).backward()
        opt.step()
        losses.append(float(reg.detach()))
    return opt, losses


def max_rel_err(params, ref_params):
    """Largest ``max|p - q| / max|q|`` over the pairs, computed on the CPU in float64 (the
    parameters may live on another device than the CPU ground truth).

    ``inf`` when any value on either side is NaN or infinite (``max(0.0, nan)`` is 0.0, so a
    NaN must not reach ``max``), and when the two lists differ in length or a pair in shape:
    every ``max_rel_err(...) < tol`` then fails."""
    params, ref_params = list(params), list(ref_params)
    if len(params) != len(ref_params):
        return math.inf
    worst = 0.0
    for p, q in zip(params, ref_params):
        p, q = p.detach().cpu().double(), q.detach().cpu().double()
        if p.shape != q.shape or not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
            return math.inf
        err = float((p - q).abs().max() / q.abs().max().clamp_min(1e-30)) if p.numel() else 0.0
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


def rel_err(got, want):
    """:func:`max_rel_err` of one tensor against its reference."""
    return max_rel_err([got], [want])


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (``ops``: op name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def clone_model(model):
    return copy.deepcopy(model)


def asft_and_reference(lam=1.0, lr=1e-2):
    """Two identical odd-shaped LoRA models (r = 2, anchor k = 3): ``m1`` with ``AsFTAdamW``
    (``o1``) and ``m2`` with ``torch.optim.AdamW`` (``o2``) for the ground truth on binding
    ``b2``; returns ``(m1, o1, m2, o2, b2)``."""
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    o1 = asft.AsFTAdamW(trainable(m1), lr=lr, anchor=anchor.bind(m1), anchor_lambda=lam)
    o2 = torch.optim.AdamW(trainable(m2), lr=lr)
    return m1, o1, m2, o2, anchor.bind(m2)


def lockstep(m1, o1, m2, o2, b2, step, lam=1.0):
    """One step of ``AsFTAdamW`` (m1, o1) and of the ground truth (m2, o2: AdamW on the task
    loss + λ·R of binding ``b2``) on the same batch."""
    o1.zero_grad()
    o2.zero_grad()
    odd_task_loss(m1, step, torch.float64).backward()
    (odd_task_loss(m2, step, torch.float64) + paper_regularizer(b2, lam)).backward()
    o1.step()
    o2.step()


def swap_parameters(model, opt):
    """Replace every parameter object of ``model`` by a copy, in the modules and in the
    optimizer's ``param_groups`` and state, as accelerate and FSDP2 do."""
    mapping = {}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            new = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            setattr(mod, name, new)
            mapping[id(p)] = new
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            new = mapping[id(p)]
            if p in opt.state:
                opt.state[new] = opt.state.pop(p)
            group["params"][i] = new


def refuse_host_reads(monkeypatch, root: str) -> None:
    """Patch ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy`` and the conversions
    ``float()``, ``int()``, ``bool()`` (a Python branch on a tensor) to raise when called
    from code under the folder ``root`` (the Triton interpreter itself copies tensors to the
    host, so calls from elsewhere pass)."""
    root = os.path.abspath(root)
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.abspath(caller).startswith(root):
                raise AssertionError(f"Tensor.{_name} called from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
