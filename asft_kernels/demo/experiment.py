"""The demo's experiment, protocol v2 of docs/demo.md: per seed a base, a short alignment, the
fine-tuning runs of every family; then the statistics, the verdict, ``results.json`` and the plot."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AsFTError
from . import analysis
from .data import CorpusSizes, build_corpora, build_tokenizer
from .metrics import Outcomes, evaluate, refusal_rate
from .models import (
    ModelShape,
    alignment_deltas,
    delta_statistics,
    lora_updates,
    new_model,
    random_subspace_deltas,
    with_lora,
)
from .training import encode, train

PROTOCOL_VERSION = 2
# Seed offsets of the random streams of one seed (protocol v2: every family shares them).
_BASE_INIT, _BASE_BATCHES, _ALIGN_BATCHES, _LORA_INIT, _FT_BATCHES, _TASK_BATCHES, _RANDOM_SUBSPACE = range(7)


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of one demo run (docs/demo.md, protocol v2). Steps are optimizer steps,
    lr in AdamW units, levels are task accuracies in [0, 1]."""

    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    sizes: CorpusSizes = CorpusSizes()
    shape: ModelShape = ModelShape()
    base_steps: int = 600
    base_lr: float = 3e-3
    pretrain_batch: int = 32
    align_lr: float = 1e-3
    align_max_steps: int = 300
    align_check_every: int = 10
    align_refusal_target: float = 0.9
    lora_rank: int = 8
    lora_alpha: float = 16.0
    finetune_steps: int = 120
    finetune_batch: int = 32
    finetune_lr: float = 5e-3
    low_lr: float = 1e-3
    sft_eval_steps: tuple[int, ...] = (10, 20, 40, 80, 120)
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    projector_ks: tuple[int, ...] = (4, 8)
    positive_k: int = 8
    levels: tuple[float, ...] = (0.90, 0.75)
    bootstrap: int = 1000
    max_new_tokens: int = 16
    safe_lora_threshold: float = 0.5
    backend: str = "eager"

    @classmethod
    def quick_config(cls, seeds: tuple[int, ...] = (0,)) -> DemoConfig:
        """The ``--quick`` sizes: a CI smoke test of the same code path (not results)."""
        return cls(
            seeds=tuple(seeds), quick=True,
            sizes=CorpusSizes(base=1500, align=800, finetune=300, task_only=270, eval_harmful=60,
                              eval_task=60, eval_benign=40),
            base_steps=200, align_max_steps=100, finetune_steps=30, sft_eval_steps=(5, 10, 20, 30),
            lambdas=(1.0, 100.0), bootstrap=200,
        )

    @classmethod
    def smoke_config(cls, seeds: tuple[int, ...] = (0,)) -> DemoConfig:
        """An even smaller variant of ``--quick`` for the test suite (seconds): every family,
        one λ, one k; the same code path."""
        return cls(
            seeds=tuple(seeds), quick=True,
            sizes=CorpusSizes(base=600, align=300, finetune=120, task_only=100, eval_harmful=30,
                              eval_task=30, eval_benign=20),
            base_steps=60, align_max_steps=30, finetune_steps=8, sft_eval_steps=(4, 8), lambdas=(10.0,),
            projector_ks=(8,), bootstrap=50,
        )

    def validate(self) -> None:
        """Raise :class:`AsFTError` on settings the protocol cannot run with."""
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise AsFTError(f"asft demo: seeds must be distinct integers >= 0, got {self.seeds}")
        if not self.sft_eval_steps or self.sft_eval_steps[-1] != self.finetune_steps \
                or list(self.sft_eval_steps) != sorted(set(self.sft_eval_steps)):
            raise AsFTError("asft demo: sft_eval_steps must increase and end at finetune_steps")
        if any(lam <= 0 for lam in self.lambdas):
            raise AsFTError(f"asft demo: lambdas must be > 0 (λ = 0 is the sft run), got {self.lambdas}")
        if self.positive_k not in self.projector_ks:
            raise AsFTError("asft demo: positive_k must be one of projector_ks (it shares their random control)")

    def families(self) -> list[str]:
        """The anchored families, in plot and table order."""
        out = ["paper", "full"]
        for k in self.projector_ks:
            out += [f"projector_k{k}", f"random_projector_k{k}"]
        return out + [f"task_projector_k{self.positive_k}"]


def _stream(seed: int, offset: int) -> int:
    return 1000 * seed + offset


def _readable(path: str) -> None:
    """Give a ``mkstemp`` file (mode 0600) the permissions of a plainly created file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _record(seed: int, family: str, method: str, mode: str | None, lam: float, k: int | None, lr: float | None,
            step: int, out: Outcomes, extra: dict | None = None) -> dict:
    return {"method": method, "mode": mode, "family": family, "anchor_lambda": lam, "k": k, "lr": lr,
            "seed": seed, "step": step, **out.rates(), **(extra or {}), "outcomes": out.bits()}


class _SeedRun:
    """Everything of one seed: corpora, models, runs (protocol v2 §1–§6)."""

    def __init__(self, cfg: DemoConfig, seed: int, progress: bool):
        self.cfg, self.seed, self.progress = cfg, seed, progress
        self.records: list[dict] = []
        self.outcomes: dict[tuple[str, float | int], Outcomes] = {}  # (family, λ or step) -> outcomes

    def _train(self, model, optimizer, examples, steps, batch_seed, desc, after_step=None) -> dict:
        return train(model, optimizer, examples, steps=steps, batch_size=self.cfg.finetune_batch,
                     seed=batch_seed, pad_id=self.tokenizer.pad_token_id, desc=desc, progress=self.progress,
                     after_step=after_step)

    def pretrain(self) -> dict:
        """Stages 1–3: corpora, tokenizer, base, aligned (stopped at the refusal criterion)."""
        cfg, seed = self.cfg, self.seed
        self.corpora = build_corpora(seed, cfg.sizes)
        self.tokenizer = tok = build_tokenizer(self.corpora)
        base = new_model(len(tok), cfg.shape, _stream(seed, _BASE_INIT))
        base_info = train(
            base, torch.optim.AdamW(base.parameters(), lr=cfg.base_lr, weight_decay=0.0),
            encode(tok, None, texts=self.corpora.base["text"]), steps=cfg.base_steps,
            batch_size=cfg.pretrain_batch, seed=_stream(seed, _BASE_BATCHES), pad_id=tok.pad_token_id,
            desc=f"seed {seed}: base", progress=self.progress,
        )
        aligned = copy.deepcopy(base)
        dev = self.corpora.align_dev["prompt"]
        checks: list[list[float]] = []

        def criterion(step: int) -> bool:
            if step % cfg.align_check_every:
                return False
            rate = refusal_rate(aligned, tok, dev, cfg.max_new_tokens)
            checks.append([step, round(rate, 6)])
            return rate >= cfg.align_refusal_target

        align_info = train(
            aligned, torch.optim.AdamW(aligned.parameters(), lr=cfg.align_lr, weight_decay=0.0),
            encode(tok, self.corpora.align["prompt"], self.corpora.align["response"]),
            steps=cfg.align_max_steps, batch_size=cfg.pretrain_batch, seed=_stream(seed, _ALIGN_BATCHES),
            pad_id=tok.pad_token_id, desc=f"seed {seed}: alignment", progress=self.progress,
            after_step=criterion,
        )
        self.base, self.aligned = base.eval(), aligned.eval()
        self.deltas = alignment_deltas(aligned, base)
        base_weights = {n.removesuffix(".weight"): p.detach() for n, p in base.named_parameters()}
        met = bool(checks) and checks[-1][1] >= cfg.align_refusal_target
        return {
            "seed": seed,
            "base_steps": base_info["steps"], "base_final_loss": base_info["final_loss"],
            "align_steps": align_info["steps"], "align_final_loss": align_info["final_loss"],
            "criterion": f"refusal rate on the {len(dev)} alignment-dev harmful prompts >= "
                         f"{cfg.align_refusal_target} (checked every {cfg.align_check_every} steps)",
            "criterion_met": met, "dev_refusal_checks": checks, "vocab_size": len(tok),
            "layers": {name: delta_statistics(V, base_weights[name]) for name, V in sorted(self.deltas.items())},
        }

    def reference_points(self) -> list[dict]:
        out = []
        for name, model in (("base", self.base), ("aligned", self.aligned)):
            o = evaluate(model, self.tokenizer, self.corpora, self.cfg.max_new_tokens)
            out.append({"model": name, "seed": self.seed, **o.rates(), "outcomes": o.bits()})
            self.outcomes[(name, 0)] = o
        return out

    def _eval(self, model) -> Outcomes:
        return evaluate(model, self.tokenizer, self.corpora, self.cfg.max_new_tokens)

    def sft(self, family: str, lr: float, examples) -> nn.Module:
        """Plain AdamW LoRA run, evaluated at ``sft_eval_steps`` (the early-stopping frontier)."""
        cfg = self.cfg
        model = with_lora(self.aligned, cfg.lora_rank, cfg.lora_alpha, seed=_stream(self.seed, _LORA_INIT))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

        def checkpoint(step: int) -> bool:
            if step in cfg.sft_eval_steps:
                o = self._eval(model)
                self.outcomes[(family, step)] = o
                self.records.append(_record(self.seed, family, "sft", None, 0.0, None, lr, step, o))
            return False

        self._train(model, opt, examples, cfg.finetune_steps, _stream(self.seed, _FT_BATCHES),
                    f"seed {self.seed}: {family}", checkpoint)
        return model

    def anchored(self, family: str, mode: str, anchor, k: int | None, lam: float, examples) -> None:
        """One ``AsFTAdamW`` LoRA run, evaluated after the last step."""
        from .. import AsFTAdamW

        cfg = self.cfg
        model = with_lora(self.aligned, cfg.lora_rank, cfg.lora_alpha, seed=_stream(self.seed, _LORA_INIT))
        params = [p for p in model.parameters() if p.requires_grad]
        bind_mode = "projector" if mode == "random_projector" else mode
        opt = AsFTAdamW(params, lr=cfg.finetune_lr, weight_decay=0.0, anchor=anchor.bind(model, mode=bind_mode),
                        anchor_lambda=lam, backend=cfg.backend)
        info = self._train(model, opt, examples, cfg.finetune_steps, _stream(self.seed, _FT_BATCHES),
                           f"seed {self.seed}: {family} λ={lam:g}")
        o = self._eval(model)
        self.outcomes[(family, lam)] = o
        self.records.append(_record(self.seed, family, "asft", mode, lam, k, cfg.finetune_lr, cfg.finetune_steps, o,
                                    {"final_loss": info["final_loss"],
                                     "final_anchor_loss": round(float(opt.anchor_loss), 6)}))

    def run(self) -> dict:
        from .. import AlignmentAnchor, safe_lora_project

        cfg, seed = self.cfg, self.seed
        t0 = time.perf_counter()
        alignment = self.pretrain()
        references = self.reference_points()
        tok = self.tokenizer
        examples = encode(tok, self.corpora.finetune["prompt"], self.corpora.finetune["response"])

        full_anchor = AlignmentAnchor.from_deltas(self.deltas)  # numerical rank: the exact published C
        anchors: dict[str, tuple[str, Any, int | None]] = {"paper": ("paper", full_anchor, None),
                                                           "full": ("full", full_anchor, None)}
        shapes = {n: tuple(V.shape) for n, V in self.deltas.items()}
        for k in cfg.projector_ks:
            anchors[f"projector_k{k}"] = ("projector", AlignmentAnchor.from_deltas(self.deltas, rank=k), k)
            rand = random_subspace_deltas(shapes, k, _stream(seed, _RANDOM_SUBSPACE) + 100 * k)
            anchors[f"random_projector_k{k}"] = ("random_projector", AlignmentAnchor.from_deltas(rand, rank=k), k)

        sft_model = self.sft("sft", cfg.finetune_lr, examples)
        safe = safe_lora_project(sft_model, full_anchor, threshold=cfg.safe_lora_threshold, mode="paper")
        o = self._eval(sft_model)
        self.outcomes[("safe_lora", cfg.finetune_steps)] = o
        self.records.append(_record(seed, "safe_lora", "safe_lora", None, 0.0, None, cfg.finetune_lr,
                                    cfg.finetune_steps, o, {"projected_layers": sorted(safe.projected)}))
        del sft_model
        self.sft("sft_low_lr", cfg.low_lr, examples)

        # positive control: the top directions of a task-only update on separate task data
        task_model = with_lora(self.aligned, cfg.lora_rank, cfg.lora_alpha, seed=_stream(seed, _LORA_INIT))
        self._train(task_model, torch.optim.AdamW([p for p in task_model.parameters() if p.requires_grad],
                                                  lr=cfg.finetune_lr, weight_decay=0.0),
                    encode(tok, self.corpora.task_only["prompt"], self.corpora.task_only["response"]),
                    cfg.finetune_steps, _stream(seed, _TASK_BATCHES), f"seed {seed}: task-only update")
        k = cfg.positive_k
        anchors[f"task_projector_k{k}"] = ("projector",
                                           AlignmentAnchor.from_deltas(lora_updates(task_model), rank=k), k)
        del task_model

        for family in cfg.families():
            mode, anchor, k = anchors[family]
            for lam in cfg.lambdas:
                self.anchored(family, mode, anchor, k, lam, examples)
        alignment["anchor_full_rank"] = {n: e.rank for n, e in sorted(full_anchor.items())}
        return {"alignment": alignment, "references": references, "records": self.records,
                "outcomes": self.outcomes, "seconds": round(time.perf_counter() - t0, 1)}


def _run_seed(cfg: DemoConfig, seed: int, progress: bool, threads: int | None = None) -> dict:
    """One seed's runs (a worker process's entry point when seeds run in parallel)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return _SeedRun(cfg, seed, progress).run()


def _frontier_inputs(cfg: DemoConfig, outcomes: dict, family: str) -> list[Outcomes]:
    """The runs of ``family`` in path order: λ = 0 (the final sft) then λ ascending; or steps."""
    if family in ("sft", "sft_low_lr"):
        return [outcomes[(family, s)] for s in cfg.sft_eval_steps]
    if family == "safe_lora":
        return [outcomes[("safe_lora", cfg.finetune_steps)]]
    return [outcomes[("sft", cfg.finetune_steps)]] + [outcomes[(family, lam)] for lam in cfg.lambdas]


def _statistics(cfg: DemoConfig, seed_outcomes: dict[int, dict]) -> tuple[dict, list[dict], dict]:
    """Frontier values with paired bootstrap replicates; the summary and the comparisons."""
    families = ["sft", "sft_low_lr", "safe_lora", *cfg.families()]
    # values[level][family][seed] = (B + 1,) frontier h(T); margins likewise
    values = {T: {f: {} for f in families} for T in cfg.levels}
    margins = {T: {f: {} for f in families} for T in cfg.levels}
    for seed, outcomes in seed_outcomes.items():
        rng = np.random.default_rng(10000 + seed)
        first = outcomes[("aligned", 0)]
        w_h = analysis.bootstrap_weights(len(first.harmful), cfg.bootstrap, rng)
        w_t = analysis.bootstrap_weights(len(first.task), cfg.bootstrap, rng)
        for f in families:
            runs = _frontier_inputs(cfg, outcomes, f)
            harm = np.stack([w_h @ o.harmful for o in runs], axis=-1) / len(first.harmful)  # (B+1, J)
            acc = np.stack([w_t @ o.task for o in runs], axis=-1) / len(first.task)
            # the margin is resampled with the harmful prompts it belongs to
            marg = np.stack([w_h @ o.margin for o in runs], axis=-1) / len(first.harmful)
            for T in cfg.levels:
                h, m = analysis.frontier_value(acc, harm, T, marg)
                values[T][f][seed], margins[T][f][seed] = h, m
    summary: dict[str, dict] = {}
    for f in families:
        summary[f] = {}
        for T in cfg.levels:
            entry = {}
            for metric, table, scale in (("harmful_rate", values, 100.0), ("safety_margin", margins, 1.0)):
                per_seed = {s: scale * table[T][f][s] for s in sorted(seed_outcomes)}
                mean = np.mean(np.stack(list(per_seed.values())), axis=0)
                lo, hi = analysis.interval(mean[1:])
                entry[metric] = {"mean": analysis._r(mean[0]), "lo": lo, "hi": hi,
                                 "per_seed": {str(s): analysis._r(v[0]) for s, v in per_seed.items()}}
            summary[f][f"{T:.2f}"] = entry
    comparisons = []
    for T in cfg.levels:
        comparisons.append(analysis.compare(values[T], (f"task_projector_k{cfg.positive_k}",
                                                        f"random_projector_k{cfg.positive_k}"), T, "positive_control"))
        for x, y in (("paper", "full"), *[(f"projector_k{k}", f"random_projector_k{k}") for k in cfg.projector_ks]):
            comparisons.append(analysis.compare(values[T], (x, y), T, "primary"))
    return summary, comparisons, values


def _versions() -> dict[str, str]:
    import datasets
    import peft
    import tokenizers
    import transformers

    from .. import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__, "datasets": datasets.__version__, "numpy": np.__version__,
            "asft_kernels": __version__, "python": platform.python_version()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _config_json(cfg: DemoConfig) -> dict:
    def jsonable(x):
        if isinstance(x, dict):
            return {k: jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [jsonable(v) for v in x]
        return x
    return jsonable(dataclasses.asdict(cfg))


def run_demo(out_dir: str | os.PathLike, cfg: DemoConfig, progress: bool = True, jobs: int = 1) -> dict:
    """Run protocol v2; write ``out_dir/results.json``, ``results.png`` and ``timing.json``.

    Args:
        out_dir: output folder (created).
        cfg: the settings.
        progress: show progress bars (only with ``jobs=1``).
        jobs: seeds run in this many worker processes at once, each with the caller's torch
            thread count; every seed's numbers are the same for any ``jobs`` (each seed is
            one deterministic single-process computation).

    Returns the results dict (rates are fractions in [0, 1]; summary and comparisons in
    percentage points; safety margins in nats).
    """
    cfg.validate()
    if jobs < 1:
        raise AsFTError(f"asft demo: jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed: dict[int, dict] = {}
    jobs = min(jobs, len(cfg.seeds))
    if jobs == 1:
        for seed in tqdm(cfg.seeds, desc="asft demo: seeds", disable=not progress, dynamic_ncols=True):
            per_seed[seed] = _run_seed(cfg, seed, progress)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = torch.get_num_threads()
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {seed: pool.submit(_run_seed, cfg, seed, False, threads) for seed in cfg.seeds}
            for seed in tqdm(cfg.seeds, desc="asft demo: seeds", disable=not progress, dynamic_ncols=True):
                per_seed[seed] = futures[seed].result()
    summary, comparisons, _ = _statistics(cfg, {s: per_seed[s]["outcomes"] for s in cfg.seeds})
    verdict = analysis.decide(comparisons)
    runs = [r for s in cfg.seeds for r in per_seed[s]["records"]]
    results = {
        "protocol_version": PROTOCOL_VERSION,
        "seeds": list(cfg.seeds),
        "versions": _versions(),
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_model": _cpu_model(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "config": _config_json(cfg),
        "alignment": {str(s): per_seed[s]["alignment"] for s in cfg.seeds},
        "anchor_full_rank": {str(s): per_seed[s]["alignment"].pop("anchor_full_rank") for s in cfg.seeds},
        "reference_points": [r for s in cfg.seeds for r in per_seed[s]["references"]],
        "runs": runs,
        "summary": summary,
        "comparisons": comparisons,
        "verdict": verdict,
    }
    _atomic_write_text(out / "results.json", json.dumps(results, indent=1, sort_keys=False) + "\n")
    plot_results(results, out / "results.png")
    timing = {"seconds_total": round(time.perf_counter() - t0, 1), "jobs": jobs,
              "seconds_per_seed": {str(s): per_seed[s]["seconds"] for s in cfg.seeds},
              "torch_threads": torch.get_num_threads(), "load_average_at_end": list(os.getloadavg())}
    _atomic_write_text(out / "timing.json", json.dumps(timing, indent=1) + "\n")
    return results


# ------------------------------------------------------------------------------------------------
# Presentation

_COLOURS = {
    "sft": "#000000", "sft_low_lr": "#7f7f7f", "safe_lora": "#8c564b", "aligned": "#17becf",
    "paper": "#d62728", "full": "#ff9896", "projector_k4": "#1f77b4", "random_projector_k4": "#aec7e8",
    "projector_k8": "#2ca02c", "random_projector_k8": "#98df8a", "task_projector_k8": "#9467bd",
}
_MARKERS = {
    "sft": "o", "sft_low_lr": "v", "safe_lora": "X", "aligned": "*", "paper": "s", "full": "D",
    "projector_k4": "^", "random_projector_k4": "<", "projector_k8": ">", "random_projector_k8": "d",
    "task_projector_k8": "P",
}


def _family_paths(results: dict) -> dict[str, dict[int, list[dict]]]:
    """Per family and seed the run records in path order (as the statistics use them)."""
    cfg = results["config"]
    by_family: dict[str, dict[int, list[dict]]] = {}
    for seed in results["seeds"]:
        runs = [r for r in results["runs"] if r["seed"] == seed]
        sft_final = next(r for r in runs if r["family"] == "sft" and r["step"] == cfg["finetune_steps"])
        for r in runs:
            by_family.setdefault(r["family"], {}).setdefault(seed, [])
        for fam, seeds in by_family.items():
            rows = [r for r in runs if r["family"] == fam]
            if fam in ("sft", "sft_low_lr"):
                seeds[seed] = sorted(rows, key=lambda r: r["step"])
            elif fam == "safe_lora":
                seeds[seed] = rows
            else:
                seeds[seed] = [sft_final] + sorted(rows, key=lambda r: r["anchor_lambda"])
    return by_family


def plot_results(results: dict, path: Path) -> None:
    """Harmful rate and safety margin (y) against task accuracy (x): per family the seeds' runs
    faint, the seed mean of the frontier value ``h(T)`` as a line with its 95% band at the
    summary levels. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13.0, 5.4))
    paths = _family_paths(results)
    levels = sorted(float(t) for t in next(iter(results["summary"].values())))
    order = ["sft", "sft_low_lr", "safe_lora"] + [f for f in paths if f not in ("sft", "sft_low_lr", "safe_lora")]
    for ax, metric, scale in ((axes[0], "harmful_rate", 100.0), (axes[1], "safety_margin", 1.0)):
        refs = [r for r in results["reference_points"] if r["model"] == "aligned"]
        ax.scatter([100 * r["task_accuracy"] for r in refs], [scale * r[metric] for r in refs], marker="*", s=160,
                   color=_COLOURS["aligned"], edgecolor="black", linewidth=0.5, zorder=5,
                   label="aligned (no fine-tune)")
        for i, r in enumerate(refs):  # seeds whose stars coincide stay readable
            ax.annotate(f"seed {r['seed']}", (100 * r["task_accuracy"], scale * r[metric]), fontsize=7,
                        xytext=(9, 6 - 9 * i), textcoords="offset points", color="#0f6f78")
        for fam in order:
            colour, marker = _COLOURS.get(fam, "#bcbd22"), _MARKERS.get(fam, "o")
            for rows in paths[fam].values():
                xs = [100 * r["task_accuracy"] for r in rows]
                ys = [scale * r[metric] for r in rows]
                ax.plot(xs, ys, "-", color=colour, alpha=0.25, linewidth=0.8)
                ax.scatter(xs, ys, marker=marker, color=colour, alpha=0.35, s=18, linewidth=0)
            if fam == "safe_lora":
                continue
            summ = results["summary"][fam]
            xs = [100 * T for T in levels]
            mean = [summ[f"{T:.2f}"][metric]["mean"] for T in levels]
            lo = [summ[f"{T:.2f}"][metric]["lo"] for T in levels]
            hi = [summ[f"{T:.2f}"][metric]["hi"] for T in levels]
            ok = [i for i, m in enumerate(mean) if m is not None and lo[i] is not None]
            if ok:
                ax.errorbar([xs[i] for i in ok], [mean[i] for i in ok],
                            yerr=[[mean[i] - lo[i] for i in ok], [hi[i] - mean[i] for i in ok]],
                            fmt=marker + "-", color=colour, markersize=8, markeredgecolor="black",
                            markeredgewidth=0.5, capsize=3, linewidth=1.6, zorder=4, label=fam)
            else:
                ax.plot([], [], marker + "-", color=colour, label=f"{fam} *")
        safe = paths.get("safe_lora", {})
        if safe:
            ax.plot([], [], _MARKERS["safe_lora"], color=_COLOURS["safe_lora"], label="safe_lora (per seed)")
        ax.set_xlabel("task accuracy (%)")
        ax.set_xlim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("harmful rate (%), lower is safer")
    axes[0].set_ylim(-3, 103)
    axes[1].set_ylabel("safety margin (nats), higher is safer")
    seeds = ", ".join(str(s) for s in results["seeds"])
    quick = " (quick: smoke test)" if results["config"]["quick"] else ""
    fig.suptitle(f"asft demo v2, seeds {seeds}{quick}. Faint: every run per seed. Bold: seed mean of the "
                 f"best value at task accuracy ≥ {', '.join(f'{100 * T:g}%' for T in levels)} with 95% interval. "
                 f"Verdict: {results['verdict']['label']}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    starred = any(label.endswith("*") for label in labels)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False, title_fontsize=7,
               title="* no bold mean: a level is\nnot reached in every seed" if starred else None)
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        # fixed metadata: the PNG bytes depend only on the results
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def verdict_line(results: dict) -> str:
    """The verdict in one line: label, seeds, the positive control and ``paper − full`` (seed
    means with 95% intervals, percentage points, at each level)."""
    v = results["verdict"]
    seeds = ",".join(str(s) for s in results["seeds"])

    def means(role: str, pair: str) -> str:
        cs = [c for c in results["comparisons"] if c["role"] == role and c["pair"] == pair]
        return "; ".join(f">={100 * c['level']:g}%: {analysis.format_value(c['mean'], c['mean_lo'], c['mean_hi'])}"
                         for c in cs)

    pos = next(c["pair"] for c in results["comparisons"] if c["role"] == "positive_control")
    return (f"verdict: {v['label']} (seeds {seeds}; positive control {pos} "
            f"{'succeeded' if v['positive_control'] else 'failed'}: {means('positive_control', pos)} points; "
            f"paper - full: {means('primary', 'paper - full')} points; rule: asft demo --help)")


def format_table(results: dict) -> str:
    """Summary and comparisons as text (percentage points); the verdict is :func:`verdict_line`."""
    lines = ["harmful rate (%) at task accuracy >= T: seed mean [95% interval] (per seed; - where the "
             "family never reaches T)"]
    for fam, levels in results["summary"].items():
        cells = []
        for T, entry in levels.items():
            h = entry["harmful_rate"]
            per = "/".join("-" if v is None else f"{v:.1f}" for v in h["per_seed"].values())
            if h["mean"] is None:
                cells.append(f"T={T}: mean undefined ({per})")
            else:
                cells.append(f"T={T}: {h['mean']:5.1f} [{h['lo']:.1f}, {h['hi']:.1f}] ({per})")
        lines.append(f"  {fam:<22}" + "   ".join(cells))
    lines.append("comparisons (points, negative = the first is safer):")
    lines += [f"  {e}" for e in results["verdict"]["evidence"]]
    return "\n".join(lines)
