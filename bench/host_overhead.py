"""Host work of one optimizer step on a model with many adapted layers.

A Llama layout (``--layers`` decoder layers × 7 LoRA targets: q, k, v, o, gate, up, down;
hidden 64, intermediate 128, r 8, anchor k 8) keeps every shape small on purpose, so that
what is measured is the Python and dispatch work around the kernels. Every LoRA parameter
has a fixed random gradient; a step is the optimizer's work only.

Reported, in one run: the median step time of ``torch.optim.AdamW(fused=True)``,
``AdamW(foreach=True)``, ``AsFTAdamW`` with the compiled backend of the device (C++ on CPU,
Triton on CUDA) and the eager backend, their ratios (the median of the ratios within each
interleaved round), the number of torch ops one step
dispatches (a ``TorchDispatchMode`` counter) and how many times the step plan was built.
On CUDA every timed step ends with ``torch.cuda.synchronize()``.

    python bench/host_overhead.py                  # 2, 8 and 32 layers (14, 56, 224 pairs)
    python bench/host_overhead.py --json out.json  # also write the rows
    python bench/host_overhead.py --device cuda    # the triton backend against AdamW on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_lora(layers: int, hidden: int = 64, inter: int = 128, r: int = 8, seed: int = 0):
    """A PEFT LoRA model of a tiny Llama with every linear layer adapted (B ≠ 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(base, lcfg)


def anchored_model(layers: int, k: int = 8, seed: int = 0, device: str | torch.device = "cpu"):
    """``(model, binding, params)``: the LoRA model on ``device``, a binding of a random rank-k
    anchor for every adapted layer, and the trainable parameters with fixed random gradients
    (drawn on the CPU, the same values on every device)."""
    from asft_kernels import AlignmentAnchor
    from asft_kernels.anchor import normalize_module_name

    model = llama_lora(layers, seed=seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            m, n = module.base_layer.weight.shape
            V = torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen)
            deltas[normalize_module_name(name)] = V
    anchor = AlignmentAnchor.from_deltas(deltas, rank=k)
    binding = anchor.bind(model, mode="paper")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device)
    return model, binding, params


def make_optimizer(variant: str, params, binding):
    from asft_kernels import AsFTAdamW

    if variant == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    if variant == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    return AsFTAdamW(params, lr=1e-4, weight_decay=0.01, anchor=binding, anchor_lambda=1.0, backend=variant)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_per_step(optimizer) -> int:
    """Torch ops dispatched by one ``step()`` after the first (plan built, stats cached)."""
    optimizer.step()
    with OpCounter() as counter:
        optimizer.step()
    return counter.count


def median_step_ms(step, device: str | torch.device, steps: int, warmup: int = 5) -> float:
    """Median wall time of ``step()`` in ms over ``steps`` calls after ``warmup`` calls; on
    CUDA each timed call ends with ``torch.cuda.synchronize()``."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compiled_backend(device: str | torch.device) -> str:
    """The compiled backend of ``device``: ``cpp`` on CPU, ``triton`` on CUDA."""
    return "triton" if torch.device(device).type == "cuda" else "cpp"


def variants_for(device: str | torch.device) -> tuple[str, ...]:
    """The optimizers compared on ``device``."""
    return ("adamw_fused", "adamw_foreach", compiled_backend(device), "eager")


VARIANTS = variants_for("cpu")


def measure(layers: int, steps: int, rounds: int, device: str | torch.device = "cpu") -> dict:
    """One row: medians over ``rounds`` interleaved rounds of ``steps`` steps per variant.
    Each variant steps its own copy of the model (same seed: the same parameters and
    gradients): on shared parameters an anchored optimizer would see the others' writes and
    recompute every pair's statistics at its first step of each round."""
    variants = variants_for(device)
    fused = compiled_backend(device)
    opts = {}
    for v in variants:
        _, binding, params = anchored_model(layers, device=device)
        opts[v] = make_optimizer(v, params, binding)
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):  # interleaved, so a load change hits every variant alike
        for v, opt in opts.items():
            samples[v].append(median_step_ms(opt.step, device, steps))
    row = {"layers": layers, "pairs": len(binding), "params": len(params)}
    for v in variants:
        row[f"{v}_ms"] = round(statistics.median(samples[v]), 4)
    # ratios paired by round (the median of the rounds' ratios), so a load change between
    # rounds does not enter them
    for name, (num, den) in ((f"{fused}_over_fused", (fused, "adamw_fused")),
                             ("eager_over_foreach", ("eager", "adamw_foreach"))):
        row[name] = round(statistics.median(a / b for a, b in zip(samples[num], samples[den])), 3)
    for v in (fused, "eager", "adamw_fused"):
        row[f"{v}_ops_per_step"] = ops_per_step(opts[v])
    row[f"{fused}_plan_builds"] = opts[fused].plan_builds
    return row


def machine() -> dict:
    import asft_kernels

    return {
        "torch": torch.__version__, "asft_kernels": asft_kernels.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="decoder layers (7 pairs each)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=25,
                    help="interleaved rounds; times: the median of their medians; ratios: the median of their ratios")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, help="write the rows and machine facts here")
    ap.add_argument("--device", default="cpu", help="cpu (C++ backend) or cuda (triton backend)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fused = compiled_backend(args.device)
    rows = [measure(n, args.steps, args.rounds, args.device) for n in args.layers]
    head = ("pairs", "adamw_fused_ms", "adamw_foreach_ms", f"{fused}_ms", "eager_ms", f"{fused}_over_fused",
            "eager_over_foreach", f"{fused}_ops_per_step", "eager_ops_per_step", "adamw_fused_ops_per_step")
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(str(row[h]) for h in head))
    info = machine()
    print(f"# {info}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
