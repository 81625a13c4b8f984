"""Shared fixtures: the backends that can run here, the device of the Triton kernel tests, tiny PEFT models."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Deterministic, quiet, small: CI has 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def available_backends() -> list[str]:
    """Backends that can run CPU tensors here (plus CUDA ones on a GPU machine)."""
    from asft_kernels.ops import _compiled_backend

    names = ["eager"]
    if _compiled_backend("cpp") is not None:
        names.append("cpp")
    if _compiled_backend("triton") is not None:
        names.append("triton")
    return names


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


def device_for(backend: str) -> torch.device:
    """Where a test of ``backend`` puts its model and inputs: CUDA for ``triton`` when CUDA is
    present, else the CPU (``triton`` then runs under ``TRITON_INTERPRET=1``). Ground-truth
    references stay on the CPU; compare after ``.cpu()``."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """Where the tests of the Triton backend's kernels run: CUDA when present, else CPU tensors
    under the Triton interpreter (``TRITON_INTERPRET=1`` for the test)."""
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def tiny_llama(dtype=torch.float64, seed=0, layers=2, hidden=32, inter=48, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def lora(model, r=4, targets=("q_proj", "v_proj"), seed=1, **kwargs):
    """PEFT model with B ≠ 0 (``init_lora_weights=False``) so every term is exercised."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     lora_dropout=0.0, **kwargs)
    return get_peft_model(copy.deepcopy(model), cfg)
