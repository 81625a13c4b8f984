"""The embedded end-to-end safety demo (``asft demo``, docs/demo.md).

A tokenizer, corpora, an unaligned base and an aligned tiny Llama are built locally; the
aligned model is LoRA-fine-tuned on task data with 10% harmful examples, with plain AdamW
(``sft``), Safe LoRA and :class:`asft_kernels.AsFTAdamW`, and scored by harmful rate and task
accuracy on held-out prompts.
"""

from __future__ import annotations

from .experiment import DemoConfig, format_table, plot_results, run_demo

__all__ = ["DemoConfig", "format_table", "plot_results", "run_demo"]
