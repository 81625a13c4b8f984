"""Safe LoRA (Hsu et al., 2024): the post-hoc projection AsFT is compared with.

The published algorithm, per LoRA layer with alignment delta ``V = W_aligned − W_base``:

1. ``C = V Vᵀ / ‖V‖_F`` (m × m), the same ``C`` as the anchor's ``paper`` mode;
2. the layer similarity ``cos(C·B A, B A)`` of the flattened (m, n) matrices;
3. project ``B ← C·B`` on the layers whose similarity is at most ``threshold``, or on the
   ``num_layers`` layers of lowest similarity (with ties to the last one included, as in
   the published selection "similarity ≤ the num_layers-th smallest").

Here ``C = U diag(c) Uᵀ`` comes from the anchor (``U``: (m, k), ``c = s²/‖V‖_F``), so
``C·B = U (diag(c) (Uᵀ B))`` costs O(m k r) and the similarity is computed from
``P = Uᵀ B`` (k, r) and ``A Aᵀ`` (r, r) (:func:`asft_kernels.diagnostics.lowrank_alignment`):
no ``m × m`` and no ``m × n`` matrix is formed. With an anchor truncated to k < rank(V)
the ``C`` is the truncated one. The published code rounds the similarity to 5 decimals
before comparing; this implementation compares the float64 value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..anchor import AlignmentAnchor, AnchorBinding
from ..diagnostics import _as_binding, lowrank_alignment
from ..errors import AsFTError


@dataclass
class SafeLoRAResult:
    """What :func:`safe_lora_project` did.

    Attributes:
        similarity: ``cos(C·B A, B A)`` per anchor key, before projection (module order).
        projected: anchor keys of the layers whose ``B`` was replaced by ``C·B``.
        threshold: the similarity threshold that was applied (for ``num_layers``, the
            ``num_layers``-th smallest similarity).
        module_names: the PEFT module name of each anchor key.
    """

    similarity: dict[str, float]
    projected: list[str]
    threshold: float
    module_names: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def safe_lora_project(
    peft_model: nn.Module,
    anchor: AlignmentAnchor | AnchorBinding,
    threshold: float | None = None,
    num_layers: int | None = None,
    *,
    mode: str = "paper",
    adapter_name: str = "default",
    strict: bool = True,
) -> SafeLoRAResult:
    """Apply the Safe LoRA projection ``B ← C·B`` in place to the least aligned layers.

    Args:
        peft_model: a PEFT model with LoRA adapters on the anchored modules.
        anchor: an :class:`AlignmentAnchor` (bound here with ``mode``) or an
            :class:`AnchorBinding` (its own mode is used).
        threshold: project every layer with similarity ``≤ threshold`` (the published
            code's ``select_layers_type="threshold"``).
        num_layers: project the ``num_layers`` layers of lowest similarity
            (``select_layers_type="number"``). Give exactly one of the two.
        mode: ``"paper"`` (the published ``C``, default) or ``"projector"`` (``C = U Uᵀ``).
        adapter_name: the PEFT adapter to project.
        strict: passed to :meth:`AlignmentAnchor.bind`.

    Returns:
        A :class:`SafeLoRAResult` with every layer's similarity and the projected layers.

    Raises:
        AsFTError: both or neither of ``threshold``/``num_layers``, a non-finite threshold,
            ``num_layers < 1``, ``mode="full"``; nothing is modified.
        AnchorMismatchError: the anchor does not fit the model (see ``bind``).
    """
    if (threshold is None) == (num_layers is None):
        raise AsFTError("safe_lora_project needs exactly one of threshold= or num_layers=")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise AsFTError(f"threshold must be a finite number, got {threshold!r}")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                   or num_layers < 1):
        raise AsFTError(f"num_layers must be a positive int, got {num_layers!r}")
    chosen_mode = anchor.mode if isinstance(anchor, AnchorBinding) else mode
    if chosen_mode not in ("paper", "projector"):
        raise AsFTError(f"Safe LoRA projects with mode 'paper' or 'projector', not {chosen_mode!r}")
    binding = _as_binding(peft_model, anchor, None if isinstance(anchor, AnchorBinding) else mode,
                          adapter_name, strict)

    # Everything is computed before anything is written.
    similarity = {p.key: lowrank_alignment(p.entry.U, p.c, p.B, p.A)["projection_cosine"] for p in binding}
    # A zero update has no direction: torch's cosine_similarity gives 0 for it.
    similarity = {k: (0.0 if math.isnan(v) else v) for k, v in similarity.items()}
    if num_layers is not None:
        ordered = sorted(similarity.values())
        applied = ordered[min(num_layers, len(ordered)) - 1]
    else:
        applied = float(threshold)
    selected = [p for p in binding if similarity[p.key] <= applied]
    updates = []
    for pair in selected:
        B = pair.B
        U = pair.entry.U.to(device=B.device, dtype=torch.float64)
        c = pair.c.to(device=B.device, dtype=torch.float64)
        projected = U @ (c[:, None] * (U.T @ B.detach().to(torch.float64)))  # C·B, (m, r)
        updates.append((B, projected.to(B.dtype)))
    for B, value in updates:
        B.copy_(value)
    return SafeLoRAResult(
        similarity=similarity,
        projected=[p.key for p in selected],
        threshold=applied,
        module_names={p.key: p.module_name for p in binding},
    )
