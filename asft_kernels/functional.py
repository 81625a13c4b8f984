"""The stateless anchored AdamW step: what :class:`asft_kernels.AsFTAdamW` runs each step.

As ``torch.optim.adamw.adamw`` is to ``torch.optim.AdamW``: no param groups, no state
creation, no caching. The optimizer resolves its pairs into buckets once (its step plan)
and calls these functions with the bucket's tensors.

Symbols (docs/method.md), per pair ``j`` of a bucket of L pairs of equal (k, r):
``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r), ``M = A Aᵀ`` (r, r), ``w = 2c − c²`` (k,).
"""

from __future__ import annotations

from .ops import AdamWHyper, AnchoredBatch, Backend, resolve_backend, route
from .ops.eager import anchoring_terms  # the eager math of the terms, re-exported

__all__ = ["AdamWHyper", "AnchoredBatch", "anchored_adamw", "anchoring_terms"]


def anchored_adamw(
    batch: AnchoredBatch,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    backend: str | Backend = "auto",
) -> None:
    """One anchored AdamW step on ``batch`` (contract: :mod:`asft_kernels.ops.schema`).

    Every pair: ``g_B = grad_B + B Q_B − U R_B``, ``g_A = grad_A + H A``, then AdamW exactly
    as ``torch.optim.AdamW`` with ``t = step`` (already incremented), and ``P, G, M`` of the
    stored new values written in place. ``Q_B, R_B, H`` come from :func:`anchoring_terms`.

    Args:
        batch: the pairs' tensors; A, B, the moments and P, G, M are written in place.
        lr: learning rate (parameter units per step). betas, eps, weight_decay, maximize:
            as ``torch.optim.AdamW``.
        backend: a name (``auto|eager|cpp|triton``, resolved for the batch's device) or a
            resolved :class:`~asft_kernels.ops.Backend`; pairs it does not support run eager.
    """
    if len(batch) == 0:
        return
    if isinstance(backend, str):
        backend = resolve_backend(backend, batch.B[0].device)
    hyper = AdamWHyper(float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), bool(maximize))
    routed: dict[str, tuple[Backend, list[int]]] = {}  # pairs by the backend route() picks
    for j, (A, B) in enumerate(zip(batch.A, batch.B)):
        chosen = route(backend, B.dtype, int(A.shape[0]))
        routed.setdefault(chosen.name, (chosen, []))[1].append(j)
    for chosen, index in routed.values():
        chosen.fused_step(batch if len(index) == len(batch) else batch.select(index), hyper)
