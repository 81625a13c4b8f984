"""asft_kernels: AsFT safety anchoring inside a fused AdamW step.

Public names (see README.md)::

    import asft_kernels as asft
    anchor = asft.AlignmentAnchor.from_deltas({"model.layers.0.self_attn.q_proj": V}, rank=64)
    binding = anchor.bind(peft_model, mode="paper")
    optimizer = asft.AsFTAdamW(peft_model.parameters(), lr=5e-5, anchor=binding, anchor_lambda=1.0)
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (first: before anything imports peft, and with it bitsandbytes)
from .anchor import AlignmentAnchor, AnchorBinding, AnchoredPair, AnchorEntry
from .errors import (
    AnchorEntryError,
    AnchorFileError,
    AnchorMismatchError,
    AsFTError,
    OptimizerInputError,
    UnsupportedAdapterError,
)
from .optim import AsFTAdamW

__version__ = "0.1.0"


def build_anchor(*args, **kwargs):
    """Build an :class:`AlignmentAnchor` from an aligned and a base checkpoint.

    See :func:`asft_kernels.build.build_anchor`.
    """
    from .build import build_anchor as _build_anchor

    return _build_anchor(*args, **kwargs)


def safe_lora_project(*args, **kwargs):
    """Safe LoRA post-hoc projection; see :func:`asft_kernels.integrations.safe_lora.safe_lora_project`."""
    from .integrations.safe_lora import safe_lora_project as _project

    return _project(*args, **kwargs)


__all__ = [
    "AlignmentAnchor",
    "AnchorBinding",
    "AnchorEntry",
    "AnchoredPair",
    "AnchorEntryError",
    "AnchorFileError",
    "AnchorMismatchError",
    "AsFTAdamW",
    "AsFTError",
    "OptimizerInputError",
    "UnsupportedAdapterError",
    "build_anchor",
    "safe_lora_project",
]
