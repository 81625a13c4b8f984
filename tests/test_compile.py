"""``torch.compile`` of a whole training step (forward, backward, ``AsFTAdamW.step()``) runs
and keeps the trajectory of the published formula and the optimizer's ``anchor_loss``.

What is compiled: the forward and the backward of the model (dynamo breaks the graph at
``loss.backward()``, as for any optimizer). What is not: ``AsFTAdamW._anchored_step`` (the
checks, the step plan, torch's AdamW on the plain parameters, one backend call per bucket,
``anchor_loss``) runs as it is, outside dynamo's tracing (``torch.compiler.disable``); on the
``cpp`` backend its work is one ``torch.ops.asft.anchored_adamw_step_`` call per bucket.

Why not traced: dynamo handles every ``torch.optim.Optimizer`` as an ``OptimizerVariable``
that its side-effect tracker does not record, so an attribute the step writes on the
optimizer in a frame dynamo turns into a graph is never written back; with two or more
buckets the frame that sums the buckets' R holds tensor ops, and ``anchor_loss`` kept its
previous value (None after a first compiled step) while the parameters were right
(docs/architecture.md, "torch.compile"). The tests below fail that way when the decorator
is removed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import available_backends
from helpers import max_rel_err, odd_anchor, odd_lora, odd_task_loss, run_reference, trainable

import asft_kernels as asft

COMPILE_BACKENDS = [b for b in available_backends() if b != "triton"]


def _batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + s)
    return torch.randn(5, 123, generator=g).double(), torch.randn(5, 123, generator=g).double()


def _train_step(model, opt):
    def train_step(x, y):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return train_step


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_training_step_matches_reference(backend):
    torch._dynamo.reset()
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.5, backend=backend)
    train_step = torch.compile(_train_step(m1, opt), backend="eager")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo reports its graph breaks in the optimizer
        for s in range(4):
            train_step(*_batch(s))
    run_reference(m2, anchor.bind(m2), 4, lambda m, s: odd_task_loss(m, s, torch.float64), lam=0.5)
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10
    assert opt.anchor_loss is not None


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_step_anchor_loss_is_the_uncompiled_one(backend):
    """After every step, a compiled step's ``anchor_loss`` equals that of the same step run
    uncompiled: a first uncompiled step, then compiled ones, so a value left over from an
    earlier step (or None) fails."""
    torch._dynamo.reset()
    anchor = odd_anchor(rank=3)
    m1, m2 = odd_lora(r=2), odd_lora(r=2)
    opt1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.5, backend=backend)
    opt2 = asft.AsFTAdamW(trainable(m2), lr=1e-2, anchor=anchor.bind(m2), anchor_lambda=0.5, backend=backend)
    eager_step = _train_step(m1, opt1)
    compiled_step = torch.compile(eager_step, backend="eager")
    reference_step = _train_step(m2, opt2)
    assert len(opt1.describe()) >= 2  # several buckets: the case where a traced step lost anchor_loss
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(4):
            (eager_step if s == 0 else compiled_step)(*_batch(s))
            reference_step(*_batch(s))
            assert opt1.anchor_loss is not None, f"step {s}"
            assert torch.equal(opt1.anchor_loss, opt2.anchor_loss), f"step {s}"
            seen.append(float(opt1.anchor_loss))
    assert len(set(seen)) == len(seen)  # R moves from step to step: equality above is not of a constant
    assert max_rel_err(trainable(m1), trainable(m2)) == 0.0
