"""``asft demo``: the end-to-end safety experiment on a CPU (docs/demo.md)."""

from __future__ import annotations

import argparse

from ..errors import AsFTError


def register_cli(subparsers) -> None:
    """Add ``asft demo [--out DIR] [--quick] [--seed N] [--threads T]`` to the ``asft`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end safety demo on CPU (tiny models built locally, no downloads)",
        description="Fine-tune a tiny aligned Llama on task data with 10% harmful examples, with plain "
        "LoRA (sft), Safe LoRA and AsFTAdamW; report harmful rate and task accuracy (docs/demo.md).",
    )
    parser.add_argument("--out", default="asft_demo", help="output folder (results.json, results.png, cache/)")
    parser.add_argument("--quick", action="store_true", help="small CI variant (about a minute); not results")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialization and batch order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the 64-wide matrices gain nothing from more)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments and print the results table."""
    import torch

    from .experiment import DemoConfig, format_table, run_demo

    if args.seed < 0:
        raise AsFTError(f"asft demo: --seed must be >= 0, got {args.seed}")
    if args.threads < 1:
        raise AsFTError(f"asft demo: --threads must be >= 1, got {args.threads}")
    cfg = DemoConfig.quick_config(args.seed) if args.quick else DemoConfig(seed=args.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_demo(args.out, cfg, progress=not args.no_progress)
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep their setting
    print(format_table(results))
    print(f"\nwrote {args.out}/results.json and {args.out}/results.png ({results['config']['seconds']} s)")
    return 0
