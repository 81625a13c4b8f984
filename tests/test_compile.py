"""``torch.compile`` of a whole training step (forward, backward, ``AsFTAdamW.step()``) runs
and keeps the trajectory of the published formula."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import available_backends
from helpers import max_rel_err, odd_anchor, odd_lora, odd_task_loss, run_reference, trainable

import asft_kernels as asft


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
def test_compiled_training_step_matches_reference(backend):
    torch._dynamo.reset()
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.5, backend=backend)

    @torch.compile(backend="eager")
    def train_step(x, y):
        loss = (m1(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo reports its graph breaks in the optimizer
        for s in range(4):
            g = torch.Generator().manual_seed(100 + s)
            x = torch.randn(5, 123, generator=g).double()
            y = torch.randn(5, 123, generator=g).double()
            train_step(x, y)
    run_reference(m2, anchor.bind(m2), 4, lambda m, s: odd_task_loss(m, s, torch.float64), lam=0.5)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert opt.anchor_loss is not None
