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
    """
    lr, beta1, beta2, eps, weight_decay, maximize = hyper.op_args()
    b = batch
    for j in range(len(b)):
        dt = b.exp_avg_B[j].dtype
        b_old = b.B[j].to(dt)
        a_old = b.A[j].to(dt)
        # Anchoring gradients from the cached statistics (before any update).
        g_b = b.grad_B[j].to(dt) + b_old @ b.Q_B[j] - b.U[j].to(dt) @ b.R_B[j]
        g_a = b.grad_A[j].to(dt) + b.H[j] @ a_old
        if maximize:
            g_b = -g_b
            g_a = -g_a
        adamw = (lr, beta1, beta2, eps, weight_decay)
        b_new = _adamw_update_(b.B[j], g_b, b.exp_avg_B[j], b.exp_avg_sq_B[j], float(b.step_B[j]), *adamw)
        a_new = _adamw_update_(b.A[j], g_a, b.exp_avg_A[j], b.exp_avg_sq_A[j], float(b.step_A[j]), *adamw)
        # Next step's statistics, from the values as stored.
        b.P[j].copy_(b.U[j].to(dt).T @ b_new)
        b.G[j].copy_(b_new.T @ b_new)
        b.M[j].copy_(a_new @ a_new.T)
