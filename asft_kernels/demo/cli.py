"""``asft demo``: the end-to-end safety experiment on a CPU (docs/demo.md, protocol v3)."""

from __future__ import annotations

import argparse
import os

from ..errors import AsFTError


def register_cli(subparsers) -> None:
    """Add ``asft demo [--out DIR] [--quick] [--seeds N ...] [--threads T]`` to the ``asft`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end safety demo on CPU (tiny models built locally, no downloads)",
        description="Protocol v2 of docs/demo.md: fine-tune a tiny aligned Llama on task data with 10%% harmful "
        "examples with plain LoRA, Safe LoRA and AsFTAdamW in every anchor mode, with random-subspace and "
        "positive controls; report harmful rate at fixed task accuracy over seeds and print the verdict.",
    )
    parser.add_argument("--out", default="asft_demo", help="output folder (results.json, results.png, timing.json)")
    parser.add_argument("--quick", action="store_true",
                        help="small CI variant of the same code path (seed 0 unless --seeds); not results")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of data, initialization and batch order (default: 0 1 2; --quick: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the 64-wide matrices gain nothing from more)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="seeds run in this many processes at once, 1 torch thread each unless --threads "
                        "(default: 2, or 1 on a 1-core machine; the numbers are the same for any value)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; print the summary, then the verdict in one line."""
    import torch

    from .experiment import DemoConfig, format_table, run_demo, verdict_line

    if args.seeds is not None and (any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds)):
        raise AsFTError(f"asft demo: --seeds must be distinct integers >= 0, got {args.seeds}")
    if args.jobs < 1:
        raise AsFTError(f"asft demo: --jobs must be >= 1, got {args.jobs}")
    if args.threads < 1:
        raise AsFTError(f"asft demo: --threads must be >= 1, got {args.threads}")
    if args.quick:
        cfg = DemoConfig.quick_config(tuple(args.seeds) if args.seeds else (0,))
    else:
        cfg = DemoConfig(seeds=tuple(args.seeds)) if args.seeds else DemoConfig()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_demo(args.out, cfg, progress=not args.no_progress, jobs=args.jobs)
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep their setting
    print(format_table(results))
    print(f"wrote {args.out}/results.json, {args.out}/results.png and {args.out}/timing.json")
    print(verdict_line(results))
    return 0
