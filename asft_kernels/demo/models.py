"""Tiny Llama models of the demo, LoRA wrapping, and the anchors of its runs (docs/demo.md, protocol v3 §2–§5)."""

from __future__ import annotations

import copy
import warnings
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
    with warnings.catch_warnings():
        # PEFT asks transformers a deprecated question on every wrap; the demo's console stays readable
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(copy.deepcopy(model), config)


def alignment_deltas(aligned: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """``V = W_aligned − W_base`` (out, in) of every ``q_proj``/``v_proj``, keyed by module name."""
    base_params = dict(base.named_parameters())
    return {
        name.removesuffix(".weight"): (p.detach() - base_params[name].detach()).float()
        for name, p in aligned.named_parameters()
        if name.endswith(tuple(f"{t}.weight" for t in TARGET_MODULES))
    }


def lora_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """``ΔW = (alpha/r) B A`` (out, in) of every LoRA module of the PEFT ``model``, keyed by the
    base model's module name (the ``base_model.model.`` prefix removed)."""
    out = {}
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or "default" not in lora_A:
            continue
        update = module.lora_B["default"].weight @ lora_A["default"].weight * module.scaling["default"]
        out[name.removeprefix("base_model.model.")] = update.detach().float().clone()
    return out


def random_subspace_deltas(shapes: dict[str, tuple[int, int]], k: int, seed: int) -> dict[str, torch.Tensor]:
    """Per module, ``Q diag(k, …, 1) R`` (m, n): its column space is a random k-dimensional
    subspace (``Q`` a random orthonormal (m, k), ``R`` a random (k, n)), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        m, n = shapes[name]
        Q = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
        R = torch.randn(k, n, generator=gen, dtype=torch.float64)
        scale = torch.arange(k, 0, -1, dtype=torch.float64)
        out[name] = (Q * scale @ R).float()
    return out


def delta_statistics(V: torch.Tensor, W_base: torch.Tensor, spectrum: int = 16) -> dict:
    """What decides how ``paper`` mode acts on one layer (protocol v3 §3).

    Args:
        V: (m, n) alignment delta ``W_aligned − W_base``.
        W_base: (m, n) base weight.
        spectrum: number of leading energy fractions reported.
    """
    V64 = V.double()
    s = torch.linalg.svdvals(V64)
    energy = s.square() / s.square().sum()
    fro = float(V64.norm())
    c = s.square() / fro
    w = 2 * c - c.square()
    r6 = lambda x: round(float(x), 6)  # noqa: E731
    return {
        "delta_fro": r6(fro),
        "relative_to_base": r6(fro / float(W_base.double().norm())),
        "energy_spectrum": [r6(e) for e in energy[:spectrum]],
        "energy_top4": r6(energy[:4].sum()),
        "energy_top8": r6(energy[:8].sum()),
        "participation_rank": r6(s.square().sum().square() / s.pow(4).sum()),
        "max_c": r6(c.max()),
        "max_w": r6(w.max()),
    }
