"""The published AsFT regularizer, computed the way the authors' training loop does it.

For every anchored layer the published code builds the dense projection
``C = V Vᵀ / ‖V‖_F`` (m × m), materializes ``ΔW = B A`` (m × n) and ``(I − C) ΔW``, and
adds ``λ ‖(I − C) B A‖²_F`` to the task loss, letting autograd produce the gradients.
This module does exactly that, from an anchor's ``U``, ``s`` and ``‖V‖_F``
(``V Vᵀ = U diag(s²) Uᵀ``), for the modes ``paper`` (``C = U diag(s²/‖V‖_F) Uᵀ``),
``projector`` (``C = U Uᵀ``) and ``full`` (``C = 0``).

It is O(m²n) flops and O(m² + mn) memory per layer: the correctness reference for every
backend and the baseline of the benchmarks, never the fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .anchor import AnchorBinding, AnchoredPair


def published_projection(V: Tensor) -> Tensor:
    """``C = V Vᵀ / ‖V‖_F`` (m, m) from a raw alignment delta ``V`` (m, n), as published."""
    return V @ V.T / torch.linalg.matrix_norm(V)


def dense_projection(pair: AnchoredPair, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """The dense ``C`` (m, m) of ``pair`` for its mode, built from the anchor entry."""
    dtype = dtype or pair.B.dtype
    device = device or pair.B.device
    U = pair.entry.U.to(device=device, dtype=dtype)
    c = pair.c.to(device=device, dtype=dtype)
    return (U * c) @ U.T


def pair_regularizer(pair: AnchoredPair, anchor_lambda: float = 1.0, C: Tensor | None = None) -> Tensor:
    """``λ · coef · ‖(I − C) B A‖²_F`` for one pair, differentiable w.r.t. A and B."""
    A, B = pair.A, pair.B
    if C is None:
        C = dense_projection(pair, dtype=B.dtype, device=B.device)
    delta = B @ A  # (m, n), materialized as in the published code
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    residual = (eye - C) @ delta
    return anchor_lambda * pair.coef * residual.pow(2).sum()


def paper_regularizer(binding: AnchorBinding, anchor_lambda: float = 1.0) -> Tensor:
    """``R = λ Σ_layers ‖(I − C) B A‖²_F`` over all pairs of ``binding`` (0-d tensor),
    differentiable w.r.t. every ``lora_A``/``lora_B``."""
    total = None
    for pair in binding:
        term = pair_regularizer(pair, anchor_lambda)
        total = term if total is None else total + term
    return total
