"""Build an alignment anchor from an aligned and a base checkpoint, streaming.

For every target module the delta ``V = W_aligned − W_base`` (m, n) (``out × in``; GPT-2
``Conv1D`` weights are stored ``in × out`` and transposed) is formed from the two
stored tensors, factorized (:func:`asft_kernels.anchor.factorize_delta`) and dropped
before the next module is read. Both checkpoints are validated from their headers first
(targets present on both sides, same shapes, same layout), so a mismatch fails before
any tensor data is read or any SVD runs.

Command line (registered in :mod:`asft_kernels.cli`)::

    asft build-anchor --aligned A --base B --targets q_proj,v_proj --rank 64 --out anchor.safetensors
        [--tolerance 0.01] [--seed 0] [--skip-unchanged] [--allow-missing-targets]
    asft inspect anchor.safetensors [--plot spectrum.png]
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .anchor import (
    DEFAULT_SEED,
    AlignmentAnchor,
    _check_sketch_args,
    _factorize,
    _refuse_unchanged,
    atomic_write,
    check_tolerance,
    entry_paper_bound,
    normalize_module_name,
    svd_method,
)
from .checkpoint import CheckpointReader, open_checkpoint
from .errors import AnchorFileError, AnchorMismatchError, AsFTError

ALL_LINEAR = "all-linear"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _RankCapWarning(UserWarning):
    """:func:`build_anchor`'s warning that ``rank`` caps k below what ``tolerance`` needs; its
    own category so that the ``build`` command, which says it in its summary line, can silence
    exactly this warning."""


@dataclass(frozen=True)
class TargetPair:
    """One module to anchor: its name (aligned side), the two stored tensor keys, the
    delta shape ``(m, n)`` in ``out × in`` layout and whether the weights are transposed."""

    name: str
    aligned_key: str
    base_key: str
    shape: tuple[int, int]
    conv1d: bool


def _weight_modules(reader: CheckpointReader) -> dict[str, str]:
    """``{module name: tensor key}`` for every 2-D ``*.weight`` tensor, plus tied
    aliases whose tensor is stored under another name (``lm_head`` → ``wte``)."""
    modules: dict[str, str] = {}
    for key in reader.keys():
        if key.endswith(".weight") and len(reader.info(key)[0]) == 2:
            modules[normalize_module_name(key)] = key
    by_norm = {normalize_module_name(k) + ".weight": k for k in reader.keys()}
    for name, others in reader.layout.tied.items():
        module = normalize_module_name(name)
        if module in modules or not name.endswith(".weight"):
            continue
        stored = next((by_norm[o] for o in others if o in by_norm), None)
        if stored is not None and len(reader.info(stored)[0]) == 2:
            modules[module] = stored
    return modules


def match_targets(names: Sequence[str], target_modules: str | Sequence[str], reader: CheckpointReader) -> list[str]:
    """Module names selected by ``target_modules`` with PEFT's rules.

    A list selects names equal to an entry or ending with ``"." + entry``; a string is a
    regular expression that must match the whole name; ``"all-linear"`` selects every
    ``nn.Linear``/``Conv1D`` weight except the output head (by module type when known,
    else every 2-D weight that is not an embedding or output head by name).
    """
    layout = reader.layout
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            picked = []
            for n in names:
                if layout.is_output_head(n):
                    continue
                linear = layout.is_linear(n)
                if linear is None:
                    leaf = n.rsplit(".", 1)[-1]
                    linear = not any(h in leaf for h in ("embed", "wte", "wpe", "word_embeddings", "shared"))
                if linear:
                    picked.append(n)
            return picked
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise AsFTError(f"target_modules {target_modules!r} is not a valid regular expression: {exc}") from exc
        return [n for n in names if pattern.fullmatch(n)]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise AsFTError(f"target_modules must be a non-empty list of names or a regex string, got {target_modules!r}")
    return [n for n in names if n in targets or any(n.endswith("." + t) for t in targets)]


def _pair_name(name: str, others: dict[str, str]) -> str | None:
    """The module of the other checkpoint that ``name`` refers to: same name, or a unique
    match on a dot boundary (one side saved from ``LlamaModel``, the other from
    ``LlamaForCausalLM``)."""
    if name in others:
        return name
    hits = [o for o in others if o.endswith("." + name) or name.endswith("." + o)]
    return hits[0] if len(hits) == 1 else None


def _leaf_names(names: Sequence[str]) -> list[str]:
    """The distinct last components of module names (``q_proj``, ``c_attn``, ...), sorted."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def unmatched_targets(target_modules: Sequence[str], names: Sequence[str]) -> list[str]:
    """The entries of a list ``target_modules`` that select none of ``names`` (PEFT's rule:
    equal to a name or a suffix of it on a dot boundary)."""
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def plan_targets(aligned: CheckpointReader, base: CheckpointReader,
                 target_modules: str | Sequence[str], *, allow_missing_targets: bool = False) -> list[TargetPair]:
    """Resolve and validate the target modules of two checkpoints from metadata only.

    Args:
        allow_missing_targets: with a list ``target_modules``, build from the entries that
            match and ignore those that match no module (default: refuse them, since a
            typo would silently leave a module unanchored).

    Raises:
        AnchorMismatchError: different architectures, a target that matches no module
            (listing the module names that exist), a target missing on one side, a
            non-linear target, or different shapes (naming the module and both shapes).
    """
    a_type, b_type = aligned.layout.model_type, base.layout.model_type
    if a_type and b_type and a_type != b_type:
        raise AnchorMismatchError(
            f"different architectures: aligned {aligned.description!r} is {a_type!r}, "
            f"base {base.description!r} is {b_type!r}"
        )
    a_modules, b_modules = _weight_modules(aligned), _weight_modules(base)
    a_names = match_targets(list(a_modules), target_modules, aligned)
    b_names = match_targets(list(b_modules), target_modules, base)
    if not a_names and not b_names:
        raise AnchorMismatchError(
            f"target_modules {target_modules!r} match no 2-D weight of {aligned.description!r}; "
            f"its module names end in: {', '.join(_leaf_names(list(a_modules)))}"
        )
    if not isinstance(target_modules, str) and not allow_missing_targets:
        missing = unmatched_targets(list(target_modules), a_names + b_names)
        if missing:
            raise AnchorMismatchError(
                f"target(s) {missing} match no 2-D weight of {aligned.description!r} (a typo?); its module names "
                f"end in: {', '.join(_leaf_names(list(a_modules)))}. Fix the name, or allow targets that match "
                "nothing with allow_missing_targets=True (asft build-anchor --allow-missing-targets)"
            )
    problems: list[str] = []
    pairs: list[TargetPair] = []
    paired_base: set[str] = set()
    for name in a_names:
        b_name = _pair_name(name, b_modules)
        if b_name is None:
            problems.append(f"{name}: in aligned {aligned.description!r} {aligned.info(a_modules[name])[0]}, "
                            f"missing from base {base.description!r}")
            continue
        paired_base.add(b_name)
        a_key, b_key = a_modules[name], b_modules[b_name]
        a_shape, b_shape = aligned.info(a_key)[0], base.info(b_key)[0]
        if a_shape != b_shape:
            problems.append(f"{name}: aligned weight {a_shape} vs base weight {b_shape}")
            continue
        for reader, n in ((aligned, name), (base, b_name)):
            if reader.layout.is_linear(n) is False:
                problems.append(f"{n}: not a linear or Conv1D layer in {reader.description!r}; only those can "
                                "carry LoRA factors that the anchor applies to")
        a_conv, b_conv = aligned.layout.is_conv1d(name), base.layout.is_conv1d(b_name)
        if a_conv is not None and b_conv is not None and a_conv != b_conv:
            problems.append(f"{name}: Conv1D (in × out) in one checkpoint and Linear (out × in) in the other")
            continue
        conv1d = bool(a_conv if a_conv is not None else b_conv)
        shape = (a_shape[1], a_shape[0]) if conv1d else (a_shape[0], a_shape[1])
        pairs.append(TargetPair(name, a_key, b_key, shape, conv1d))
    for b_name in b_names:
        if b_name not in paired_base and _pair_name(b_name, a_modules) is None:
            problems.append(f"{b_name}: in base {base.description!r} {base.info(b_modules[b_name])[0]}, "
                            f"missing from aligned {aligned.description!r}")
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise AnchorMismatchError("checkpoints do not match: " + "; ".join(problems[:8]) + more)
    return pairs


def build_anchor(
    aligned: Any,
    base: Any,
    target_modules: str | Sequence[str],
    rank: int | None = 64,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    method: str = "auto",
    oversample: int = 10,
    niter: int = 4,
    seed: int = DEFAULT_SEED,
    skip_unchanged: bool = False,
    allow_missing_targets: bool = False,
    tolerance: float | None = None,
) -> AlignmentAnchor:
    """Alignment anchor of ``aligned`` relative to ``base``, one module at a time.

    For each target module, ``V = W_aligned − W_base`` (m, n) in ``out × in`` layout is
    computed in float32 (float64 when ``dtype`` is float64) from the stored tensors of
    any dtype (bf16/fp16 are upcast before subtracting), factorized, and released.

    Args:
        aligned: the aligned (chat/instruct) model: a local checkpoint directory (sharded
            safetensors with ``model.safetensors.index.json``, ``model.safetensors``,
            ``pytorch_model.bin[.index.json]``), a checkpoint file, a hub id resolved
            from the local Hugging Face cache only, an ``nn.Module`` or a state dict.
        base: the model it was aligned from, same kinds.
        target_modules: as PEFT's ``target_modules``: list of names or suffixes
            (``["q_proj", "v_proj"]``), a regex string matching whole names, or
            ``"all-linear"`` (every linear/``Conv1D`` weight except the output head).
        rank: directions kept per module; ``None`` keeps the numerical rank (exact SVD).
        energy: keep per module the fewest directions that capture this fraction of
            ``‖V‖²_F`` (0 < energy ≤ 1), capped by ``rank`` when both are given.
        dtype: dtype of the stored bases, float32 or float64.
        device: where the SVD runs (``"cuda"`` for large models); default CPU.
        progress: show a tqdm progress bar over modules.
        method: ``"auto"``, ``"exact"`` or ``"randomized"``, see
            :func:`asft_kernels.anchor.svd_method`.
        oversample: extra sketch columns of the randomized SVD.
        niter: power iterations of the randomized SVD.
        seed: seed of the randomized SVD's sketch (default 0): two builds of the same
            checkpoints with the same arguments give byte-identical anchor files.
        skip_unchanged: leave modules whose delta is exactly zero out of the anchor
            (default: refuse them, naming them; an unchanged module would get a zero
            anchor, which in ``paper`` mode is the plain ``λ‖BA‖²`` penalty).
        allow_missing_targets: ignore entries of a list ``target_modules`` that match no
            module (default: refuse them, listing the module names that exist).
        tolerance: keep per module the fewest directions whose dropped rest changes the
            published ``R`` (mode ``paper``) by at most ``tolerance · ‖B A‖²_F``, for any
            LoRA product ``B A``: the largest dropped ``|wᵢ| = |2cᵢ − cᵢ²|`` is at most
            ``tolerance`` (:func:`asft_kernels.anchor.dropped_paper_bounds`; docs/method.md).
            Runs the exact SVD; ``rank`` caps it (pass ``rank=None`` for no cap; a module
            the cap keeps above the tolerance is named in a ``UserWarning``); not with
            ``energy``. ``0`` keeps every direction of the numerical rank.

    Returns:
        The anchor; ``anchor.metadata`` (stored in the file) records the sources, rank,
        energy, SVD method, oversample, niter, seed, dtype, device, per-module rank /
        energy captured / SVD method actually run / ``paper_bound`` (the largest dropped
        ``|wᵢ|``, so ``|R_k − R| ≤ paper_bound · ‖B A‖²_F``; None after a randomized SVD),
        the tolerance, the modules skipped as unchanged,
        and the reader counters (tensors read, peak tensors alive at once).
        ``anchor.timings`` (not stored, so that files are reproducible) holds the
        wall-clock seconds, in total and per module.

    Memory: at most one tensor per checkpoint is alive at a time (the readers count
    them), so the peak is about two stored weights, the float32 delta and the SVD
    workspace of one module, never two models. Measured (docs/build.md, 2-core CPU,
    ``"all-linear"``, rank 64, transformers already imported): the peak RSS rose by
    32–43 MB for two sharded 52 MB float32 Llama checkpoints (0.6–0.8× one checkpoint)
    and by 38–44 MB for two 100 MB ones (0.4×), where loading both state dicts takes
    2.1–2.2×. The first call in a process also imports transformers' model classes to
    read module types (about 235 MB once).

    Raises:
        AnchorMismatchError: different architectures, a target missing on one side or
            matching nothing, different shapes (raised before any tensor data is read);
            unchanged modules unless ``skip_unchanged`` (raised after reading them all,
            naming every one).
        AnchorFileError: missing, truncated or corrupted files, NaN/inf in a weight, a
            hub id absent from the local cache.
        AsFTError: bad ``rank``, ``energy``, ``tolerance``, ``dtype``, ``method``,
            ``oversample``, ``niter``, ``seed``, or a ``device`` that does not exist here.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AsFTError(f"rank must be a positive int or None, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise AsFTError(f"energy must be in (0, 1], got {energy!r}")
    if dtype not in (torch.float32, torch.float64):
        raise AsFTError(f"anchor dtype must be torch.float32 or torch.float64, got {dtype}")
    check_tolerance(tolerance, energy)
    if tolerance is not None and method == "randomized":
        raise AsFTError("tolerance needs the exact SVD (its bound uses every singular value and exact singular "
                        "vectors); use method='exact' or 'auto'")
    svd_method((1, 1), rank, method=method, oversample=oversample)  # validates method, oversample
    _check_sketch_args(niter, seed)
    device = resolve_device(device)
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    start = time.perf_counter()
    a_reader = open_checkpoint(aligned, "aligned")
    b_reader = open_checkpoint(base, "base")
    pairs = plan_targets(a_reader, b_reader, target_modules, allow_missing_targets=allow_missing_targets)

    from tqdm.auto import tqdm

    entries = {}
    per_module: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    unchanged: list[str] = []
    for pair in tqdm(pairs, desc="build-anchor", unit="module", disable=not progress):
        t0 = time.perf_counter()
        V = _read_delta(a_reader, b_reader, pair, device, work_dtype)
        if not bool(V.any()):
            unchanged.append(pair.name)
            continue
        if unchanged and not skip_unchanged:
            continue  # the build fails anyway: only finish the list of unchanged modules
        entry, bound = _factorize(V, rank, energy, method=method, oversample=oversample, niter=niter, seed=seed,
                                  dtype=dtype, name=pair.name, tolerance=tolerance)
        del V
        entries[pair.name] = entry
        seconds[pair.name] = time.perf_counter() - t0
        per_module[pair.name] = {
            "rank": entry.rank,
            "energy": entry.energy,
            "paper_bound": bound,
            "method": "exact" if bound is not None else "randomized",
            "conv1d": pair.conv1d,
            "keys": [pair.aligned_key, pair.base_key],
        }
    _refuse_unchanged(unchanged, skip_unchanged, "skip_unchanged=True (asft build-anchor --skip-unchanged)")
    if not entries:
        raise AnchorMismatchError(f"every target module is unchanged between {a_reader.description!r} and "
                                  f"{b_reader.description!r}: nothing to anchor")
    stored_dtypes = {
        "aligned": sorted({str(a_reader.info(p.aligned_key)[1]) for p in pairs}),
        "base": sorted({str(b_reader.info(p.base_key)[1]) for p in pairs}),
    }
    metadata = {
        "built_by": "build_anchor",
        "sources": {"aligned": a_reader.description, "base": b_reader.description},
        "model_type": a_reader.layout.model_type or b_reader.layout.model_type,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "rank": rank,
        "energy": energy,
        "tolerance": tolerance,
        "method": method,
        "oversample": oversample,
        "niter": niter,
        "seed": seed,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "checkpoint_dtypes": stored_dtypes,
        "per_module": per_module,
        "skipped_unchanged": unchanged,
        "streaming": {"aligned": a_reader.stats(), "base": b_reader.stats()},
    }
    if tolerance is not None:
        over = {n: info["paper_bound"] for n, info in per_module.items() if info["paper_bound"] > tolerance}
        if over:
            listed = ", ".join(f"{n} (k = {per_module[n]['rank']}, bound {b:.3g})" for n, b in list(over.items())[:5])
            warnings.warn(f"build_anchor: rank={rank} caps k below what tolerance={tolerance:g} needs in "
                          f"{len(over)} module(s): {listed}; their dropped directions change R by up to the "
                          "bound stored in metadata['per_module'][name]['paper_bound'] times ||BA||_F^2",
                          _RankCapWarning, stacklevel=2)
    anchor = AlignmentAnchor(entries, metadata)
    anchor.timings = {"seconds": time.perf_counter() - start, "per_module": seconds}
    return anchor


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (default CPU), checked to exist on this machine.

    Raises:
        AsFTError: an unknown device string, or a device this machine does not have
            (``"cuda"`` without a GPU or a CUDA build of torch).
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AsFTError(f"unknown device {device!r} (expected e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # torch raises RuntimeError or AssertionError by backend
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AsFTError(f"device {str(dev)!r} is not available on this machine ({reason})") from exc
    return dev


def _read_delta(a_reader: CheckpointReader, b_reader: CheckpointReader, pair: TargetPair,
                device: torch.device, work_dtype: torch.dtype) -> torch.Tensor:
    """``V = W_aligned − W_base`` (m, n) for one pair, ``out × in``, in ``work_dtype``."""
    w_aligned = a_reader.read(pair.aligned_key)
    # copy=True: never subtract in place into a caller's parameter or a shared mmap.
    V = w_aligned.to(device=device, dtype=work_dtype, copy=True)
    w_base = b_reader.read(pair.base_key)
    V.sub_(w_base.to(device=device, dtype=work_dtype))
    if not bool(torch.isfinite(V).all()):
        for reader, key, w in ((a_reader, pair.aligned_key, w_aligned), (b_reader, pair.base_key, w_base)):
            if not bool(torch.isfinite(w.to(work_dtype)).all()):
                raise AnchorFileError(f"{reader.where(key)!r}: tensor {key!r} holds NaN or inf")
        raise AnchorFileError(f"{pair.name}: the delta overflows {work_dtype}")
    del w_aligned, w_base
    return V.T if pair.conv1d else V


# Command line ---------------------------------------------------------------------------


def _parse_targets(text: str) -> str | list[str]:
    if text.lower() == ALL_LINEAR:
        return ALL_LINEAR
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names or 'all-linear', got {text!r}")
    return targets


def _parse_rank(text: str) -> int | None:
    if text.lower() in ("none", "full", "exact"):
        return None
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"rank must be a positive integer or 'none', got {text!r}")
    return rank


def _float_where(accept, expected: str):
    """An argparse type: the float ``text`` names when ``accept(value)`` holds (text that is no
    number reads as NaN), else an error ``"<expected>, got <text>"``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


_parse_energy = _float_where(lambda v: 0.0 < v <= 1.0, "energy must be a number in (0, 1]")
_parse_tolerance = _float_where(lambda v: v >= 0.0 and v != float("inf"), "tolerance must be a finite number >= 0")


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value >= high):
            bound = f"in [{low}, {high})" if high is not None else f"≥ {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value

    return parse


def _parse_device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected e.g. cpu, cuda, cuda:1)") from exc
    return text


class _DefaultRank:
    """``--rank`` not given: 64, or no cap with ``--tolerance``."""

    def __repr__(self) -> str:
        return "64"


_DEFAULT_RANK = _DefaultRank()


def _cmd_build(args: argparse.Namespace) -> int:
    from .cli import check_output_path

    targets: str | list[str] = args.targets_regex if args.targets_regex else args.targets
    out = check_output_path(args.out, "--out")
    rank = args.rank
    if rank is _DEFAULT_RANK:
        rank = None if args.tolerance is not None else 64
    with warnings.catch_warnings():  # a rank that caps the tolerance is said in the summary line below
        warnings.simplefilter("ignore", _RankCapWarning)
        anchor = build_anchor(args.aligned, args.base, targets, rank=rank, energy=args.energy,
                              dtype=_DTYPES[args.dtype], device=args.device, progress=not args.no_progress,
                              method=args.method, oversample=args.oversample, niter=args.niter, seed=args.seed,
                              skip_unchanged=args.skip_unchanged, allow_missing_targets=args.allow_missing_targets,
                              tolerance=args.tolerance)
    anchor.save(out)
    energies = [e.energy for e in anchor.values()]
    skipped = anchor.metadata.get("skipped_unchanged") or []
    note = f"; left out {len(skipped)} unchanged module(s)" if skipped else ""
    if args.rank is not _DEFAULT_RANK and rank is not None and args.energy is None and args.tolerance is None:
        short = sorted({e.rank for e in anchor.values() if e.rank < rank})
        if short:
            count = sum(e.rank < rank for e in anchor.values())
            note += (f"; --rank {rank} is more than {count} module(s) have (min(m, n) or the numerical rank "
                     f"of V): they keep all {'/'.join(map(str, short))} directions, the exact delta")
    if args.tolerance is not None:
        bounds = [info["paper_bound"] for info in anchor.metadata["per_module"].values()]
        over = sum(b > args.tolerance for b in bounds)
        note += f"; --tolerance {args.tolerance:g}: largest dropped weight {max(bounds):.3g}"
        if over:
            note += f", above the tolerance in {over} module(s) where --rank {rank} capped k"
    print(f"wrote {args.out}: {len(anchor)} modules, ranks {sorted({e.rank for e in anchor.values()})}, "
          f"energy captured {min(energies):.4f}..{max(energies):.4f}, seed {args.seed}, "
          f"{anchor.timings['seconds']:.2f} s{note}")
    return 0


def _decay(s: torch.Tensor) -> tuple[float, float, float]:
    s = s.double()
    s1 = float(s[0]) if s.numel() else 0.0
    if s1 == 0.0:
        return s1, 0.0, 0.0
    return s1, float(s[(s.numel() - 1) // 2]) / s1, float(s[-1]) / s1


def paper_bound_text(anchor: AlignmentAnchor, name: str) -> str:
    """The ``R bound`` cell of ``asft inspect`` for module ``name``: the largest dropped
    ``|wᵢ|`` stored at build time (``|R_k − R| ≤ bound · ‖B A‖²_F`` in mode ``paper``);
    ``n/a`` after a randomized SVD; for files without a stored bound, the upper bound that
    follows from the entry alone, marked ``*``."""
    info = ((anchor.metadata or {}).get("per_module") or {}).get(name) or {}
    if "paper_bound" in info:
        return "n/a" if info["paper_bound"] is None else f"{info['paper_bound']:.3g}"
    if info.get("method") == "randomized":
        return "n/a"
    return f"{entry_paper_bound(anchor[name]):.3g}*"


def inspect_table(anchor: AlignmentAnchor) -> str:
    """A text table: module, shape (m × n), rank, energy captured, the ``R`` bound of the
    dropped directions (:func:`paper_bound_text`), ‖V‖_F, s₁, and the singular-value decay
    ``s_mid/s₁`` and ``s_k/s₁``."""
    header = ("module", "shape", "rank", "energy", "R bound", "||V||_F", "s_1", "s_mid/s_1", "s_k/s_1")
    rows = []
    for name, e in anchor.items():
        s1, mid, last = _decay(e.s)
        rows.append((name, f"{e.shape[0]}x{e.shape[1]}", str(e.rank), f"{e.energy:.4f}",
                     paper_bound_text(anchor, name), f"{e.fro_norm:.4g}", f"{s1:.4g}", f"{mid:.3g}", f"{last:.3g}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def plot_spectrum(anchor: AlignmentAnchor, path: str | Path) -> None:
    """Save a log-scale plot of ``sᵢ / s₁`` against ``i`` for every module (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for name, e in anchor.items():
            s = e.s.double()
            if s.numel() == 0 or float(s[0]) == 0.0:
                continue
            ax.plot(range(1, s.numel() + 1), (s / s[0]).numpy(), lw=1, alpha=0.6,
                    label=name if len(anchor) <= 12 else None)
        ax.set_yscale("log")
        ax.set_xlabel("direction i")
        ax.set_ylabel("s_i / s_1")
        ax.set_title(f"alignment-delta spectrum ({len(anchor)} modules)")
        if len(anchor) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .cli import check_output_path

    plot = check_output_path(args.plot, "--plot") if args.plot else None
    anchor = AlignmentAnchor.load(args.anchor)
    meta = anchor.metadata
    if meta:
        keys = ("built_by", "sources", "model_type", "rank", "energy", "tolerance", "method", "seed", "dtype",
                "device")
        print("build: " + ", ".join(f"{k}={meta[k]}" for k in keys if k in meta))
    table = inspect_table(anchor)
    print(table)
    print("R bound: |R_k - R| <= bound * ||BA||_F^2 in mode paper, from the directions left out"
          + ("; * derived from the entry (no bound stored in the file)" if "*" in table else ""))
    if plot is not None:
        plot_spectrum(anchor, plot)
        print(f"wrote {args.plot}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``asft build-anchor`` and ``asft inspect``."""
    p = subparsers.add_parser("build-anchor", help="build an alignment anchor from an aligned and a base checkpoint",
                              description=build_anchor.__doc__.split("\n\n")[0])
    p.add_argument("--aligned", required=True, help="aligned checkpoint: directory, file or cached hub id")
    p.add_argument("--base", required=True, help="base checkpoint: directory, file or cached hub id")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--targets", type=_parse_targets,
                       help="comma-separated module names/suffixes, or 'all-linear'")
    group.add_argument("--targets-regex", help="regular expression matching whole module names")
    p.add_argument("--rank", type=_parse_rank, default=_DEFAULT_RANK,
                   help="directions per module, or 'none' (default 64; with --tolerance: none, a cap if given)")
    p.add_argument("--energy", type=_parse_energy, default=None,
                   help="per-module rank by captured energy, e.g. 0.9")
    p.add_argument("--tolerance", type=_parse_tolerance, default=None,
                   help="per-module rank: the fewest directions whose dropped rest changes R (mode paper) by at "
                        "most TOLERANCE x ||BA||_F^2 (largest dropped |2c - c^2|), e.g. 0.01; exact SVD")
    p.add_argument("--method", choices=("auto", "exact", "randomized"), default="auto",
                   help="SVD: exact, randomized, or auto (randomized when rank is small; default)")
    p.add_argument("--oversample", type=_int_at_least(0), default=10,
                   help="extra sketch columns of the randomized SVD (default 10)")
    p.add_argument("--niter", type=_int_at_least(0), default=4,
                   help="power iterations of the randomized SVD (default 4)")
    p.add_argument("--seed", type=_int_at_least(0, 2**63), default=DEFAULT_SEED,
                   help=f"seed of the randomized SVD's sketch, recorded in the file (default {DEFAULT_SEED}); "
                        "the same inputs and seed give a byte-identical file")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device", type=_parse_device, default=None, help="SVD device, e.g. cuda (default cpu)")
    p.add_argument("--out", required=True, help="output anchor file (.safetensors)")
    p.add_argument("--skip-unchanged", action="store_true",
                   help="leave modules whose weights did not change out of the anchor (default: error)")
    p.add_argument("--allow-missing-targets", action="store_true",
                   help="ignore --targets entries that match no module (default: error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build)

    q = subparsers.add_parser("inspect", help="print an anchor file's modules and spectra")
    q.add_argument("anchor", help="anchor file written by build-anchor")
    q.add_argument("--plot", default=None, help="also save a spectrum plot (PNG)")
    q.set_defaults(func=_cmd_inspect)


__all__ = ["TargetPair", "build_anchor", "inspect_table", "match_targets", "plan_targets", "plot_spectrum",
           "register_cli", "resolve_device", "unmatched_targets"]
