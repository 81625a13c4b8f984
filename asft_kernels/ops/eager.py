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

from .schema import AdamWHyper, AnchoredBatch


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


def _adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> Tensor:
    """One AdamW update in the math dtype, written back into ``param``.

    Mirrors ``torch.optim.AdamW`` (single-tensor path) operation by operation. Returns the
    value as stored (rounded to ``param.dtype``) in the math dtype, for the statistics.
    """
    dt = exp_avg.dtype
    p = param.to(dt)
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is param:  # same dtype: updated in place already
        return param
    param.copy_(p)
    return param.to(dt)


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Every float dtype and rank: the eager backend runs any pair (the routing fallback)."""
    return True


def fused_step(batch: AnchoredBatch, hyper: AdamWHyper) -> None:
    """Anchored AdamW step for a batch of pairs (contract: :mod:`asft_kernels.ops.schema`).

    Per pair ``j``: A (r, n), B (m, r) and their moments are updated in place, and
    ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) receive the statistics of the stored values.
    The AdamW update runs as ``torch.optim.AdamW``'s foreach implementation does, over every
    factor of the batch at once; the anchoring products are a few matmuls per pair.
    """
    if len(batch) == 0:
        return
    dtypes = {b.dtype for b in batch.B}
    if len(dtypes) > 1:  # one math dtype per foreach call
        for dtype in dtypes:
            fused_step(batch.select([j for j, b in enumerate(batch.B) if b.dtype == dtype]), hyper)
        return
    lr, beta1, beta2, eps, weight_decay, maximize = hyper.op_args()
    b = batch
    L = len(b)
    dt = b.exp_avg_B[0].dtype
    same = b.B[0].dtype == dt
    B_old = b.B if same else [t.to(dt) for t in b.B]
    A_old = b.A if same else [t.to(dt) for t in b.A]
    # Anchoring gradients from the cached statistics (before any update):
    # g_B = grad_B + B Q_B − U R_B,  g_A = grad_A + H A
    grads = []
    for j in range(L):
        g_b = torch.addmm(b.grad_B[j].to(dt), B_old[j], b.Q_B[j])
        grads.append(g_b.addmm_(b.U[j].to(dt), b.R_B[j], alpha=-1.0))
    for j in range(L):
        grads.append(torch.addmm(b.grad_A[j].to(dt), b.H[j], A_old[j]))
    if maximize:
        torch._foreach_neg_(grads)
    params = list(b.B) + list(b.A)
    work = params if same else B_old + A_old  # fresh math-dtype copies, written back below
    exp_avgs = list(b.exp_avg_B) + list(b.exp_avg_A)
    exp_avg_sqs = list(b.exp_avg_sq_B) + list(b.exp_avg_sq_A)
    steps = torch.stack(list(b.step_B) + list(b.step_A)).tolist()
    # torch.optim.AdamW (foreach, decoupled weight decay), operation by operation
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
    if not same:
        torch._foreach_copy_(params, work)
        stored = [t.to(dt) for t in params]  # the values as stored (rounded), in the math dtype
    else:
        stored = params
    # Next step's statistics, from the values as stored.
    for j in range(L):
        b_new, a_new = stored[j], stored[L + j]
        torch.mm(b.U[j].to(dt).T, b_new, out=b.P[j])
        torch.mm(b_new.T, b_new, out=b.G[j])
        torch.mm(a_new, a_new.T, out=b.M[j])
