"""The embedded end-to-end safety demo (``asft demo``, docs/demo.md, protocol v3).

A tokenizer, corpora, an unaligned base and a briefly aligned tiny Llama are built locally per
seed; the aligned model is LoRA-fine-tuned on task data with 10% harmful examples with plain
AdamW, Safe LoRA and :class:`asft_kernels.AsFTAdamW` in every anchor mode, against
random-subspace and positive controls; harmful rate is compared at fixed task accuracy with
paired bootstrap intervals and a decision rule fixed in advance.
"""

from __future__ import annotations

from .experiment import DemoConfig, format_table, plot_results, run_demo, verdict_line

__all__ = ["DemoConfig", "format_table", "plot_results", "run_demo", "verdict_line"]
