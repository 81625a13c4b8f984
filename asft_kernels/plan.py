"""The step plan of :class:`asft_kernels.AsFTAdamW`: buckets, their prepared backend handles,
the step counters, the statistics refresh and the rules that invalidate it all.

Symbols (docs/method.md), per anchored pair: ``A`` (r, n), ``B`` (m, r), ``U`` (m, k),
``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r), ``M = A Aᵀ`` (r, r), ``w = 2c − c²`` (k,).

The pairs named in ``param_groups`` are resolved, validated and bucketed once
(:func:`build_plan`); each bucket gets one handle from its backend's ``prepare``
(contract: :mod:`asft_kernels.ops`), and each step calls its backend's ``step`` once. The
plan is the only owner of handles: a rebuild (:meth:`StepPlan.still_valid` says when) makes
new ones and drops the old. The step counters of every anchored factor live in the plan's
buffers (one per device kind): ``state["step"]`` is a 0-d view of them, and only a
backend's ``step`` advances them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .anchor import AnchoredPair
from .errors import OptimizerInputError
from .ops import (
    BATCH_FIELDS,
    EAGER,
    AdamWHyper,
    AnchoredBatch,
    Backend,
    BucketTensors,
    math_dtype,
    resolve_backend,
    route,
)
from .ops import eager as eager_ops
from .sharding import ShardedPair, complete_sharded_step, local_tensor, sharded_pair

_SUPPORTED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
MOMENTS = ("exp_avg", "exp_avg_sq")

# C-level getters: one pass over a list of tensors without a Python frame per tensor
_version = operator.attrgetter("_version")
_grad = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")
_is_none = partial(operator.is_, None)


def step_dtype() -> torch.dtype:
    """The dtype of step counters: fp64 under a float64 default dtype, else fp32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def hyper_of(group: dict) -> AdamWHyper:
    """The AdamW hyperparameters of a param group."""
    beta1, beta2 = group["betas"]
    return AdamWHyper(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                      float(group["weight_decay"]), bool(group["maximize"]))


def init_state(state: dict, p: Tensor) -> dict:
    """``state`` of an anchored factor ``p``, created (zero moments in the math dtype, step 0)
    or normalized (step a CPU fp32/fp64 tensor, moments in the math dtype, contiguous)."""
    md = math_dtype(p.dtype)
    if len(state) == 0:
        state["step"] = torch.tensor(0.0, dtype=step_dtype())
        state["exp_avg"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=md, memory_format=torch.contiguous_format)
    else:
        step = state["step"]
        if not torch.is_tensor(step):
            state["step"] = torch.tensor(float(step), dtype=step_dtype())
        elif step.device.type != "cpu" or step.dtype not in (torch.float32, torch.float64):
            state["step"] = step.detach().to("cpu", step_dtype())
        for name in MOMENTS:
            if state[name].dtype != md or not state[name].is_contiguous():
                state[name] = state[name].to(dtype=md).contiguous()
    return state


# ----------------------------------------------------------------------------- buckets
@dataclass
class Bucket:
    """Anchored pairs stepped together by one backend call: one backend, device, parameter
    dtype, basis dtype, rank r, basis size k, param group of B (whose λ is the pairs') and
    param group of A (each factor steps with its own group's hyperparameters).

    ``tensors`` holds the stacked statistics ``P`` (L, k, r), ``G``, ``M`` (L, r, r) and
    weights ``w`` (L, k, 1); ``coef`` (L,) the per-pair λ multiplier and ``scale`` (L,) =
    2λ·coef for the λ it was last computed for; ``counters`` (2L,) A's step counters, then
    B's (a slice of the plan's buffer); ``handle`` what the backend's ``prepare`` returned.
    """

    backend: Backend
    group_B: int
    group_A: int
    pairs: list[AnchoredPair]
    A: list[Tensor]
    B: list[Tensor]
    tensors: BucketTensors
    coef: Tensor
    scale: Tensor
    watch: list[Tensor]  # tensors whose storage/version reveal outside edits (local shards)
    zeros_A: dict[int, Tensor]  # pairs whose A has no grad: zeros are passed
    zeros_B: dict[int, Tensor]
    counters: Tensor | None = None
    handle: object = None
    lam: float | None = None  # the λ that `scale` holds
    shards: list[ShardedPair] | None = None  # FSDP2 DTensor pairs (asft_kernels.sharding)
    gathered_A: list[Tensor | None] = field(default_factory=list)
    versions: list[int] | None = None  # None: statistics must be recomputed
    routed_from: str | None = None  # the backend that does not support these pairs (eager runs them)

    def __len__(self) -> int:
        return len(self.pairs)

    def current_versions(self) -> list[int]:
        """Version counters of A then B of every pair (of the local shards for DTensors,
        whose local tensors are looked up again: FSDP2 may replace them)."""
        watch = self.watch if self.shards is None else [local_tensor(t) for t in self.A + self.B]
        return list(map(_version, watch))

    def grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """The task gradients (zeros where the plan saw none), checked for layout (a sparse
        one raises :class:`OptimizerInputError`; a strided one is copied contiguous)."""
        grad_A = list(map(_grad, self.A))
        grad_B = list(map(_grad, self.B))
        for j, z in self.zeros_A.items():
            grad_A[j] = z
        for j, z in self.zeros_B.items():
            grad_B[j] = z
        if self.shards is not None:
            return grad_A, grad_B
        # autograd and the .grad setter guarantee shape, dtype and device; check the layout
        # (a sparse tensor is not contiguous: the loop below names it)
        for grads, label in ((grad_A, "lora_A"), (grad_B, "lora_B")):
            if not all(map(Tensor.is_contiguous, grads)):
                for j, g in enumerate(grads):
                    if g.is_sparse:
                        raise OptimizerInputError(
                            f"{self.pairs[j].module_name}: sparse gradient for {label} is not supported")
                    grads[j] = g.contiguous()
        return grad_A, grad_B

    def refresh_statistics(self) -> None:
        """Recompute ``P, G, M`` of the pairs edited outside the optimizer (or all, first)."""
        now = self.current_versions()
        if now == self.versions:
            return
        L = len(self)
        old = self.versions
        stale = list(range(L)) if old is None else \
            [j for j in range(L) if now[j] != old[j] or now[L + j] != old[L + j]]
        t = self.tensors
        if self.shards is None:
            P, G, M = self.backend.stats_pass([t.U[j] for j in stale], [self.B[j].detach() for j in stale],
                                              [self.A[j].detach() for j in stale])
            for i, j in enumerate(stale):
                t.P[j].copy_(P[i])
                t.G[j].copy_(G[i])
                t.M[j].copy_(M[i])
        else:
            for j in stale:
                P, G, M, gathered = self.shards[j].statistics(self.backend.stats_pass, t.U[j])
                t.P[j].copy_(P)
                t.G[j].copy_(G)
                t.M[j].copy_(M)
                self.gathered_A[j] = gathered
        self.versions = now

    def scale_for(self, lam: float) -> Tensor:
        """``scale`` = 2λ·coef (L,), recomputed only when λ changed."""
        if lam != self.lam:
            torch.mul(self.coef, 2.0 * lam, out=self.scale)
            self.lam = lam
        return self.scale

    def step(self, grads: tuple[list[Tensor], list[Tensor]], lam: float, hyper_A: AdamWHyper, hyper_B: AdamWHyper,
             grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
        """The bucket's step: one backend ``step`` call (FSDP2 shards: the eager terms, the
        backend's fused update on the local shards, then the collectives). Returns R."""
        step = self.backend.step if self.shards is None else eager_ops.step  # shards: see _prepare
        loss = step(self.handle, grads[0], grads[1], self.scale_for(lam), hyper_A, hyper_B, grad_scale, found_inf)
        self.versions = self.current_versions()
        return loss

    def sharded_fused_step(self, batch: AnchoredBatch, hyper_A: AdamWHyper, hyper_B: AdamWHyper) -> None:
        """FSDP2: the fused update of ``batch`` (the bucket's per-pair views, gradients set) on
        the local shards by the backend, then the collectives that complete the partial
        statistics (:mod:`asft_kernels.sharding`)."""
        local = [shard.localize({name: getattr(batch, name)[j] for name in BATCH_FIELDS}, self.gathered_A[j])
                 for j, shard in enumerate(self.shards)]
        self.backend.fused_step(AnchoredBatch(*([it[name] for it in local] for name in BATCH_FIELDS)), hyper_A,
                                hyper_B)
        self.gathered_A = list(complete_sharded_step(self.shards, batch.P, batch.G, batch.M))


# ----------------------------------------------------------------------------- the plan
@dataclass
class StepPlan:
    """Everything a step needs that does not change from one step to the next.

    Valid while: no param group was added or loaded (``generation``), the param objects in
    ``param_groups`` are the same (accelerate/FSDP2 swaps), their storage is the same
    (``model.half()``, ``.to()``), ``requires_grad`` and the presence of gradients of
    anchored params are unchanged, λ has not moved to or from 0, and no anchored factor
    was parametrized since (``torch.nn.utils.parametrize`` changes the class of the module
    holding it; the rebuild then refuses the factor).
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
    buckets: list[Bucket]
    plain: list[list[Tensor]]  # per group: params stepped by torch's AdamW
    plain_fp32_state: list[list[Tensor]]  # per group: λ = 0 low-precision factors with fp32 moments
    counters: list[Tensor]  # the buffers every bucket's counters are slices of
    holders: list  # the modules holding the anchored factors (AnchoredPair.factor_holders)
    holder_types: tuple

    def still_valid(self, opt) -> bool:
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
            list(map(Tensor.data_ptr, watch)) == self.ptrs
            and tuple(map(_requires_grad, self.anchored)) == self.requires_grad
            and tuple(map(_is_none, map(_grad, self.anchored))) == self.grad_missing
            and tuple(map(type, self.holders)) == self.holder_types
        )

    def invalidate_statistics(self) -> None:
        for bucket in self.buckets:
            bucket.versions = None

    def gradients(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Every bucket's task gradients, checked (raises before anything is written)."""
        return [b.grads() for b in self.buckets]

    def step(self, groups: list[dict], grads: list[tuple[list[Tensor], list[Tensor]]], grad_scale: Tensor | None,
             found_inf: Tensor | None) -> list[Tensor]:
        """Every bucket's step with its ``grads`` (from :meth:`gradients`): the statistics
        refreshed where parameters were edited outside the optimizer, then one backend call
        per bucket. Returns each bucket's R."""
        for bucket in self.buckets:
            bucket.refresh_statistics()
        losses = []
        for bucket, g in zip(self.buckets, grads):
            hyper_B = hyper_of(groups[bucket.group_B])
            hyper_A = hyper_B if bucket.group_A == bucket.group_B else hyper_of(groups[bucket.group_A])
            lam = float(groups[bucket.group_B]["anchor_lambda"])
            losses.append(bucket.step(g, lam, hyper_A, hyper_B, grad_scale, found_inf))
        return losses


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


def build_plan(opt) -> StepPlan:
    """Resolve, validate and bucket the anchored pairs of optimizer ``opt`` (an
    :class:`~asft_kernels.AsFTAdamW`); create missing state; prepare one backend handle per
    bucket. Writes no parameter; raises :class:`OptimizerInputError` on anything the step
    cannot run."""
    binding = opt._binding
    groups = opt.param_groups
    anchored_ids: set[int] = set()
    anchored: list[Tensor] = []
    holders: list = []
    specs: dict[tuple, dict] = {}
    backends: dict[torch.device, Backend] = {}
    lam_zero = [float(g["anchor_lambda"]) == 0.0 for g in groups]
    sharded_any = False
    for gi, group in enumerate(groups):
        for key, a_gi, a_pi, b_pi in group["anchor_pairs"]:
            if key not in binding:
                raise OptimizerInputError(f"param_groups name anchor entry {key!r}, absent from the binding")
            pair = binding[key]
            A = groups[a_gi]["params"][a_pi]
            B = group["params"][b_pi]
            anchored.extend((A, B))
            holders.extend(holder for holder, _ in pair.factor_holders())
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
            basis_dtype = opt._basis_dtype if (opt._basis_dtype and md != torch.float64) else md
            frozen = train_A != train_B
            routed = None
            if frozen:
                if shard is not None:
                    raise OptimizerInputError(
                        f"{pair.module_name}: a frozen lora factor is not supported with FSDP2-sharded pairs")
                backend = EAGER  # the one backend that steps a pair with a frozen factor
            else:
                if device not in backends:
                    backends[device] = resolve_backend(opt._backend_request, device)
                backend = route(backends[device], dtype, int(A.shape[0]))
                routed = backends[device].name if backend is not backends[device] else None
            k = pair.entry.rank
            bkey = (backend.name, device, dtype, basis_dtype, int(A.shape[0]), k, gi, a_gi, shard is not None, frozen)
            specs.setdefault(bkey, {"backend": backend, "groups": (gi, a_gi), "frozen": frozen, "items": [],
                                    "routed": routed})[
                "items"].append((pair, A, B, shard, basis_dtype, md, train_A, train_B))
    # ---- every check passed: create state, buffers, counters and handles
    made = [_make_bucket(opt, spec) for spec in specs.values()]
    buckets = [bucket for bucket, _ in made]
    counters = _gather_counters([states for _, states in made], buckets)
    for bucket in buckets:
        _prepare(bucket)
    plain, plain_fp32 = [], []
    for group in groups:
        ps, fp32 = [], []
        for p in group["params"]:
            if id(p) in anchored_ids:
                continue
            st = opt.state.get(p)
            if st and p.dtype in LOW_PRECISION and st.get("exp_avg") is not None \
                    and st["exp_avg"].dtype == torch.float32:
                fp32.append(p)  # a λ = 0 factor that keeps the fp32 moments of anchored steps
            else:
                ps.append(p)
        plain.append(ps)
        plain_fp32.append(fp32)
    watch = [local_tensor(t) for t in anchored]
    return StepPlan(
        generation=opt._generation,
        group_params=[list(g["params"]) for g in groups],
        lam_zero=lam_zero,
        anchored=anchored,
        watch=watch,
        ptrs=list(map(Tensor.data_ptr, watch)),
        requires_grad=tuple(map(_requires_grad, anchored)),
        grad_missing=tuple(map(_is_none, map(_grad, anchored))),
        sharded=sharded_any,
        buckets=buckets,
        plain=plain,
        plain_fp32_state=plain_fp32,
        counters=counters,
        holders=holders,
        holder_types=tuple(map(type, holders)),
    )


def _make_bucket(opt, spec: dict) -> tuple[Bucket, list[dict | None]]:
    """The bucket of ``spec`` and its factors' states (A's then B's; None for a frozen factor)."""
    items = spec["items"]
    pairs = [it[0] for it in items]
    As = [it[1] for it in items]
    Bs = [it[2] for it in items]
    shards = [it[3] for it in items]
    basis_dtype, md = items[0][4], items[0][5]
    train_A = [it[6] for it in items]
    train_B = [it[7] for it in items]
    device = Bs[0].device
    L, r, k = len(items), int(As[0].shape[0]), pairs[0].entry.rank
    states_A = [init_state(opt.state[a], a) if t else None for a, t in zip(As, train_A)]
    states_B = [init_state(opt.state[b], b) if t else None for b, t in zip(Bs, train_B)]
    stats = dict(device=device, dtype=md)
    tensors = BucketTensors(
        A=As, B=Bs,
        exp_avg_A=[s and s["exp_avg"] for s in states_A], exp_avg_sq_A=[s and s["exp_avg_sq"] for s in states_A],
        exp_avg_B=[s and s["exp_avg"] for s in states_B], exp_avg_sq_B=[s and s["exp_avg_sq"] for s in states_B],
        U=[p.basis(device, basis_dtype) for p in pairs],
        P=torch.zeros((L, k, r), **stats), G=torch.zeros((L, r, r), **stats), M=torch.zeros((L, r, r), **stats),
        w=torch.stack([p.weights(device, md) for p in pairs])[:, :, None],
        train_A=train_A if spec["frozen"] else None, train_B=train_B if spec["frozen"] else None,
    )
    coef = torch.tensor([float(p.coef) for p in pairs], **stats)
    sharded = any(s is not None for s in shards)
    bucket = Bucket(
        backend=spec["backend"], group_B=spec["groups"][0], group_A=spec["groups"][1], pairs=pairs, A=As, B=Bs,
        tensors=tensors, coef=coef, scale=torch.empty_like(coef), watch=[local_tensor(t) for t in As + Bs],
        zeros_A={j: torch.zeros_like(a) for j, a in enumerate(As) if a.grad is None},
        zeros_B={j: torch.zeros_like(b) for j, b in enumerate(Bs) if b.grad is None},
        shards=shards if sharded else None, gathered_A=[None] * L, routed_from=spec["routed"],
    )
    return bucket, states_A + states_B


def _gather_counters(states_of: list[list[dict | None]], buckets: list[Bucket]) -> list[Tensor]:
    """One counter buffer per device the counters live on (the CPU, or the parameters'
    device for a backend with ``device_counters``): each bucket's counters a contiguous
    (2L,) slice, A's then B's, and each trained factor's ``state["step"]`` replaced by its
    0-d view (``state_dict()`` keeps a 0-d ``step`` per parameter, as AdamW's does). A
    frozen factor's slot is a placeholder no state refers to."""
    by_device: dict[torch.device, list[tuple[Bucket, list[dict | None]]]] = {}
    for bucket, states in zip(buckets, states_of):
        where = bucket.B[0].device if bucket.backend.device_counters else torch.device("cpu")
        by_device.setdefault(where, []).append((bucket, states))
    buffers = []
    for device, members in by_device.items():
        states = [st for _, member_states in members for st in member_states]
        zero = torch.zeros((), dtype=step_dtype())
        values = [zero if st is None else st["step"].reshape(()).to("cpu", step_dtype()) for st in states]
        buffer = torch.stack(values).to(device)
        for st, view in zip(states, buffer.unbind(0)):
            if st is not None:
                st["step"] = view
        off = 0
        for b, _ in members:
            b.counters = buffer[off:off + 2 * len(b)]
            off += 2 * len(b)
        buffers.append(buffer)
    return buffers


def _prepare(bucket: Bucket) -> None:
    """The bucket's handle from its backend (for FSDP2 shards an eager handle whose fused
    update is :meth:`Bucket.sharded_fused_step`)."""
    if bucket.shards is not None:  # the eager step (terms, inf skip, unscaling, counters) around the shards' update
        bucket.handle = eager_ops.prepare(bucket.tensors, bucket.counters, fused=bucket.sharded_fused_step)
    else:
        bucket.handle = bucket.backend.prepare(bucket.tensors, bucket.counters)
