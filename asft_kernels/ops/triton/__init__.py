"""Triton backend: the statistics pass and the one-pass fused anchored AdamW step.

Implements the contract of :mod:`asft_kernels.ops.schema` for CUDA tensors (and for CPU
tensors under the Triton interpreter, ``TRITON_INTERPRET=1``, used by the tests); docs in
docs/triton.md. One job per module:

* :mod:`.kernels`: the ``@triton.jit`` kernels (their docstrings hold the math) and the
  fields of the tables they read;
* :mod:`.layout`: block sizes and launch options (:func:`kernel_config`), padded ranks,
  strips, and the byte model :func:`predicted_step_bytes`;
* :mod:`.launch`: validation, pointer tables, launches, ``supports``, ``stats_pass``,
  ``prepare``/``step`` (the prepared step of a bucket: device-resident tables, no host
  reads, capturable in a CUDA graph), ``fused_step``, the precision option of the U
  products (:func:`u_precision`), and the CUDA registration of the ``asft::`` ops;
* :mod:`.version`: the supported Triton range.

fp32/bf16/fp16 parameters of LoRA rank up to :data:`MAX_TRITON_RANK` run here with fp32
state and math; :func:`asft_kernels.ops.route` sends every other pair to the eager backend
(this backend refuses them). Hyperparameters are runtime arguments: a scheduler changing
lr never triggers a recompile.

With a Triton outside the supported range (:mod:`.version`) the module still imports: it
warns once (:class:`TritonVersionWarning`), :func:`is_available` and :func:`supports` are
False, and nothing is registered.
"""

from __future__ import annotations

import os
import warnings

import triton

from .version import MAX_TRITON_EXCLUSIVE, MIN_TRITON, TRITON_REQUIREMENT, TritonVersionWarning, version_problem

#: None when the installed Triton is supported, else the message saying it is not.
UNSUPPORTED = version_problem(triton.__version__)

if UNSUPPORTED is None:
    from .kernels import (
        _K,
        _M_ROWS,
        _N_COLS,
        _RANK,
        DOT_PRECISION,
        PAIR_FIELDS,
        REDUCE_BLOCK,
        _factor_kernel,
        _interpreting,
        _p_tile_kernel,
        _reduce_kernel,
        _terms_kernel,
        jitted,
    )
    from .launch import (
        DEFAULT_U_PRECISION,
        DEVICE_COUNTERS,
        PARAM_DTYPES,
        U_PRECISION_ENV,
        TritonStep,
        fused_step,
        is_available,
        prepare,
        stats_pass,
        step,
        supports,
        u_precision,
        u_precisions,
    )
    from .layout import (
        LAUNCH_OPTIONS,
        MAX_TRITON_RANK,
        U_STRIP_BYTES,
        kernel_config,
        p_split,
        padded_rank,
        predicted_step_bytes,
        ptile_config,
        strip_blocks,
        terms_config,
    )
else:
    warnings.warn(UNSUPPORTED, TritonVersionWarning, stacklevel=2)

    DEVICE_COUNTERS = True

    def is_available(warn: bool = True) -> bool:
        """False: the installed Triton is not supported (see :data:`UNSUPPORTED`)."""
        return False

    def supports(dtype, rank: int) -> bool:
        """False: no pair runs on an unsupported Triton."""
        return False

    def _interpreting() -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    def _unsupported(*args, **kwargs):
        from ...errors import OptimizerInputError

        raise OptimizerInputError(UNSUPPORTED)

    stats_pass = fused_step = prepare = step = _unsupported

__all__ = [
    "DEVICE_COUNTERS", "MAX_TRITON_EXCLUSIVE", "MIN_TRITON", "TRITON_REQUIREMENT", "UNSUPPORTED",
    "TritonVersionWarning", "fused_step", "is_available", "prepare", "stats_pass", "step", "supports",
]
if UNSUPPORTED is None:
    __all__ += [
        "DEFAULT_U_PRECISION", "DOT_PRECISION", "LAUNCH_OPTIONS", "MAX_TRITON_RANK", "PAIR_FIELDS", "PARAM_DTYPES",
        "REDUCE_BLOCK", "U_PRECISION_ENV", "U_STRIP_BYTES", "TritonStep", "_K", "_M_ROWS", "_N_COLS", "_RANK",
        "_factor_kernel", "_interpreting", "_p_tile_kernel", "_reduce_kernel", "_terms_kernel", "jitted",
        "kernel_config", "p_split", "padded_rank", "predicted_step_bytes", "ptile_config", "strip_blocks",
        "terms_config", "u_precision", "u_precisions",
    ]
