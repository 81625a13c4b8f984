"""The ``asft`` command.

Each sub-command lives with the feature it drives and registers itself through a
``register_cli(subparsers)`` function; this file only lists them, and gives every
sub-command the same error handling: an ordinary mistake (bad input, a file that cannot
be read or written, a device that is not there) prints one line on stderr and exits 1; a
usage error (unknown option, bad option value) exits 2, as argparse does. Output paths
(``--out``, ``--json``, ``--plot``) are checked before any work is done
(:func:`check_output_path`, :func:`check_output_dir`), and missing parent directories are
created, by every command alike.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import AsFTError

# module path of each feature that contributes sub-commands
_COMMAND_MODULES = (
    "asft_kernels.demo.cli",  # asft demo
    "asft_kernels.build",  # asft build-anchor, asft inspect
    "asft_kernels.ops.cpp",  # asft build-ext
    "asft_kernels.diagnostics",  # asft report
    "asft_kernels.integrations.distributed",  # asft comm-report
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit status (every command):
  0  success
  1  error: invalid or unreadable input (checkpoint, anchor, adapter), an output that
     cannot be written, a device that is not available, a failed build; one line on stderr
  2  usage error: unknown command or option, missing or malformed option value

output paths (--out, --json, --plot; every command):
  checked before any work starts: the nearest existing directory must be writable;
  missing parent directories are created; an existing file is replaced atomically"""


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a :class:`Path` for an output file, checked before any work is done: not
    a directory, and its nearest existing parent is a writable directory (missing
    directories in between are created when the file is written).

    Raises:
        AsFTError: the path cannot be written (the message says why).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise AsFTError(f"{what} {str(path)!r} is a directory; give a file name")
    _check_creatable_under(path, path.parent, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a :class:`Path` for an output folder, checked before any work is done: not
    an existing file, and its nearest existing parent is a writable directory (it and the
    missing directories above it are created when the results are written).

    Raises:
        AsFTError: the folder cannot be created or written (the message says why, in the
            words of :func:`check_output_path`).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise AsFTError(f"{what} {str(path)!r} is a file; give a folder")
    _check_creatable_under(path, path, what)
    return path


def _check_creatable_under(path: Path, start: Path, what: str) -> None:
    """Refuse ``path`` unless the nearest existing one of ``start`` and its parents is a
    writable directory (where the missing directories down to ``path`` can be created)."""
    existing = start
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AsFTError(f"{what} {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AsFTError(f"{what} {str(path)!r}: directory {str(existing)!r} is not writable")


def _one_line(exc: BaseException, command: str = "") -> str:
    """The error as one line: an ``OSError`` as ``'<file>': <reason>`` (no errno number),
    without a leading ``asft <command>:`` that the caller prints anyway."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        text = f"{' -> '.join(repr(str(n)) for n in names)}: {exc.strerror}" if names else exc.strerror
    else:
        text = str(exc)
    text = " ".join(text.split())
    prefix = f"asft {command}: "
    while command and text.startswith(prefix):
        text = text[len(prefix):]
    return text or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asft", description="AsFT safety anchoring for LoRA fine-tuning",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Run ``asft``; returns the exit status (0, 1 or 2, see :data:`EPILOG`)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (AsFTError, OSError) as exc:
        print(f"asft {args.command}: error: {_one_line(exc, args.command)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
