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
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AnchorFileError, AnchorMismatchError, AsFTError, UnsupportedAdapterError

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
        U: (m, k) orthonormal left singular vectors of ``V``, float32 or float64.
        s: (k,) singular values, descending, same dtype as ``U``.
        fro_norm: ``‖V‖_F`` of the full delta (not of the truncation).
        shape: ``(m, n)`` of the delta in ``out × in`` layout.
        energy: fraction of ``‖V‖²_F`` captured by the k kept directions.
    """

    U: Tensor
    s: Tensor
    fro_norm: float
    shape: tuple[int, int]
    energy: float

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


def svd_method(shape: tuple[int, int], rank: int | None, *, method: str = "auto", oversample: int = 10) -> str:
    """The SVD :func:`factorize_delta` runs for a delta of ``shape`` (m, n): ``"exact"``
    (``torch.linalg.svd``) or ``"randomized"`` (``torch.svd_lowrank``, needs ``rank``).

    ``"auto"`` picks randomized when ``4·(rank + oversample) < min(m, n)``: there the
    range finder works on a thin (n, rank + oversample) sketch and beats the full SVD.
    """
    if method not in ("auto", "exact", "randomized"):
        raise AsFTError(f"unknown SVD method {method!r}")
    if rank is None or method == "exact":
        return "exact"
    if method == "randomized" or 4 * (rank + oversample) < min(shape):
        return "randomized"
    return "exact"


def factorize_delta(
    V: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    method: str = "auto",
    oversample: int = 10,
    niter: int = 4,
    dtype: torch.dtype = torch.float32,
    name: str = "delta",
) -> AnchorEntry:
    """SVD of one alignment delta ``V`` (m, n), truncated to ``rank`` or to ``energy``.

    Args:
        V: (m, n) delta in ``out × in`` layout, any floating dtype and device.
        rank: number of directions kept; ``None`` keeps the numerical rank of ``V``.
        energy: if given (0 < energy ≤ 1), the smallest k whose directions capture this
            fraction of ``‖V‖²_F`` (capped by ``rank`` when both are given).
        method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (``torch.svd_lowrank``
            with ``oversample`` extra columns and ``niter`` power iterations) or ``"auto"``
            (randomized when ``rank`` is set and ``4·(rank + oversample) < min(m, n)``).
        dtype: dtype of the stored ``U`` and ``s`` (float32 or float64).
        name: module name used in error messages.
    """
    if V.ndim != 2:
        raise AnchorMismatchError(f"{name}: alignment delta must be 2-D, got shape {tuple(V.shape)}")
    if not V.is_floating_point():
        raise AnchorMismatchError(f"{name}: alignment delta must be floating point, got {V.dtype}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise AsFTError(f"rank must be a positive int or None, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise AsFTError(f"energy must be in (0, 1], got {energy!r}")
    V = V.detach()
    m, n = V.shape
    chosen = svd_method((m, n), rank, method=method, oversample=oversample)  # validates method
    work = V.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if not torch.isfinite(work).all():
        raise AnchorMismatchError(f"{name}: alignment delta of shape {(m, n)} holds NaN or inf")
    fro = float(torch.linalg.vector_norm(work, dtype=torch.float64))  # no float64 copy of V
    full = min(m, n)
    if chosen == "randomized":
        q = min(rank + oversample, full)
        U, s, _ = torch.svd_lowrank(work, q=q, niter=niter)
    else:
        U, s, _ = torch.linalg.svd(work, full_matrices=False)
    # Numerical rank: drop directions at round-off level.
    tol = (s[0] if s.numel() else torch.tensor(0.0)) * max(m, n) * torch.finfo(work.dtype).eps
    k = int((s > tol).sum()) if s.numel() else 0
    if rank is not None:
        k = min(k, rank)
    if energy is not None and fro > 0:
        cum = torch.cumsum(s[:k].double().square(), 0) / (fro * fro)
        k_energy = int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype) - 1e-12)) + 1
        k = min(k, k_energy)
    k = max(k, 1)
    U = U[:, :k].contiguous()
    s = s[:k].contiguous()
    captured = float(s.double().square().sum()) / (fro * fro) if fro > 0 else 1.0
    return AnchorEntry(
        U=U.to(dtype).cpu().contiguous(),
        s=s.to(dtype).cpu().contiguous(),
        fro_norm=fro,
        shape=(int(m), int(n)),
        energy=min(captured, 1.0),
    )


class AlignmentAnchor(Mapping[str, AnchorEntry]):
    """The alignment subspace of every anchored module, keyed by the base model's names.

    Build one with :meth:`from_deltas` or :func:`asft_kernels.build_anchor`, store it with
    :meth:`save`, read it with :meth:`load`, attach it to a PEFT model with :meth:`bind`.
    """

    def __init__(self, entries: Mapping[str, AnchorEntry], metadata: dict[str, Any] | None = None):
        self._entries: dict[str, AnchorEntry] = {normalize_module_name(k): v for k, v in entries.items()}
        self.metadata: dict[str, Any] = dict(metadata or {})

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
    ) -> AlignmentAnchor:
        """Anchor from alignment deltas ``{module name: V}``.

        Args:
            deltas: ``V = W_aligned − W_base`` per module, each (m, n) in ``out × in``
                layout (for GPT-2 ``Conv1D`` weights, pass ``W.T``). Names are the base
                model's module names (``model.layers.0.self_attn.q_proj``); a trailing
                ``.weight`` is accepted.
            rank: directions kept per module (``None``: the numerical rank).
            energy: keep per module the fewest directions capturing this fraction of
                ``‖V‖²_F``.
            method: SVD method, see :func:`factorize_delta`.
            dtype: dtype of the stored bases (float32 or float64).
        """
        if len(deltas) == 0:
            raise AnchorMismatchError("from_deltas needs at least one module delta")
        entries = {
            normalize_module_name(name): factorize_delta(
                V, rank, energy, method=method, dtype=dtype, name=name
            )
            for name, V in deltas.items()
        }
        meta = {"built_by": "from_deltas", "rank": rank, "energy": energy, "method": method}
        return cls(entries, meta)

    # File format ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the anchor as safetensors: per module ``<name>::U`` (m, k), ``<name>::s``
        (k,), ``<name>::fro`` (1,), and JSON metadata (format version, shapes, ranks,
        energies, how it was built). The write is atomic (temp file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {}
        modules = {}
        for name, e in self._entries.items():
            tensors[f"{name}::U"] = e.U.contiguous()
            tensors[f"{name}::s"] = e.s.contiguous()
            tensors[f"{name}::fro"] = torch.tensor([e.fro_norm], dtype=torch.float64)
            modules[name] = {"shape": list(e.shape), "rank": e.rank, "energy": e.energy,
                             "fro_norm": e.fro_norm}
        meta = {"format_version": FORMAT_VERSION, "modules": modules, "build": self.metadata}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AlignmentAnchor:
        """Read and validate an anchor file written by :meth:`save`.

        Raises:
            AnchorFileError: missing, truncated or corrupted file, unknown format
                version, inconsistent shapes, non-finite values or a non-orthonormal basis.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise AnchorFileError(f"anchor file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except AnchorFileError:
            raise
        except Exception as exc:  # safetensors raises several error types
            raise AnchorFileError(f"anchor file {str(path)!r} is not a readable safetensors file: {exc}") from exc
        if raw_meta is None:
            raise AnchorFileError(f"anchor file {str(path)!r} has no {METADATA_KEY!r} metadata")
        try:
            meta = json.loads(raw_meta)
            version = meta["format_version"]
            modules = meta["modules"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorFileError(f"anchor file {str(path)!r}: malformed metadata ({exc})") from exc
        if version != FORMAT_VERSION:
            raise AnchorFileError(
                f"anchor file {str(path)!r} has format version {version}, this library reads {FORMAT_VERSION}"
            )
        entries = {}
        for name, info in modules.items():
            try:
                U, s, fro = tensors[f"{name}::U"], tensors[f"{name}::s"], tensors[f"{name}::fro"]
            except KeyError as exc:
                raise AnchorFileError(f"anchor file {str(path)!r}: module {name!r} lacks tensor {exc}") from exc
            m, n = info["shape"]
            k = info["rank"]
            where = f"anchor file {str(path)!r}, module {name!r}"
            if tuple(U.shape) != (m, k) or tuple(s.shape) != (k,) or fro.numel() != 1:
                raise AnchorFileError(
                    f"{where}: expected U {(m, k)} and s {(k,)}, found U {tuple(U.shape)} and s {tuple(s.shape)}"
                )
            if U.dtype not in (torch.float32, torch.float64) or s.dtype != U.dtype:
                raise AnchorFileError(f"{where}: U/s must be float32 or float64, found {U.dtype}/{s.dtype}")
            if not (torch.isfinite(U).all() and torch.isfinite(s).all() and torch.isfinite(fro).all()):
                raise AnchorFileError(f"{where}: holds NaN or inf")
            if (s < 0).any() or float(fro) < 0:
                raise AnchorFileError(f"{where}: negative singular values or norm")
            gram = U.double().T @ U.double()
            if k and float((gram - torch.eye(k, dtype=torch.float64)).abs().max()) > 1e-3:
                raise AnchorFileError(f"{where}: basis U is not orthonormal")
            entries[name] = AnchorEntry(U=U, s=s, fro_norm=float(fro), shape=(int(m), int(n)),
                                        energy=float(info.get("energy", 1.0)))
        return cls(entries, meta.get("build", {}))

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
            use_lora_scaling: if True the regularizer uses ``ΔW = scaling · B A`` as
                PEFT's forward does (scaling = alpha / r); the published regularizer
                (default) uses ``B A``.

        Raises:
            AnchorMismatchError: a module is missing or a shape does not match (the message
                names the module, the expected and the found shapes).
            UnsupportedAdapterError: DoRA, PiSSA/OLoRA/LoftQ/CorDA initializations, or
                LoRA on something other than a linear / ``Conv1D`` layer.
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
            if adapter_name not in lora_A:
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
                f"model has no LoRA modules for adapter {adapter_name!r}; bind expects a PEFT model"
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
    lin_A, lin_B = module.lora_A[adapter], module.lora_B[adapter]
    if not isinstance(lin_A, nn.Linear) or not isinstance(lin_B, nn.Linear):
        raise UnsupportedAdapterError(
            f"{mod_name}: LoRA factors are {type(lin_A).__name__}/{type(lin_B).__name__}; "
            "only linear and Conv1D layers can be anchored"
        )
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
    shape = _logical_weight_shape(base)
    if shape is None:
        raise UnsupportedAdapterError(f"{mod_name}: base layer {type(base).__name__} has no 2-D weight")
    conv1d = type(base).__name__ == "Conv1D" or bool(getattr(module, "fan_in_fan_out", False))
    found = shape[::-1] if conv1d else shape
    if found != tuple(entry.shape):
        layout = " (Conv1D, in × out stored, compared transposed)" if conv1d else ""
        raise AnchorMismatchError(
            f"{mod_name}: anchor entry {key!r} expects a weight of shape {tuple(entry.shape)} "
            f"(out × in), the model has {found}{layout}"
        )
    m, n = entry.shape
    A, B = lin_A.weight, lin_B.weight
    r = A.shape[0]
    if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
        raise AnchorMismatchError(
            f"{mod_name}: expected lora_A ({r}, {n}) and lora_B ({m}, {r}), "
            f"found {tuple(A.shape)} and {tuple(B.shape)}"
        )
    coef = 1.0
    if use_lora_scaling:
        coef = float(module.scaling[adapter]) ** 2
    return AnchoredPair(key=key, module_name=mod_name, module=module, adapter=adapter, entry=entry,
                        mode=mode, coef=coef, conv1d=conv1d)


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
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def A(self) -> nn.Parameter:
        """``lora_A`` weight, (r, n)."""
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:
        """``lora_B`` weight, (m, r)."""
        return self.module.lora_B[self.adapter].weight

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


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over
    ``path``; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


