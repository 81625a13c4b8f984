"""The demo's experiment: stages 1–7 of docs/demo.md, caching, ``results.json`` and the plot."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..anchor import atomic_write
from ..errors import AsFTError
from ..ops import resolve_backend
from .data import CorpusSizes, build_corpora, build_tokenizer
from .metrics import harmful_rate, task_accuracy
from .models import ModelShape, build_alignment_anchor, new_model, with_lora
from .training import encode, train

CACHE_VERSION = 1


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of one demo run (docs/demo.md). Steps are optimizer steps; lr in AdamW units."""

    seed: int = 0
    quick: bool = False
    sizes: CorpusSizes = CorpusSizes()
    shape: ModelShape = ModelShape()
    base_steps: int = 600
    base_lr: float = 3e-3
    align_steps: int = 300
    align_lr: float = 1e-3
    pretrain_batch: int = 32
    lora_rank: int = 8
    lora_alpha: float = 16.0
    finetune_steps: int = 500
    finetune_batch: int = 16
    finetune_lr: float = 5e-3
    anchor_rank: int | None = None
    asft_mode: str = "paper"
    asft_lambda: float = 1.0
    sweep_lambdas: tuple[float, ...] = (0.0, 0.1, 1.0, 10.0, 100.0)
    sweep_modes: tuple[str, ...] = ("paper", "projector")
    safe_lora_threshold: float = 0.5
    backend: str = "auto"

    @classmethod
    def quick_config(cls, seed: int = 0) -> DemoConfig:
        """The ``--quick`` sizes: a CI smoke test of the same protocol."""
        return cls(
            seed=seed, quick=True,
            sizes=CorpusSizes(base=1500, align=800, finetune=300, eval_harmful=50, eval_task=100),
            base_steps=200, align_steps=100, finetune_steps=80, sweep_lambdas=(0.0, 1.0, 10.0),
        )

    def pretrain_key(self) -> str:
        """Hash of everything stages 1–3 depend on (names the cache folder)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k in ("seed", "sizes", "shape", "base_steps", "base_lr", "align_steps", "align_lr",
                           "pretrain_batch")}
        fields["version"] = CACHE_VERSION
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"seed{self.seed}-{digest}"


@dataclass
class Pretrained:
    """Outputs of stages 1–3."""

    tokenizer: Any
    base: nn.Module
    aligned: nn.Module
    cached: bool
    info: dict = field(default_factory=dict)


def _pretrain(cfg: DemoConfig, corpora, cache_dir: Path, progress: bool) -> Pretrained:
    """Stages 1–3 (tokenizer, base, aligned), loaded from ``cache_dir`` when present."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    done = cache_dir / "complete.json"
    if done.is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cache_dir / "tokenizer")
        base = LlamaForCausalLM.from_pretrained(cache_dir / "base").float().eval()
        aligned = LlamaForCausalLM.from_pretrained(cache_dir / "aligned").float().eval()
        return Pretrained(tokenizer, base, aligned, True, json.loads(done.read_text()))

    tokenizer = build_tokenizer(corpora)
    pad = tokenizer.pad_token_id
    base = new_model(len(tokenizer), cfg.shape, cfg.seed)
    base_loss = train(
        base, torch.optim.AdamW(base.parameters(), lr=cfg.base_lr, weight_decay=0.0),
        encode(tokenizer, None, texts=corpora.base["text"]),
        steps=cfg.base_steps, batch_size=cfg.pretrain_batch, seed=cfg.seed + 1, pad_id=pad,
        desc="2/7 base model", progress=progress,
    )
    aligned = new_model(len(tokenizer), cfg.shape, cfg.seed)
    aligned.load_state_dict(base.state_dict())
    align_loss = train(
        aligned, torch.optim.AdamW(aligned.parameters(), lr=cfg.align_lr, weight_decay=0.0),
        encode(tokenizer, corpora.align["prompt"], corpora.align["response"]),
        steps=cfg.align_steps, batch_size=cfg.pretrain_batch, seed=cfg.seed + 2, pad_id=pad,
        desc="3/7 alignment", progress=progress,
    )
    info = {"base_final_loss": base_loss, "align_final_loss": align_loss, "vocab_size": len(tokenizer)}
    # write into a temporary folder, then rename, so an interrupted run leaves no half cache
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    base.save_pretrained(tmp / "base")
    aligned.save_pretrained(tmp / "aligned")
    (tmp / "complete.json").write_text(json.dumps(info))
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.replace(tmp, cache_dir)
    return Pretrained(tokenizer, base.eval(), aligned.eval(), False, info)


def _evaluate(model: nn.Module, tokenizer, corpora) -> dict[str, float]:
    return {
        "harmful_rate": harmful_rate(model, tokenizer, corpora.eval_harmful["prompt"]),
        "task_accuracy": task_accuracy(model, tokenizer, corpora.eval_task["prompt"], corpora.eval_task["label"]),
    }


def _finetune(cfg: DemoConfig, aligned: nn.Module, examples, pad_id: int, anchor, mode: str | None,
              lam: float, desc: str, progress: bool) -> tuple[nn.Module, dict]:
    """One LoRA fine-tune of the aligned model: AdamW when λ = 0, AsFTAdamW(mode, λ) otherwise."""
    from ..optim import AsFTAdamW

    model = with_lora(aligned, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed + 3)
    params = [p for p in model.parameters() if p.requires_grad]
    if lam == 0.0:
        optimizer = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
    else:
        optimizer = AsFTAdamW(params, lr=cfg.finetune_lr, weight_decay=0.0, anchor=anchor.bind(model, mode=mode),
                              anchor_lambda=lam, backend=cfg.backend)
    start = time.perf_counter()
    loss = train(model, optimizer, examples, steps=cfg.finetune_steps, batch_size=cfg.finetune_batch,
                 seed=cfg.seed + 4, pad_id=pad_id, desc=desc, progress=progress)
    info = {"final_loss": loss, "seconds": time.perf_counter() - start}
    if lam != 0.0:
        info["final_anchor_loss"] = float(optimizer.anchor_loss)
    return model, info


def _safe_lora(model: nn.Module, anchor, threshold: float) -> dict:
    """Apply the Safe LoRA projection (paper ``C``, layers with similarity ≤ ``threshold``) to the
    fine-tuned PEFT ``model`` in place; returns what was projected."""
    from .. import safe_lora_project

    result = safe_lora_project(model, anchor, threshold=threshold, mode="paper")
    return {"threshold": threshold, "projected": list(result.projected), "similarity": dict(result.similarity)}


def run_demo(out_dir: str | os.PathLike, cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the whole experiment, write ``out_dir/results.json`` and ``out_dir/results.png``.

    Returns the results dict (rates and accuracies are fractions in [0, 1]).
    """
    if cfg.asft_mode not in cfg.sweep_modes or cfg.asft_lambda not in cfg.sweep_lambdas:
        raise AsFTError(f"the asft setting ({cfg.asft_mode}, λ={cfg.asft_lambda}) must be one of the sweep's")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = tqdm(total=7, desc="asft demo", disable=not progress, dynamic_ncols=True)

    stages.set_description("1/7 corpora + tokenizer")
    corpora = build_corpora(cfg.seed, cfg.sizes)
    stages.update(1)
    stages.set_description("2-3/7 base + aligned")
    pre = _pretrain(cfg, corpora, out / "cache" / cfg.pretrain_key(), progress)
    tokenizer = pre.tokenizer
    stages.update(2)

    stages.set_description("4/7 anchor")
    anchor = build_alignment_anchor(pre.aligned, pre.base, cfg.anchor_rank)
    stages.update(1)

    stages.set_description("5/7 fine-tuning")
    examples = encode(tokenizer, corpora.finetune["prompt"], corpora.finetune["response"])
    runs: dict[tuple[str, float], dict] = {}
    sft_model = None
    settings = [("sft", 0.0)] + [(m, lam) for m in cfg.sweep_modes for lam in cfg.sweep_lambdas if lam != 0.0]
    for mode, lam in tqdm(settings, desc="fine-tunes", disable=not progress, leave=False, dynamic_ncols=True):
        name = "sft" if lam == 0.0 else f"asft {mode} λ={lam:g}"
        model, info = _finetune(cfg, pre.aligned, examples, tokenizer.pad_token_id, anchor,
                                None if lam == 0.0 else mode, lam, name, progress)
        info.update(_evaluate(model, tokenizer, corpora))
        runs[(mode, lam)] = info
        if lam == 0.0:
            sft_model = model
    stages.update(1)

    stages.set_description("6/7 safe_lora + evaluation")
    methods: dict[str, Any] = {"sft": _metrics(runs[("sft", 0.0)])}
    notes = []
    safe_lora_info = _safe_lora(sft_model, anchor, cfg.safe_lora_threshold)
    methods["safe_lora"] = _evaluate(sft_model, tokenizer, corpora)
    methods["asft"] = _metrics(runs[(cfg.asft_mode, cfg.asft_lambda)])
    sweep = []
    for mode in cfg.sweep_modes:
        for lam in cfg.sweep_lambdas:
            run = runs[("sft", 0.0) if lam == 0.0 else (mode, lam)]
            sweep.append({"mode": mode, "anchor_lambda": lam, **_metrics(run),
                          "final_task_loss": run["final_loss"], "final_anchor_loss": run.get("final_anchor_loss")})
    results = {
        "aligned": _evaluate(pre.aligned, tokenizer, corpora),
        "base": _evaluate(pre.base, tokenizer, corpora),
        "methods": methods,
        "sweep": sweep,
        "config": {
            **_jsonable(dataclasses.asdict(cfg)),
            "anchor_builder": "asft_kernels.build_anchor",
            "resolved_backend": resolve_backend(cfg.backend, torch.device("cpu")).name,
            "safe_lora": safe_lora_info,
            "anchor_ranks": {k: e.rank for k, e in anchor.items()},
            "pretrain_cache": str(Path("cache") / cfg.pretrain_key()),
            "pretrain_cached": pre.cached,
            "pretrain": pre.info,
            "notes": notes,
            "machine": _machine(),
            "seconds": None,
        },
    }
    stages.update(1)

    stages.set_description("7/7 results")
    results["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    plot_results(results, out / "results.png")
    stages.update(1)
    stages.close()
    return results


def _metrics(run: dict) -> dict[str, float]:
    return {"harmful_rate": run["harmful_rate"], "task_accuracy": run["task_accuracy"]}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def plot_results(results: dict, path: Path) -> None:
    """Harmful rate (y) against task accuracy (x): the sweep per mode as lines, the methods as
    labelled markers. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    modes = sorted({s["mode"] for s in results["sweep"]})
    for k, (mode, style) in enumerate(zip(modes, ("o-", "s--", "^:"))):
        pts = [s for s in results["sweep"] if s["mode"] == mode]
        xy = [(100 * s["task_accuracy"], 100 * s["harmful_rate"]) for s in pts]
        ax.plot([x for x, _ in xy], [y for _, y in xy], style, alpha=0.6, label=f"AsFTAdamW {mode}, λ sweep")
        # settings landing on the same point share one label
        at: dict[tuple[float, float], list[str]] = {}
        for s, (x, y) in zip(pts, xy):
            at.setdefault((round(x, 1), round(y, 1)), []).append(f"{s['anchor_lambda']:g}")
        for (x, y), lams in at.items():
            ax.annotate(f"{mode} λ={','.join(lams)}", (x, y), fontsize=7, xytext=(4, 4 - 11 * k),
                        textcoords="offset points", ha="right" if x > 80 else "left")
    named = {"aligned": results["aligned"], **results["methods"]}
    for (name, m), marker in zip(named.items(), ("*", "X", "P", "D")):
        ax.scatter([100 * m["task_accuracy"]], [100 * m["harmful_rate"]], marker=marker, s=120, zorder=3, label=name)
    cfg = results["config"]
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("harmful rate (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_title(f"asft demo, seed {cfg['seed']}{' (quick)' if cfg['quick'] else ''}: lower right is better",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def format_table(results: dict) -> str:
    """The results as a text table (percentages)."""
    rows = [("aligned", results["aligned"])] + list(results["methods"].items())
    lines = [f"{'method':<24}{'harmful rate':>14}{'task accuracy':>15}"]
    lines += [f"{name:<24}{100 * m['harmful_rate']:>13.1f}%{100 * m['task_accuracy']:>14.1f}%" for name, m in rows]
    lines.append("")
    lines.append(f"{'λ sweep':<24}{'harmful rate':>14}{'task accuracy':>15}")
    lines += [
        f"{s['mode'] + ' λ=' + format(s['anchor_lambda'], 'g'):<24}{100 * s['harmful_rate']:>13.1f}%"
        f"{100 * s['task_accuracy']:>14.1f}%"
        for s in results["sweep"]
    ]
    lines += [f"note: {n}" for n in results["config"]["notes"]]
    return "\n".join(lines)
