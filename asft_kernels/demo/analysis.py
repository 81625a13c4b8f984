"""Where the demo's fine-tuning updates lie relative to the alignment delta (docs/demo.md, verdict).

For every anchored layer: ``‖ΔW‖_F`` of the LoRA update ``ΔW = (alpha/r) B A`` (out, in),
``‖V‖_F`` of the alignment delta, ``cos(ΔW, V)`` and the fraction of ``‖ΔW‖²_F`` inside the top-k
left singular directions of ``V`` (``k/m`` for a random subspace). Plain ``sft`` (AdamW) runs on
three data sets: the ``1k_p_0.1`` mix, its task examples alone, its harmful examples alone.

Run ``python -m asft_kernels.demo.analysis --out DIR --seed N`` after ``asft demo --out DIR --seed N``
(it reuses the cached base and aligned models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .data import build_corpora
from .experiment import DemoConfig, _finetune, _pretrain
from .models import alignment_deltas
from .training import encode


def update_geometry(model: torch.nn.Module, deltas: dict[str, torch.Tensor], top_k: int) -> dict[str, dict]:
    """Per LoRA module of the PEFT ``model``: norms, cosine with ``V`` and energy in ``V``'s top-k."""
    out = {}
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, torch.nn.ModuleDict) or "default" not in lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        V = deltas[key]
        update = (module.lora_B["default"].weight @ lora_A["default"].weight).detach() * module.scaling["default"]
        U = torch.linalg.svd(V, full_matrices=False)[0][:, :top_k]
        out[key] = {
            "update_fro": float(update.norm()),
            "delta_fro": float(V.norm()),
            "cosine": float((update * V).sum() / (update.norm() * V.norm())),
            "energy_in_top_k": float((U.T @ update).norm() ** 2 / update.norm() ** 2),
            "random_subspace_energy": top_k / V.shape[0],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder of a finished `asft demo` run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = DemoConfig(seed=args.seed)
    corpora = build_corpora(cfg.seed, cfg.sizes)
    pre = _pretrain(cfg, corpora, Path(args.out) / "cache" / cfg.pretrain_key(), progress=False)
    deltas = alignment_deltas(pre.aligned, pre.base)
    sets = {
        "1k_p_0.1": corpora.finetune,
        "task only": corpora.finetune.filter(lambda row: row["harmful"] == 0),
        "harmful only": corpora.finetune.filter(lambda row: row["harmful"] == 1),
    }
    report = {}
    for label, ds in sets.items():
        examples = encode(pre.tokenizer, ds["prompt"], ds["response"])
        model, _ = _finetune(cfg, pre.aligned, examples, pre.tokenizer.pad_token_id, None, None, 0.0, label, False)
        report[label] = update_geometry(model, deltas, args.top_k)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
