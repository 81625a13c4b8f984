"""``AsFTAdamW``: AdamW whose step adds the gradient of the AsFT regularizer.

Algorithm (per anchored LoRA pair, docs/method.md; λ = ``anchor_lambda``)::

    R   = λ ( ⟨G, M⟩ − ⟨Pᵀ diag(w) P, M⟩ )          P = Uᵀ B,  G = Bᵀ B,  M = A Aᵀ
    g_B = grad_B + 2λ ( B M − U diag(w) P M )
    g_A = grad_A + 2λ ( G − Pᵀ diag(w) P ) A
    A, B ← AdamW(A, g_A), AdamW(B, g_B)             (exactly torch.optim.AdamW's update)

``R = λ‖(I − C) B A‖²_F`` is the published regularizer, so ``n`` steps of this optimizer
equal ``n`` steps of ``torch.optim.AdamW`` on ``task_loss + R``.

How a step runs (docs/architecture.md): the pairs named in ``param_groups`` are resolved,
validated and bucketed once into a *step plan* (:class:`_StepPlan`), reused until something
it depends on changes. ``P, G, M`` live in stacked per-bucket buffers, carried from the
previous step (the kernels accumulate them while writing the parameters) and recomputed
when a parameter's version counter shows an outside edit.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import warnings
from dataclasses import dataclass, field
from functools import partial
from itertools import chain

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.optim.adam import adam as _functional_adam

from .anchor import AlignmentAnchor, AnchorBinding, AnchoredPair, refuse_parametrized
from .errors import OptimizerInputError
from .functional import anchoring_terms
from .ops import (
    BACKENDS,
    BATCH_FIELDS,
    AdamWHyper,
    AnchoredBatch,
    Backend,
    eager,
    math_dtype,
    resolve_backend,
    route,
)
from .sharding import ShardedPair, complete_sharded_step, local_tensor, sharded_pair

_LOG = logging.getLogger("asft_kernels")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_MOMENTS = ("exp_avg", "exp_avg_sq")

# C-level getters: one pass over a list of tensors without a Python frame per tensor
_version = operator.attrgetter("_version")
_grad = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")
_is_none = partial(operator.is_, None)
_is_not_none = partial(operator.is_not, None)
_is_sparse = operator.attrgetter("is_sparse")


def _step_with_hooks(step):
    """``step`` wrapped as ``torch.optim.Optimizer`` wraps every optimizer's ``step``: the
    global and per-optimizer step pre-hooks (which may replace the arguments), the step,
    the profiler's step-code marker, the post-hooks, all inside a ``record_function`` named
    ``Optimizer.step#<class>.step``. The difference: the ``record_function`` is entered
    only while a profiler runs. Outside profiling it records nothing, but its two
    dispatched ops cost tens of µs per step when the caches are cold after forward/backward.
    Marked ``hooked`` so that ``Optimizer`` does not wrap it a second time; a subclass that
    overrides ``step`` gets torch's wrapper, and its ``super().step()`` runs no hooks again."""

    def run(args, kwargs):
        self = args[0]
        for pre_hook in chain(_torch_optimizer._global_optimizer_pre_hooks.values(),
                              self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(
                        f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               _torch_optimizer._global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if type(args[0]).step is not wrapper:  # a subclass's own step, which torch wrapped: its hooks ran
            return step(*args, **kwargs)
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return run(args, kwargs)
        return run(args, kwargs)

    wrapper.hooked = True
    return wrapper


def _unhooked(step):
    """A ``step`` without the hook wrapper ``torch.optim`` puts on it once an instance of its
    class exists (ours already ran the hooks)."""
    return step.__wrapped__ if getattr(step, "hooked", False) and hasattr(step, "__wrapped__") else step


def _step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _gather_steps(states: list[dict]) -> Tensor | None:
    """One (N,) buffer holding the ``step`` of every state in ``states``, each
    ``state["step"]`` replaced by its 0-d view: one in-place add advances them all, and
    ``state_dict()`` still holds a 0-d ``step`` tensor per parameter, as AdamW's does."""
    if not states:
        return None
    buffer = torch.stack([st["step"].reshape(()).to(_step_dtype()) for st in states])
    for st, view in zip(states, buffer.unbind(0)):
        st["step"] = view
    return buffer


def _data_ptrs(tensors: list[Tensor]) -> list[int]:
    return list(map(Tensor.data_ptr, tensors))


# ----------------------------------------------------------------------------- the plan
@dataclass
class _Bucket:
    """Anchored pairs stepped together: one backend, device, parameter dtype, basis dtype,
    rank r, basis size k and param group (one set of hyperparameters).

    ``P`` (L, k, r), ``G`` (L, r, r), ``M`` (L, r, r) are the cached statistics; ``Q_B``,
    ``R_B``, ``H`` the anchoring terms, all stacked; ``batch`` holds per-pair views of them
    and every other per-pair tensor of the contract (gradients are filled in each step).
    """

    backend: Backend
    group_index: int
    pairs: list[AnchoredPair]
    A: list[Tensor]
    B: list[Tensor]
    batch: AnchoredBatch
    P: Tensor
    G: Tensor
    M: Tensor
    Q_B: Tensor
    R_B: Tensor
    H: Tensor
    w: Tensor  # (L, k, 1)
    coef: float | Tensor  # λ multiplier per pair: a number, or (L, 1, 1)
    watch: list[Tensor]  # tensors whose storage/version reveal outside edits (local shards)
    missing_A: list[int]  # pairs whose A has no grad (zeros are passed)
    missing_B: list[int]
    zeros_A: dict[int, Tensor]
    zeros_B: dict[int, Tensor]
    shards: list[ShardedPair] | None = None  # FSDP2 DTensor pairs (see asft_kernels.sharding)
    gathered_A: list[Tensor | None] = field(default_factory=list)
    versions: list[int] | None = None  # None: statistics must be recomputed
    coefs: list[float] = field(default_factory=list)  # λ multiplier per pair (the floats of coef)
    w_list: list[Tensor] = field(default_factory=list)  # per-pair (k, 1) views of w
    steps: Tensor | None = None  # (2L,) view of the plan's counters: A's, then B's
    scale_lam: float | None = None  # the λ that `scale` was computed for
    scale: list[float] = field(default_factory=list)  # 2λ·coef per pair
    routed_from: str | None = None  # the backend that does not support these pairs (eager runs them)

    @property
    def one_call(self) -> bool:
        """The whole step of this bucket is one backend call (``anchored_step``)."""
        return self.shards is None and self.backend.anchored_step is not None

    def __len__(self) -> int:
        return len(self.pairs)

    def current_versions(self) -> list[int]:
        """Version counters of A then B of every pair (of the local shards for DTensors,
        whose local tensors are looked up again: FSDP2 may replace them)."""
        watch = self.watch if self.shards is None else [local_tensor(t) for t in self.A + self.B]
        return list(map(_version, watch))


@dataclass
class _PartialPair:
    """An anchored pair with one frozen factor (e.g. LoRA-FA): only the trainable factor is
    written, with the gradient of task + R taken with the frozen factor held constant."""

    pair: AnchoredPair
    A: Tensor
    B: Tensor
    group_index: int
    train_A: bool  # else B is the trainable factor
    U: Tensor
    w: Tensor


@dataclass
class _StepPlan:
    """Everything a step needs that does not change from one step to the next.

    Valid while: no param group was added or loaded (``generation``), the param objects in
    ``param_groups`` are the same (accelerate/FSDP2 swaps), their storage is the same
    (``model.half()``, ``.to()``), ``requires_grad`` and the presence of gradients of
    anchored params are unchanged, and λ has not moved to or from 0.
    """

    generation: int
    group_params: list[list[Tensor]]
    lam_zero: list[bool]
    anchored: list[Tensor]  # every anchored factor (the ones watched below)
    watch: list[Tensor]  # their storage holders (local shards for DTensors)
    ptrs: list[int]
    requires_grad: tuple
    grad_missing: tuple
    sharded: bool
    buckets: list[_Bucket]
    partial: list[_PartialPair]
    plain: list[list[Tensor]]  # per group: params stepped by torch's AdamW
    plain_fp32_state: list[list[Tensor]]  # per group: λ = 0 low-precision factors with fp32 moments
    steps: Tensor | None  # (N,) every anchored step counter; each state["step"] is a 0-d view of it
    partial_steps: Tensor | None = None  # the view of `steps` holding the frozen-factor pairs' counters

    def still_valid(self, opt: AsFTAdamW) -> bool:
        if self.generation != opt._generation:
            return False
        groups = opt.param_groups
        if len(groups) != len(self.group_params):
            return False
        for group, params, zero in zip(groups, self.group_params, self.lam_zero):
            current = group["params"]
            if len(current) != len(params) or not all(map(operator.is_, current, params)):
                return False
            if (float(group["anchor_lambda"]) == 0.0) != zero:
                return False
        watch = [local_tensor(t) for t in self.anchored] if self.sharded else self.watch
        return (
            _data_ptrs(watch) == self.ptrs
            and tuple(map(_requires_grad, self.anchored)) == self.requires_grad
            and tuple(map(_is_none, map(_grad, self.anchored))) == self.grad_missing
        )


class AsFTAdamW(torch.optim.AdamW):
    r"""AdamW with the AsFT safety anchor applied inside every step.

    Arguments are those of :class:`torch.optim.AdamW`, plus:

    Args:
        anchor: an :class:`~asft_kernels.AnchorBinding` from ``AlignmentAnchor.bind(model)``,
            or None (plain AdamW).
        anchor_lambda: λ ≥ 0, the regularizer weight; a per-group option, so schedulers
            and param groups can change it. λ = 0 is plain AdamW.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU, eager where neither is
            available), ``"triton"``, ``"cpp"`` or ``"eager"``.
        basis_dtype: dtype of ``U`` inside the step (default: fp32, fp64 for fp64 params).

    Parameters that are not part of an anchored pair (biases, ``modules_to_save``, …) get
    plain AdamW in the same step; with ``anchor=None`` the whole step is
    ``torch.optim.AdamW.step``. ``state_dict()`` holds the same per-parameter state as
    ``torch.optim.AdamW`` (``step``, ``exp_avg``, ``exp_avg_sq``); for bf16/fp16 anchored
    parameters the moments are kept in fp32, also across ``load_state_dict``. The pairing
    lives in ``param_groups`` (``anchor_pairs``: ``[key, group of A, index of A, index of
    B]``), so it survives parameter objects being swapped in place; anchor tensors are never
    part of the state. A factor with ``requires_grad=False`` is never written (LoRA-FA): the
    other factor gets the gradient of task + R with it held constant.

    After each :meth:`step`, :attr:`anchor_loss` holds ``R`` at the parameters before the
    step (a 0-d tensor, summed over pairs). Gradient clipping before ``step()`` does not see
    the anchoring gradient; with gradient accumulation the regularizer is applied once per
    step (the published code adds it to every micro-batch).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        anchor: AnchorBinding | None = None,
        anchor_lambda: float = 1.0,
        backend: str = "auto",
        basis_dtype: torch.dtype | None = None,
    ) -> None:
        _check_lambda(anchor_lambda)
        if backend not in BACKENDS:
            raise OptimizerInputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if isinstance(anchor, AlignmentAnchor):
            raise OptimizerInputError(
                "anchor must be an AnchorBinding: call anchor.bind(peft_model) and pass the result"
            )
        if anchor is not None and not isinstance(anchor, AnchorBinding):
            raise OptimizerInputError(f"anchor must be an AnchorBinding or None, got {type(anchor).__name__}")
        if anchor is not None and getattr(anchor, "detached", False):
            raise OptimizerInputError(_DETACHED_MESSAGE)
        if anchor is not None and (amsgrad or capturable or differentiable):
            raise OptimizerInputError("amsgrad, capturable and differentiable are not supported with an anchor")
        if basis_dtype not in (None, torch.float32, torch.float64, torch.bfloat16):
            raise OptimizerInputError(f"basis_dtype must be float32, float64 or bfloat16, got {basis_dtype}")
        self._init_anchor_lambda = float(anchor_lambda)
        self._binding = anchor
        self._backend_request = backend
        self._basis_dtype = basis_dtype
        self._anchor_loss: Tensor | None = None
        self._plan: _StepPlan | None = None
        self._generation = 0
        self._plan_builds = 0
        self._initialized = False
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
        self.defaults["anchor_lambda"] = float(anchor_lambda)
        self._initialized = True
        self._assign_pairs()
        unanchored = list(getattr(anchor, "unanchored", None) or [])
        if unanchored:
            warnings.warn(
                f"{len(unanchored)} LoRA module(s) have no anchor entry and are trained as plain AdamW "
                f"(bound with strict=False): {unanchored[:5]}" + (" ..." if len(unanchored) > 5 else ""),
                UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        lam = param_group.setdefault("anchor_lambda", getattr(self, "_init_anchor_lambda", 1.0))
        _check_lambda(lam)
        param_group.setdefault("anchor_pairs", [])
        super().add_param_group(param_group)
        self._generation = getattr(self, "_generation", 0) + 1
        if getattr(self, "_initialized", False):
            try:
                self._assign_pairs()
            except OptimizerInputError:
                self.param_groups.pop()  # refused: leave the optimizer as it was
                self._assign_pairs()
                raise

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # deepcopy((model, optimizer)) maps the binding's modules to the copied model; a pickle
        # keeps only a detached binding that refuses to step (AnchorBinding.__reduce__)
        for name in ("_binding", "_backend_request", "_basis_dtype", "_init_anchor_lambda"):
            state[name] = self.__dict__.get(name)
        return state

    def __setstate__(self, state: dict) -> None:
        extra = {k: state.pop(k) for k in ("_binding", "_backend_request", "_basis_dtype", "_init_anchor_lambda")
                 if k in state}
        super().__setstate__(state)
        default_lam = self.__dict__.get("defaults", {}).get("anchor_lambda", 1.0)
        for group in self.param_groups:
            group.setdefault("anchor_lambda", default_lam)
            group.setdefault("anchor_pairs", [])
        self.__dict__.update(extra)
        for name, value in (("_binding", None), ("_backend_request", "auto"), ("_basis_dtype", None),
                            ("_init_anchor_lambda", default_lam), ("_anchor_loss", None), ("_plan", None),
                            ("_plan_builds", 0), ("_initialized", True)):
            self.__dict__.setdefault(name, value)
        self._generation = self.__dict__.get("_generation", 0) + 1

    def _assign_pairs(self) -> None:
        """Record each bound pair as positions in ``param_groups`` (the group of B holds it).

        Raises:
            OptimizerInputError: a binding none of whose pairs is among the parameters (a
                binding of another model instance), half a pair, an anchored factor listed
                twice, the two factors in groups with different hyperparameters, or an
                explicit backend that cannot run the pairs' device.
        """
        pairs_of = [[] for _ in self.param_groups]
        binding = self._binding
        if binding is not None:
            where: dict[int, tuple[int, int]] = {}
            seen_twice: set[int] = set()
            explicit: dict[torch.device, Backend] = {}
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if id(p) in where:
                        seen_twice.add(id(p))
                    where.setdefault(id(p), (gi, pi))
            for pair in binding:
                refuse_parametrized(pair, OptimizerInputError)  # else A/B are computed tensors: never matched
                A, B = pair.A, pair.B
                loc_a, loc_b = where.get(id(A)), where.get(id(B))
                if loc_a is None and loc_b is None:
                    continue  # pair not optimized by this optimizer
                if loc_a is None or loc_b is None:
                    missing = "lora_A" if loc_a is None else "lora_B"
                    raise OptimizerInputError(
                        f"{pair.module_name}: {missing} is not among the optimizer's parameters; "
                        "an anchored pair must be optimized together"
                    )
                for t, label in ((A, "lora_A"), (B, "lora_B")):
                    if id(t) in seen_twice:
                        raise OptimizerInputError(
                            f"{pair.module_name}: {label} is listed more than once in the optimizer's parameters; "
                            "pass each parameter once (e.g. AsFTAdamW(model.parameters()), not params + params)"
                        )
                ga, gb = self.param_groups[loc_a[0]], self.param_groups[loc_b[0]]
                for opt in ("lr", "betas", "eps", "weight_decay", "maximize"):
                    if ga[opt] != gb[opt]:
                        raise OptimizerInputError(
                            f"{pair.module_name}: lora_A and lora_B are in param groups with different {opt!r} "
                            f"({ga[opt]} vs {gb[opt]}); an anchored pair needs one set of hyperparameters"
                        )
                if self._backend_request in ("cpp", "triton") and B.device not in explicit:
                    # an explicit backend is built here, so a missing compiler is one error at
                    # construction naming the cause (auto warns once and runs eager instead)
                    explicit[B.device] = resolve_backend(self._backend_request, B.device)
                pairs_of[loc_b[0]].append([pair.key, loc_a[0], loc_a[1], loc_b[1]])
            if not len(binding):
                raise OptimizerInputError("the anchor binding holds no pairs: bind the model with anchor.bind(model)")
            if not any(pairs_of):
                first = next(iter(binding))
                raise OptimizerInputError(
                    f"the anchor binding matches none of the optimizer's parameters (e.g. {first.module_name}: its "
                    "lora_A/lora_B are not among them): it was bound to another model instance (a copy, or a model "
                    "re-created after bind). Bind the model whose parameters you optimize: "
                    "AsFTAdamW(model.parameters(), anchor=anchor.bind(model))"
                )
        for group, pairs in zip(self.param_groups, pairs_of):
            group["anchor_pairs"] = pairs
        self._plan = None

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.AdamW.load_state_dict``, plus: refuses state whose shapes do not
        match the parameters (before anything changes), keeps fp32 moments of bf16/fp16
        anchored parameters fp32, and gives groups saved without ``anchor_lambda`` (e.g. by
        ``torch.optim.AdamW``) this optimizer's λ."""
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups", [])
        params = [p for g in groups for p in g["params"]]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        keep_fp32: dict[int, dict[str, Tensor]] = {}
        by_id = dict(zip(saved_ids, params)) if len(params) == len(saved_ids) else {}
        if by_id:
            for pid, value in state_dict.get("state", {}).items():
                p = by_id.get(pid)
                if p is None or not isinstance(value, dict):
                    continue
                for key in _MOMENTS:
                    t = value.get(key)
                    if not torch.is_tensor(t):
                        continue
                    if tuple(t.shape) != tuple(p.shape):
                        raise OptimizerInputError(
                            f"load_state_dict: the saved {key} of parameter {pid} has shape {tuple(t.shape)}, the "
                            f"parameter has {tuple(p.shape)}; this state belongs to a model of other shapes"
                        )
                    if p.dtype in _LOW_PRECISION and t.dtype == torch.float32:
                        keep_fp32.setdefault(pid, {})[key] = t
        default_lam = self.defaults.get("anchor_lambda", 1.0)
        for group in saved_groups:
            if "anchor_lambda" in group:
                _check_lambda(group["anchor_lambda"])
        super().load_state_dict(state_dict)
        for pid, moments in keep_fp32.items():
            p = by_id[pid]
            for key, t in moments.items():
                self.state[p][key] = t.to(device=p.device)
        for group, saved in zip(self.param_groups, saved_groups):
            if "anchor_lambda" not in saved:
                group["anchor_lambda"] = default_lam
        self._generation += 1
        self._assign_pairs()

    # ------------------------------------------------------------------ properties
    @property
    def anchor(self) -> AnchorBinding | None:
        """The :class:`AnchorBinding` in use (not part of ``state_dict``)."""
        return self._binding

    @property
    def anchor_loss(self) -> Tensor | None:
        """``R = Σ λ‖(I − C) B A‖²_F`` at the parameters before the last step (0-d tensor,
        fp32, fp64 for fp64 params; a zero tensor after a step where λ = 0), or None before
        the first step and with ``anchor=None``."""
        return self._anchor_loss

    @property
    def plan_builds(self) -> int:
        """How many times the step plan was built (once, plus once per change it depends on)."""
        return self._plan_builds

    def describe(self) -> list[dict]:
        """Which backend runs which anchored pairs: one dict per bucket of the step plan
        (pairs stepped together), with ``backend`` (``"triton"``, ``"cpp"``, ``"eager"``),
        ``device``, ``dtype`` (parameters), ``basis_dtype`` (``U``), ``r`` (LoRA rank),
        ``k`` (anchor basis size), ``pairs`` (how many), ``group`` (param group index),
        ``frozen_factor`` (pairs with one factor frozen, stepped by the eager math) and
        ``routed_from`` (the backend that does not run pairs of this dtype and r, so eager
        runs them; else None). Pairs of groups with λ = 0 are plain AdamW and not listed.

        Builds the step plan if it is not current (creating the state of anchored
        parameters, as the first step would). The same summary is logged once, at INFO on
        the ``asft_kernels`` logger, at the first step.
        """
        if self._binding is None:
            return []
        return _plan_summary(self._current_plan())

    def invalidate_anchor_stats(self) -> None:
        """Forget the cached statistics; needed only after editing parameters through
        ``.data`` (which bypasses the version counters that normally detect edits)."""
        if self._plan is not None:
            for bucket in self._plan.buckets:
                bucket.versions = None

    # ------------------------------------------------------------------ step
    @_step_with_hooks
    def step(self, closure=None):
        """Perform one AdamW step with the anchoring gradient added to every anchored pair.

        Everything that can fail (λ, shapes, dtypes, devices, backend) is checked before the
        first parameter or state is written.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        if self._binding is None:  # exactly torch.optim.AdamW, differentiable included
            return _unhooked(torch.optim.AdamW.step)(self, closure)
        if getattr(self._binding, "detached", False):
            raise OptimizerInputError(_DETACHED_MESSAGE)
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._anchored_step()
        return loss

    def _current_plan(self) -> _StepPlan:
        plan = self._plan
        if plan is None or not plan.still_valid(self):
            plan = self._plan = self._build_plan()
            self._announce(plan)
        return plan

    def _announce(self, plan: _StepPlan) -> None:
        """At the first plan: one INFO line saying which backend runs which pairs; at any
        plan: one WARNING per (backend, dtype, r) routed to eager, once per optimizer."""
        summary = _plan_summary(plan)
        said = self.__dict__.setdefault("_routes_said", set())
        for row in summary:
            key = (row["routed_from"], row["dtype"], row["r"])
            if row["routed_from"] and key not in said:
                said.add(key)
                _LOG.warning("asft_kernels: backend %r does not run %s pairs of LoRA rank r = %d; %d such pair(s) "
                             "run on the eager backend", row["routed_from"], row["dtype"], row["r"], row["pairs"])
        if not self.__dict__.get("_plan_logged") and summary:
            self._plan_logged = True
            _LOG.info("asft_kernels: AsFTAdamW step plan: %s", _summary_line(summary))

    def _anchored_step(self) -> None:
        for group in self.param_groups:
            _check_lambda(group["anchor_lambda"])
        plan = self._current_plan()
        # ---- inputs and checks: nothing is written before this block ends
        grads = [self._bucket_grads(b) for b in plan.buckets]
        for bucket in plan.buckets:
            self._refresh_statistics(bucket)
        losses: list[Tensor | None] = []
        for bucket in plan.buckets:
            lam = float(self.param_groups[bucket.group_index]["anchor_lambda"])
            if bucket.one_call:  # terms, counters and step in one call below
                if bucket.scale_lam != lam:
                    bucket.scale = [2.0 * lam * c for c in bucket.coefs]
                    bucket.scale_lam = lam
                losses.append(None)
                continue
            losses.append(bucket.backend.terms(bucket.P, bucket.G, bucket.M, bucket.w, bucket.coef * (2.0 * lam),
                                               bucket.Q_B, bucket.R_B, bucket.H))
        partial_updates = [self._partial_gradient(pp) for pp in plan.partial]
        self._check_plain_grads(plan)  # every group's plain params, before group 0 is written
        # ---- writes
        for gi, group in enumerate(self.param_groups):
            self._plain_adamw(group, plan.plain[gi])
            for p in plan.plain_fp32_state[gi]:
                if p.grad is not None:
                    self._eager_adamw(group, p, p.grad)
        if plan.steps is not None:  # the counters no one-call bucket advances itself
            if not any(b.one_call for b in plan.buckets):
                plan.steps.add_(1)
            else:
                for bucket in plan.buckets:
                    if not bucket.one_call:
                        bucket.steps.add_(1)
                if plan.partial_steps is not None:
                    plan.partial_steps.add_(1)
        for i, (bucket, (grad_A, grad_B)) in enumerate(zip(plan.buckets, grads)):
            group = self.param_groups[bucket.group_index]
            batch = bucket.batch
            batch.grad_A, batch.grad_B = grad_A, grad_B
            beta1, beta2 = group["betas"]
            hyper = AdamWHyper(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                               float(group["weight_decay"]), bool(group["maximize"]))
            if bucket.one_call:
                losses[i] = bucket.backend.anchored_step(batch, bucket.w_list, bucket.scale, hyper)
            elif bucket.shards is None:
                bucket.backend.fused_step(batch, hyper)
            else:
                self._sharded_fused_step(bucket, hyper)
            bucket.versions = bucket.current_versions()
        for pp, (param, grad, _) in zip(plan.partial, partial_updates):
            self._eager_adamw(self.param_groups[pp.group_index], param, grad, stepped=True)
        losses.extend(loss for _, _, loss in partial_updates)
        total = None
        for loss in losses:
            total = loss if total is None else total + loss.to(total.device, total.dtype)
        if total is None:  # λ = 0 everywhere (or nothing trainable): R = 0, still a 0-d tensor
            like = plan.anchored[0] if plan.anchored else None
            total = torch.zeros((), dtype=math_dtype(like.dtype) if like is not None else _step_dtype(),
                                device=like.device if like is not None else None)
        self._anchor_loss = total

    # ------------------------------------------------------------------ building the plan
    def _build_plan(self) -> _StepPlan:
        """Resolve, validate and bucket the anchored pairs; create missing state. Writes no
        parameter; raises :class:`OptimizerInputError` on anything the step cannot run."""
        binding = self._binding
        self._repair_if_moved()
        groups = self.param_groups
        anchored_ids: set[int] = set()
        anchored: list[Tensor] = []
        buckets: dict[tuple, dict] = {}
        partial: list[_PartialPair] = []
        step_states: list[dict] = []
        backends: dict[torch.device, Backend] = {}
        lam_zero = [float(g["anchor_lambda"]) == 0.0 for g in groups]
        sharded_any = False
        pending = []  # validated pairs: creation of state only after every check passed
        for gi, group in enumerate(groups):
            for key, a_gi, a_pi, b_pi in group["anchor_pairs"]:
                if key not in binding:
                    raise OptimizerInputError(f"param_groups name anchor entry {key!r}, absent from the binding")
                pair = binding[key]
                A = groups[a_gi]["params"][a_pi]
                B = group["params"][b_pi]
                anchored.extend((A, B))
                if lam_zero[gi]:
                    continue  # plain AdamW for this group (below)
                anchored_ids.update((id(A), id(B)))
                # A factor with requires_grad=False is never written. A trainable factor is
                # stepped even without a .grad (an unused layer, conditional compute, MoE):
                # AdamW on task + R sees ∇R there, so its task gradient counts as zero.
                train_A, train_B = A.requires_grad, B.requires_grad
                if not (train_A or train_B):
                    continue
                _validate_pair(pair, A, B)
                shard = sharded_pair(pair.module_name, A, B)
                sharded_any = sharded_any or shard is not None
                device, dtype = B.device, B.dtype
                md = math_dtype(dtype)
                basis_dtype = self._basis_dtype if (self._basis_dtype and md != torch.float64) else md
                if A.requires_grad != B.requires_grad:
                    if shard is not None:
                        raise OptimizerInputError(
                            f"{pair.module_name}: a frozen lora factor is not supported with FSDP2-sharded pairs")
                    pending.append((gi, pair, A, B, train_A, basis_dtype, md))
                    continue
                if device not in backends:
                    backends[device] = resolve_backend(self._backend_request, device)
                backend = route(backends[device], dtype, int(A.shape[0]))
                k = pair.entry.rank
                bkey = (backend.name, device, dtype, basis_dtype, int(A.shape[0]), k, gi, shard is not None)
                routed = backends[device].name if backend is not backends[device] else None
                buckets.setdefault(bkey, {"backend": backend, "gi": gi, "items": [], "routed": routed})[
                    "items"].append((pair, A, B, shard, basis_dtype, md))
        # ---- every check passed: create state and buffers
        out_buckets = []
        for spec in buckets.values():
            out_buckets.append(self._make_bucket(spec["backend"], spec["gi"], spec["items"], step_states))
            out_buckets[-1].routed_from = spec["routed"]
        for gi, pair, A, B, train_A, basis_dtype, md in pending:
            param = A if train_A else B
            step_states.append(self._state_for(param))
            partial.append(_PartialPair(pair, A, B, gi, train_A, pair.basis(B.device, basis_dtype),
                                        pair.weights(B.device, md)))
        steps = _gather_steps(step_states)
        off = 0  # step_states: each bucket's A then B states, in bucket order, then the partial pairs'
        for bucket in out_buckets:
            bucket.steps = steps[off:off + 2 * len(bucket)]
            off += 2 * len(bucket)
        partial_steps = steps[off:] if partial else None
        for bucket in out_buckets:
            bucket.batch.step_A = [self.state[a]["step"] for a in bucket.A]
            bucket.batch.step_B = [self.state[b]["step"] for b in bucket.B]
        plain, plain_fp32 = [], []
        for group in groups:
            ps, fp32 = [], []
            for p in group["params"]:
                if id(p) in anchored_ids:
                    continue
                st = self.state.get(p)
                if st and p.dtype in _LOW_PRECISION and st.get("exp_avg") is not None \
                        and st["exp_avg"].dtype == torch.float32:
                    fp32.append(p)  # a λ = 0 factor that keeps the fp32 moments of anchored steps
                else:
                    ps.append(p)
            plain.append(ps)
            plain_fp32.append(fp32)
        watch = [local_tensor(t) for t in anchored]
        self._plan_builds += 1
        return _StepPlan(
            generation=self._generation,
            group_params=[list(g["params"]) for g in groups],
            lam_zero=lam_zero,
            anchored=anchored,
            watch=watch,
            ptrs=_data_ptrs(watch),
            requires_grad=tuple(map(_requires_grad, anchored)),
            grad_missing=tuple(map(_is_none, map(_grad, anchored))),
            sharded=sharded_any,
            buckets=out_buckets,
            partial=partial,
            plain=plain,
            plain_fp32_state=plain_fp32,
            steps=steps,
            partial_steps=partial_steps,
        )

    def _repair_if_moved(self) -> None:
        """Check that the positions recorded in ``anchor_pairs`` still hold the binding's
        factors (looked up on the modules); if ``params`` lists were edited by hand
        (reordered, replaced), pair again by parameter identity through the binding, so a
        position never pairs one layer's A with another's B. Refuses, changing nothing,
        when a recorded pair's factors are no longer among the parameters."""
        groups = self.param_groups
        binding = self._binding
        intact = True
        for group in groups:
            params = group["params"]
            for key, a_gi, a_pi, b_pi in group["anchor_pairs"]:
                if key not in binding:
                    return  # _build_plan names the stale key
                pair = binding[key]
                if not (a_gi < len(groups) and a_pi < len(groups[a_gi]["params"]) and b_pi < len(params)
                        and groups[a_gi]["params"][a_pi] is pair.A and params[b_pi] is pair.B):
                    intact = False
                    break
            if not intact:
                break
        if intact:
            return
        before = [group["anchor_pairs"] for group in groups]
        self._assign_pairs()  # raises (changing nothing) on half a pair, naming module and factor
        lost = {e[0] for pairs in before for e in pairs} - {e[0] for g in groups for e in g["anchor_pairs"]}
        if lost:
            for group, pairs in zip(groups, before):
                group["anchor_pairs"] = pairs
            names = sorted(binding[key].module_name for key in lost)
            raise OptimizerInputError(
                f"{names[:5]}: lora_A and lora_B of these anchored modules are no longer among the optimizer's "
                "parameters (param_groups' params were replaced by tensors that are not the model's factors); "
                "replace a parameter in the model and in param_groups together, or build a new optimizer")

    def _make_bucket(self, backend: Backend, gi: int, items: list, step_states: list[dict]) -> _Bucket:
        pairs = [it[0] for it in items]
        As = [it[1] for it in items]
        Bs = [it[2] for it in items]
        shards = [it[3] for it in items]
        basis_dtype, md = items[0][4], items[0][5]
        device = Bs[0].device
        L, r, k = len(items), int(As[0].shape[0]), pairs[0].entry.rank
        states_A = [self._state_for(a) for a in As]
        states_B = [self._state_for(b) for b in Bs]
        stats = dict(device=device, dtype=md)
        P = torch.zeros((L, k, r), **stats)
        G = torch.zeros((L, r, r), **stats)
        M = torch.zeros((L, r, r), **stats)
        Q_B = torch.empty((L, r, r), **stats)
        R_B = torch.empty((L, k, r), **stats)
        H = torch.empty((L, r, r), **stats)
        w = torch.stack([p.weights(device, md) for p in pairs])[:, :, None]
        coefs = [float(p.coef) for p in pairs]
        coef = coefs[0] if all(c == coefs[0] for c in coefs) else \
            torch.tensor(coefs, dtype=md, device=device)[:, None, None]
        missing_A = [j for j, a in enumerate(As) if a.grad is None]
        missing_B = [j for j, b in enumerate(Bs) if b.grad is None]
        zeros_A = {j: torch.zeros_like(As[j]) for j in missing_A}
        zeros_B = {j: torch.zeros_like(Bs[j]) for j in missing_B}
        step_states.extend(states_A)
        step_states.extend(states_B)
        batch = AnchoredBatch(
            A=As, B=Bs,
            exp_avg_A=[s["exp_avg"] for s in states_A], exp_avg_sq_A=[s["exp_avg_sq"] for s in states_A],
            exp_avg_B=[s["exp_avg"] for s in states_B], exp_avg_sq_B=[s["exp_avg_sq"] for s in states_B],
            P=list(P.unbind(0)), G=list(G.unbind(0)), M=list(M.unbind(0)),
            grad_A=[], grad_B=[],
            U=[p.basis(device, basis_dtype) for p in pairs],
            Q_B=list(Q_B.unbind(0)), R_B=list(R_B.unbind(0)), H=list(H.unbind(0)),
            step_A=[], step_B=[],  # views of the plan's step buffer, set once it exists
        )
        batch.fixed = True  # the plan hands this batch to every step and rebuilds it on any change
        sharded = any(s is not None for s in shards)
        return _Bucket(
            backend=backend, group_index=gi, pairs=pairs, A=As, B=Bs, batch=batch, P=P, G=G, M=M,
            Q_B=Q_B, R_B=R_B, H=H, w=w, coef=coef, watch=[local_tensor(t) for t in As + Bs],
            missing_A=missing_A, missing_B=missing_B, zeros_A=zeros_A, zeros_B=zeros_B,
            shards=shards if sharded else None, gathered_A=[None] * L, coefs=coefs, w_list=list(w.unbind(0)),
        )

    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        md = math_dtype(p.dtype)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_step_dtype())
            state["exp_avg"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
        else:
            step = state["step"]
            if not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=_step_dtype())
            elif step.device.type != "cpu" or step.dtype not in (torch.float32, torch.float64):
                state["step"] = step.detach().to("cpu", _step_dtype())
            for name in _MOMENTS:
                if state[name].dtype != md or not state[name].is_contiguous():
                    state[name] = state[name].to(dtype=md).contiguous()
        return state

    # ------------------------------------------------------------------ per-step pieces
    def _bucket_grads(self, bucket: _Bucket) -> tuple[list[Tensor], list[Tensor]]:
        """The bucket's gradients (zeros where the plan saw none), checked for layout."""
        grad_A = list(map(_grad, bucket.A))
        grad_B = list(map(_grad, bucket.B))
        for j, z in bucket.zeros_A.items():
            grad_A[j] = z
        for j, z in bucket.zeros_B.items():
            grad_B[j] = z
        if bucket.shards is not None:
            return grad_A, grad_B
        # autograd and the .grad setter guarantee shape, dtype and device; check the layout
        for grads, label in ((grad_A, "lora_A"), (grad_B, "lora_B")):
            if not all(map(Tensor.is_contiguous, grads)) or any(map(operator.attrgetter("is_sparse"), grads)):
                for j, g in enumerate(grads):
                    if g.is_sparse:
                        raise OptimizerInputError(
                            f"{bucket.pairs[j].module_name}: sparse gradient for {label} is not supported")
                    grads[j] = g.contiguous()
        return grad_A, grad_B

    def _refresh_statistics(self, bucket: _Bucket) -> None:
        """Recompute ``P, G, M`` of the pairs edited outside the optimizer (or all, first)."""
        now = bucket.current_versions()
        if now == bucket.versions:
            return
        L = len(bucket)
        old = bucket.versions
        stale = list(range(L)) if old is None else \
            [j for j in range(L) if now[j] != old[j] or now[L + j] != old[L + j]]
        U = bucket.batch.U
        if bucket.shards is None:
            P, G, M = bucket.backend.stats_pass([U[j] for j in stale], [bucket.B[j].detach() for j in stale],
                                                [bucket.A[j].detach() for j in stale])
            for i, j in enumerate(stale):
                bucket.P[j].copy_(P[i])
                bucket.G[j].copy_(G[i])
                bucket.M[j].copy_(M[i])
        else:
            for j in stale:
                P, G, M, gathered = bucket.shards[j].statistics(bucket.backend.stats_pass, U[j])
                bucket.P[j].copy_(P)
                bucket.G[j].copy_(G)
                bucket.M[j].copy_(M)
                bucket.gathered_A[j] = gathered
        bucket.versions = now

    def _sharded_fused_step(self, bucket: _Bucket, hyper: AdamWHyper) -> None:
        """FSDP2: the backend writes local shards and partial sums; complete them
        (:mod:`asft_kernels.sharding`)."""
        b = bucket.batch
        local = []
        for j, shard in enumerate(bucket.shards):
            item = {name: getattr(b, name)[j] for name in BATCH_FIELDS}
            local.append(shard.localize(item, bucket.gathered_A[j]))
        batch = AnchoredBatch(*([it[name] for it in local] for name in BATCH_FIELDS))
        bucket.backend.fused_step(batch, hyper)
        gathered = complete_sharded_step(bucket.shards, b.P, b.G, b.M)
        bucket.gathered_A = list(gathered)

    def _partial_gradient(self, pp: _PartialPair) -> tuple[Tensor, Tensor, Tensor]:
        """``(factor, g, R)``: the trainable factor, its gradient of task + R with the frozen
        factor held constant (math dtype), and R (0-d); the terms of
        :func:`~asft_kernels.functional.anchoring_terms` for one pair."""
        lam = float(self.param_groups[pp.group_index]["anchor_lambda"]) * float(pp.pair.coef)
        A, B = pp.A.detach(), pp.B.detach()
        (P,), (G,), (M,) = eager.stats_pass([pp.U], [B], [A])
        k, r = P.shape
        Q_B, R_B, H = P.new_empty((1, r, r)), P.new_empty((1, k, r)), P.new_empty((1, r, r))
        loss = anchoring_terms(P[None], G[None], M[None], pp.w[None, :, None], 2.0 * lam, Q_B, R_B, H)
        md = P.dtype
        if pp.train_A:  # g_A = grad_A + H A
            param, g = pp.A, H[0] @ A.to(md)
        else:  # g_B = grad_B + B Q_B − U R_B
            param, g = pp.B, B.to(md) @ Q_B[0] - pp.U.to(md) @ R_B[0]
        if param.grad is not None:
            g = g + param.grad.to(md)
        return param, g, loss

    def _check_plain_grads(self, plan: _StepPlan) -> None:
        """Refuse a sparse gradient on any plain (unanchored) parameter of any group before the
        first write: torch's AdamW raises on it only when it reaches that group, after the
        earlier groups were stepped. One C-level pass per group; a Python loop only on error."""
        for gi, params in enumerate(plan.plain):
            for lst in (params, plan.plain_fp32_state[gi]):
                if lst and any(map(_is_sparse, filter(_is_not_none, map(_grad, lst)))):
                    for p in lst:
                        if p.grad is not None and p.grad.is_sparse:
                            i = next(i for i, q in enumerate(self.param_groups[gi]["params"]) if q is p)
                            raise OptimizerInputError(
                                f"param group {gi}, parameter {i} (shape {tuple(p.shape)}, {p.dtype}): sparse "
                                "gradient; AdamW does not support sparse gradients (e.g. nn.Embedding(sparse=True)): "
                                "use a dense embedding or optimize it with torch.optim.SparseAdam")

    def _eager_adamw(self, group: dict, p: Tensor, grad: Tensor, stepped: bool = False) -> None:
        """AdamW on one tensor with math-dtype moments (``stepped``: its counter has been
        advanced already)."""
        state = self._state_for(p)
        if not stepped:
            state["step"] += 1
        g = grad.to(state["exp_avg"].dtype)
        if group["maximize"]:
            g = -g
        beta1, beta2 = group["betas"]
        eager.adamw_foreach_([p], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [float(state["step"])],
                             float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])

    def _plain_adamw(self, group: dict, params: list[Tensor]) -> None:
        """``torch.optim.AdamW``'s own update for the group's unanchored params."""
        if not params:
            return
        sub = dict(group)
        sub["params"] = params
        params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
        has_complex = self._init_group(
            sub, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        if not params_with_grad:
            return
        beta1, beta2 = group["betas"]
        _functional_adam(
            params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
            differentiable=group["differentiable"], fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=True,
        )


def _plan_summary(plan: _StepPlan) -> list[dict]:
    """:meth:`AsFTAdamW.describe`'s rows for ``plan``."""
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    rows = []
    for b in plan.buckets:
        rows.append({"backend": b.backend.name, "device": str(b.B[0].device), "dtype": name(b.B[0].dtype),
                     "basis_dtype": name(b.batch.U[0].dtype), "r": int(b.A[0].shape[0]), "k": int(b.P.shape[1]),
                     "pairs": len(b), "group": b.group_index, "frozen_factor": False, "routed_from": b.routed_from})
    partial_rows: dict[tuple, dict] = {}
    for pp in plan.partial:
        key = (str(pp.B.device), name(pp.B.dtype), name(pp.U.dtype), int(pp.A.shape[0]), int(pp.U.shape[1]),
               pp.group_index)
        row = partial_rows.setdefault(key, {
            "backend": "eager", "device": key[0], "dtype": key[1], "basis_dtype": key[2], "r": key[3], "k": key[4],
            "pairs": 0, "group": key[5], "frozen_factor": True, "routed_from": None})
        row["pairs"] += 1
    return rows + list(partial_rows.values())


def _summary_line(rows: list[dict]) -> str:
    """``describe()`` in one line: ``cpp cpu float32 r=8 k=64: 14 pairs; ...``."""
    parts = []
    for row in rows:
        note = " (frozen factor)" if row["frozen_factor"] else \
            f" (routed from {row['routed_from']})" if row["routed_from"] else ""
        parts.append(f"{row['backend']} {row['device']} {row['dtype']} r={row['r']} k={row['k']}: "
                     f"{row['pairs']} pair{'s' if row['pairs'] != 1 else ''}{note}")
    return "; ".join(parts)


_DETACHED_MESSAGE = (
    "this optimizer's anchor binding was not carried over (the optimizer was unpickled without its model), so "
    "it cannot anchor anything: build a new AsFTAdamW with anchor=anchor.bind(model) over the model you train "
    "and load this optimizer's state_dict() into it"
)


def _check_lambda(lam) -> None:
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise OptimizerInputError(f"anchor_lambda must be a number, got {lam!r}") from None
    if not math.isfinite(value) or value < 0:
        raise OptimizerInputError(f"anchor_lambda must be finite and >= 0, got {lam!r}")


def _validate_pair(pair: AnchoredPair, A: Tensor, B: Tensor) -> None:
    m, n = pair.entry.shape
    name = pair.module_name
    if A.dtype not in _SUPPORTED or B.dtype not in _SUPPORTED:
        raise OptimizerInputError(f"{name}: lora parameters must be fp64/fp32/bf16/fp16, found {A.dtype}/{B.dtype}")
    if A.dtype != B.dtype:
        raise OptimizerInputError(f"{name}: lora_A is {A.dtype} but lora_B is {B.dtype}")
    if A.device != B.device:
        raise OptimizerInputError(f"{name}: lora_A on {A.device} but lora_B on {B.device}")
    r = A.shape[0] if A.ndim == 2 else -1
    if A.ndim != 2 or B.ndim != 2 or tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
        raise OptimizerInputError(
            f"{name}: anchor expects lora_A (r, {n}) and lora_B ({m}, r); found {tuple(A.shape)} and {tuple(B.shape)}"
        )
    for t, label in ((A, "lora_A"), (B, "lora_B")):
        if not t.is_contiguous():
            raise OptimizerInputError(f"{name}: {label} must be contiguous")
        g = t.grad
        if g is not None and g.is_sparse:
            raise OptimizerInputError(f"{name}: sparse gradient for {label} is not supported")
