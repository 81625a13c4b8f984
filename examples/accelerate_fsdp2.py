"""AsFT fine-tuning under FSDP2 with accelerate.

Launch (GPUs, one process per GPU)::

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/accelerate_fsdp2.py

accelerate shards with FSDP only on accelerators (CUDA, XPU, ...). On a laptop, ``--cpu``
runs the same script as CPU processes with gloo and DDP-style gradient averaging (no
sharding), a smoke test of everything but ``fully_shard``::

    accelerate launch --config_file examples/accelerate_fsdp2.yaml --cpu --num_processes 2 \\
        examples/accelerate_fsdp2.py --max-steps 5

(FSDP2 itself on CPU, without accelerate: tests/test_distributed.py calls ``fully_shard``
directly on a gloo process group.)

What happens:

1. every rank builds the anchor: from ``--anchor`` (a file written by ``asft build-anchor``),
   or, by default, from a tiny Llama built from a config and a copy moved by a low-rank
   "alignment" delta (nothing is downloaded);
2. LoRA (PEFT) on the aligned model, the anchor bound to it, ``AsFTAdamW`` created on
   the plain model;
3. ``accelerator.prepare(model, optimizer, dataloader)``: accelerate applies ``fully_shard``
   per decoder layer and on the root and swaps the optimizer's parameters for the sharded
   DTensors; the A/B pairing lives in ``param_groups`` and survives that;
4. training: each step all-reduces the small anchor statistics (``UᵀB``, ``BᵀB``) and
   gathers A (r × n) — see docs/distributed.md for the bytes;
5. ``accelerator.save_state(OUT)`` (a sharded distributed checkpoint with the optimizer
   state) when ``--output-dir`` is given; ``--resume`` loads it and continues.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import asft_kernels as asft

TARGETS = ["q_proj", "v_proj"]


def tiny_aligned_and_base(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    """``(aligned, base)`` tiny Llamas: ``aligned`` is ``base`` plus a rank-4 delta on the
    ``q_proj``/``v_proj`` weights. Deterministic, so every rank builds the same pair."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.split(".")[-1] in TARGETS:
                m, n = module.weight.shape
                module.weight += 0.05 * torch.randn(m, 4) @ torch.randn(4, n) / n**0.5
    return aligned, base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchor", type=Path, help="anchor file (default: built from the tiny model pair)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--anchor-lambda", type=float, default=1.0)
    p.add_argument("--anchor-mode", choices=["paper", "projector", "full"], default="paper")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--output-dir", type=Path, help="save the sharded training state here at the end")
    p.add_argument("--resume", action="store_true", help="load the state in --output-dir first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the anchor loss ``R`` of every step (same value on every rank)."""
    args = parse_args(argv)
    accelerator = Accelerator()
    aligned, base = tiny_aligned_and_base()
    if args.anchor is not None:
        anchor = asft.AlignmentAnchor.load(args.anchor)
    else:
        anchor = asft.build_anchor(aligned=aligned, base=base, target_modules=TARGETS, rank=8, progress=False)

    lora_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=TARGETS,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(aligned, lora_config)
    binding = anchor.bind(model, mode=args.anchor_mode)
    optimizer = asft.AsFTAdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                               weight_decay=0.0, anchor=binding, anchor_lambda=args.anchor_lambda)

    gen = torch.Generator().manual_seed(1)
    rows = args.max_steps * args.batch_size * accelerator.num_processes
    ids = torch.randint(0, aligned.config.vocab_size, (rows, 32), generator=gen)
    loader = DataLoader(TensorDataset(ids), batch_size=args.batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    A = binding.pairs[0].A  # looked up on the module: now the sharded parameter
    accelerator.print(f"{binding.pairs[0].module_name}.lora_A: {type(A).__name__} "
                      f"{getattr(A, 'placements', '(not sharded)')}, global {tuple(A.shape)}")
    if args.resume and args.output_dir is not None:
        accelerator.load_state(str(args.output_dir))

    model.train()
    anchor_losses = []
    for step, (batch,) in enumerate(loader):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        # AcceleratedOptimizer wraps AsFTAdamW; R at the parameters before this step
        anchor_loss = float(optimizer.optimizer.anchor_loss)
        anchor_losses.append(anchor_loss)
        accelerator.print(f"step {step}: task loss {loss.item():.4f}  anchor loss {anchor_loss:.6f}")

    if args.output_dir is not None:
        accelerator.save_state(str(args.output_dir))
        accelerator.print(f"training state -> {args.output_dir}")
    accelerator.end_training()
    return anchor_losses


if __name__ == "__main__":
    main(sys.argv[1:])
