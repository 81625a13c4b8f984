"""Eager backend: the low-rank anchored AdamW step in plain torch.

Implements the contract of :mod:`asft_kernels.ops.schema` with ordinary torch ops over
the lists of a bucket's pairs: ``torch._foreach_*`` ops for the elementwise work and the
per-pair matmuls (``torch._foreach_mm``), batched matmuls for the stacked terms, so that a
step dispatches a constant number of torch ops per bucket (fp32/fp64 parameters; a
bucket of bf16/fp16 parameters adds its per-pair conversions to the math dtype). It is the
default implementation of the ``asft::`` ops on every device, the fallback when no
compiled backend is available, and the readable version of what the fused kernels do.
Nothing of size ``m × n`` or ``m × m`` is ever created.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .schema import AdamWHyper, AnchoredBatch, BucketTensors


def _math(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_FOREACH_MM = getattr(torch, "_foreach_mm", None)  # torch ≥ 2.13


def mm_each(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """``[x @ y for x, y in zip(xs, ys)]`` as new tensors, any shapes: one
    ``torch._foreach_mm`` op for CPU tensors where torch has it, else one ``torch.mm`` per
    product (on CUDA, torch sends fp32 ``_foreach_mm`` through a grouped-GEMM path whose
    precision has not been checked against ``torch.mm`` here, so the eager pairs routed there
    keep ``torch.mm``)."""
    if not xs:
        return []
    if _FOREACH_MM is not None and xs[0].device.type == "cpu":
        return _FOREACH_MM(xs, ys)
    return [torch.mm(x, y) for x, y in zip(xs, ys)]


def _in_dtype(ts: list[Tensor], dt: torch.dtype) -> list[Tensor]:
    """The tensors of ``ts`` (a list of one dtype) in ``dt``: ``ts`` itself when they are
    already (no per-tensor call), else converted copies."""
    if not ts or ts[0].dtype == dt:
        return ts
    return [t.to(dt) for t in ts]


def stats_pass(
    U: Sequence[Tensor], B: Sequence[Tensor], A: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Statistics of each pair from the stored parameters.

    Args:
        U: per pair (m, k) basis. B: per pair (m, r). A: per pair (r, n).

    Returns:
        ``(P, G, M)`` lists with ``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r),
        ``M = A Aᵀ`` (r, r), in the math dtype (fp64 for fp64 params, else fp32).
    """
    Ps, Gs, Ms = [], [], []
    for u, b, a in zip(U, B, A):
        dt = _math(b)
        bm = b.to(dt)
        am = a.to(dt)
        Ps.append(u.to(dt).T @ bm)
        Gs.append(bm.T @ bm)
        Ms.append(am @ am.T)
    return Ps, Gs, Ms


def adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    work: list[Tensor] | None = None,
) -> list[Tensor]:
    """AdamW on lists of tensors of one dtype, in the math dtype of the moments, written
    back into ``params``; ``grads`` are in the math dtype, ``steps`` already incremented.
    ``work``: fresh math-dtype copies of low-precision ``params`` to update (made here if
    not given; unused when the parameters are in the math dtype already).

    Mirrors ``torch.optim.AdamW``'s foreach implementation (decoupled weight decay)
    operation by operation. Returns the values as stored (rounded to the parameter dtype),
    in the math dtype, for the statistics: ``params`` themselves, or ``work`` overwritten
    with them.
    """
    dt = exp_avgs[0].dtype
    same = params[0].dtype == dt
    if same:
        work = params
    elif work is None:
        work = [t.to(dt) for t in params]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if len(set(steps)) == 1:  # every factor at the same step (the usual case): two numbers, not two lists
        step_size, bias_correction2_sqrt = -(lr / (1 - beta1**steps[0])), math.sqrt(1 - beta2**steps[0])
    else:
        step_size = [-(lr / (1 - beta1**t)) for t in steps]
        bias_correction2_sqrt = [math.sqrt(1 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_size)
    if same:
        return params
    torch._foreach_copy_(params, work)
    torch._foreach_copy_(work, params)  # the stored (rounded) values, exactly, in the math dtype
    return work


def anchoring_terms(
    P: Tensor, G: Tensor, M: Tensor, w: Tensor, two_lam: float | Tensor,
    Q_B: Tensor, R_B: Tensor, H: Tensor,
) -> Tensor:
    """The r×r / k×r terms of the anchoring gradient for a bucket, as batched matmuls::

        Pw  = diag(w) P              (L, k, r)
        H   = 2λ (G − Pᵀ Pw)         (L, r, r)      g_A = grad_A + H A
        Q_B = 2λ M                   (L, r, r)      g_B = grad_B + B Q_B − U R_B
        R_B = 2λ Pw M                (L, k, r)
        R   = λ ⟨G − Pᵀ Pw, M⟩ = ½ Σ_j ⟨H_j, M_j⟩

    The eager math of ``asft::anchoring_terms_`` (:mod:`asft_kernels.ops.schema`) and the
    ``terms`` of the eager and triton backends.

    Args:
        P: (L, k, r), G: (L, r, r), M: (L, r, r) statistics in the math dtype.
        w: (L, k, 1) per-direction weights ``w = 2c − c²``.
        two_lam: 2λ, a Python number or an (L, 1, 1) tensor (per-pair λ·coef).
        Q_B, R_B, H: preallocated outputs of the shapes above, written in place.

    Returns:
        ``R`` summed over the bucket, a 0-d tensor in the math dtype.
    """
    Pw = P * w
    torch.baddbmm(G, P.mT, Pw, beta=1.0, alpha=-1.0, out=H)
    H.mul_(two_lam)
    torch.mul(M, two_lam, out=Q_B)
    torch.bmm(Pw, Q_B, out=R_B)
    return torch.vdot(H.reshape(-1), M.reshape(-1)) * 0.5


def anchoring_terms_op(
    P: Tensor, G: Tensor, M: Tensor, w: Tensor, coef: Tensor | None, two_lam: float,
    Q_B: Tensor, R_B: Tensor, H: Tensor,
) -> Tensor:
    """``asft::anchoring_terms_`` in the op's argument order: :func:`anchoring_terms` with
    ``2λ = two_lam · coef`` (``coef`` None or (L, 1, 1))."""
    scale = two_lam if coef is None else coef if two_lam == 1.0 else coef * two_lam
    return anchoring_terms(P, G, M, w, scale, Q_B, R_B, H)


@dataclass
class Handle:
    """A bucket prepared for :func:`step`: its tensors, its counters, the stacked terms
    ``Q_B`` (L, r, r), ``R_B`` (L, k, r), ``H`` (L, r, r), the :class:`AnchoredBatch` of the
    fused update (per-pair views of all of them; the gradients are set per step) and the
    fused update that runs it (this module's, or a compiled backend's ``fused_step``).
    ``train``: None, or the pairs whose A and whose B are written (frozen factors)."""

    bucket: BucketTensors
    counters: Tensor
    Q_B: Tensor
    R_B: Tensor
    H: Tensor
    batch: AnchoredBatch
    fused: Callable
    train: tuple[list[int], list[int]] | None
    scale_views: tuple = (None, None)  # (scale, its (L, 1, 1) view) of the last step


class Views(NamedTuple):
    """Views :func:`fused_step` would otherwise make every step, made once by :func:`prepare`:
    ``U`` (m, k) and ``UT`` = Uᵀ in the math dtype; ``BT`` = Bᵀ, ``AT`` = Aᵀ of parameters
    stored in the math dtype (None otherwise); ``stats`` the bucket's stacked ``P`` (L, k, r),
    ``G``, ``M`` (L, r, r) that the batch's per-pair statistics are views of. Bᵀ and Aᵀ are
    views of detached aliases: they follow the in-place updates of the parameters and are no
    autograd views of them (those would be refused once grad mode is back on)."""

    U: list[Tensor]
    UT: list[Tensor]
    BT: list[Tensor] | None
    AT: list[Tensor] | None
    stats: tuple[Tensor, Tensor, Tensor]


def _views(bucket: BucketTensors) -> Views:
    dt = bucket.P.dtype
    same = bucket.B[0].dtype == dt
    U = _in_dtype(bucket.U, dt)
    return Views(U, [u.T for u in U], [b.detach().T for b in bucket.B] if same else None,
                 [a.detach().T for a in bucket.A] if same else None, (bucket.P, bucket.G, bucket.M))


def prepare(bucket: BucketTensors, counters: Tensor, fused: Callable | None = None) -> Handle:
    """A :class:`Handle` for ``bucket`` (contract: :mod:`asft_kernels.ops`).

    Args:
        bucket: the bucket's tensors (frozen factors allowed: ``train_A``/``train_B``).
        counters: (2L,) the bucket's step counters, A's then B's (a view of the plan's buffer).
        fused: the fused update ``fused(batch, hyper_A, hyper_B)`` (default: :func:`fused_step`;
            a compiled backend without a ``prepare`` of its own passes its ``fused_step``).
    """
    L = len(bucket)
    batch, Q_B, R_B, H = bucket.as_batch(counters)
    if fused is None:  # this module's update, with the views it needs made once
        fused = partial(fused_step, views=_views(bucket))
    train = None
    if bucket.train_A is not None or bucket.train_B is not None:
        train_A = bucket.train_A if bucket.train_A is not None else [True] * L
        train_B = bucket.train_B if bucket.train_B is not None else [True] * L
        train = ([j for j in range(L) if train_A[j]], [j for j in range(L) if train_B[j]])
    return Handle(bucket, counters, Q_B, R_B, H, batch, fused, train)


def step(handle: Handle, grad_A: list[Tensor], grad_B: list[Tensor], scale: Tensor, hyper_A: AdamWHyper,
         hyper_B: AdamWHyper, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Tensor:
    """One anchored AdamW step of a prepared bucket (contract: :mod:`asft_kernels.ops`): the
    anchoring terms of every pair from the cached statistics (one batched computation,
    ``2λ = scale[j]``), then, unless ``found_inf`` is nonzero, the counters advanced by one
    and the fused update (A with ``hyper_A``, B with ``hyper_B``, task gradients divided by
    ``grad_scale`` into new tensors). Frozen factors are never written.

    Args:
        grad_A: per pair (r, n), grad_B: per pair (m, r) task gradients (parameter dtype).
        scale: (L,) ``2λ·coef`` per pair, math dtype.

    Returns:
        ``R`` summed over the bucket at the statistics before the step (0-d, math dtype).
    """
    b = handle.bucket
    if handle.scale_views[0] is not scale:  # the plan hands the same (L,) tensor every step
        handle.scale_views = (scale, scale.view(-1, 1, 1))
    loss = anchoring_terms(b.P, b.G, b.M, b.w, handle.scale_views[1], handle.Q_B, handle.R_B, handle.H)
    if found_inf is not None and bool(found_inf.item() != 0):
        return loss
    if grad_scale is not None:
        grad_A, grad_B = torch._foreach_div(grad_A, grad_scale), torch._foreach_div(grad_B, grad_scale)
    handle.counters.add_(1)
    batch = handle.batch
    batch.grad_A, batch.grad_B = grad_A, grad_B
    if handle.train is None:
        handle.fused(batch, hyper_A, hyper_B)
    else:
        _frozen_factor_step(batch, *handle.train, hyper_A, hyper_B)
    return loss


def _frozen_factor_step(batch: AnchoredBatch, train_A: list[int], train_B: list[int], hyper_A: AdamWHyper,
                        hyper_B: AdamWHyper) -> None:
    """The fused update of :func:`fused_step` for pairs with a frozen factor: only the pairs
    in ``train_A`` write A and only those in ``train_B`` write B (the gradient of task + R
    with the other factor held constant); the statistics of every pair are recomputed."""
    b = batch
    dt = b.P[0].dtype
    steps = torch.stack(list(b.step_A) + list(b.step_B)).tolist()
    L = len(b)
    B_old, A_old = _in_dtype(b.B, dt), _in_dtype(b.A, dt)  # a bucket has one parameter dtype
    U = _in_dtype(b.U, dt)

    def pick(xs: list, idx: list[int]) -> list:
        return [xs[j] for j in idx]

    grads = _anchoring_gradients(pick(B_old, train_B), pick(b.Q_B, train_B), pick(U, train_B),
                                 pick(b.R_B, train_B), pick(b.grad_B, train_B),
                                 pick(A_old, train_A), pick(b.H, train_A), pick(b.grad_A, train_A))
    g_B, g_A = grads[:len(train_B)], grads[len(train_B):]
    for hyper, idx, g, is_a in ((hyper_B, train_B, g_B, False), (hyper_A, train_A, g_A, True)):
        if not idx:
            continue
        if hyper.maximize:
            torch._foreach_neg_(g)
        params = pick(b.A if is_a else b.B, idx)
        m = pick(b.exp_avg_A if is_a else b.exp_avg_B, idx)
        v = pick(b.exp_avg_sq_A if is_a else b.exp_avg_sq_B, idx)
        t = [steps[j if is_a else L + j] for j in idx]
        # B_old/A_old: the parameters themselves, or their copies, left holding the stored values
        adamw_foreach_(params, g, m, v, t, *hyper.op_args()[:5], work=pick(A_old if is_a else B_old, idx))
    _write_statistics(b, B_old, A_old, [u.T for u in U])


def anchored_step_op(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, grad_A, grad_B, U, w, scale,
                     counters, *rest) -> Tensor:
    """``asft::anchored_adamw_step_`` (:mod:`asft_kernels.ops.schema`) in torch ops:
    :func:`prepare` and :func:`step` of the bucket the op's arguments describe."""
    hyper_A, hyper_B, (grad_scale, found_inf) = AdamWHyper(*rest[:6]), AdamWHyper(*rest[6:12]), rest[12:14]
    handle = prepare(BucketTensors(list(A), list(B), list(exp_avg_A), list(exp_avg_sq_A), list(exp_avg_B),
                                   list(exp_avg_sq_B), list(U), P, G, M, w), counters)
    return step(handle, list(grad_A), list(grad_B), scale, hyper_A, hyper_B, grad_scale, found_inf)


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Every float dtype and rank: the eager backend runs any pair (the routing fallback)."""
    return True


def fused_step(batch: AnchoredBatch, hyper_A: AdamWHyper, hyper_B: AdamWHyper | None = None, *,
               views: Views | None = None) -> None:
    """Anchored AdamW step for a batch of pairs (contract: :mod:`asft_kernels.ops.schema`).

    Per pair ``j``: A (r, n), B (m, r) and their moments are updated in place, and
    ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) receive the statistics of the stored values.
    The AdamW update runs as ``torch.optim.AdamW``'s foreach implementation does, over every
    factor of the batch at once (A with ``hyper_A``, B with ``hyper_B``, default: ``hyper_A``;
    one foreach pass when they are equal); the anchoring products are foreach matmuls
    (:func:`mm_each`) over the batch's lists. ``views``: the :class:`Views` of the batch's
    tensors made once by :func:`prepare` (made here when None).
    """
    hyper_B = hyper_A if hyper_B is None else hyper_B
    if len(batch) == 0:
        return
    dtypes = {b.dtype for b in batch.B}
    if len(dtypes) > 1:  # one math dtype per foreach call
        for dtype in dtypes:
            fused_step(batch.select([j for j, b in enumerate(batch.B) if b.dtype == dtype]), hyper_A, hyper_B)
        return
    b = batch
    L = len(b)
    dt = b.exp_avg_B[0].dtype
    # the factors in the math dtype: the parameters themselves, or fresh copies that the
    # AdamW update below works on after they served the anchoring gradients
    B_old, A_old = _in_dtype(b.B, dt), _in_dtype(b.A, dt)
    U = views.U if views is not None else _in_dtype(b.U, dt)
    # Anchoring gradients from the cached statistics (before any update), B's then A's
    grads = _anchoring_gradients(B_old, b.Q_B, U, b.R_B, b.grad_B, A_old, b.H, b.grad_A)
    steps = torch.stack(list(b.step_B) + list(b.step_A)).tolist()
    params, work = list(b.B) + list(b.A), list(B_old) + list(A_old)
    exp_avgs, exp_avg_sqs = list(b.exp_avg_B) + list(b.exp_avg_A), list(b.exp_avg_sq_B) + list(b.exp_avg_sq_A)
    # one foreach pass over both factors when they share hyperparameters, else B's then A's
    parts = [(hyper_A, slice(0, 2 * L))] if hyper_A == hyper_B else \
        [(hyper_B, slice(0, L)), (hyper_A, slice(L, 2 * L))]
    stored = []
    for hyper, part in parts:
        g = grads[part]
        if hyper.maximize:
            torch._foreach_neg_(g)
        stored += adamw_foreach_(params[part], g, exp_avgs[part], exp_avg_sqs[part], steps[part],
                                 *hyper.op_args()[:5], work=work[part])
    # Next step's statistics, from the values as stored (the parameters themselves when
    # they are in the math dtype: their transposed views hold)
    UT = views.UT if views is not None else [u.T for u in U]
    same = stored[0] is b.B[0]
    BT, AT = (views.BT, views.AT) if views is not None and same else (None, None)
    _write_statistics(b, stored[:L], stored[L:], UT, BT, AT, views.stats if views is not None else None)


def _anchoring_gradients(B: list[Tensor], Q_B: list[Tensor], U: list[Tensor], R_B: list[Tensor],
                         grad_B: list[Tensor], A: list[Tensor], H: list[Tensor], grad_A: list[Tensor]) -> list[Tensor]:
    """The gradients of task + R, new tensors in the math dtype: per pair of the B lists
    ``g_B = grad_B + B Q_B − U R_B`` (m, r), then per pair of the A lists ``g_A = grad_A + H A``
    (r, n). Factors, terms and ``U`` in the math dtype; task gradients in their parameter dtype
    (unchanged). Four torch ops whatever the number of pairs (:func:`mm_each`)."""
    if not (B or A):
        return []
    grads = mm_each(list(B) + list(H), list(Q_B) + list(A))  # B Q_B, H A
    torch._foreach_add_(grads, list(grad_B) + list(grad_A))  # a bf16/fp16 gradient is promoted exactly
    if B:
        torch._foreach_sub_(grads[:len(B)], mm_each(U, R_B))
    return grads


def _write_statistics(b: AnchoredBatch, B_new: list[Tensor], A_new: list[Tensor], UT: list[Tensor],
                      BT: list[Tensor] | None = None, AT: list[Tensor] | None = None,
                      stacked: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """``P = Uᵀ B'``, ``G = B'ᵀ B'``, ``M = A' A'ᵀ`` of every pair into the batch's buffers, from
    the stored factors ``B_new``, ``A_new`` in the math dtype and ``UT`` = Uᵀ in it (``BT``,
    ``AT``: B'ᵀ and A'ᵀ when the caller holds them; ``stacked``: the (L, ·, ·) tensors the
    batch's ``P``, ``G``, ``M`` are views of, when known). One :func:`mm_each`, then one foreach
    copy or three stacks into ``stacked``, plus the transposes not given."""
    L = len(B_new)
    BT = [t.T for t in B_new] if BT is None else BT
    AT = [t.T for t in A_new] if AT is None else AT
    new = mm_each([*UT, *BT, *A_new], [*B_new, *B_new, *AT])
    if stacked is None:
        torch._foreach_copy_([*b.P, *b.G, *b.M], new)
        return
    for i, out in enumerate(stacked):  # one copy kernel each, cheaper than a foreach copy of 3L tensors
        torch.stack(new[i * L:(i + 1) * L], out=out)
