"""The backend contract: two ``torch.library`` ops declared once, implemented per device.

Every backend (``eager`` in plain torch, ``cpp`` for CPU tensors, ``triton`` for CUDA
tensors) implements the same two operations on a *batch* of anchored LoRA pairs. The
optimizer never knows which backend ran.

Symbols (docs/method.md), per pair ``j``:

* ``A``: (r, n) ``lora_A`` weight, ``B``: (m, r) ``lora_B`` weight (fp64/fp32/bf16/fp16,
  contiguous).
* ``U``: (m, k) orthonormal alignment basis (fp64 when the params are fp64, otherwise
  fp32, or bf16 for the Triton ``basis_dtype`` option).
* statistics ``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r), ``M = A Aᵀ`` (r, r), in the *math
  dtype*: fp64 for fp64 params, fp32 otherwise.
* ``Q_B = 2λ M`` (r, r), ``R_B = 2λ diag(w) P M`` (k, r), ``H = 2λ (G − Pᵀ diag(w) P)``
  (r, r), math dtype, computed by the optimizer from the cached statistics.

``asft::stats_pass(U, B, A) -> (P, G, M)``
    Fresh statistics from the stored parameters.

``asft::fused_anchored_adamw_(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B,
P, G, M, grad_A, grad_B, U, Q_B, R_B, H, step_A, step_B, lr, beta1, beta2, eps,
weight_decay, maximize)``
    One pass per pair:

    * rows of B: ``g = grad_B + B Q_B − U R_B`` (``g = −g`` if ``maximize``), then the
      AdamW update exactly as ``torch.optim.AdamW`` (decoupled weight decay
      ``p *= 1 − lr·wd``, ``m = β₁m + (1−β₁)g``, ``v = β₂v + (1−β₂)g²``,
      ``p −= lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``), with ``t = step_B[j]`` (already
      incremented);
    * A: ``g = grad_A + H A``, same update with ``t = step_A[j]``;
    * the *next* statistics, computed from the values actually stored (after rounding to
      the parameter dtype), written into ``P``, ``G``, ``M`` in place.

    ``exp_avg*`` are fp64 for fp64 params and fp32 otherwise. ``grad_*`` have the
    parameter's dtype and shape (a missing gradient is passed as zeros). Reductions are
    deterministic: the same inputs give bitwise the same outputs for any thread count.

The default implementation (any device) is the eager one; ``cpp`` registers the CPU
kernel and ``triton`` the CUDA kernel under these names.
"""

from __future__ import annotations

import torch

LIBRARY_NAME = "asft"

STATS_PASS_SCHEMA = "stats_pass(Tensor[] U, Tensor[] B, Tensor[] A) -> (Tensor[], Tensor[], Tensor[])"

FUSED_STEP_SCHEMA = (
    "fused_anchored_adamw_("
    "Tensor(a!)[] A, Tensor(b!)[] B, "
    "Tensor(c!)[] exp_avg_A, Tensor(d!)[] exp_avg_sq_A, "
    "Tensor(e!)[] exp_avg_B, Tensor(f!)[] exp_avg_sq_B, "
    "Tensor(g!)[] P, Tensor(h!)[] G, Tensor(i!)[] M, "
    "Tensor[] grad_A, Tensor[] grad_B, Tensor[] U, "
    "Tensor[] Q_B, Tensor[] R_B, Tensor[] H, "
    "float[] step_A, float[] step_B, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize"
    ") -> ()"
)

_lib = torch.library.Library(LIBRARY_NAME, "FRAGMENT")
_lib.define(STATS_PASS_SCHEMA)
_lib.define(FUSED_STEP_SCHEMA)


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and optimizer state use for parameters of ``param_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"{LIBRARY_NAME}::stats_pass")
def _stats_pass_fake(U, B, A):
    P = [u.new_empty((u.shape[1], b.shape[1]), dtype=math_dtype(b.dtype)) for u, b in zip(U, B)]
    G = [b.new_empty((b.shape[1], b.shape[1]), dtype=math_dtype(b.dtype)) for b in B]
    M = [a.new_empty((a.shape[0], a.shape[0]), dtype=math_dtype(a.dtype)) for a in A]
    return P, G, M


@torch.library.register_fake(f"{LIBRARY_NAME}::fused_anchored_adamw_")
def _fused_fake(*args, **kwargs):
    return None


def _register_default_impls() -> None:
    # Imported late: eager.py imports this module for math_dtype.
    from . import eager

    _lib.impl("stats_pass", eager.stats_pass_impl, "CompositeExplicitAutograd")
    _lib.impl("fused_anchored_adamw_", eager.fused_step_impl, "CompositeExplicitAutograd")


_register_default_impls()
