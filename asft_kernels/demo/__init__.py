"""The embedded end-to-end safety demo (``asft demo``, docs/demo.md, protocol v3).

A tokenizer, corpora, an unaligned base and an aligned tiny Llama are built locally per seed (a
seed whose aligned model refuses fewer than 90% of the held-out harmful prompts is excluded); the
aligned model is LoRA-fine-tuned on task data with 10% harmful examples with plain AdamW, Safe
LoRA and :class:`asft_kernels.AsFTAdamW` in every anchor mode, against random-subspace and
positive controls, each run trained until it reaches the task-accuracy levels (or a step cap);
harmful rate is compared at those levels with paired bootstrap intervals and a decision rule
fixed in advance.
"""

from __future__ import annotations

from .experiment import DemoConfig, format_table, plot_results, run_demo, verdict_line

__all__ = ["DemoConfig", "format_table", "plot_results", "run_demo", "verdict_line"]
