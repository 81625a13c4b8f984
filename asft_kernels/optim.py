"""``AsFTAdamW``: AdamW whose step adds the gradient of the AsFT regularizer.

Algorithm (per anchored LoRA pair, docs/method.md; λ = ``anchor_lambda``)::

    R   = λ ( ⟨G, M⟩ − ⟨Pᵀ diag(w) P, M⟩ )          P = Uᵀ B,  G = Bᵀ B,  M = A Aᵀ
    g_B = grad_B + 2λ ( B M − U diag(w) P M )
    g_A = grad_A + 2λ ( G − Pᵀ diag(w) P ) A
    A, B ← AdamW(A, g_A), AdamW(B, g_B)             (exactly torch.optim.AdamW's update)

``R = λ‖(I − C) B A‖²_F`` is the published regularizer, so ``n`` steps of this optimizer
equal ``n`` steps of ``torch.optim.AdamW`` on ``task_loss + R``.

How a step runs (docs/architecture.md): the pairs named in ``param_groups`` are resolved,
validated and bucketed once into a *step plan* (:mod:`asft_kernels.plan`), reused until
something it depends on changes; a step is torch's AdamW on the plain parameters and one
backend call per bucket of anchored pairs.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import warnings
from functools import partial
from itertools import chain

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.optim.adam import adam as _functional_adam

from .anchor import AlignmentAnchor, AnchorBinding, refuse_parametrized
from .errors import OptimizerInputError
from .ops import BACKENDS, eager, math_dtype, resolve_backend
from .plan import LOW_PRECISION, MOMENTS, StepPlan, build_plan, init_state, step_dtype

_LOG = logging.getLogger("asft_kernels")
_grad = operator.attrgetter("grad")
_is_not_none = partial(operator.is_not, None)
_is_sparse = operator.attrgetter("is_sparse")


def _step_with_hooks(step):
    """``step`` wrapped as ``torch.optim.Optimizer`` wraps every optimizer's ``step``: the
    global and per-optimizer step pre-hooks (which may replace the arguments), the step,
    the profiler's step-code marker, the post-hooks, all inside a ``record_function`` named
    ``Optimizer.step#<class>.step``. The difference: the ``record_function`` is entered
    only while a profiler runs. Outside profiling it records nothing, but entering it (two
    dispatched ``profiler`` ops) made torch's wrapper cost 84–178 µs per C++ step more than
    this one with the caches cold after forward/backward and 34–59 µs warm: 3–17 % of the
    step (``bench/step_hooks.py``; docs/architecture.md, "Step hooks").
    Marked ``hooked`` so that ``Optimizer`` does not wrap it a second time; a subclass that
    overrides ``step`` gets torch's wrapper, and its ``super().step()`` runs no hooks again
    (torch's own wrapper would run them twice there once a plain ``AdamW`` exists).
    ``tests/test_step_hooks.py`` compares every behaviour with ``torch.optim.AdamW``'s."""

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
        if anchor is not None and (amsgrad or differentiable):
            raise OptimizerInputError("amsgrad and differentiable are not supported with an anchor")
        if basis_dtype not in (None, torch.float32, torch.float64, torch.bfloat16):
            raise OptimizerInputError(f"basis_dtype must be float32, float64 or bfloat16, got {basis_dtype}")
        self._init_anchor_lambda = float(anchor_lambda)
        self._binding = anchor
        self._backend_request = backend
        self._basis_dtype = basis_dtype
        self._anchor_loss: Tensor | None = None
        self._plan: StepPlan | None = None
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
                twice, the two factors in groups with different ``anchor_lambda``, or an
                explicit backend that cannot run the pairs' device.
        """
        pairs_of = [[] for _ in self.param_groups]
        binding = self._binding
        if binding is not None:
            where: dict[int, tuple[int, int]] = {}
            seen_twice: set[int] = set()
            explicit: set[torch.device] = set()
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
                if self._backend_request in ("cpp", "triton") and B.device not in explicit:
                    # an explicit backend is built here, so a missing compiler is one error at
                    # construction naming the cause (auto warns once and runs eager instead)
                    resolve_backend(self._backend_request, B.device)
                    explicit.add(B.device)
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
        self._links = None
        self._check_pair_lambdas()

    def _check_pair_lambdas(self) -> None:
        """Refuse pairs whose A and B sit in param groups of different ``anchor_lambda``: λ is
        one number per pair (every other hyperparameter may differ between the factors, as
        LoRA+ sets them). Runs at construction and at every step before anything is written,
        over the distinct (group of A, group of B) links of the pairs.

        Raises:
            OptimizerInputError: naming a pair, its two groups and their λ.
        """
        links = self.__dict__.get("_links")
        if links is None:
            links = {}
            for gi, group in enumerate(self.param_groups):
                for key, a_gi, _, _ in group["anchor_pairs"]:
                    if a_gi != gi:
                        links.setdefault((a_gi, gi), key)
            self._links = links
        groups = self.param_groups
        for (a_gi, b_gi), key in links.items():
            lam_a, lam_b = groups[a_gi]["anchor_lambda"], groups[b_gi]["anchor_lambda"]
            if float(lam_a) != float(lam_b):
                raise OptimizerInputError(
                    f"{key}: lora_A is in param group {a_gi} with anchor_lambda={lam_a}, lora_B in group {b_gi} with "
                    f"anchor_lambda={lam_b}; the two factors of an anchored pair need one λ (lr, betas, eps, "
                    "weight_decay and maximize may differ)")

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
                for key in MOMENTS:
                    t = value.get(key)
                    if not torch.is_tensor(t):
                        continue
                    if tuple(t.shape) != tuple(p.shape):
                        raise OptimizerInputError(
                            f"load_state_dict: the saved {key} of parameter {pid} has shape {tuple(t.shape)}, the "
                            f"parameter has {tuple(p.shape)}; this state belongs to a model of other shapes"
                        )
                    if p.dtype in LOW_PRECISION and t.dtype == torch.float32:
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
        ``k`` (anchor basis size), ``pairs`` (how many), ``group`` (param group index of B;
        A's when it differs is ``group_A``), ``frozen_factor`` (pairs with one factor frozen,
        stepped by the eager backend) and ``routed_from`` (the backend that does not run
        pairs of this dtype and r, so eager runs them; else None). Pairs of groups with
        λ = 0 are plain AdamW and not listed.

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
            self._plan.invalidate_statistics()

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

    def _current_plan(self) -> StepPlan:
        plan = self._plan
        if plan is None or not plan.still_valid(self):
            plan = self._plan = None  # the old handles go before the new ones are made
            self._repair_if_moved()
            plan = self._plan = build_plan(self)
            self._plan_builds += 1
            self._announce(plan)
        return plan

    def _announce(self, plan: StepPlan) -> None:
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
                    return  # build_plan names the stale key
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
            self._links = None
            names = sorted(binding[key].module_name for key in lost)
            raise OptimizerInputError(
                f"{names[:5]}: lora_A and lora_B of these anchored modules are no longer among the optimizer's "
                "parameters (param_groups' params were replaced by tensors that are not the model's factors); "
                "replace a parameter in the model and in param_groups together, or build a new optimizer")

    def _check_plain_grads(self, plan: StepPlan) -> None:
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

    @torch.compiler.disable
    def _anchored_step(self) -> None:
        """One step: checks (λ, the plan), then torch's AdamW on the plain parameters and one
        backend call per bucket (:meth:`asft_kernels.plan.StepPlan.step`). Run as it is under
        ``torch.compile``: dynamo does not write back attributes set on an optimizer in a frame
        it turns into a graph, so a traced step lost ``_anchor_loss`` (and could lose ``_plan``)
        with two or more buckets; the work is in the ``asft::`` ops anyway (docs/architecture.md,
        "torch.compile")."""
        groups = self.param_groups
        for group in groups:
            _check_lambda(group["anchor_lambda"])
        self._check_pair_lambdas()
        plan = self._current_plan()
        # A GradScaler hands a fused optimizer its scale and inf flag instead of unscaling
        # (``_step_supports_amp_scaling``); the backends unscale inside the step and write
        # nothing on an inf, as torch's fused AdamW does.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grads = plan.gradients()  # checked before anything is written
        self._check_plain_grads(plan)  # every group's plain params, before group 0 is written
        for gi, group in enumerate(groups):
            self._plain_adamw(group, plan.plain[gi])
            fp32 = [p for p in plan.plain_fp32_state[gi] if p.grad is not None]
            if fp32 and not (found_inf is not None and bool(found_inf.item() != 0)):
                for p in fp32:
                    self._eager_adamw(group, p, p.grad if grad_scale is None else p.grad / grad_scale)
        losses = plan.step(groups, grads, grad_scale, found_inf)
        total = None
        for loss in losses:
            total = loss if total is None else total + loss.to(total.device, total.dtype)
        if total is None:  # λ = 0 everywhere (or nothing trainable): R = 0, still a 0-d tensor
            like = plan.anchored[0] if plan.anchored else None
            total = torch.zeros((), dtype=math_dtype(like.dtype) if like is not None else step_dtype(),
                                device=like.device if like is not None else None)
        self._anchor_loss = total

    def _eager_adamw(self, group: dict, p: Tensor, grad: Tensor) -> None:
        """AdamW on one unanchored tensor with math-dtype moments (a λ = 0 low-precision
        factor that keeps the fp32 moments of its anchored steps)."""
        state = init_state(self.state[p], p)
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


def _plan_summary(plan: StepPlan) -> list[dict]:
    """:meth:`AsFTAdamW.describe`'s rows for ``plan``."""
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    rows = []
    for b in plan.buckets:
        row = {"backend": b.backend.name, "device": str(b.B[0].device), "dtype": name(b.B[0].dtype),
               "basis_dtype": name(b.tensors.U[0].dtype), "r": int(b.A[0].shape[0]), "k": int(b.tensors.P.shape[1]),
               "pairs": len(b), "group": b.group_B, "frozen_factor": b.tensors.train_A is not None,
               "routed_from": b.routed_from}
        if b.group_A != b.group_B:
            row["group_A"] = b.group_A
        rows.append(row)
    return rows


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
