"""Where does an adapter drift? Per-layer alignment of ``ΔW = B A`` with the anchor.

For every anchored LoRA pair (``B``: (m, r), ``A``: (r, n)) and the anchor's
``C = U diag(c) Uᵀ`` (``U``: (m, k); ``c`` from the mode, docs/method.md) the report gives

==========================  ==========================================================
``residual_fraction``       ``‖(I − C) B A‖_F / ‖B A‖_F``: the share of the update the
                            AsFT regularizer penalizes (0: fully anchored)
``subspace_cosine``         ``‖U Uᵀ B A‖_F / ‖B A‖_F``: cosine between ``B A`` and its
                            orthogonal projection onto the alignment subspace
``projection_cosine``       ``cos(C·B A, B A)`` of the flattened matrices; in ``paper``
                            mode this is Safe LoRA's layer similarity
``delta_norm``              ``‖B A‖_F`` (without PEFT's ``scaling``; see ``lora_scaling``)
==========================  ==========================================================

Everything is computed in float64 from ``P = Uᵀ B`` (k, r), ``M = A Aᵀ`` (r, r) and the
residual ``(I − C) B = B − U diag(c) P`` (m, r): nothing of size ``m × n`` or ``m × m``.

``asft report ADAPTER_DIR ANCHOR`` prints the table for a saved PEFT adapter (only the
adapter file and the anchor are read, not the base model) and can plot it to a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .anchor import METADATA_KEY, MODES, AlignmentAnchor, AnchorBinding, atomic_write, normalize_module_name
from .errors import AnchorFileError, AnchorMismatchError, AsFTError, UnsupportedAdapterError

# torch.nn.functional.cosine_similarity's default eps: norms below it are clamped.
_COSINE_EPS = 1e-8


@dataclass(frozen=True)
class LayerAlignment:
    """One row of :func:`alignment_report` (see the module docstring for the columns).

    Fractions and cosines are NaN when ``B A = 0`` (nothing to measure).
    """

    key: str
    module_name: str
    rank: int
    residual_fraction: float
    subspace_cosine: float
    projection_cosine: float
    delta_norm: float
    lora_scaling: float


def lowrank_alignment(U: Tensor, c: Tensor, B: Tensor, A: Tensor) -> dict[str, float]:
    """Alignment statistics of ``ΔW = B A`` against ``C = U diag(c) Uᵀ`` in float64.

    Args:
        U: (m, k) orthonormal basis. c: (k,) coefficients of ``C``.
        B: (m, r) ``lora_B`` weight. A: (r, n) ``lora_A`` weight.

    Returns:
        ``residual_fraction``, ``subspace_cosine``, ``projection_cosine`` and
        ``delta_norm`` (module docstring), as Python floats.
    """
    U64, c64 = U.detach().to(torch.float64), c.detach().to(device=U.device, dtype=torch.float64)
    B64 = B.detach().to(device=U.device, dtype=torch.float64)
    A64 = A.detach().to(device=U.device, dtype=torch.float64)
    P = U64.T @ B64  # (k, r)
    M = A64 @ A64.T  # (r, r)
    residual_B = B64 - U64 @ (c64[:, None] * P)  # (I − C) B, (m, r)
    # ‖X A‖²_F = ⟨Xᵀ X, A Aᵀ⟩ for any X with r columns.
    delta_sq = float(((B64.T @ B64) * M).sum().clamp_min(0))
    residual_sq = float(((residual_B.T @ residual_B) * M).sum().clamp_min(0))
    subspace_sq = float(((P.T @ P) * M).sum().clamp_min(0))
    cba_sq = float(((P.T @ ((c64 * c64)[:, None] * P)) * M).sum().clamp_min(0))
    inner = float(((P.T @ (c64[:, None] * P)) * M).sum())  # ⟨C B A, B A⟩
    delta = math.sqrt(delta_sq)
    if delta == 0.0:
        nan = float("nan")
        return {"residual_fraction": nan, "subspace_cosine": nan, "projection_cosine": nan, "delta_norm": 0.0}
    cosine = inner / (max(math.sqrt(cba_sq), _COSINE_EPS) * max(delta, _COSINE_EPS))
    return {
        "residual_fraction": math.sqrt(residual_sq) / delta,
        "subspace_cosine": math.sqrt(subspace_sq) / delta,
        "projection_cosine": cosine,
        "delta_norm": delta,
    }


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded (DTensor) parameter; other tensors as they are."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _as_binding(model: nn.Module, anchor, mode: str | None, adapter_name: str, strict: bool) -> AnchorBinding:
    if isinstance(anchor, AnchorBinding):
        if mode is not None and mode != anchor.mode:
            raise AsFTError(f"mode {mode!r} given, but the binding was made with mode {anchor.mode!r}")
        return anchor
    if isinstance(anchor, (str, os.PathLike)):
        anchor = AlignmentAnchor.load(anchor)
    if not isinstance(anchor, AlignmentAnchor):
        raise AsFTError(f"anchor must be an AlignmentAnchor, an AnchorBinding or a path, got {type(anchor).__name__}")
    return anchor.bind(model, mode=mode or "paper", adapter_name=adapter_name, strict=strict)


def alignment_report(
    peft_model: nn.Module,
    anchor: AlignmentAnchor | AnchorBinding | str | os.PathLike,
    mode: str | None = None,
    adapter_name: str = "default",
    *,
    strict: bool = True,
) -> list[LayerAlignment]:
    """Per-layer alignment of a PEFT model's LoRA updates with an anchor.

    Args:
        peft_model: a PEFT model (or a model wrapped as ``AlignmentAnchor.bind`` accepts).
        anchor: an :class:`AlignmentAnchor` (or the path of an anchor file), bound here
            with ``mode`` (default ``"paper"``), or an existing :class:`AnchorBinding`.
        mode: ``"paper"``, ``"projector"`` or ``"full"``: which ``C`` the residual uses.
        adapter_name: the PEFT adapter to inspect.
        strict: passed to :meth:`AlignmentAnchor.bind`.

    Returns:
        One :class:`LayerAlignment` per anchored pair, in the model's module order.
    """
    binding = _as_binding(peft_model, anchor, mode, adapter_name, strict)
    rows = []
    for pair in binding:
        stats = lowrank_alignment(pair.entry.U, pair.c, _full(pair.B), _full(pair.A))
        scaling = getattr(pair.module, "scaling", {}).get(pair.adapter, 1.0)
        rows.append(LayerAlignment(key=pair.key, module_name=pair.module_name, rank=int(pair.A.shape[0]),
                                   lora_scaling=float(scaling), **stats))
    return rows


def _read_adapter(adapter: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and config of a saved PEFT adapter directory (or a single weights file)."""
    if adapter.is_dir():
        config_path = adapter / "adapter_config.json"
        candidates = [adapter / "adapter_model.safetensors", adapter / "adapter_model.bin"]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise AnchorFileError(f"adapter directory {str(adapter)!r} holds no adapter_model.safetensors/.bin")
    elif adapter.is_file():
        config_path, weights = adapter.parent / "adapter_config.json", adapter
    else:
        raise AnchorFileError(f"adapter {str(adapter)!r} does not exist")
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise AnchorFileError(f"adapter config {str(config_path)!r} is not valid JSON: {exc}") from exc
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / torch raise several error types
        raise AnchorFileError(f"adapter weights {str(weights)!r} could not be read: {exc}") from exc
    return tensors, config


def _is_anchor_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file carrying anchor metadata (header only)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file: not an anchor either
        return False


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and ((path / "adapter_config.json").is_file()
                              or (path / "adapter_model.safetensors").is_file()
                              or (path / "adapter_model.bin").is_file())


def _check_not_swapped(adapter: Path, anchor: Path) -> None:
    """Refuse ``adapter_report(anchor, adapter)``: the arguments in the wrong order."""
    if _is_anchor_file(adapter) and (_is_adapter(anchor) or not _is_anchor_file(anchor)):
        raise AsFTError(
            f"the arguments look swapped: {str(adapter)!r} is an anchor file and {str(anchor)!r} is "
            + ("an adapter directory" if _is_adapter(anchor) else "not an anchor file")
            + "; the order is ADAPTER ANCHOR (asft report ADAPTER_DIR ANCHOR_FILE)"
        )
    if _is_adapter(anchor):
        raise AsFTError(f"{str(anchor)!r} is an adapter directory, not an anchor file; the order is ADAPTER ANCHOR "
                        "(asft report ADAPTER_DIR ANCHOR_FILE)")


def adapter_report(
    adapter: str | os.PathLike,
    anchor: AlignmentAnchor | str | os.PathLike,
    mode: str = "paper",
    *,
    strict: bool = True,
) -> list[LayerAlignment]:
    """:func:`alignment_report` for a saved PEFT adapter, without loading the base model.

    Args:
        adapter: a directory written by ``PeftModel.save_pretrained`` (``adapter_config.json``
            and ``adapter_model.safetensors`` or ``.bin``), or the weights file itself.
        anchor: an :class:`AlignmentAnchor` or the path of an anchor file.
        mode: ``"paper"``, ``"projector"`` or ``"full"``.
        strict: if True, every LoRA module of the adapter needs an anchor entry.

    Raises:
        AnchorFileError: unreadable adapter or anchor file.
        AnchorMismatchError: a module without an anchor entry (``strict``) or with shapes that
            do not match it (the message names the module and both shapes).
        UnsupportedAdapterError: a DoRA adapter (``ΔW = B A`` does not hold).
    """
    if mode not in MODES:
        raise AsFTError(f"unknown anchor mode {mode!r}; expected one of {MODES}")
    if not isinstance(anchor, AlignmentAnchor):
        _check_not_swapped(Path(adapter), Path(anchor))
        anchor = AlignmentAnchor.load(anchor)
    tensors, config = _read_adapter(Path(adapter))
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in tensors):
        raise UnsupportedAdapterError(f"adapter {str(adapter)!r} uses DoRA: ΔW = B A does not hold")
    r_default = config.get("r")
    alpha_default = config.get("lora_alpha")
    use_rslora = bool(config.get("use_rslora", False))
    rows, unmatched = [], []
    # (name of A, name of B): a Linear/Conv1D's factors, or an Embedding's (whose anchor entry
    # holds (W_aligned − W_base)ᵀ, the layout of PEFT's (B A))
    factor_names = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
    found = sorted((k[: -len(a)], a, b) for k in tensors for a, b in factor_names if k.endswith(a))
    for module_name, suffix_A, suffix_B in found:
        name_A, name_B = module_name + suffix_A, module_name + suffix_B
        if name_B not in tensors:
            raise AnchorFileError(f"adapter {str(adapter)!r}: {name_A!r} has no matching {name_B!r}")
        A, B = tensors[name_A], tensors[name_B]
        key = anchor._match_key(normalize_module_name(module_name))
        if key is None:
            unmatched.append(module_name)
            continue
        entry = anchor[key]
        m, n = entry.shape
        r = A.shape[0]
        if A.ndim != 2 or B.ndim != 2 or tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
            raise AnchorMismatchError(
                f"{module_name}: anchor entry {key!r} is ({m}, {n}), so lora_A must be (r, {n}) and lora_B ({m}, r); "
                f"the adapter has {tuple(A.shape)} and {tuple(B.shape)}"
            )
        scaling = 1.0
        if r_default and alpha_default:
            scaling = float(alpha_default) / (math.sqrt(r) if use_rslora else r)
        stats = lowrank_alignment(entry.U, entry.coefficients(mode), B, A)
        rows.append(LayerAlignment(key=key, module_name=module_name, rank=int(r), lora_scaling=scaling, **stats))
    if not rows and not unmatched:
        raise AnchorMismatchError(f"adapter {str(adapter)!r} holds no LoRA weights (*.lora_A.weight, "
                                  "*.lora_embedding_A)")
    if unmatched and strict:
        raise AnchorMismatchError(
            f"adapter modules without an anchor entry: {unmatched[:5]}"
            + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
            + f"; anchor has e.g. {list(anchor)[:3]}"
        )
    if not rows:
        raise AnchorMismatchError(f"no module of adapter {str(adapter)!r} matches an anchor entry")
    return rows


COLUMN_LEGEND = """\
resid    ‖(I − C) B A‖_F / ‖B A‖_F: share of the update that the AsFT regularizer penalizes;
         0 = the update lies in the alignment subspace, higher = more drift away from it
cos_sub  ‖U Uᵀ B A‖_F / ‖B A‖_F: cosine between the update and the alignment subspace;
         1 = inside it, lower = more drift
cos_CBA  cos(C B A, B A) of the flattened matrices (in paper mode Safe LoRA's layer similarity);
         higher = more aligned
|BA|_F   ‖B A‖_F, the size of the update (without PEFT's lora_alpha / r scaling)"""


def format_report(rows: list[LayerAlignment], *, legend: bool = False) -> str:
    """The report as a fixed-width text table, one line per layer plus a mean line.

    Layers whose update is zero (``B A = 0``, an untrained adapter: PEFT initializes
    ``lora_B`` to zero) read ``no update yet`` instead of NaN columns. ``legend``
    appends :data:`COLUMN_LEGEND`, which says what each column means and which
    direction is more drift.
    """
    header = f"{'module':<48} {'r':>3} {'resid':>7} {'cos_sub':>7} {'cos_CBA':>8} {'|BA|_F':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row.key if len(row.key) <= 48 else "…" + row.key[-47:]
        if row.delta_norm == 0.0:
            lines.append(f"{name:<48} {row.rank:>3} {'no update yet (B A = 0)':>24} {row.delta_norm:>11.4e}")
            continue
        lines.append(f"{name:<48} {row.rank:>3} {row.residual_fraction:>7.4f} {row.subspace_cosine:>7.4f} "
                     f"{row.projection_cosine:>8.4f} {row.delta_norm:>11.4e}")
    finite = [r for r in rows if math.isfinite(r.residual_fraction)]
    lines.append("-" * len(header))
    if finite:
        mean = sum(r.residual_fraction for r in finite) / len(finite)
        untrained = len(rows) - len(finite)
        note = f" ({untrained} layer(s) with no update yet left out)" if untrained else ""
        lines.append(f"{len(rows)} layers; mean residual fraction {mean:.4f}{note}")
    else:
        lines.append(f"the adapter has no update yet: B A = 0 in all {len(rows)} layers (PEFT initializes "
                     "lora_B to zero; train the adapter, then report)")
    if legend:
        lines.extend(["", COLUMN_LEGEND])
    return "\n".join(lines)


def plot_report(rows: list[LayerAlignment], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot residual fraction and subspace cosine per layer to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) + 2), 4.0))
    ax.plot(x, [r.residual_fraction for r in rows], "o-", label="resid ‖(I−C)BA‖/‖BA‖ (higher = more drift)")
    ax.plot(x, [r.subspace_cosine for r in rows], "s-",
            label="cos_sub: cos(BA, alignment subspace) (lower = more drift)")
    ax.set_xticks(x)
    ax.set_xticklabels([r.key for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction (layers with no update yet are not drawn)")
    ax.set_title(title or "adapter alignment per layer")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


def _cmd_report(args: argparse.Namespace) -> int:
    from .cli import check_output_path

    json_path = check_output_path(args.json, "--json") if args.json else None
    plot_path = check_output_path(args.plot, "--plot") if args.plot else None
    rows = adapter_report(args.adapter, args.anchor, mode=args.mode, strict=not args.non_strict)
    print(format_report(rows, legend=True))
    if json_path is not None:
        payload = json.dumps([asdict(r) for r in rows], indent=2)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(payload))
        print(f"wrote {args.json}")
    if plot_path is not None:
        plot_report(rows, plot_path, title=f"{Path(args.adapter).name} vs {Path(args.anchor).name} ({args.mode})")
        print(f"wrote {args.plot}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``asft report`` to the ``asft`` command."""
    p = subparsers.add_parser("report", help="per-layer alignment of a saved LoRA adapter with an anchor",
                              description=__doc__.split("\n\n")[0], epilog="columns:\n" + COLUMN_LEGEND,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("anchor", help="anchor file (.safetensors)")
    p.add_argument("--mode", choices=MODES, default="paper", help="which C the residual uses (default: paper)")
    p.add_argument("--plot", metavar="PNG", help="also plot the table to this PNG file")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--non-strict", action="store_true", help="skip adapter modules that have no anchor entry")
    p.set_defaults(func=_cmd_report)
