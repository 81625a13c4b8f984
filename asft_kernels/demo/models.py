"""Tiny Llama models of the demo, LoRA wrapping, and the alignment anchor (docs/demo.md §2–§5)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class ModelShape:
    """Size of the demo's ``LlamaForCausalLM`` (vocabulary size comes from the tokenizer)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    max_positions: int = 64


def new_model(vocab_size: int, shape: ModelShape, seed: int) -> nn.Module:
    """A randomly initialized float32 ``LlamaForCausalLM`` built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def with_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> nn.Module:
    """A deep copy of ``model`` wrapped by PEFT LoRA on ``q_proj``/``v_proj`` (B = 0 at start,
    A drawn from ``seed``); only the LoRA factors are trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(model), config)


def alignment_deltas(aligned: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """``V = W_aligned − W_base`` (out, in) of every ``q_proj``/``v_proj``, keyed by module name."""
    base_params = dict(base.named_parameters())
    return {
        name.removesuffix(".weight"): (p.detach() - base_params[name].detach()).float()
        for name, p in aligned.named_parameters()
        if name.endswith(tuple(f"{t}.weight" for t in TARGET_MODULES))
    }


def build_alignment_anchor(aligned: nn.Module, base: nn.Module, rank: int | None = None):
    """The anchor of ``q_proj``/``v_proj`` (``V = W_aligned − W_base``), built by
    ``asft_kernels.build_anchor`` from the two in-memory models. ``rank=None`` (the protocol)
    keeps every direction of numerical rank, i.e. the exact published ``C``."""
    from .. import build_anchor

    return build_anchor(aligned=aligned, base=base, target_modules=list(TARGET_MODULES), rank=rank, progress=False)
