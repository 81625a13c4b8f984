"""step() never allocates anything of size m·n (no weight delta, no m × m projection)."""

from __future__ import annotations

import torch
from conftest import device_for
from torch.utils._python_dispatch import TorchDispatchMode

import asft_kernels as asft
from asft_kernels.ops import resolve_backend


class _AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor produced by any op."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t):
                if t.numel() > self.largest:
                    self.largest = t.numel()
                self.ops.append((str(func), tuple(t.shape)))
        return out


def _model(m, n, r, device, dtype):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))
    net = get_peft_model(net, LoraConfig(r=r, target_modules=["0"], init_lora_weights=False))
    return net.to(device=device, dtype=dtype)


def test_step_allocates_nothing_of_weight_size(backend):
    device = device_for(backend)
    m, n, r, k = 96, 80, 4, 8
    model = _model(m, n, r, device, torch.float32)
    V = torch.randn(m, n)
    anchor = asft.AlignmentAnchor.from_deltas({"0": V}, rank=k)
    opt = asft.AsFTAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                         anchor=anchor.bind(model), anchor_lambda=1.0, backend=backend)
    assert resolve_backend(backend, device).name == backend
    x = torch.randn(3, n, device=device)
    for step in range(3):
        model(x).pow(2).sum().backward()
        with _AllocationRecorder() as rec:
            opt.step()
        opt.zero_grad()
        assert rec.largest < m * n, f"step {step}: allocated {rec.largest} elements: {rec.ops}"
        assert rec.largest >= m * r or backend != "eager"  # the recorder does see the step's tensors
