"""Alignment anchors: the low-rank alignment subspace of each module, its file format,
and binding to a PEFT model.

For one linear module with weights ``W`` of shape (m, n) (torch's ``out × in``), the
alignment delta is ``V = W_aligned − W_base`` (m, n). Its SVD ``V = Σ sᵢ uᵢ yᵢᵀ`` gives
the anchor entry ``U = [u₁ … u_k]`` (m, k), ``s`` (k,) and ``‖V‖_F`` (scalar). The
published projection is ``C = V Vᵀ / ‖V‖_F = U diag(s²/‖V‖_F) Uᵀ`` (exact when k equals
``rank(V)``).

Modes (``AlignmentAnchor.bind(..., mode=)``) choose the per-direction weights ``cᵢ``:

=============  ==================  ===========================================
mode           ``cᵢ``              meaning
=============  ==================  ===========================================
``paper``      ``sᵢ² / ‖V‖_F``     the published ``C`` (default)
``projector``  ``1``               orthogonal projector onto the top-k subspace
``full``       ``0``               no anchor: λ‖BA‖²_F
=============  ==================  ===========================================

and ``wᵢ = 2cᵢ − cᵢ²`` so that ``(I − C)² = I − U diag(w) Uᵀ``. The published ``C`` is
not a projector: for ``cᵢ > 2`` the weight ``wᵢ`` is negative.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AnchorEntryError, AnchorFileError, AnchorMismatchError, AsFTError, UnsupportedAdapterError

FORMAT_VERSION = 1
METADATA_KEY = "asft_anchor"
MODES = ("paper", "projector", "full")

# Prefixes that wrappers put in front of the base model's module names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# Path segments inserted by FSDP1 / activation-checkpoint wrappers anywhere in a name.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# PEFT initializations that rewrite the base weight, so ΔW = B A on top of the aligned
# weights no longer holds.
_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")


def normalize_module_name(name: str) -> str:
    """Strip wrapper prefixes (DDP ``module.``, ``_orig_mod.``, PEFT ``base_model.model.``)
    and a trailing ``.weight`` from a module or parameter name."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name


@dataclass(frozen=True)
class AnchorEntry:
    """One module of an anchor.

    Attributes:
        U: (m, k) orthonormal left singular vectors of ``V``, float32 or float64, 1 ≤ k ≤ m.
        s: (k,) singular values ≥ 0, descending, same dtype as ``U``.
        fro_norm: ``‖V‖_F`` of the full delta (not of the truncation), > 0.
        shape: ``(m, n)`` of the delta in ``out × in`` layout.
        energy: fraction of ``‖V‖²_F`` captured by the k kept directions, in [0, 1].

    The values are checked once, at construction (:class:`AnchorEntryError` on failure):
    finite, ``UᵀU = I`` and ``Σ sᵢ² ≤ ‖V‖²_F`` up to a round-off tolerance of the dtype,
    and coefficients ``cᵢ``, ``wᵢ`` that the dtype can hold. The orthonormality check is
    one (k, k) Gram matrix in the basis dtype.
    """

    U: Tensor
    s: Tensor
    fro_norm: float
    shape: tuple[int, int]
    energy: float

    def __post_init__(self) -> None:
        _validate_entry(self)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def coefficients(self, mode: str) -> Tensor:
        """The per-direction ``c`` (k,) of ``C = U diag(c) Uᵀ`` for ``mode``."""
        if mode == "paper":
            if self.fro_norm == 0.0:
                return torch.zeros_like(self.s)
            return self.s.square() / self.fro_norm
        if mode == "projector":
            return torch.ones_like(self.s)
        if mode == "full":
            return torch.zeros_like(self.s)
        raise AsFTError(f"unknown anchor mode {mode!r}; expected one of {MODES}")


_BASIS_DTYPES = (torch.float32, torch.float64)


def _round_off(dtype: torch.dtype, size: int) -> float:
    """Tolerance for sums of ``size`` products in ``dtype``: 64·√size·eps (measured
    errors of float32 SVDs up to 4096 rows are below 1/100 of it)."""
    return 64.0 * math.sqrt(max(size, 16)) * torch.finfo(dtype).eps


def _is_int(x: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _validate_entry(e: AnchorEntry) -> None:
    """The construction-time checks of :class:`AnchorEntry` (see its docstring)."""
    U, s = e.U, e.s
    if not isinstance(U, Tensor) or not isinstance(s, Tensor):
        raise AnchorEntryError(f"U and s must be tensors, got {type(U).__name__} and {type(s).__name__}")
    if U.dtype not in _BASIS_DTYPES or s.dtype != U.dtype:
        raise AnchorEntryError(f"U and s must both be float32 or both float64, got {U.dtype} and {s.dtype}")
    shape = e.shape
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2 or not all(_is_int(d) for d in shape)
            or min(shape) < 1):
        raise AnchorEntryError(f"shape must be two positive ints (m, n), got {shape!r}")
    object.__setattr__(e, "shape", (int(shape[0]), int(shape[1])))
    m, n = e.shape
    if U.ndim != 2 or U.shape[0] != m or U.shape[1] < 1:
        raise AnchorEntryError(f"U must be (m, k) = ({m}, k) with k ≥ 1 for shape {e.shape}, got {tuple(U.shape)}")
    k = int(U.shape[1])
    if k > m:
        raise AnchorEntryError(f"U is ({m}, {k}): k = {k} > m = {m} directions cannot be orthonormal")
    if tuple(s.shape) != (k,):
        raise AnchorEntryError(f"s must be ({k},) to match U {tuple(U.shape)}, got {tuple(s.shape)}")
    for label, value in (("fro_norm", e.fro_norm), ("energy", e.energy)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise AnchorEntryError(f"{label} must be a finite number, got {value!r}")
    if e.fro_norm <= 0:
        raise AnchorEntryError(f"fro_norm = ‖V‖_F must be > 0 (a zero delta has no direction), got {e.fro_norm!r}")
    if not (0.0 <= e.energy <= 1.0 + _round_off(U.dtype, m)):
        raise AnchorEntryError(f"energy must be in [0, 1], got {e.energy!r}")
    if not bool(torch.isfinite(U).all()) or not bool(torch.isfinite(s).all()):
        raise AnchorEntryError("U or s holds NaN or inf")
    if bool((s < 0).any()):
        raise AnchorEntryError("singular values s must be ≥ 0")
    energy_sq = float(s.double().square().sum())
    fro_sq = float(e.fro_norm) ** 2
    if energy_sq > fro_sq * (1.0 + _round_off(U.dtype, max(m, n))):
        raise AnchorEntryError(
            f"Σ sᵢ² = {energy_sq:.6g} exceeds ‖V‖²_F = {fro_sq:.6g}: the singular values do not belong "
            "to a delta of this norm"
        )
    c = s.square() / float(e.fro_norm)
    if not bool(torch.isfinite(2 * c - c * c).all()):
        raise AnchorEntryError(f"s₁ = {float(s.max()):.4g} is too large for {U.dtype}: sᵢ²/‖V‖_F overflows; "
                               "store the basis in float64")
    gram = U.T @ U
    gram.diagonal().sub_(1.0)
    err = float(gram.abs().max())
    if not err <= _round_off(U.dtype, m):
        raise AnchorEntryError(f"U is not orthonormal: max |UᵀU − I| = {err:.3g} "
                               f"(tolerance {_round_off(U.dtype, m):.3g} for {U.dtype})")


DEFAULT_SEED = 0


def svd_method(shape: tuple[int, int], rank: int | None, *, method: str = "auto", oversample: int = 10) -> str:
    """The SVD :func:`factorize_delta` runs for a delta of ``shape`` (m, n): ``"exact"``
    (``torch.linalg.svd``) or ``"randomized"`` (:func:`randomized_svd`, needs ``rank``).

    ``"auto"`` picks randomized when ``4·(rank + oversample) < min(m, n)``: there the
    range finder works on a thin (n, rank + oversample) sketch and beats the full SVD.
    """
    if method not in ("auto", "exact", "randomized"):
        raise AsFTError(f"unknown SVD method {method!r}; expected 'auto', 'exact' or 'randomized'")
    if not _is_int(oversample) or oversample < 0:
        raise AsFTError(f"oversample must be an int ≥ 0, got {oversample!r}")
    if rank is None or method == "exact":
        return "exact"
    if method == "randomized" or 4 * (rank + oversample) < min(shape):
        return "randomized"
    return "exact"


def _check_sketch_args(niter: int, seed: int) -> None:
    if not _is_int(niter) or niter < 0:
        raise AsFTError(f"niter must be an int ≥ 0, got {niter!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise AsFTError(f"seed must be an int in [0, 2**63), got {seed!r}")


def randomized_svd(V: Tensor, q: int, *, niter: int = 4, seed: int = DEFAULT_SEED) -> tuple[Tensor, Tensor]:
    """Top-``q`` left singular vectors (m, q) and singular values (q,) of ``V`` (m, n) by a
    randomized range finder with ``niter`` power iterations (Halko, Martinsson & Tropp 2011).

    The Gaussian sketch Ω (n, q) is drawn on the CPU from a generator seeded with
    ``seed`` (the global RNG is untouched), so the same ``V``, ``q``, ``niter`` and
    ``seed`` give the same result on every run and the same sketch on every device.
    Each power iteration re-orthonormalizes (QR) to keep float32 accurate.
    """
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(V.shape[1], q, generator=gen, dtype=V.dtype).to(V.device)
    Q = torch.linalg.qr(V @ omega).Q  # (m, q): orthonormal basis of the range sketch
    for _ in range(niter):
        Q = torch.linalg.qr(V.T @ Q).Q  # (n, q)
        Q = torch.linalg.qr(V @ Q).Q  # (m, q)
    U_small, s, _ = torch.linalg.svd(Q.T @ V, full_matrices=False)  # (q, n) → U_small (q, q)
    return Q @ U_small, s


def paper_weight_bound(c_max: float) -> float:
    """``max |wᵢ| = max |2c − c²|`` over ``c ∈ [0, c_max]``: ``w`` rises to 1 at ``c = 1``,
    falls to 0 at ``c = 2`` and is ``−c(c − 2)`` beyond (``|w| = 1`` again at ``c = 1 + √2``)."""
    c_max = max(float(c_max), 0.0)
    if c_max <= 1.0:
        return c_max * (2.0 - c_max)
    return max(1.0, c_max * (c_max - 2.0))


def dropped_paper_bounds(s: Tensor, fro_norm: float, full_rank: int) -> list[float]:
    """``bounds[k]`` (k = 0 … K) is the largest ``|wᵢ|`` of mode ``paper`` over the
    directions an anchor keeping the top k of ``s`` drops.

    Why it matters: with ``M = B A`` and ``aᵢ = ‖uᵢᵀ M‖²``, the published
    ``R = ‖(I − C) M‖²_F = ‖M‖²_F − Σᵢ wᵢ aᵢ`` over all directions of ``V``
    (``wᵢ = 2cᵢ − cᵢ²``, ``cᵢ = sᵢ²/‖V‖_F``), and an anchor of the top k has the same
    ``cᵢ`` for what it keeps, so ``R_k − R = Σ_{i>k} wᵢ aᵢ`` and, as ``Σ_{i>k} aᵢ ≤ ‖M‖²_F``,
    ``|R_k − R| ≤ bounds[k] · ‖B A‖²_F`` for every ``B A``; equality when ``B A`` lies along
    the dropped direction of largest ``|wᵢ|``.

    Args:
        s: (K,) singular values of ``V`` known, descending (K ≤ ``full_rank``).
        fro_norm: ``‖V‖_F``.
        full_rank: ``min(m, n)``. When K < ``full_rank`` the unknown directions beyond K
            have ``sᵢ ≤ s_K`` and ``Σ sᵢ² ≤ ‖V‖²_F − Σ_known``: their ``c`` is bounded by
            ``min(s_K², ‖V‖²_F − Σ_known) / ‖V‖_F`` and :func:`paper_weight_bound` of it
            enters every bound.
    """
    s64 = s.detach().double().cpu()
    if fro_norm <= 0.0:
        return [0.0] * (s64.numel() + 1)
    c = s64.square() / fro_norm
    w = (c * (2.0 - c)).abs()
    tail = 0.0
    if s64.numel() < full_rank:
        rest = max(fro_norm * fro_norm - float(s64.square().sum()), 0.0)
        last = float(s64[-1]) ** 2 if s64.numel() else rest
        tail = paper_weight_bound(min(last, rest) / fro_norm)
    bounds = [tail] * (s64.numel() + 1)
    for k in range(s64.numel() - 1, -1, -1):
        bounds[k] = max(bounds[k + 1], float(w[k]))
    return bounds


def entry_paper_bound(entry: AnchorEntry) -> float:
    """An upper bound, from ``entry`` alone, on the largest ``|wᵢ|`` (mode ``paper``) of the
    directions of ``V`` it does not keep (see :func:`dropped_paper_bounds`): each has
    ``sᵢ ≤ s_k`` and they hold ``(1 − energy)·‖V‖²_F`` together. For anchors whose file
    predates the stored bound."""
    full = min(entry.shape)
    if entry.rank >= full:
        return 0.0
    rest = max(1.0 - entry.energy, 0.0) * entry.fro_norm ** 2
    last = float(entry.s[-1].double()) ** 2
    return paper_weight_bound(min(last, rest) / entry.fro_norm)


def factorize_delta(
    V: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    method: str = "auto",
    oversample: int = 10,
    niter: int = 4,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    name: str = "delta",
    tolerance: float | None = None,
) -> AnchorEntry:
    """SVD of one alignment delta ``V`` (m, n), truncated to ``rank``, ``energy`` or ``tolerance``.

    Args:
        V: (m, n) delta in ``out × in`` layout, any floating dtype and device.
        rank: number of directions kept; ``None`` keeps the numerical rank of ``V``.
        energy: if given (0 < energy ≤ 1), the smallest k whose directions capture this
            fraction of ``‖V‖²_F`` (capped by ``rank`` when both are given).
        tolerance: if given (τ ≥ 0), the smallest k whose dropped directions change the
            published ``R`` by at most ``τ · ‖B A‖²_F`` for every ``B A`` (mode ``paper``;
            see :func:`dropped_paper_bounds`), capped by ``rank``; not with ``energy``. Runs
            the exact SVD (``method="randomized"`` is refused).
        method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"``
            (:func:`randomized_svd` with ``oversample`` extra columns and ``niter`` power
            iterations) or ``"auto"`` (randomized when ``rank`` is set and
            ``4·(rank + oversample) < min(m, n)``).
        seed: seed of the randomized SVD's sketch (same seed, same result).
        dtype: dtype of the stored ``U`` and ``s`` (float32 or float64).
        name: module name used in error messages.

    Raises:
        AnchorMismatchError: ``V`` not 2-D, not floating point, non-finite, exactly zero
            (an unchanged module has no direction), or too large for ``dtype``.
        AsFTError: bad ``rank``, ``energy``, ``tolerance``, ``method``, ``oversample``,
            ``niter``, ``seed`` or ``dtype``.
    """
    return _factorize(V, rank, energy, method=method, oversample=oversample, niter=niter, seed=seed, dtype=dtype,
                      name=name, tolerance=tolerance)[0]


def check_tolerance(tolerance: float | None, energy: float | None) -> None:
    """Raise :class:`AsFTError` unless ``tolerance`` is None or a finite number ≥ 0 given
    without ``energy``."""
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise AsFTError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if energy is not None:
        raise AsFTError("give energy or tolerance, not both (each picks the number of directions per module)")


def _factorize(
    V: Tensor,
    rank: int | None,
    energy: float | None,
    *,
    method: str,
    oversample: int,
    niter: int,
    seed: int,
    dtype: torch.dtype,
    name: str,
    tolerance: float | None,
) -> tuple[AnchorEntry, float | None]:
    """:func:`factorize_delta`, and the bound of :func:`dropped_paper_bounds` at the k kept
    (None after a randomized SVD)."""
    check_tolerance(tolerance, energy)
    if V.ndim != 2:
        raise AnchorMismatchError(f"{name}: alignment delta must be 2-D, got shape {tuple(V.shape)}")
    if not V.is_floating_point():
        raise AnchorMismatchError(f"{name}: alignment delta must be floating point, got {V.dtype}")
    if rank is not None and (not _is_int(rank) or rank < 1):
        raise AsFTError(f"rank must be a positive int or None, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise AsFTError(f"energy must be in (0, 1], got {energy!r}")
    if dtype not in _BASIS_DTYPES:
        raise AsFTError(f"anchor dtype must be torch.float32 or torch.float64, got {dtype}")
    _check_sketch_args(niter, seed)
    V = V.detach()
    m, n = V.shape
    if min(m, n) < 1:
        raise AnchorMismatchError(f"{name}: alignment delta has an empty shape {(m, n)}")
    chosen = svd_method((m, n), rank, method=method, oversample=oversample)  # validates method
    if tolerance is not None and chosen == "randomized":
        if method == "randomized":
            raise AsFTError(f"{name}: tolerance needs the exact SVD (its bound uses every singular value and "
                            "exact singular vectors); use method='exact' or 'auto'")
        chosen = "exact"
    work = V.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if not torch.isfinite(work).all():
        raise AnchorMismatchError(f"{name}: alignment delta of shape {(m, n)} holds NaN or inf")
    fro = float(torch.linalg.vector_norm(work, dtype=torch.float64))  # no float64 copy of V
    if fro == 0.0:
        raise AnchorMismatchError(f"{name}: alignment delta is exactly zero (the module is unchanged), "
                                  "so it has no alignment direction")
    full = min(m, n)
    if chosen == "randomized":
        U, s = randomized_svd(work, min(rank + oversample, full), niter=niter, seed=seed)
    else:
        U, s, _ = torch.linalg.svd(work, full_matrices=False)
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(U).all())):
        raise AnchorMismatchError(f"{name}: the SVD of the delta (‖V‖_F = {fro:.4g}) overflows {work.dtype}; "
                                  "build with dtype=torch.float64")
    # Numerical rank: drop directions at round-off level.
    tol = s[0] * max(m, n) * torch.finfo(work.dtype).eps
    k = int((s > tol).sum())
    if rank is not None:
        k = min(k, rank)
    if energy is not None:
        cum = torch.cumsum(s[:k].double().square(), 0) / (fro * fro)
        k_energy = int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype) - 1e-12)) + 1
        k = min(k, k_energy)
    bounds = dropped_paper_bounds(s, fro, full)
    if tolerance is not None:
        k = min(k, next(j for j in range(1, len(bounds)) if bounds[j] <= tolerance or j == len(bounds) - 1))
    k = max(k, 1)
    U = U[:, :k].contiguous()
    s = s[:k].contiguous()
    captured = float(s.double().square().sum()) / (fro * fro)
    try:
        entry = AnchorEntry(
            U=U.to(dtype).cpu().contiguous(),
            s=s.to(dtype).cpu().contiguous(),
            fro_norm=fro,
            shape=(int(m), int(n)),
            energy=min(captured, 1.0),
        )
    except AnchorEntryError as exc:
        raise AnchorMismatchError(f"{name}: {exc}") from exc
    # the bound holds for exact singular vectors and values; a sketch only estimates them
    return entry, (bounds[k] if chosen == "exact" else None)


class AlignmentAnchor(Mapping[str, AnchorEntry]):
    """The alignment subspace of every anchored module, keyed by the base model's names.

    Build one with :meth:`from_deltas` or :func:`asft_kernels.build_anchor`, store it with
    :meth:`save`, read it with :meth:`load`, attach it to a PEFT model with :meth:`bind`.
    """

    def __init__(self, entries: Mapping[str, AnchorEntry], metadata: dict[str, Any] | None = None):
        self._entries: dict[str, AnchorEntry] = {}
        for key, entry in entries.items():
            if not isinstance(entry, AnchorEntry):
                raise AnchorEntryError(f"anchor entry {key!r} must be an AnchorEntry, got {type(entry).__name__}")
            name = normalize_module_name(key)
            if name in self._entries:
                raise AnchorEntryError(f"two anchor entries have the module name {name!r}")
            self._entries[name] = entry
        if not self._entries:
            raise AnchorEntryError("an anchor needs at least one module")
        self.metadata: dict[str, Any] = dict(metadata or {})
        # Wall-clock seconds of the build (``build_anchor``); not stored in files.
        self.timings: dict[str, Any] = {}

    # Mapping protocol -------------------------------------------------------------
    def __getitem__(self, key: str) -> AnchorEntry:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        ranks = sorted({e.rank for e in self._entries.values()})
        return f"AlignmentAnchor({len(self)} modules, ranks={ranks})"

    # Construction -----------------------------------------------------------------
    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, Tensor],
        rank: int | None = None,
        energy: float | None = None,
        *,
        method: str = "auto",
        dtype: torch.dtype = torch.float32,
        oversample: int = 10,
        niter: int = 4,
        seed: int = DEFAULT_SEED,
        skip_unchanged: bool = False,
    ) -> AlignmentAnchor:
        """Anchor from alignment deltas ``{module name: V}``.

        Args:
            deltas: ``V = W_aligned − W_base`` per module, each (m, n) in ``out × in``
                layout (for GPT-2 ``Conv1D`` weights, pass ``W.T``; for an ``nn.Embedding``,
                ``V.T``, embedding_dim × num_embeddings, see docs/method.md). Names are the base
                model's module names (``model.layers.0.self_attn.q_proj``); a trailing
                ``.weight`` is accepted.
            rank: directions kept per module (``None``: the numerical rank).
            energy: keep per module the fewest directions capturing this fraction of
                ``‖V‖²_F``.
            method: SVD method, see :func:`factorize_delta`.
            dtype: dtype of the stored bases (float32 or float64).
            oversample, niter, seed: the randomized SVD's extra sketch columns, power
                iterations and sketch seed (:func:`randomized_svd`).
            skip_unchanged: leave modules whose delta is exactly zero out of the anchor
                (listed in ``metadata["skipped_unchanged"]``) instead of refusing them.

        Raises:
            AnchorMismatchError: no deltas, a delta that is not a finite 2-D float tensor,
                an unchanged (all-zero) module unless ``skip_unchanged``, or values too
                large for ``dtype``.
        """
        if len(deltas) == 0:
            raise AnchorMismatchError("from_deltas needs at least one module delta")
        entries: dict[str, AnchorEntry] = {}
        per_module: dict[str, dict[str, Any]] = {}
        unchanged: list[str] = []
        for name, V in deltas.items():
            if not isinstance(V, Tensor):
                raise AnchorMismatchError(f"{name}: alignment delta must be a tensor, got {type(V).__name__}")
            if V.is_floating_point() and V.numel() and not bool(V.detach().ne(0).any()):
                unchanged.append(name)
                continue
            entry = factorize_delta(V, rank, energy, method=method, oversample=oversample, niter=niter, seed=seed,
                                    dtype=dtype, name=name)
            key = normalize_module_name(name)
            entries[key] = entry
            per_module[key] = {"rank": entry.rank, "energy": entry.energy,
                               "method": svd_method(entry.shape, rank, method=method, oversample=oversample)}
        _refuse_unchanged(unchanged, skip_unchanged, "skip_unchanged=True")
        if not entries:
            raise AnchorMismatchError(f"every delta is exactly zero ({unchanged[:5]}...): nothing to anchor")
        meta = {"built_by": "from_deltas", "rank": rank, "energy": energy, "method": method,
                "oversample": oversample, "niter": niter, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
                "per_module": per_module, "skipped_unchanged": [normalize_module_name(n) for n in unchanged]}
        return cls(entries, meta)

    # File format ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the anchor as safetensors: per module ``<name>::U`` (m, k), ``<name>::s``
        (k,), ``<name>::fro`` (1,), and JSON metadata (format version, shapes, ranks,
        energies, how it was built: SVD method, seed, ...). The same anchor always gives
        the same bytes. The write is atomic (temp file, then rename; see
        :func:`atomic_write`); the file gets the usual permissions (0666 minus the umask).

        Raises:
            AsFTError: metadata that is not JSON (or holds NaN/inf).
            OSError: the file cannot be written (permissions, disk full, a directory).
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {}
        modules = {}
        for name, e in self._entries.items():
            tensors[f"{name}::U"] = e.U.detach().cpu().contiguous()
            tensors[f"{name}::s"] = e.s.detach().cpu().contiguous()
            tensors[f"{name}::fro"] = torch.tensor([e.fro_norm], dtype=torch.float64)
            modules[name] = {"shape": list(e.shape), "rank": e.rank, "energy": e.energy,
                             "fro_norm": e.fro_norm}
        meta = {"format_version": FORMAT_VERSION, "modules": modules, "build": self.metadata}
        try:
            text = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AsFTError(f"anchor metadata cannot be stored as JSON (NaN, inf or a non-JSON value): {exc}") from exc
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AlignmentAnchor:
        """Read and validate an anchor file written by :meth:`save`.

        Raises:
            AnchorFileError: missing, truncated or corrupted file, unknown format version,
                malformed metadata, inconsistent shapes, non-finite values, a
                non-orthonormal basis, singular values inconsistent with ``‖V‖_F``, or no
                modules. The message names the file and the field or module.
        """
        from safetensors import safe_open

        path = Path(path)
        where = f"anchor file {str(path)!r}"
        if path.is_dir():
            raise AnchorFileError(f"{where} is a directory, not an anchor file")
        if not path.is_file():
            raise AnchorFileError(f"{where} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several error types
            raise AnchorFileError(f"{where} is not a readable safetensors file: {exc}") from exc
        if raw_meta is None:
            raise AnchorFileError(f"{where} has no {METADATA_KEY!r} metadata (not an anchor file?)")
        meta = _parse_metadata(raw_meta, where)
        entries = {}
        used: set[str] = set()
        for name, info in meta["modules"].items():
            keys = (f"{name}::U", f"{name}::s", f"{name}::fro")
            entries[name] = _load_entry(name, info, tensors, where)
            used.update(keys)
        stray = sorted(set(tensors) - used)
        if stray:
            raise AnchorFileError(f"{where}: tensors {stray[:3]} belong to no module of metadata field 'modules'")
        return cls(entries, meta["build"])

    # Binding ------------------------------------------------------------------------
    def bind(
        self,
        model: nn.Module,
        mode: str = "paper",
        adapter_name: str = "default",
        *,
        strict: bool = True,
        use_lora_scaling: bool = False,
    ) -> AnchorBinding:
        """Pair every LoRA module of ``model`` with its anchor entry.

        Args:
            model: a PEFT model (also wrapped by DDP, ``torch.compile`` or FSDP2).
            mode: ``"paper"``, ``"projector"`` or ``"full"`` (see the module docstring).
            adapter_name: the PEFT adapter to anchor.
            strict: if True, every LoRA module of the adapter must have an anchor entry;
                if False, modules without one are left unanchored (plain AdamW).
                LoRA on an ``nn.Embedding`` (PEFT's ``lora_embedding_A/B``, delta
                ``(B A)ᵀ``) is anchored like any other module; its entry's ``V`` is
                ``(W_aligned − W_base)ᵀ``, ``embedding_dim × num_embeddings``.
            use_lora_scaling: if True the regularizer uses ``ΔW = scaling · B A`` as
                PEFT's forward does (scaling = alpha / r); the published regularizer
                (default) uses ``B A``.

        Raises:
            AnchorMismatchError: a module is missing or a shape does not match (the message
                names the module, the expected and the found shapes).
            UnsupportedAdapterError: DoRA, PiSSA/OLoRA/LoftQ/CorDA initializations, or
                LoRA on something other than a linear / ``Conv1D`` / ``Embedding`` layer, or
                a LoRA factor parametrized with ``torch.nn.utils.parametrize``.
        """
        if mode not in MODES:
            raise AsFTError(f"unknown anchor mode {mode!r}; expected one of {MODES}")
        _check_adapter_config(model, adapter_name)
        pairs: list[AnchoredPair] = []
        unmatched: list[str] = []
        found_any_lora = False
        for mod_name, module in model.named_modules():
            lora_A = getattr(module, "lora_A", None)
            lora_B = getattr(module, "lora_B", None)
            if not isinstance(lora_A, nn.ModuleDict) or not isinstance(lora_B, nn.ModuleDict):
                continue
            # PEFT keeps the factors of LoRA on an nn.Embedding in lora_embedding_A/B
            # (ParameterDicts), not in lora_A/lora_B: a module counts if either holds the adapter
            emb_A = getattr(module, "lora_embedding_A", None)
            if adapter_name not in lora_A and not (isinstance(emb_A, nn.ParameterDict) and adapter_name in emb_A):
                continue
            found_any_lora = True
            key = self._match_key(normalize_module_name(mod_name))
            if key is None:
                unmatched.append(mod_name)
                continue
            pairs.append(_make_pair(key, self._entries[key], mod_name, module, adapter_name, mode,
                                    use_lora_scaling))
        if not found_any_lora:
            raise AnchorMismatchError(
                f"model has no LoRA modules for adapter_name={adapter_name!r}; bind expects a PEFT model"
            )
        if unmatched and strict:
            raise AnchorMismatchError(
                f"LoRA modules without an anchor entry: {unmatched[:5]}"
                + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
                + f"; anchor has e.g. {list(self._entries)[:3]}. Pass strict=False to leave them unanchored."
            )
        if not pairs:
            raise AnchorMismatchError("no LoRA module of the model matches an anchor entry")
        return AnchorBinding(pairs, mode=mode, adapter_name=adapter_name, unanchored=unmatched)

    def _match_key(self, name: str) -> str | None:
        if name in self._entries:
            return name
        # Suffix match on a dot boundary, in either direction (anchor built from a
        # sub-model such as GPT2Model vs GPT2LMHeadModel); must be unique.
        hits = [k for k in self._entries if name.endswith("." + k) or k.endswith("." + name)]
        return hits[0] if len(hits) == 1 else None


def _refuse_unchanged(unchanged: list[str], allowed: bool, option: str) -> None:
    """Raise for modules whose delta is exactly zero unless ``allowed``: an unchanged
    module has ``‖V‖_F = 0``, and in ``paper`` mode ``C = 0`` silently turns the penalty
    into the plain ``λ‖BA‖²`` ablation."""
    if unchanged and not allowed:
        more = f" (+{len(unchanged) - 8} more)" if len(unchanged) > 8 else ""
        raise AnchorMismatchError(
            f"{len(unchanged)} module(s) unchanged between the checkpoints (delta exactly zero): "
            f"{unchanged[:8]}{more}; an unchanged module has no alignment direction. Check that the aligned "
            f"and base checkpoints differ, or pass {option} to leave these modules out of the anchor"
        )


def _reject_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token}")


def _parse_metadata(raw: str, where: str) -> dict[str, Any]:
    """The JSON metadata of an anchor file, checked field by field."""
    try:
        meta = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise AnchorFileError(f"{where}: metadata {METADATA_KEY!r} is nested too deeply") from exc
    except ValueError as exc:
        raise AnchorFileError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise AnchorFileError(f"{where}: metadata {METADATA_KEY!r} must be a JSON object, got {type(meta).__name__}")
    if "format_version" not in meta:
        raise AnchorFileError(f"{where}: metadata field 'format_version' is missing")
    version = meta["format_version"]
    if not _is_int(version):
        raise AnchorFileError(f"{where}: metadata field 'format_version' must be an int, got {version!r}")
    if version != FORMAT_VERSION:
        raise AnchorFileError(f"{where} has format version {version}, this library reads {FORMAT_VERSION}")
    modules = meta.get("modules")
    if not isinstance(modules, dict):
        raise AnchorFileError(f"{where}: metadata field 'modules' must be a JSON object "
                              f"{{module name: {{shape, rank, ...}}}}, got {type(modules).__name__}")
    if not modules:
        raise AnchorFileError(f"{where}: metadata field 'modules' is empty: the anchor has no modules")
    build = meta.get("build", {})
    if not isinstance(build, dict):
        raise AnchorFileError(f"{where}: metadata field 'build' must be a JSON object, got {type(build).__name__}")
    meta["build"] = build
    return meta


def _load_entry(name: str, info: Any, tensors: Mapping[str, Tensor], where: str) -> AnchorEntry:
    """One module of an anchor file: metadata ``info`` checked against its tensors."""
    field_ = f"modules[{name!r}]"
    if not isinstance(info, dict):
        raise AnchorFileError(f"{where}: metadata field {field_} must be a JSON object, got {type(info).__name__}")
    shape = info.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) and d >= 1 for d in shape):
        raise AnchorFileError(f"{where}: metadata field {field_}.shape must be two positive ints [m, n], "
                              f"got {shape!r}")
    rank = info.get("rank")
    if not _is_int(rank) or rank < 1:
        raise AnchorFileError(f"{where}: metadata field {field_}.rank must be a positive int, got {rank!r}")
    energy = info.get("energy")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))):
        raise AnchorFileError(f"{where}: metadata field {field_}.energy must be a number, got {energy!r}")
    found = {}
    for part in ("U", "s", "fro"):
        key = f"{name}::{part}"
        if key not in tensors:
            raise AnchorFileError(f"{where}: module {name!r} lacks tensor {key!r}")
        found[part] = tensors[key]
    U, s, fro = found["U"], found["s"], found["fro"]
    m, k = shape[0], rank
    mod = f"{where}, module {name!r}"
    if tuple(U.shape) != (m, k) or tuple(s.shape) != (k,):
        raise AnchorFileError(f"{mod}: metadata says shape {tuple(shape)} and rank {k}, so U ({m}, {k}) and s ({k},); "
                              f"found U {tuple(U.shape)} and s {tuple(s.shape)}")
    if fro.numel() != 1 or not fro.is_floating_point():
        raise AnchorFileError(f"{mod}: tensor '{name}::fro' must hold one float, found {tuple(fro.shape)} {fro.dtype}")
    if U.dtype not in _BASIS_DTYPES or s.dtype != U.dtype:
        raise AnchorFileError(f"{mod}: U/s must be float32 or float64, found {U.dtype}/{s.dtype}")
    for part, t in found.items():
        if not bool(torch.isfinite(t).all()):
            raise AnchorFileError(f"{mod}: tensor '{name}::{part}' holds NaN or inf")
    fro_norm = float(fro.double().reshape(()))
    if energy is None:  # files without it: what the stored directions capture
        energy = min(float(s.double().square().sum()) / fro_norm**2, 1.0) if fro_norm > 0 else 0.0
    try:
        return AnchorEntry(U=U, s=s, fro_norm=fro_norm, shape=(shape[0], shape[1]), energy=float(energy))
    except AnchorEntryError as exc:
        raise AnchorFileError(f"{mod}: {exc}") from exc


def _check_adapter_config(model: nn.Module, adapter_name: str) -> None:
    configs = None
    for mod in [model, *model.modules()]:
        cfg = getattr(mod, "peft_config", None)
        if isinstance(cfg, dict):
            configs = cfg
            break
    if not configs or adapter_name not in configs:
        return
    cfg = configs[adapter_name]
    if getattr(cfg, "use_dora", False):
        raise UnsupportedAdapterError(
            f"adapter {adapter_name!r} uses DoRA: its magnitude vector rescales W + BA, so "
            "ΔW = B A does not hold and the AsFT regularizer would anchor something else"
        )
    init = getattr(cfg, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"adapter {adapter_name!r} uses init_lora_weights={init!r}, which rewrites the base "
            "weight; the anchor describes deltas on top of the aligned weights, so it would not apply"
        )
    if getattr(cfg, "loftq_config", None):
        raise UnsupportedAdapterError(f"adapter {adapter_name!r} uses LoftQ, which rewrites the base weight")


def _make_pair(key, entry, mod_name, module, adapter, mode, use_lora_scaling) -> AnchoredPair:
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if magnitude is not None and adapter in magnitude:
        raise UnsupportedAdapterError(f"{mod_name}: DoRA magnitude vector present; ΔW = B A does not hold")
    use_dora = getattr(module, "use_dora", {})
    if isinstance(use_dora, dict) and use_dora.get(adapter, False):
        raise UnsupportedAdapterError(f"{mod_name}: DoRA adapter; ΔW = B A does not hold")
    embedding = adapter not in module.lora_A  # bind() saw it in lora_embedding_A
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
    if embedding:
        # PEFT: A (r, num_embeddings), B (embedding_dim, r), ΔW = (B A)ᵀ · scaling, so B A is the
        # delta in the out × in layout used everywhere else (an embedding's output is a row of W)
        if not isinstance(base, nn.Embedding):
            raise UnsupportedAdapterError(
                f"{mod_name}: lora_embedding_A/B on a {type(base).__name__}; only nn.Embedding can be anchored")
    else:
        lin_A, lin_B = module.lora_A[adapter], module.lora_B[adapter]
        if not isinstance(lin_A, nn.Linear) or not isinstance(lin_B, nn.Linear):
            raise UnsupportedAdapterError(
                f"{mod_name}: LoRA factors are {type(lin_A).__name__}/{type(lin_B).__name__}; "
                "only linear, Conv1D and Embedding layers can be anchored"
            )
    shape = _logical_weight_shape(base)
    if shape is None:
        raise UnsupportedAdapterError(f"{mod_name}: base layer {type(base).__name__} has no 2-D weight")
    conv1d = not embedding and (type(base).__name__ == "Conv1D" or bool(getattr(module, "fan_in_fan_out", False)))
    found = shape[::-1] if (conv1d or embedding) else shape
    if found != tuple(entry.shape):
        layout = " (Conv1D, in × out stored, compared transposed)" if conv1d else ""
        if embedding:
            layout = (" (Embedding: V is (W_aligned − W_base)ᵀ, embedding_dim × num_embeddings; "
                      "the weight is num_embeddings × embedding_dim)")
        raise AnchorMismatchError(
            f"{mod_name}: anchor entry {key!r} expects a weight of shape {tuple(entry.shape)} "
            f"(out × in), the model has {found}{layout}"
        )
    m, n = entry.shape
    if embedding:
        A, B = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    else:
        A, B = lin_A.weight, lin_B.weight
    r = A.shape[0]
    if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
        raise AnchorMismatchError(
            f"{mod_name}: expected lora_A ({r}, {n}) and lora_B ({m}, {r}), "
            f"found {tuple(A.shape)} and {tuple(B.shape)}"
        )
    pair = AnchoredPair(key=key, module_name=mod_name, module=module, adapter=adapter, entry=entry,
                        mode=mode, conv1d=conv1d, embedding=embedding)
    refuse_parametrized(pair, UnsupportedAdapterError)
    coef = 1.0
    if use_lora_scaling:
        coef = float(module.scaling[adapter]) ** 2
    pair.coef = coef
    return pair


def refuse_parametrized(pair: AnchoredPair, error: type[Exception]) -> None:
    """Raise ``error`` naming the module and factor if a factor of ``pair`` is parametrized
    (``torch.nn.utils.parametrize``): its parameter is not the ``A``/``B`` of ``ΔW = B A``,
    and anchoring it would either miss it or anchor the wrong tensor."""
    found = pair.parametrized()
    if found:
        raise error(
            f"{pair.module_name}: {'/'.join(found)} is parametrized (torch.nn.utils.parametrize); the anchored step "
            "writes A and B themselves, so a parametrized LoRA factor cannot be anchored. Remove the "
            "parametrization (parametrize.remove_parametrizations) or leave this module out of the anchor")


def _logical_weight_shape(base: nn.Module | None) -> tuple[int, int] | None:
    """The (rows, cols) of ``base``'s weight as the layer computes with it, or None.

    A quantized weight stores a packed tensor: bitsandbytes' 4-bit ``Params4bit`` is
    (m·n/2, 1) uint8 and keeps the real shape in ``quant_state.shape``; its 8-bit
    ``Int8Params`` keeps the real (m, n) shape. Unquantized weights are their own shape.
    """
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    quant_state = getattr(weight, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is None:
        shape = weight.shape
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


@dataclass
class AnchoredPair:
    """One anchored LoRA pair: a module's ``lora_A``/``lora_B`` and its anchor entry.

    The parameters are looked up on the module at every access, so swapping the
    parameter objects (accelerate, FSDP2) keeps the pairing intact.
    """

    key: str
    module_name: str
    module: nn.Module
    adapter: str
    entry: AnchorEntry
    mode: str
    coef: float = 1.0
    conv1d: bool = False
    embedding: bool = False  # LoRA on nn.Embedding: factors in lora_embedding_A/B, ΔW = (B A)ᵀ
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def A(self) -> nn.Parameter:
        """``lora_A`` weight, (r, n) (``lora_embedding_A``, (r, num_embeddings), for an embedding)."""
        if self.embedding:
            return self.module.lora_embedding_A[self.adapter]
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:
        """``lora_B`` weight, (m, r) (``lora_embedding_B``, (embedding_dim, r), for an embedding)."""
        if self.embedding:
            return self.module.lora_embedding_B[self.adapter]
        return self.module.lora_B[self.adapter].weight

    def parametrized(self) -> list[str]:
        """The factors (``"lora_A"``, ``"lora_B"``) whose tensor is computed by a
        ``torch.nn.utils.parametrize`` parametrization: the step writes parameters, and the
        regularizer of a parametrized factor would have to go through the parametrization."""
        from torch.nn.utils import parametrize

        return [label for label, (holder, name) in zip(("lora_A", "lora_B"), self.factor_holders())
                if parametrize.is_parametrized(holder, name)]

    def factor_holders(self) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        """``(module, attribute)`` holding A, then B: ``lora_A[adapter].weight`` (for an
        embedding the ``lora_embedding_A`` dict's ``adapter`` entry), then B's. Registering a
        parametrization on a factor changes its holder's class."""
        if self.embedding:
            return (self.module.lora_embedding_A, self.adapter), (self.module.lora_embedding_B, self.adapter)
        return (self.module.lora_A[self.adapter], "weight"), (self.module.lora_B[self.adapter], "weight")

    @property
    def c(self) -> Tensor:
        """``c`` (k,) of ``C = U diag(c) Uᵀ`` for this pair's mode (CPU, anchor dtype)."""
        return self.entry.coefficients(self.mode)

    @property
    def w(self) -> Tensor:
        """``w = 2c − c²`` (k,): ``(I − C)² = I − U diag(w) Uᵀ``."""
        c = self.c
        return 2 * c - c * c

    def basis(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``U`` (m, k) on ``device`` in ``dtype``, cached."""
        key = ("U", torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.entry.U.to(device=device, dtype=dtype).contiguous()
        return self._cache[key]

    def weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``w`` (k,) on ``device`` in ``dtype``, cached."""
        key = ("w", torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.w.to(device=device, dtype=dtype).contiguous()
        return self._cache[key]


class AnchorBinding:
    """An anchor attached to one model: the list of :class:`AnchoredPair`.

    Pass it to :class:`asft_kernels.AsFTAdamW` as ``anchor=``. ``unanchored`` lists the
    LoRA modules left without an anchor entry (``strict=False``).
    """

    def __init__(self, pairs: list[AnchoredPair], mode: str, adapter_name: str,
                 unanchored: list[str] | None = None):
        self.pairs = list(pairs)
        self.mode = mode
        self.adapter_name = adapter_name
        self.unanchored = list(unanchored or [])
        self._by_key = {p.key: p for p in self.pairs}
        if len(self._by_key) != len(self.pairs):
            raise AnchorMismatchError("two LoRA modules matched the same anchor entry")

    def __getitem__(self, key: str) -> AnchoredPair:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[AnchoredPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"AnchorBinding({len(self)} pairs, mode={self.mode!r}, adapter={self.adapter_name!r})"

    #: True for a binding that lost its model (unpickled): it refuses to anchor anything
    detached = False

    def __deepcopy__(self, memo: dict) -> AnchorBinding:
        # copy.deepcopy((model, optimizer)) maps every pair's module to the copied model
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol):
        # A pickle keeps no model: the copy is detached, and an optimizer holding it refuses
        # to step instead of training unanchored.
        return (_DetachedBinding, (self.mode, self.adapter_name, [p.key for p in self.pairs]))


class _DetachedBinding(AnchorBinding):
    """What an :class:`AnchorBinding` becomes through pickle: its keys without the model."""

    detached = True

    def __init__(self, mode: str, adapter_name: str, keys: list[str]):
        super().__init__([], mode, adapter_name)
        self.keys = list(keys)

    def __repr__(self) -> str:
        return f"AnchorBinding(detached: {len(self.keys)} pairs without a model, mode={self.mode!r})"


# Temporary files of atomic_write: ``.<target>.asft-tmp.<host>.<pid>.<random>``.
_TMP_MARK = ".asft-tmp."
_STALE_AFTER_S = 3600.0  # a temp file of another host untouched this long is abandoned


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(path: Path) -> list[Path]:
    """Remove temp files that an earlier :func:`atomic_write` of ``path`` left behind
    when it was killed: those of a process of this host that no longer runs, and those of
    other hosts untouched for an hour. Returns the removed paths."""
    prefix = f".{path.name}{_TMP_MARK}"
    removed = []
    host = _host_tag()
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for tmp in candidates:
        parts = tmp.name[len(prefix):].split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        tmp_host, pid = parts[0], int(parts[1])
        try:
            if tmp_host == host:
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = time.time() - tmp.stat().st_mtime > _STALE_AFTER_S
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over
    ``path``; on any error the temporary file is removed and ``path`` is untouched.

    The temporary file is named ``.<name>.asft-tmp.<host>.<pid>.<random>``; one left by
    a writer that was killed (``kill -9``, power loss) is removed by the next write of
    the same ``path``. The result gets the usual permissions, 0666 minus the umask
    (set after ``write``, which may replace the file it was given).

    Raises:
        OSError: ``path`` is a directory, or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.parent / f".{path.name}{_TMP_MARK}{_host_tag()}.{os.getpid()}.{os.urandom(4).hex()}"
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
