"""Fine-tune with AsFT through transformers' Trainer, on a model small enough for a laptop CPU.

What it shows, end to end:

1. an "aligned" and a "base" model (here: a tiny Llama built from a config, and the same
   weights plus a low-rank alignment delta on ``q_proj``/``v_proj``);
2. ``asft.build_anchor`` on the two models, saved to ``OUT/anchor.safetensors``;
3. LoRA on the aligned model, trained by ``AsFTTrainer`` (``anchor_loss`` in the logs,
   per-layer residual fractions every ``--residual-every`` steps);
4. the per-layer alignment report of the trained adapter, and Safe LoRA's post-hoc
   projection on a copy, for comparison;
5. the adapter saved to ``OUT/adapter`` so that ``asft report OUT/adapter OUT/anchor.safetensors``
   prints the same table from disk.

Run::

    python examples/finetune_trainer.py --output-dir /tmp/asft-example --max-steps 20
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import asft_kernels as asft
from asft_kernels.diagnostics import alignment_report, format_report
from asft_kernels.integrations.hf import AsFTTrainer

TARGETS = ["q_proj", "v_proj"]


def tiny_model_pair(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128,
                    delta_rank: int = 4, delta_scale: float = 0.05):
    """``(aligned, base)``: a tiny random Llama and a copy whose ``q_proj``/``v_proj``
    weights are moved by a rank-``delta_rank`` alignment delta."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.split(".")[-1] in TARGETS:
                m, n = module.weight.shape
                module.weight += delta_scale * torch.randn(m, delta_rank) @ torch.randn(delta_rank, n) / n**0.5
    return aligned, base


def random_token_dataset(vocab: int, rows: int = 64, length: int = 32, seed: int = 1) -> Dataset:
    """Next-token prediction on random sequences: a stand-in for a fine-tuning set."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--anchor-lambda", type=float, default=1.0)
    p.add_argument("--anchor-mode", choices=["paper", "projector", "full"], default="paper")
    p.add_argument("--anchor-rank", type=int, default=8, help="directions kept per module")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--residual-every", type=int, default=5, help="log per-layer residual fractions every N steps")
    p.add_argument("--safe-lora-threshold", type=float, default=0.5)
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "cpp", "triton"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the trainer, the anchor, the report rows and the paths written."""
    args = parse_args(argv)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    aligned, base = tiny_model_pair()
    anchor = asft.build_anchor(aligned=aligned, base=base, target_modules=TARGETS, rank=args.anchor_rank,
                               progress=False)
    anchor_path = out / "anchor.safetensors"
    anchor.save(anchor_path)
    print(f"anchor: {anchor} -> {anchor_path}")

    # Fine-tune the aligned model with PEFT's default LoRA init (B = 0, so anchor_loss starts at 0).
    lora_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=TARGETS,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(aligned, lora_config)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
    )
    trainer = AsFTTrainer(
        model=model, args=training_args, train_dataset=random_token_dataset(aligned.config.vocab_size),
        anchor=anchor, anchor_lambda=args.anchor_lambda, anchor_mode=args.anchor_mode,
        anchor_backend=args.backend, anchor_residual_every=args.residual_every,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "anchor_loss" in entry:
            print({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()
                   if not k.startswith("anchor_residual/")})

    rows = alignment_report(model, anchor, mode=args.anchor_mode)
    print(format_report(rows))

    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir))
    print(f"adapter -> {adapter_dir}; inspect it with: asft report {adapter_dir} {anchor_path}")

    # The post-hoc baseline on a copy: Safe LoRA projects B ← C·B on dissimilar layers.
    projected = copy.deepcopy(model)
    result = asft.safe_lora_project(projected, anchor, threshold=args.safe_lora_threshold)
    print(f"Safe LoRA (threshold {args.safe_lora_threshold}): projected {len(result.projected)} of "
          f"{len(result.similarity)} layers")
    return {"trainer": trainer, "anchor": anchor, "rows": rows, "anchor_path": anchor_path,
            "adapter_dir": adapter_dir, "safe_lora": result}


if __name__ == "__main__":
    main(sys.argv[1:])
