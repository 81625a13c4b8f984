"""Backends of the anchored AdamW step.

All backends implement the contract documented in :mod:`asft_kernels.ops.schema`
(``stats_pass`` and ``fused_anchored_adamw_``). :func:`resolve_backend` picks one:

* ``eager``: plain torch (:mod:`.eager`), any device;
* ``cpp``: the C++ kernel for CPU tensors (:mod:`.cpp`, built on first use);
* ``triton``: the Triton kernels for CUDA tensors (:mod:`.triton`);
* ``auto``: ``triton`` for CUDA, ``cpp`` for CPU, ``eager`` where those are unavailable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import eager
from .schema import math_dtype

BACKENDS = ("auto", "eager", "cpp", "triton")


@dataclass(frozen=True)
class Backend:
    """One implementation of the contract: ``stats_pass(U, B, A)`` and
    ``fused_step(A, B, ..., maximize)`` with the argument order of the op schema."""

    name: str
    stats_pass: Callable
    fused_step: Callable


EAGER = Backend("eager", eager.stats_pass_impl, eager.fused_step_impl)


def _compiled_backend(name: str) -> Backend | None:
    """The ``cpp`` or ``triton`` backend if it can run here, else None.

    Each backend module exposes ``is_available() -> bool`` and the Python callables
    ``stats_pass`` and ``fused_step`` with the op schema's argument order.
    """
    try:
        mod = importlib.import_module(f"{__name__}.{'cpp' if name == 'cpp' else 'triton'}")
    except ImportError:
        return None
    if not mod.is_available():
        return None
    return Backend(name, mod.stats_pass, mod.fused_step)


def _triton_interpreting() -> bool:
    try:
        from . import triton as triton_backend
    except ImportError:
        return False
    return triton_backend._interpreting()


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """The backend that runs tensors on ``device`` for the user's ``requested`` choice.

    Raises:
        ValueError: ``requested`` is not one of :data:`BACKENDS`, or names a backend that
            cannot run on ``device`` (``cpp`` for CUDA tensors, ``triton`` for CPU ones
            outside the Triton interpreter).
    """
    from ..errors import OptimizerInputError

    if requested not in BACKENDS:
        raise OptimizerInputError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "eager":
        return EAGER
    if requested == "auto":
        name = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else None
        if name is None:
            return EAGER
        return _compiled_backend(name) or EAGER
    if requested == "cpp" and device.type != "cpu":
        raise OptimizerInputError(f"backend 'cpp' runs CPU tensors; parameters are on {device}")
    if requested == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise OptimizerInputError(
            f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); parameters are on {device}"
        )
    backend = _compiled_backend(requested)
    if backend is None:
        raise OptimizerInputError(f"backend {requested!r} is not available on this machine")
    return backend


__all__ = ["BACKENDS", "Backend", "EAGER", "math_dtype", "resolve_backend"]
