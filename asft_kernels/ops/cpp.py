"""C++ backend: the ``asft::`` ops for CPU tensors, compiled just in time from
``asft_kernels/csrc/``.

The sources register CPU kernels (``TORCH_LIBRARY_IMPL(asft, CPU, m)``) for the four ops
that :mod:`asft_kernels.ops.schema` declares, so once the library is loaded every call of
``torch.ops.asft.stats_pass`` / ``fused_anchored_adamw_`` / ``anchoring_terms_`` /
``anchored_adamw_step_`` on CPU tensors runs the C++ kernel; other devices keep their own
implementations. :func:`prepare` and :func:`step` implement the backend contract
(:mod:`asft_kernels.ops`) with one ``anchored_adamw_step_`` call per bucket and step.

Building, the build cache and ``asft build-ext`` live in :mod:`asft_kernels.ops.cpp_build`;
its public names (:func:`is_available`, :func:`build`, :func:`cache_key`,
:func:`cache_dir`, :class:`CppBackendWarning`, ...) are re-exported here. If the library
cannot be built, :func:`is_available` returns False and warns once;
``backend="auto"`` then runs the eager backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AsFTError, OptimizerInputError
from .cpp_build import (  # noqa: F401  (re-exported: the backend contract and `asft build-ext`)
    CFLAGS,
    LDFLAGS,
    SOURCE_DIR,
    SOURCES,
    CppBackendWarning,
    _State,
    build,
    cache_dir,
    cache_key,
    is_available,
    load_arguments,
    register_cli,
    unavailable_reason,
)
from .schema import (  # importing schema declares the ops before the kernels load
    AdamWHyper,
    AnchoredBatch,
    BucketTensors,
)

#: pairs of larger LoRA rank are routed to the eager implementation (:func:`asft_kernels.ops.route`)
FUSED_MAX_RANK = 64
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _require() -> None:
    if not is_available():
        raise OptimizerInputError(f"the C++ CPU backend is unavailable: {_State.error}")


def _call(op, *args):
    """``op(*args)`` on the compiled library (built first if need be); see :func:`_run`."""
    _require()
    return _run(op, *args)


def _run(op, *args):
    """``op(*args)``, its input errors (``ValueError`` from ``TORCH_CHECK_VALUE``) surfaced as
    :class:`OptimizerInputError`."""
    try:
        return op(*args)
    except ValueError as exc:
        raise (exc if isinstance(exc, AsFTError) else OptimizerInputError(str(exc))) from None


def stats_pass(U: Sequence[Tensor], B: Sequence[Tensor], A: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
    """``(P, G, M)`` per pair from the stored parameters, by the C++ kernel.

    Args:
        U: per pair (m, k) basis (fp64/fp32/bf16). B: per pair (m, r). A: per pair (r, n);
            CPU, contiguous, fp64/fp32/bf16/fp16.

    Returns:
        Lists ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) in the math dtype (fp64 for fp64
        params, else fp32). Deterministic for any thread count.

    Raises:
        OptimizerInputError: a shape, dtype, device or layout the contract does not allow.
    """
    P, G, M = _call(torch.ops.asft.stats_pass, list(U), list(B), list(A))
    return list(P), list(G), list(M)


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Pairs the C++ kernel runs: fp64/fp32/bf16/fp16 parameters of LoRA rank up to
    :data:`FUSED_MAX_RANK` (64; its register tiles cover every rank up to there, the row
    tiles of B stay on the stack). Wider ranks are routed to eager."""
    return dtype in _DTYPES and rank <= FUSED_MAX_RANK


def fused_step(batch: AnchoredBatch, hyper_A: AdamWHyper, hyper_B: AdamWHyper | None = None) -> None:
    """One anchored AdamW step for a batch of pairs, one grouped C++ call.

    Semantics of ``asft::fused_anchored_adamw_`` (:mod:`asft_kernels.ops.schema`): A (r, n),
    B (m, r) and their moments are updated in place, P (k, r), G (r, r), M (r, r) receive the
    statistics of the stored new values. A steps with ``hyper_A``, B with ``hyper_B``
    (default: ``hyper_A``). Every input is validated before anything is written.

    Raises:
        OptimizerInputError: a shape, dtype, device or layout the contract does not allow.
    """
    hyper_B = hyper_A if hyper_B is None else hyper_B
    _call(torch.ops.asft.fused_anchored_adamw_, *batch.op_args(), *hyper_A.op_args(), *hyper_B.op_args())


def terms(
    P: Tensor, G: Tensor, M: Tensor, w: Tensor, two_lam: float | Tensor,
    Q_B: Tensor, R_B: Tensor, H: Tensor,
) -> Tensor:
    """The anchoring terms of a bucket in one C++ call (``asft::anchoring_terms_``).

    Same signature and results as :func:`asft_kernels.ops.eager.anchoring_terms`:
    ``H = 2λ (G − Pᵀ diag(w) P)``, ``Q_B = 2λ M``, ``R_B = diag(w) P Q_B`` written in place,
    ``R = ½ Σ_j ⟨H_j, M_j⟩`` returned (0-d, math dtype).

    Args:
        P: (L, k, r), G, M: (L, r, r), w: (L, k, 1); fp32/fp64 CPU, contiguous.
        two_lam: 2λ, a number, or an (L, 1, 1) tensor in the math dtype (per-pair λ·coef).
        Q_B (L, r, r), R_B (L, k, r), H (L, r, r): outputs, contiguous, written in place.

    Raises:
        OptimizerInputError: a shape, dtype, device or layout the op does not allow
            (nothing is written).
    """
    coef, scale = (two_lam, 1.0) if isinstance(two_lam, Tensor) else (None, float(two_lam))
    return _call(torch.ops.asft.anchoring_terms_, P, G, M, w, coef, scale, Q_B, R_B, H)


@dataclass
class Handle:
    """A bucket prepared for :func:`step`: ``bucket``, the C++ object
    (``torch.classes.asft.CpuBucket``) that holds the bucket's tensors (the pairs' lists, the
    stacked statistics and weights, the counters) validated once, with the pointer tables the
    kernel runs on."""

    bucket: torch.ScriptObject

    def __len__(self) -> int:
        return len(self.bucket)


def prepare(bucket: BucketTensors, counters: Tensor) -> Handle:
    """A :class:`Handle` for ``bucket`` (contract: :mod:`asft_kernels.ops`): every tensor is
    checked here once, in C++ (the checks of ``asft::anchored_adamw_step_`` but the
    gradients'); nothing is written. Each :func:`step` re-checks by pointer that the held
    tensors still have the storage, dtype, shape and layout they were prepared with.

    Args:
        bucket: L pairs of one dtype, rank and basis size, every factor trained.
        counters: (2L,) fp32/fp64 CPU step counters, A's then B's.

    Raises:
        OptimizerInputError: a frozen factor, or a shape, dtype, device or layout the op
            does not allow.
    """
    _require()
    if bucket.train_A is not None or bucket.train_B is not None:
        raise OptimizerInputError("the C++ backend steps pairs whose factors are both trained; frozen-factor pairs "
                                  "run the eager backend")
    return Handle(_call(torch.classes.asft.CpuBucket, list(bucket.A), list(bucket.B), list(bucket.exp_avg_A),
                        list(bucket.exp_avg_sq_A), list(bucket.exp_avg_B), list(bucket.exp_avg_sq_B), bucket.P,
                        bucket.G, bucket.M, list(bucket.U), bucket.w, counters))


def step(handle: Handle, grad_A: list[Tensor], grad_B: list[Tensor], scale: Tensor, hyper_A: AdamWHyper,
         hyper_B: AdamWHyper, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Tensor:
    """The step of a prepared bucket in one C++ call (``CpuBucket.step``, recorded as
    ``asft::CpuBucket.step`` by the profiler; the semantics of ``asft::anchored_adamw_step_``
    on the handle's tensors): the counters
    advanced, the anchoring terms (2λ = ``scale[j]``) and the fused update (A with
    ``hyper_A``, B with ``hyper_B``, task gradients divided by ``grad_scale`` inside the
    kernel); nothing written when ``found_inf`` is nonzero. Only the gradients, ``scale``,
    the hyperparameters and the scaler's tensors are passed per call.

    Args:
        grad_A: per pair (r, n), grad_B: per pair (m, r), parameter dtype, contiguous.
        scale: (L,) ``2λ·coef`` per pair, math dtype.

    Returns:
        ``R = ½ Σ_j ⟨H_j, M_j⟩`` at the statistics before the step (0-d, math dtype).

    Raises:
        OptimizerInputError: a gradient of another shape, dtype or layout, or a held tensor
            whose storage, dtype, shape or layout changed since :func:`prepare` (nothing
            written).
    """
    return _run(handle.bucket.step, grad_A, grad_B, scale, *hyper_A.op_args(), *hyper_B.op_args(), grad_scale,
                found_inf)


#: the phases of ``asft::cpu_phase_clock``, in the order of its result (``enum Phase`` of
#: ``csrc/asft_cpu.cpp``)
PHASES = (
    "B rows: load B", "B rows: B Q_B", "B rows: U R_B", "B rows: AdamW", "B rows: Pᵀ += B'ᵀ U", "B rows: G",
    "A cols: load A", "A cols: H A", "A cols: AdamW", "A cols: M", "reduce partials", "parallel region",
    "prepare (checks, scratch)", "anchoring terms", "whole op",
)


def phase_times(reset: bool = False) -> dict[str, float]:
    """Seconds spent in each phase of the C++ kernels since the last reset, from a build
    with the phase clock (``ASFT_CPU_PHASE_CLOCK=1`` in the environment before the first
    use; see ``bench/cpp_phases.py``).

    The phases of blocks (:data:`PHASES` up to ``"reduce partials"``) are summed over the
    threads that ran them; ``"parallel region"`` is the calling thread's wall time of the
    blocks and reductions; ``"prepare (checks, scratch)"`` and ``"anchoring terms"`` run on
    the calling thread; ``"whole op"`` sums the calls of ``fused_anchored_adamw_`` and
    ``anchored_adamw_step_`` from their first to their last statement (``stats_pass`` adds
    to the block phases only).

    Args:
        reset: set every sum back to zero after reading it.

    Raises:
        RuntimeError: the loaded library was built without the phase clock.
    """
    _require()
    try:
        op = torch.ops.asft.cpu_phase_clock
    except (AttributeError, RuntimeError):
        raise RuntimeError("the C++ kernels were built without the phase clock: set ASFT_CPU_PHASE_CLOCK=1 "
                           "before the first use in the process") from None
    values = op(reset).tolist()
    if len(values) != len(PHASES):
        raise RuntimeError(f"the phase clock returned {len(values)} phases, expected {len(PHASES)}")
    return dict(zip(PHASES, values))
