"""Integrations with the libraries people fine-tune with.

* :mod:`.hf`: ``AsFTTrainer`` / ``AsFTMixin`` / ``AsFTCallback`` for transformers'
  ``Trainer`` (and TRL trainers built on it); imports transformers on first use.
* :mod:`.safe_lora`: ``safe_lora_project``, the Safe LoRA post-hoc projection baseline.
"""

from __future__ import annotations

from .safe_lora import SafeLoRAResult, safe_lora_project

_HF_NAMES = ("AsFTCallback", "AsFTMixin", "AsFTTrainer")


def __getattr__(name: str):
    # transformers is heavy to import: load the Trainer integration only when asked for.
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SafeLoRAResult", "safe_lora_project", *_HF_NAMES]
