"""Eager backend: the low-rank anchored AdamW step in plain torch.

Implements the contract of :mod:`asft_kernels.ops.schema` with ordinary torch ops, one
pair at a time. It is the default implementation of the ``asft::`` ops on every device,
the fallback when no compiled backend is available, and the readable version of what the
fused kernels do. Nothing of size ``m × n`` or ``m × m`` is ever created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .schema import BATCH_FIELDS, AdamWHyper, AnchoredBatch


def _math(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    in the math dtype, for the statistics.
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
    step_size = [-(lr / (1 - beta1**t)) for t in steps]
    bias_correction2_sqrt = [math.sqrt(1 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_size)
    if same:
        return params
    torch._foreach_copy_(params, work)
    return [t.to(dt) for t in params]


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


def anchored_step(batch: AnchoredBatch, w: list[Tensor], scale: list[float], hyper_A: AdamWHyper,
                  hyper_B: AdamWHyper | None = None) -> Tensor:
    """``asft::anchored_adamw_step_`` (:mod:`asft_kernels.ops.schema`) in torch ops: the step
    counters advanced, the anchoring terms of every pair (:func:`anchoring_terms`, one pair at
    a time, ``2λ = scale[j]``, ``w[j]`` (k, 1)), then :func:`fused_step`. Returns ``R`` (0-d,
    math dtype)."""
    if len(batch) == 0:
        return torch.zeros(())
    torch._foreach_add_(list(batch.step_A) + list(batch.step_B), 1.0)
    loss = None
    for j in range(len(batch)):
        part = anchoring_terms(batch.P[j][None], batch.G[j][None], batch.M[j][None], w[j][None], float(scale[j]),
                               batch.Q_B[j][None], batch.R_B[j][None], batch.H[j][None])
        loss = part if loss is None else loss + part.to(loss.dtype)
    fused_step(batch, hyper_A, hyper_B)
    return loss


def anchored_step_op(*args) -> Tensor:
    """:func:`anchored_step` in the op's positional argument order."""
    n = len(BATCH_FIELDS)
    batch = AnchoredBatch(*(list(xs) for xs in args[:n]))
    return anchored_step(batch, list(args[n]), list(args[n + 1]), AdamWHyper(*args[n + 2:n + 8]),
                         AdamWHyper(*args[n + 8:n + 14]))


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Every float dtype and rank: the eager backend runs any pair (the routing fallback)."""
    return True


def fused_step(batch: AnchoredBatch, hyper_A: AdamWHyper, hyper_B: AdamWHyper | None = None) -> None:
    """Anchored AdamW step for a batch of pairs (contract: :mod:`asft_kernels.ops.schema`).

    Per pair ``j``: A (r, n), B (m, r) and their moments are updated in place, and
    ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) receive the statistics of the stored values.
    The AdamW update runs as ``torch.optim.AdamW``'s foreach implementation does, over every
    factor of the batch at once (A with ``hyper_A``, B with ``hyper_B``, default: ``hyper_A``;
    one foreach pass when they are equal); the anchoring products are a few matmuls per pair.
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
    B_old = [t.to(dt) for t in b.B]
    A_old = [t.to(dt) for t in b.A]
    # Anchoring gradients from the cached statistics (before any update):
    # g_B = grad_B + B Q_B − U R_B,  g_A = grad_A + H A
    grads = []
    for j in range(L):
        g_b = torch.addmm(b.grad_B[j].to(dt), B_old[j], b.Q_B[j])
        grads.append(g_b.addmm_(b.U[j].to(dt), b.R_B[j], alpha=-1.0))
    for j in range(L):
        grads.append(torch.addmm(b.grad_A[j].to(dt), b.H[j], A_old[j]))
    steps = torch.stack(list(b.step_B) + list(b.step_A)).tolist()
    if hyper_A == hyper_B:  # one foreach pass over both factors
        if hyper_A.maximize:
            torch._foreach_neg_(grads)
        stored = adamw_foreach_(list(b.B) + list(b.A), grads, list(b.exp_avg_B) + list(b.exp_avg_A),
                                list(b.exp_avg_sq_B) + list(b.exp_avg_sq_A), steps, *hyper_A.op_args()[:5],
                                work=B_old + A_old)
    else:  # B's factors with B's hyperparameters, A's with A's
        stored = []
        for hyper, part in ((hyper_B, slice(0, L)), (hyper_A, slice(L, 2 * L))):
            g = grads[part]
            if hyper.maximize:
                torch._foreach_neg_(g)
            factors = (list(b.B), list(b.exp_avg_B), list(b.exp_avg_sq_B), B_old) if part.start == 0 else \
                (list(b.A), list(b.exp_avg_A), list(b.exp_avg_sq_A), A_old)
            stored += adamw_foreach_(factors[0], g, factors[1], factors[2], steps[part], *hyper.op_args()[:5],
                                     work=factors[3])
    # Next step's statistics, from the values as stored.
    for j in range(L):
        b_new, a_new = stored[j], stored[L + j]
        torch.mm(b.U[j].to(dt).T, b_new, out=b.P[j])
        torch.mm(b_new.T, b_new, out=b.G[j])
        torch.mm(a_new, a_new.T, out=b.M[j])
