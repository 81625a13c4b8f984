"""The ``asft`` command.

Each sub-command lives with the feature it drives and registers itself through a
``register_cli(subparsers)`` function; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of each feature that contributes sub-commands
_COMMAND_MODULES = (
    "asft_kernels.demo.cli",  # asft demo
    "asft_kernels.build",  # asft build-anchor, asft inspect
    "asft_kernels.ops.cpp",  # asft build-ext
    "asft_kernels.diagnostics",  # asft report
    "asft_kernels.integrations.distributed",  # asft comm-report
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asft", description="AsFT safety anchoring for LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue  # feature module not present in this build
            raise
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
