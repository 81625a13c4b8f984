"""``AsFTAdamW.step``'s own hook wrapper (``asft_kernels.optim._step_with_hooks``) behaves as
``torch.optim``'s (``Optimizer.profile_hook_step``).

Every test runs the same calls on an ``AsFTAdamW`` (or a subclass) and on a plain
``torch.optim.AdamW`` and compares what the step hooks, the profiler and the profiler's
step-code marker saw. The one intended difference: outside a profiler our wrapper enters
no ``record_function`` range (``bench/step_hooks.py`` measures what that saves).
"""

from __future__ import annotations

import pytest
import torch
from helpers import OpCounter, odd_anchor, odd_lora, odd_task_loss, trainable
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import asft_kernels as asft


class StepOverride(asft.AsFTAdamW):
    """Overrides ``step`` and calls ``super().step()``: torch.optim wraps this ``step``."""

    def step(self, closure=None):
        return super().step(closure)


class Inherits(asft.AsFTAdamW):
    """Keeps ``AsFTAdamW.step`` (and its wrapper)."""


# kind: (optimizer class, anchored)
KINDS = {
    "anchored": (asft.AsFTAdamW, True),
    "anchor_none": (asft.AsFTAdamW, False),
    "override": (StepOverride, True),
    "override_anchor_none": (StepOverride, False),
    "inherits": (Inherits, True),
}


@pytest.fixture(params=list(KINDS))
def pair(request):
    """``(ours, plain)``: an optimizer of the kind and a ``torch.optim.AdamW`` (created first,
    so that torch has wrapped ``AdamW.step`` too), on two copies of one model with gradients."""
    cls, anchored = KINDS[request.param]
    models = [odd_lora(r=2), odd_lora(r=2)]
    for m in models:
        odd_task_loss(m, 0, torch.float64).backward()
    plain = torch.optim.AdamW(trainable(models[1]), lr=1e-2)
    binding = odd_anchor(rank=3).bind(models[0]) if anchored else None
    ours = cls(trainable(models[0]), lr=1e-2, anchor=binding, anchor_lambda=0.3)
    return ours, plain


def _step_count(opt) -> float | None:
    """``state["step"]`` of the optimizer's first parameter (None before its first step)."""
    state = opt.state.get(opt.param_groups[0]["params"][0], {})
    return float(state["step"]) if "step" in state else None


def _seen(opt, args, kwargs) -> tuple:
    """What a hook was called with, comparable across optimizers: the positional arguments
    (``"self"`` for the optimizer, else the type's name), the keyword names, and the step
    counter at the call."""
    return (tuple("self" if a is opt else type(a).__name__ for a in args), tuple(sorted(kwargs)), _step_count(opt))


def _recorder(log: dict, label: str):
    """A hook that appends ``(label, what it saw)`` to ``log[optimizer]`` (global hooks see
    every optimizer's steps: each optimizer gets its own list)."""

    def hook(opt, args, kwargs):
        log.setdefault(opt, []).append((label, *_seen(opt, args, kwargs)))

    return hook


def _loss():
    return torch.tensor(7.0)


def _params(opt) -> list[torch.Tensor]:
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def test_global_and_optimizer_hooks_run_in_torch_order_with_torch_arguments(pair):
    ours, plain = pair
    log: dict = {}
    handles = [register_optimizer_step_pre_hook(_recorder(log, f"global pre {i}")) for i in (1, 2)]
    handles += [register_optimizer_step_post_hook(_recorder(log, f"global post {i}")) for i in (1, 2)]
    try:
        for opt in (ours, plain):
            mine = [opt.register_step_pre_hook(_recorder(log, f"pre {i}")) for i in (1, 2)]
            mine += [opt.register_step_post_hook(_recorder(log, f"post {i}")) for i in (1, 2)]
            returned = [opt.step(), opt.step(_loss), opt.step(closure=_loss)]
            mine[0].remove()  # pre 1
            mine[3].remove()  # post 2
            returned.append(opt.step(_loss))
            log.setdefault(opt, []).append(("returned", *[None if r is None else float(r) for r in returned]))
        handles[0].remove()  # global pre 1
        for opt in (ours, plain):
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert log[ours] == log[plain]
    order = ["global pre 1", "global pre 2", "pre 1", "pre 2", "post 1", "post 2", "global post 1", "global post 2"]
    assert [e[0] for e in log[plain][:8]] == order
    # the first step: called with (optimizer,), no keywords; pre-hooks before the step, post after
    assert log[plain][0][1:] == (("self",), (), None) and log[plain][7][1:] == (("self",), (), 1.0)
    assert [e[1:3] for e in log[plain][8:24:8]] == [(("self", "function"), ()), (("self",), ("closure",))]
    assert [e[0] for e in log[plain][24:30]] == ["global pre 1", "global pre 2", "pre 2", "post 1",
                                                 "global post 1", "global post 2"]
    assert log[plain][30] == ("returned", None, 7.0, 7.0, 7.0)
    assert [e[0] for e in log[plain][31:]] == ["global pre 2", "pre 2", "post 1", "global post 1", "global post 2"]


def test_a_pre_hook_may_replace_the_arguments(pair):
    ours, plain = pair
    log: dict = {}
    for opt in (ours, plain):
        opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": _loss}))
        opt.register_step_pre_hook(_recorder(log, "later pre"))  # sees the replaced arguments
        opt.register_step_post_hook(_recorder(log, "post"))  # so does the post-hook
        log.setdefault(opt, []).append(("returned", float(opt.step())))
    assert log[ours] == log[plain] == [("later pre", ("self",), ("closure",), None),
                                       ("post", ("self",), ("closure",), 1.0), ("returned", 7.0)]


@pytest.mark.parametrize("bad", [5, ((), {}, None), [(), {}]], ids=["int", "3-tuple", "list"])
def test_a_pre_hook_returning_a_bad_value_raises_like_torch_and_nothing_is_written(pair, bad):
    ours, plain = pair
    log = []
    for opt in (ours, plain):
        opt.register_step_pre_hook(lambda o, a, k: bad)
        opt.register_step_post_hook(lambda o, a, k: log.append("post"))
        opt._optimizer_step_code = lambda: log.append("step code")
        before = _params(opt)
        with pytest.raises(RuntimeError, match=r"must return None or a tuple of \(new_args, new_kwargs\)"):
            opt.step()
        assert log == [] and not opt.state
        assert all(torch.equal(a, b) for a, b in zip(before, _params(opt)))


def test_hooks_and_the_step_code_marker_run_once_per_step(pair):
    """Also for a subclass whose own ``step`` (wrapped by torch) calls ``super().step()``,
    and for ``anchor=None`` (which runs ``torch.optim.AdamW.step`` unwrapped)."""
    ours, plain = pair
    log: dict = {}
    for opt in (ours, plain):
        opt.register_step_pre_hook(_recorder(log, "pre"))
        opt.register_step_post_hook(_recorder(log, "post"))
        # the profiler's python tracer hooks this call, made after the step, before the post-hooks
        opt._optimizer_step_code = lambda opt=opt: log[opt].append(("step code", _step_count(opt)))
        for _ in range(3):
            opt.step()
    assert log[ours] == log[plain]
    assert [e[0] for e in log[plain]] == ["pre", "step code", "post"] * 3
    assert [e[-1] for e in log[plain]] == [None, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]


def test_the_profiler_sees_one_step_range_per_step_named_like_torchs(pair):
    ours, plain = pair
    counts = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for opt in (ours, plain):
            for _ in range(2):
                opt.step()
    names = [e.name for e in prof.events()]
    for opt in (ours, plain):
        counts[opt] = names.count(f"Optimizer.step#{type(opt).__name__}.step")
    assert counts[ours] == counts[plain] == 2
    if type(ours) is asft.AsFTAdamW:
        assert names.count("Optimizer.step#AsFTAdamW.step") == 2


@pytest.mark.parametrize("cls", [asft.AsFTAdamW, Inherits], ids=["AsFTAdamW", "subclass"])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "anchor_none"])
def test_outside_a_profiler_the_step_enters_no_profiler_range(cls, anchored):
    """The difference from torch.optim's wrapper, which enters its ``record_function`` range
    (two dispatched ``profiler`` ops) whether or not a profiler runs."""
    model = odd_lora(r=2)
    odd_task_loss(model, 0, torch.float64).backward()
    opt = cls(trainable(model), lr=1e-2, anchor=odd_anchor(rank=3).bind(model) if anchored else None)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.step()
    with OpCounter() as counter:
        opt.step()
    assert calls == ["pre", "pre"]
    assert counter.ops and not [op for op in counter.ops if op.startswith("profiler.")], counter.ops
