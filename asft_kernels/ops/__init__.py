"""Backends of the anchored AdamW step, and the one routing policy between them.

The backend contract (docs/architecture.md has the flow and an add-a-backend checklist): a
module with

* ``supports(dtype, rank) -> bool``: which pairs it runs (parameter dtype, LoRA rank r);
* ``stats_pass(U, B, A) -> (P, G, M)`` on lists of pairs (fresh statistics);
* ``prepare(bucket: BucketTensors, counters) -> handle``: validates the tensors of one
  bucket once and keeps what its step needs; ``counters`` is the bucket's (2L,) view of the
  plan's step-counter buffer, A's counters then B's;
* ``step(handle, grad_A, grad_B, scale, hyper_A, hyper_B, grad_scale=None, found_inf=None)
  -> R``: one call advances the handle's counters by one, computes the anchoring terms from
  the cached ``P, G, M`` (``scale`` (L,) = 2λ·coef per pair), runs the fused update of every
  pair (A with ``hyper_A``, B with ``hyper_B``: each factor's own param group), writes the
  next statistics, and returns ``R`` (0-d, math dtype) at the statistics before the step.
  ``grad_scale``/``found_inf`` come from a GradScaler: task gradients are divided by the
  scale (the ``.grad`` tensors are not modified); when ``found_inf`` is nonzero nothing is
  written;
* ``fused_step(batch: AnchoredBatch, hyper_A, hyper_B=None)``: the fused update alone, the
  ``asft::fused_anchored_adamw_`` op (and :func:`asft_kernels.functional.anchored_adamw`).

* ``is_available(warn=True) -> bool`` (``warn=False``: an explicit request, which raises
  naming the cause instead of warning);
* ``DEVICE_COUNTERS`` (optional, default False): the step counters live on the parameters'
  device (Triton) rather than on the CPU.

A backend module without ``prepare``/``step`` of its own is run through
:func:`.eager.prepare` with its ``fused_step``: the terms in eager math, the counters on the
CPU. A backend is given only pairs it supports; it never falls back by itself. The
one place that decides which backend runs a pair is :func:`route`, called once per pair when
the step plan is built:

* ``eager``: plain torch (:mod:`.eager`), any device, every pair (and frozen-factor pairs);
* ``cpp``: the C++ kernel for CPU tensors (:mod:`.cpp`, built on first use);
* ``triton``: the Triton kernels for CUDA tensors (:mod:`.triton`);
* ``auto``: ``triton`` for CUDA, ``cpp`` for CPU, ``eager`` where those are unavailable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import eager
from .schema import (
    BATCH_FIELDS,
    LIBRARY_NAME,
    AdamWHyper,
    AnchoredBatch,
    BucketTensors,
    _lib,
    math_dtype,
    op_kernel,
)

BACKENDS = ("auto", "eager", "cpp", "triton")


@dataclass(frozen=True)
class Backend:
    """One implementation of the contract (see the module docstring)."""

    name: str
    supports: Callable[[torch.dtype, int], bool]
    stats_pass: Callable
    fused_step: Callable
    prepare: Callable
    step: Callable
    #: whether the step counters live on the parameters' device (else on the CPU)
    device_counters: bool = False


EAGER = Backend("eager", eager.supports, eager.stats_pass, eager.fused_step, eager.prepare, eager.step)

# The eager implementation is the ops' default on every device.
_lib.impl("stats_pass", eager.stats_pass, "CompositeExplicitAutograd")
_lib.impl("fused_anchored_adamw_", op_kernel(eager.fused_step), "CompositeExplicitAutograd")
_lib.impl("anchoring_terms_", eager.anchoring_terms_op, "CompositeExplicitAutograd")
_lib.impl("anchored_adamw_step_", eager.anchored_step_op, "CompositeExplicitAutograd")


def _compiled_backend(name: str, warn: bool = True) -> Backend | None:
    """The ``cpp`` or ``triton`` backend if it can run here, else None. ``warn=False``: an
    explicit request, which raises naming the cause (:func:`_unavailable_reason`) instead of
    the warning that ``auto`` gives before it runs eager."""
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
    if not mod.is_available(warn=warn):
        return None
    device_counters = bool(getattr(mod, "DEVICE_COUNTERS", False))
    if hasattr(mod, "prepare") and hasattr(mod, "step"):
        return Backend(name, mod.supports, mod.stats_pass, mod.fused_step, mod.prepare, mod.step,
                       device_counters=device_counters)
    return Backend(name, mod.supports, mod.stats_pass, mod.fused_step, partial(eager.prepare, fused=mod.fused_step),
                   eager.step, device_counters=device_counters)


def _triton_interpreting() -> bool:
    try:
        from . import triton as triton_backend
    except ImportError:
        return False
    return triton_backend._interpreting()


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """The backend that runs tensors on ``device`` for the user's ``requested`` choice.

    Raises:
        OptimizerInputError: ``requested`` is not one of :data:`BACKENDS`, or names a
            backend that cannot run on ``device`` (``cpp`` for CUDA tensors, ``triton`` for
            CPU ones outside the Triton interpreter), or is not available here.
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
    check_device(requested, device)
    backend = _compiled_backend(requested, warn=False)
    if backend is None:
        raise OptimizerInputError(
            f"backend {requested!r} is not available on this machine: {_unavailable_reason(requested)}")
    return backend


def _unavailable_reason(name: str) -> str:
    """Why the compiled backend ``name`` cannot run here, in a few words."""
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        return f"importing it failed ({exc})"
    reason = getattr(mod, "unavailable_reason", None)
    if callable(reason) and reason():
        return reason()
    return getattr(mod, "UNSUPPORTED", None) or "its is_available() is False"


def check_device(requested: str, device: torch.device) -> None:
    """Refuse an explicit backend that cannot run tensors on ``device`` (nothing is built)."""
    from ..errors import OptimizerInputError

    if requested == "cpp" and device.type != "cpu":
        raise OptimizerInputError(f"backend 'cpp' runs CPU tensors; parameters are on {device}")
    if requested == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise OptimizerInputError(
            f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); parameters are on {device}"
        )


def route(backend: Backend, dtype: torch.dtype, rank: int) -> Backend:
    """The backend that runs a pair of parameter ``dtype`` and LoRA ``rank``: ``backend``
    where it supports the pair, else :data:`EAGER`. The only fallback between backends."""
    return backend if backend.supports(dtype, rank) else EAGER


__all__ = [
    "BACKENDS", "BATCH_FIELDS", "EAGER", "LIBRARY_NAME", "AdamWHyper", "AnchoredBatch", "Backend", "BucketTensors",
    "check_device", "math_dtype", "resolve_backend", "route",
]
