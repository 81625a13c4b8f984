"""``AsFTAdamW``: AdamW whose step adds the gradient of the AsFT regularizer.

Algorithm (per anchored LoRA pair, docs/method.md; λ = ``anchor_lambda``)::

    R   = λ ( ⟨G, M⟩ − ⟨Pᵀ diag(w) P, M⟩ )          P = Uᵀ B,  G = Bᵀ B,  M = A Aᵀ
    g_B = grad_B + 2λ ( B M − U diag(w) P M )
    g_A = grad_A + 2λ ( G − Pᵀ diag(w) P ) A
    A, B ← AdamW(A, g_A), AdamW(B, g_B)             (exactly torch.optim.AdamW's update)

``R = λ‖(I − C) B A‖²_F`` is the published regularizer, so ``n`` steps of this optimizer
equal ``n`` steps of ``torch.optim.AdamW`` on ``task_loss + R``. ``P, G, M`` are carried
from the previous step (accumulated while the parameters are written) and recomputed
whenever a parameter's version counter shows an outside edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adam import adam as _functional_adam

from .anchor import AlignmentAnchor, AnchorBinding, AnchoredPair
from .errors import OptimizerInputError
from .integrations.distributed import ShardedPair, complete_sharded_step, local_tensor, sharded_pair
from .ops import BACKENDS, Backend, math_dtype, resolve_backend

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Stats:
    """Cached ``(P, G, M)`` of a pair with the identity/version of the params they describe."""

    P: Tensor
    G: Tensor
    M: Tensor
    tag: tuple
    gathered_A: Tensor | None = None  # all of A (r, n) when FSDP2 splits its rows, see integrations.distributed


def _param_tag(A: Tensor, B: Tensor) -> tuple:
    # a DTensor's (FSDP2) storage and version counter live on its local shard
    a, b = local_tensor(A), local_tensor(B)
    return (id(A), a._version, a.data_ptr(), A.dtype, id(B), b._version, b.data_ptr(), B.dtype)


@dataclass
class _Work:
    """One pair to update in this step (resolved from ``param_groups``)."""

    pair: AnchoredPair
    A: Tensor
    B: Tensor
    group: dict
    lam: float
    shard: ShardedPair | None = None  # local view when A, B are FSDP2 DTensors


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
    plain AdamW in the same step. ``state_dict()`` holds the same per-parameter state as
    ``torch.optim.AdamW`` (``step``, ``exp_avg``, ``exp_avg_sq``); for bf16/fp16 anchored
    parameters the moments are kept in fp32. The pairing lives in ``param_groups``
    (``anchor_pairs``: ``[key, group of A, index of A, index of B]``), so it survives
    parameter objects being swapped in place; anchor tensors are never part of the state.

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
        if anchor is not None and (amsgrad or capturable or differentiable):
            raise OptimizerInputError("amsgrad, capturable and differentiable are not supported with an anchor")
        if basis_dtype not in (None, torch.float32, torch.float64, torch.bfloat16):
            raise OptimizerInputError(f"basis_dtype must be float32, float64 or bfloat16, got {basis_dtype}")
        self._init_anchor_lambda = float(anchor_lambda)
        self._binding = anchor
        self._backend_request = backend
        self._basis_dtype = basis_dtype
        self._stats: dict[str, _Stats] = {}
        self._anchor_loss: Tensor | None = None
        self._initialized = False
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
        self.defaults["anchor_lambda"] = float(anchor_lambda)
        self._initialized = True
        self._assign_pairs()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        lam = param_group.setdefault("anchor_lambda", getattr(self, "_init_anchor_lambda", 1.0))
        _check_lambda(lam)
        param_group.setdefault("anchor_pairs", [])
        super().add_param_group(param_group)
        if getattr(self, "_initialized", False):
            self._assign_pairs()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("anchor_lambda", 1.0)
            group.setdefault("anchor_pairs", [])
        self.__dict__.setdefault("_binding", None)
        self.__dict__.setdefault("_backend_request", "auto")
        self.__dict__.setdefault("_basis_dtype", None)
        self.__dict__.setdefault("_stats", {})
        self.__dict__.setdefault("_anchor_loss", None)
        self.__dict__.setdefault("_initialized", True)

    def _assign_pairs(self) -> None:
        """Record each bound pair as positions in ``param_groups`` (group of B holds it)."""
        for group in self.param_groups:
            group["anchor_pairs"] = []
        if self._binding is None:
            return
        where = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                where[id(p)] = (gi, pi)
        for pair in self._binding:
            loc_a, loc_b = where.get(id(pair.A)), where.get(id(pair.B))
            if loc_a is None and loc_b is None:
                continue  # pair not optimized by this optimizer
            if loc_a is None or loc_b is None:
                missing = "lora_A" if loc_a is None else "lora_B"
                raise OptimizerInputError(
                    f"{pair.module_name}: {missing} is not among the optimizer's parameters; "
                    "an anchored pair must be optimized together"
                )
            ga, gb = self.param_groups[loc_a[0]], self.param_groups[loc_b[0]]
            for opt in ("lr", "betas", "eps", "weight_decay", "maximize"):
                if ga[opt] != gb[opt]:
                    raise OptimizerInputError(
                        f"{pair.module_name}: lora_A and lora_B are in param groups with different {opt!r} "
                        f"({ga[opt]} vs {gb[opt]}); an anchored pair needs one set of hyperparameters"
                    )
            gb["anchor_pairs"].append([pair.key, loc_a[0], loc_a[1], loc_b[1]])

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # Keep fp32 moments of low-precision params fp32 on load (torch would cast them).
        if (
            key != "step"
            and param.dtype in _LOW_PRECISION
            and torch.is_tensor(value)
            and value.dtype == torch.float32
        ):
            return value.to(device=param.device)
        return torch.optim.Optimizer._process_value_according_to_param_policy(
            param, value, param_id, param_groups, key
        )

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._stats.clear()
        for group in self.param_groups:
            group.setdefault("anchor_lambda", self.defaults.get("anchor_lambda", 1.0))
        self._assign_pairs()

    # ------------------------------------------------------------------ properties
    @property
    def anchor(self) -> AnchorBinding | None:
        """The :class:`AnchorBinding` in use (not part of ``state_dict``)."""
        return self._binding

    @property
    def anchor_loss(self) -> Tensor | None:
        """``R = Σ λ‖(I − C) B A‖²_F`` at the parameters before the last step (0-d tensor,
        fp32, fp64 for fp64 params), or None before the first anchored step."""
        return self._anchor_loss

    def invalidate_anchor_stats(self) -> None:
        """Forget the cached statistics; needed only after editing parameters through
        ``.data`` (which bypasses the version counters that normally detect edits)."""
        self._stats.clear()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one AdamW step with the anchoring gradient added to every anchored pair.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = self._collect_work()  # validates everything before anything is written
        anchored = {id(t) for w in work for t in (w.A, w.B)}
        for group in self.param_groups:
            self._plain_adamw(group, anchored)
        self._anchored_adamw(work)
        return loss

    def _collect_work(self) -> list[_Work]:
        work: list[_Work] = []
        if self._binding is None:
            return work
        for group in self.param_groups:
            lam = group["anchor_lambda"]
            _check_lambda(lam)
            if float(lam) == 0.0:
                continue
            for key, a_gi, a_pi, b_pi in group["anchor_pairs"]:
                if key not in self._binding:
                    raise OptimizerInputError(f"param_groups name anchor entry {key!r}, absent from the binding")
                pair = self._binding[key]
                A = self.param_groups[a_gi]["params"][a_pi]
                B = group["params"][b_pi]
                if A.grad is None and B.grad is None:
                    continue
                _validate_pair(pair, A, B)
                work.append(_Work(pair, A, B, group, float(lam), sharded_pair(pair.module_name, A, B)))
        return work

    def _plain_adamw(self, group: dict, exclude: set[int]) -> None:
        """``torch.optim.AdamW``'s own update for the group's unanchored params."""
        params = [p for p in group["params"] if id(p) not in exclude]
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

    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        md = math_dtype(p.dtype)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype()
                                         if torch.get_default_dtype() == torch.float64 else torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                if state[name].dtype != md or not state[name].is_contiguous():
                    state[name] = state[name].to(dtype=md).contiguous()
        return state

    def _statistics(self, backend: Backend, w: _Work, U: Tensor) -> _Stats:
        tag = _param_tag(w.A, w.B)
        cached = self._stats.get(w.pair.key)
        if cached is not None and cached.tag == tag:
            return cached
        if w.shard is not None:
            P, G, M, gathered_A = w.shard.statistics(backend.stats_pass, U)
            stats = _Stats(P, G, M, tag, gathered_A)
        else:
            (P,), (G,), (M,) = backend.stats_pass([U], [w.B.detach()], [w.A.detach()])
            stats = _Stats(P, G, M, tag)
        self._stats[w.pair.key] = stats
        return stats

    def _anchored_adamw(self, work: list[_Work]) -> None:
        if not work:
            return
        backends: dict[torch.device, Backend] = {}
        items = []
        for w in work:
            device, dtype = w.B.device, w.B.dtype
            md = math_dtype(dtype)
            if device not in backends:
                backends[device] = resolve_backend(self._backend_request, device)
            backend = backends[device]
            basis_dtype = self._basis_dtype if (self._basis_dtype and md != torch.float64) else md
            U = w.pair.basis(device, basis_dtype)
            stats = self._statistics(backend, w, U)
            state_a, state_b = self._state_for(w.A), self._state_for(w.B)
            state_a["step"] += 1
            state_b["step"] += 1
            grad_a = w.A.grad if w.A.grad is not None else torch.zeros_like(w.A)
            grad_b = w.B.grad if w.B.grad is not None else torch.zeros_like(w.B)
            items.append(dict(
                A=w.A, B=w.B, exp_avg_A=state_a["exp_avg"], exp_avg_sq_A=state_a["exp_avg_sq"],
                exp_avg_B=state_b["exp_avg"], exp_avg_sq_B=state_b["exp_avg_sq"],
                P=stats.P, G=stats.G, M=stats.M, grad_A=grad_a.contiguous(), grad_B=grad_b.contiguous(), U=U,
                step_A=float(state_a["step"]), step_B=float(state_b["step"]),
                stats=stats, work=w, backend=backend, weights=w.pair.weights(device, md),
                lam=w.lam * w.pair.coef,
            ))
        total = _anchoring_terms(items)
        # batches share a backend, device, param dtype and group (one set of hyperparameters)
        batches: dict[tuple, list] = {}
        for it in items:
            w = it["work"]
            if w.shard is not None:
                it = w.shard.localize(it, it["stats"].gathered_A)
            batches.setdefault((it["backend"].name, w.B.device, w.B.dtype, id(w.group)), []).append(
                (it["backend"], w, it))
        for items in batches.values():
            backend, w0, _ = items[0]
            group = w0.group
            beta1, beta2 = group["betas"]
            cols = {k: [it[k] for _, _, it in items] for k in _KERNEL_ARGS}
            # grad scaling by GradScaler happens before step(); found_inf skips step() entirely
            backend.fused_step(
                cols["A"], cols["B"], cols["exp_avg_A"], cols["exp_avg_sq_A"], cols["exp_avg_B"],
                cols["exp_avg_sq_B"], cols["P"], cols["G"], cols["M"], cols["grad_A"], cols["grad_B"],
                cols["U"], cols["Q_B"], cols["R_B"], cols["H"], cols["step_A"], cols["step_B"],
                float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), bool(group["maximize"]),
            )
            sharded = [(w.shard, it["stats"]) for _, w, it in items if w.shard is not None]
            if sharded:  # FSDP2: the backend wrote local shards and partial sums; complete them
                shards, stats = zip(*sharded)
                gathered = complete_sharded_step(shards, [s.P for s in stats], [s.G for s in stats],
                                                 [s.M for s in stats])
                for st, a_full in zip(stats, gathered):
                    st.gathered_A = a_full
            for _, w, it in items:
                it["stats"].tag = _param_tag(w.A, w.B)
        self._anchor_loss = total.detach()


_KERNEL_ARGS = ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B", "P", "G", "M", "grad_A",
                "grad_B", "U", "Q_B", "R_B", "H", "step_A", "step_B")


def _anchoring_terms(items: list[dict]) -> Tensor:
    """Fill ``Q_B``, ``R_B``, ``H`` of every item and return ``R`` summed over the items.

    Pairs with the same (k, r, dtype, device) are computed together as batched matmuls::

        Pw = diag(w) P            (k, r)      H   = 2λ (G − Pᵀ Pw)      (r, r)
        Q_B = 2λ M                (r, r)      R_B = 2λ Pw M            (k, r)
        R = λ ⟨G − Pᵀ Pw, M⟩ = ½ ⟨H, M⟩
    """
    buckets: dict[tuple, list[dict]] = {}
    for it in items:
        P = it["P"]
        buckets.setdefault((tuple(P.shape), P.dtype, P.device), []).append(it)
    total = None
    for (_, dtype, device), bucket in buckets.items():
        lams = [it["lam"] for it in bucket]
        if len(bucket) == 1:  # no stacking: views with a leading batch dimension of 1
            it = bucket[0]
            P, G, M, w = it["P"][None], it["G"][None], it["M"][None], it["weights"][None]
        else:
            P = torch.stack([it["P"] for it in bucket])  # (L, k, r)
            G = torch.stack([it["G"] for it in bucket])  # (L, r, r)
            M = torch.stack([it["M"] for it in bucket])
            w = torch.stack([it["weights"] for it in bucket])  # (L, k)
        if all(lam == lams[0] for lam in lams):
            two_lam = 2.0 * lams[0]  # a Python scalar: no tensor op
        else:
            two_lam = torch.tensor(lams, dtype=dtype, device=device)[:, None, None] * 2.0
        Pw = w[:, :, None] * P
        H = (G - P.mT @ Pw) * two_lam
        Q_B = M * two_lam
        R_B = (Pw * two_lam) @ M
        loss = (H * M).sum() * 0.5
        total = loss if total is None else total + loss.to(total.device, total.dtype)
        for j, it in enumerate(bucket):
            it["Q_B"], it["R_B"], it["H"] = Q_B[j], R_B[j], H[j]
    return total


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
        if g is not None:
            if g.is_sparse:
                raise OptimizerInputError(f"{name}: sparse gradient for {label} is not supported")
            if g.shape != t.shape or g.dtype != t.dtype or g.device != t.device:
                raise OptimizerInputError(
                    f"{name}: {label} grad is {tuple(g.shape)} {g.dtype} on {g.device}, "
                    f"parameter is {tuple(t.shape)} {t.dtype} on {t.device}"
                )
