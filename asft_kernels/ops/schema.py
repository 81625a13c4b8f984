"""The ops of the backends: four ``torch.library`` ops declared once, implemented per device,
and the typed inputs of the contract (:class:`AnchoredBatch`, :class:`BucketTensors`,
:class:`AdamWHyper`; the contract itself: :mod:`asft_kernels.ops`).

Every backend (``eager`` in plain torch, ``cpp`` for CPU tensors, ``triton`` for CUDA
tensors) implements the same operations on a *batch* of anchored LoRA pairs. The optimizer
never knows which backend ran.

Symbols (docs/method.md), per pair ``j``:

* ``A``: (r, n) ``lora_A`` weight, ``B``: (m, r) ``lora_B`` weight (fp64/fp32/bf16/fp16,
  contiguous).
* ``U``: (m, k) orthonormal alignment basis (fp64 when the params are fp64, otherwise
  fp32, or bf16 for the Triton ``basis_dtype`` option).
* statistics ``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r), ``M = A Aᵀ`` (r, r), in the *math
  dtype*: fp64 for fp64 params, fp32 otherwise.
* ``Q_B = 2λ M`` (r, r), ``R_B = 2λ diag(w) P M`` (k, r), ``H = 2λ (G − Pᵀ diag(w) P)``
  (r, r), math dtype, computed from the cached statistics (by ``anchoring_terms_`` or inside
  ``anchored_adamw_step_``).

``asft::stats_pass(U, B, A) -> (P, G, M)``
    Fresh statistics from the stored parameters.

``asft::fused_anchored_adamw_(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B,
P, G, M, grad_A, grad_B, U, Q_B, R_B, H, step_A, step_B, lr_A, beta1_A, beta2_A, eps_A,
weight_decay_A, maximize_A, lr_B, beta1_B, beta2_B, eps_B, weight_decay_B, maximize_B)``
    One pass per pair:

    * rows of B: ``g = grad_B + B Q_B − U R_B`` (``g = −g`` if ``maximize_B``), then the
      AdamW update exactly as ``torch.optim.AdamW`` (decoupled weight decay
      ``p *= 1 − lr·wd``, ``m = β₁m + (1−β₁)g``, ``v = β₂v + (1−β₂)g²``,
      ``p −= lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``), with ``t = step_B[j]`` (already
      incremented) and B's hyperparameters ``lr_B, …, maximize_B``;
    * A: ``g = grad_A + H A``, same update with ``t = step_A[j]`` and A's hyperparameters
      (A and B may sit in param groups of different lr, weight decay, …: LoRA+);
    * the *next* statistics, computed from the values actually stored (after rounding to
      the parameter dtype), written into ``P``, ``G``, ``M`` in place.

    ``step_A``/``step_B`` are the optimizer's per-parameter step counters (one-element
    fp32 or fp64 CPU tensors, ``state["step"]``), already incremented for this step.

    ``exp_avg*`` are fp64 for fp64 params and fp32 otherwise. ``grad_*`` have the
    parameter's dtype and shape (a missing gradient is passed as zeros). Reductions are
    deterministic: the same inputs give bitwise the same outputs for any thread count.

``asft::anchoring_terms_(P, G, M, w, coef, two_lam, Q_B, R_B, H) -> R``
    The r×r / k×r terms of the anchoring gradient for the L pairs of a bucket, stacked:
    ``P`` (L, k, r), ``G``, ``M`` (L, r, r), ``w`` (L, k, 1) per-direction weights
    ``w = 2c − c²``, ``coef`` None or (L, 1, 1) per-pair multiplier, all in the math dtype
    (fp32/fp64), contiguous. With ``s_j = two_lam · coef[j]`` (``two_lam`` alone without
    ``coef``; ``two_lam = 2λ``) and ``Pw = diag(w) P``, written in place::

        H   = s (G − Pᵀ Pw)    (L, r, r)
        Q_B = s M              (L, r, r)
        R_B = Pw Q_B           (L, k, r)

    and returned: ``R = ½ Σ_j ⟨H_j, M_j⟩``, a new 0-d tensor in the math dtype.

``asft::anchored_adamw_step_(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M,
grad_A, grad_B, U, w, scale, counters, <the 12 hyperparameters of fused_anchored_adamw_>,
grad_scale, found_inf) -> R``
    The whole step of one *bucket* (L pairs of one r, k and math dtype) in one call, the
    op behind the backends' ``step`` (:mod:`asft_kernels.ops`). The per-pair lists are those
    of ``fused_anchored_adamw_``; the bucket's buffers are stacked: ``P`` (L, k, r), ``G``,
    ``M`` (L, r, r), ``w`` (L, k, 1) and ``scale`` (L,) (``2λ·coef`` per pair) in the math
    dtype, ``counters`` (2L,) A's step counters then B's (fp32/fp64). ``grad_scale`` and
    ``found_inf``: None, or a GradScaler's 0-d fp32 tensors. Every input is validated first;
    then, when ``found_inf`` is nonzero, nothing is written (parameters, moments, counters,
    statistics); otherwise the counters are advanced by one (as ``torch.optim.AdamW``
    advances ``state["step"]``), the anchoring terms of each pair are computed as
    ``anchoring_terms_`` with ``2λ = scale[j]``, and the fused update runs with the task
    gradients divided by ``grad_scale`` (the gradient tensors are not modified). Returns
    ``R`` (as ``anchoring_terms_``, at the statistics before the step).

The default implementation (any device) is the eager one; ``cpp`` registers the CPU
kernel and ``triton`` the CUDA kernel under these names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

LIBRARY_NAME = "asft"

STATS_PASS_SCHEMA = "stats_pass(Tensor[] U, Tensor[] B, Tensor[] A) -> (Tensor[], Tensor[], Tensor[])"

#: AdamW hyperparameters of A, then of B (each factor takes its own param group's)
_HYPER_ARGS = ", ".join(f"float lr_{f}, float beta1_{f}, float beta2_{f}, float eps_{f}, float weight_decay_{f}, "
                        f"bool maximize_{f}" for f in "AB")

FUSED_STEP_SCHEMA = (
    "fused_anchored_adamw_("
    "Tensor(a!)[] A, Tensor(b!)[] B, "
    "Tensor(c!)[] exp_avg_A, Tensor(d!)[] exp_avg_sq_A, "
    "Tensor(e!)[] exp_avg_B, Tensor(f!)[] exp_avg_sq_B, "
    "Tensor(g!)[] P, Tensor(h!)[] G, Tensor(i!)[] M, "
    "Tensor[] grad_A, Tensor[] grad_B, Tensor[] U, "
    "Tensor[] Q_B, Tensor[] R_B, Tensor[] H, "
    "Tensor[] step_A, Tensor[] step_B, "
    f"{_HYPER_ARGS}"
    ") -> ()"
)

ANCHORING_TERMS_SCHEMA = (
    "anchoring_terms_(Tensor P, Tensor G, Tensor M, Tensor w, Tensor? coef, float two_lam, "
    "Tensor(a!) Q_B, Tensor(b!) R_B, Tensor(c!) H) -> Tensor"
)

ANCHORED_STEP_SCHEMA = (
    "anchored_adamw_step_("
    "Tensor(a!)[] A, Tensor(b!)[] B, "
    "Tensor(c!)[] exp_avg_A, Tensor(d!)[] exp_avg_sq_A, "
    "Tensor(e!)[] exp_avg_B, Tensor(f!)[] exp_avg_sq_B, "
    "Tensor(g!) P, Tensor(h!) G, Tensor(i!) M, "
    "Tensor[] grad_A, Tensor[] grad_B, Tensor[] U, "
    "Tensor w, Tensor scale, Tensor(j!) counters, "
    f"{_HYPER_ARGS}, "
    "Tensor? grad_scale, Tensor? found_inf"
    ") -> Tensor"
)

_lib = torch.library.Library(LIBRARY_NAME, "FRAGMENT")
_lib.define(STATS_PASS_SCHEMA)
_lib.define(FUSED_STEP_SCHEMA)
_lib.define(ANCHORING_TERMS_SCHEMA)
_lib.define(ANCHORED_STEP_SCHEMA)


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and optimizer state use for parameters of ``param_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass
class AnchoredBatch:
    """The tensors of one ``fused_anchored_adamw_`` call: per-pair lists of equal length L.

    Field order is the op schema's argument order. Shapes per pair ``j`` (symbols of
    docs/method.md): ``A``, ``grad_A``, ``exp_avg_A``, ``exp_avg_sq_A``: (r, n); ``B``,
    ``grad_B``, ``exp_avg_B``, ``exp_avg_sq_B``: (m, r); ``U``: (m, k); ``P``, ``R_B``: (k, r);
    ``G``, ``M``, ``Q_B``, ``H``: (r, r); ``step_A``, ``step_B``: one-element CPU tensors.
    Mutated in place by the step: ``A``, ``B``, the four moments, ``P``, ``G``, ``M``.

    """

    A: list[Tensor]
    B: list[Tensor]
    exp_avg_A: list[Tensor]
    exp_avg_sq_A: list[Tensor]
    exp_avg_B: list[Tensor]
    exp_avg_sq_B: list[Tensor]
    P: list[Tensor]
    G: list[Tensor]
    M: list[Tensor]
    grad_A: list[Tensor]
    grad_B: list[Tensor]
    U: list[Tensor]
    Q_B: list[Tensor]
    R_B: list[Tensor]
    H: list[Tensor]
    step_A: list[Tensor]
    step_B: list[Tensor]

    def __len__(self) -> int:
        return len(self.A)

    def op_args(self) -> tuple[list[Tensor], ...]:
        """The lists in the op schema's order."""
        return tuple(getattr(self, name) for name in BATCH_FIELDS)

    def select(self, index: list[int]) -> AnchoredBatch:
        """The sub-batch of the pairs at ``index``."""
        return AnchoredBatch(*([xs[j] for j in index] for xs in self.op_args()))


BATCH_FIELDS = tuple(f.name for f in fields(AnchoredBatch))


@dataclass(frozen=True)
class AdamWHyper:
    """AdamW hyperparameters of one call: ``lr`` (parameter units per step), ``beta1``,
    ``beta2``, ``eps``, ``weight_decay`` (decoupled, multiplied by lr) and ``maximize``."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool

    def op_args(self) -> tuple[float, float, float, float, float, bool]:
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.maximize)


def split_op_args(args: tuple) -> tuple[AnchoredBatch, AdamWHyper, AdamWHyper]:
    """``(batch, hyper_A, hyper_B)`` from the positional arguments of ``fused_anchored_adamw_``."""
    n = len(BATCH_FIELDS)
    return AnchoredBatch(*(list(xs) for xs in args[:n])), AdamWHyper(*args[n:n + 6]), AdamWHyper(*args[n + 6:n + 12])


def op_kernel(fused_step):
    """Adapt a backend's ``fused_step(batch, hyper_A, hyper_B)`` to the op's positional
    signature, to register it with ``torch.library``."""

    def kernel(*args):
        fused_step(*split_op_args(args))

    return kernel


@torch.library.register_fake(f"{LIBRARY_NAME}::stats_pass")
def _stats_pass_fake(U, B, A):
    P = [u.new_empty((u.shape[1], b.shape[1]), dtype=math_dtype(b.dtype)) for u, b in zip(U, B)]
    G = [b.new_empty((b.shape[1], b.shape[1]), dtype=math_dtype(b.dtype)) for b in B]
    M = [a.new_empty((a.shape[0], a.shape[0]), dtype=math_dtype(a.dtype)) for a in A]
    return P, G, M


@torch.library.register_fake(f"{LIBRARY_NAME}::fused_anchored_adamw_")
def _fused_fake(*args, **kwargs):
    return None


@torch.library.register_fake(f"{LIBRARY_NAME}::anchoring_terms_")
def _anchoring_terms_fake(P, G, M, w, coef, two_lam, Q_B, R_B, H):
    return P.new_empty(())


@torch.library.register_fake(f"{LIBRARY_NAME}::anchored_adamw_step_")
def _anchored_step_fake(*args):
    return args[6].new_empty(())


@dataclass
class BucketTensors:
    """What a backend's ``prepare`` receives: the tensors of one bucket of L anchored pairs of
    one parameter dtype, rank r, basis size k and device (contract: :mod:`asft_kernels.ops`).

    Per pair ``j`` (lists): ``A`` (r, n), ``B`` (m, r), their moments ``exp_avg_A``,
    ``exp_avg_sq_A`` (r, n), ``exp_avg_B``, ``exp_avg_sq_B`` (m, r) in the math dtype (None for a
    frozen factor), ``U`` (m, k). Stacked, math dtype, contiguous: ``P`` (L, k, r), ``G``,
    ``M`` (L, r, r) (the cached statistics, rewritten by each step), ``w`` (L, k, 1).
    ``train_A``/``train_B``: None (every factor is trained) or per pair whether the factor is
    written (a frozen factor, LoRA-FA: only the eager backend takes those).
    """

    A: list[Tensor]
    B: list[Tensor]
    exp_avg_A: list[Tensor | None]
    exp_avg_sq_A: list[Tensor | None]
    exp_avg_B: list[Tensor | None]
    exp_avg_sq_B: list[Tensor | None]
    U: list[Tensor]
    P: Tensor
    G: Tensor
    M: Tensor
    w: Tensor
    train_A: list[bool] | None = None
    train_B: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.A)

    def as_batch(self, counters: Tensor) -> tuple[AnchoredBatch, Tensor, Tensor, Tensor]:
        """An :class:`AnchoredBatch` of per-pair views of this bucket (gradient lists empty,
        ``step_A``/``step_B`` views of ``counters`` (2L,)) and its new stacked terms buffers
        ``Q_B`` (L, r, r), ``R_B`` (L, k, r), ``H`` (L, r, r) that the batch views: what a
        backend built on ``fused_step`` keeps in its handle."""
        L, k, r = self.P.shape
        Q_B, R_B, H = self.M.new_empty((L, r, r)), self.P.new_empty((L, k, r)), self.M.new_empty((L, r, r))
        batch = AnchoredBatch(
            A=list(self.A), B=list(self.B), exp_avg_A=list(self.exp_avg_A), exp_avg_sq_A=list(self.exp_avg_sq_A),
            exp_avg_B=list(self.exp_avg_B), exp_avg_sq_B=list(self.exp_avg_sq_B),
            P=list(self.P.unbind(0)), G=list(self.G.unbind(0)), M=list(self.M.unbind(0)), grad_A=[], grad_B=[],
            U=list(self.U), Q_B=list(Q_B.unbind(0)), R_B=list(R_B.unbind(0)), H=list(H.unbind(0)),
            step_A=list(counters[:L].unbind(0)), step_B=list(counters[L:].unbind(0)),
        )
        return batch, Q_B, R_B, H
