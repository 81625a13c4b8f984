"""Building and loading the C++ CPU kernels (``asft_kernels/csrc/``), and ``asft build-ext``.

The sources ship inside the package (package data), so an installed wheel builds them as
an editable checkout does. The first call of :func:`is_available` (or ``asft build-ext``)
compiles the library with ``torch.utils.cpp_extension.load`` into a cache directory whose
name, :func:`cache_key`, hashes everything that goes into the build command: the source
files (paths and contents), the compile and link flags, the compiler (name and the path it
resolves to), the torch version, installation directory and C++ ABI, the Python
interpreter (the real binary: links and a virtual environment's ``bin/python`` resolved),
its version, ABI tag and include directory, the cache root, and the CPU's instruction-set
flags (the kernels are built with ``-march=native``). Two checkouts, environments with
their own torch, or machines sharing one cache therefore never write the same
``build.ninja``, and never load an incompatible build; the names one interpreter is
started by (``asft``, ``python``, ``python3.11``) share one build.

The cache lives under ``$TORCH_EXTENSIONS_DIR/asft_kernels`` when that variable is set,
else under ``$XDG_CACHE_HOME/asft_kernels`` (default ``~/.cache/asft_kernels``). Every
build that compiles prints one line to stderr; loading a cached build prints nothing and
takes milliseconds.

If no C++ compiler is found or the build fails, :func:`is_available` returns False and
warns once (:class:`CppBackendWarning`); ``backend="auto"`` then runs the eager backend,
and an explicit ``backend="cpp"`` is an error at construction naming the cause
(:func:`unavailable_reason`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from . import schema  # noqa: F401  (declares the asft:: ops before the library registers kernels for them)

#: the C++ sources, shipped as package data of ``asft_kernels``
SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("asft_cpu.cpp",)
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
#: set to 1 before the first build/load of a process: a build with the phase clock
#: (``-DASFT_PHASE_CLOCK``, its own cache directory): the kernels time their phases and
#: ``asft::cpu_phase_clock`` reads the sums (``bench/cpp_phases.py``; docs/cpp.md)
PHASE_CLOCK_ENV = "ASFT_CPU_PHASE_CLOCK"


def phase_clock_requested() -> bool:
    """Whether this process builds and loads the phase-clock variant of the kernels."""
    return os.environ.get(PHASE_CLOCK_ENV, "") not in ("", "0")


class CppBackendWarning(UserWarning):
    """The C++ backend could not be built or loaded; the eager backend runs instead."""


class _State:
    """Outcome of the one build/load attempt of this process."""

    lock = threading.Lock()
    loaded: bool | None = None  # None: not tried yet
    library: Path | None = None
    error: str | None = None
    warned = False


def _compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension invokes (``$CXX`` or ``c++``)."""
    return os.environ.get("CXX", "c++")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux ``/proc/cpuinfo``), else the platform name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR/asft_kernels``, else ``$XDG_CACHE_HOME/asft_kernels``
    (default ``~/.cache/asft_kernels``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "asft_kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asft_kernels"


def load_arguments() -> dict[str, Any]:
    """The keyword arguments of ``torch.utils.cpp_extension.load`` other than ``name``,
    ``build_directory`` and ``verbose`` (those follow from :func:`cache_key`)."""
    return dict(
        sources=[str(SOURCE_DIR / name) for name in SOURCES],
        extra_cflags=list(CFLAGS) + (["-DASFT_PHASE_CLOCK"] if phase_clock_requested() else []),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[],
        is_python_module=False,
    )


def _real_interpreter() -> str:
    """The interpreter binary this process runs, whatever name started it: a virtual
    environment's ``bin/python`` leads to its base interpreter (``sys._base_executable``),
    and symbolic links (``python``, ``python3``, ``python3.11``) are resolved."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(executable) if executable else ""


def _build_environment() -> dict[str, str]:
    """What else ``cpp_extension`` writes into ``build.ninja``, or what decides whether a
    build can be loaded here: compiler, torch, Python (the real interpreter, its version, ABI
    and headers; not the name that started it, so ``asft``, ``python -c`` and ``python3.11``
    share one build), cache root and CPU."""
    compiler = _compiler()
    return {
        "compiler": compiler,
        "compiler_path": shutil.which(compiler) or "",
        "torch_version": torch.__version__,
        "torch_dir": str(Path(torch.__file__).resolve().parent),
        "cxx11_abi": str(torch.compiled_with_cxx11_abi()),
        "python": _real_interpreter(),
        "python_version": sys.version,
        "python_abi": sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag or "",
        "python_include": sysconfig.get_paths().get("include", ""),
        "cache_root": str(_cache_root().resolve()),
        "machine": platform.machine(),
        "cpu_flags": _cpu_flags(),
    }


def cache_key() -> str:
    """Hex digest (16 chars) of everything the build command and the compiled library
    depend on: :func:`load_arguments` (source paths, flags, include directories), the
    sources' contents, and :func:`_build_environment` (compiler, torch, the real Python
    interpreter and its ABI, cache root, CPU instruction set)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0")
        h.update((SOURCE_DIR / name).read_bytes())
    spec = {"load": load_arguments(), "environment": _build_environment()}
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Directory of this build: ``<cache root>/cpu_<cache_key()>``."""
    return _cache_root() / f"cpu_{cache_key()}"


def _will_compile(directory: Path, name: str) -> bool:
    """Whether loading ``name`` from ``directory`` runs the compiler: the library or its
    ``build.ninja`` is missing, or ninja has work to do (a source newer than the library,
    a changed command). The key covers the command, so the ``build.ninja`` on disk is the
    one ``cpp_extension.load`` writes again."""
    if not (directory / f"{name}.so").exists() or not (directory / "build.ninja").exists():
        return True
    ninja = shutil.which("ninja")
    if ninja is None:
        return True
    try:
        proc = subprocess.run([ninja, "-n", "-C", str(directory)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    return proc.returncode != 0 or "no work to do" not in proc.stdout


def _announce(directory: Path) -> None:
    print(f"asft_kernels: compiling the C++ CPU kernels into {directory} (about a minute; later runs load the "
          "cached build)", file=sys.stderr, flush=True)


def build(verbose: bool = False) -> Path:
    """Compile (unless cached) and load the C++ kernels; returns the library's path.

    Prints one line to stderr whenever the compiler runs. Idempotent within a process.

    Raises:
        RuntimeError: the sources are missing, no compiler is found, or the library
            registers no kernel; the compiler's error when the build fails.
    """
    with _State.lock:
        if _State.loaded:
            return _State.library
        missing = [name for name in SOURCES if not (SOURCE_DIR / name).is_file()]
        if missing:
            raise RuntimeError(f"C++ sources not found: {', '.join(str(SOURCE_DIR / n) for n in missing)}")
        compiler = _compiler()
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler: {compiler!r} (from $CXX or the default 'c++') is not on PATH")
        from torch.utils import cpp_extension

        key = cache_key()
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"asft_cpu_{key}"
        library = directory / f"{name}.so"
        announced = _will_compile(directory, name)
        if announced:
            _announce(directory)
        before = library.stat().st_mtime_ns if library.exists() else None
        path = cpp_extension.load(name=name, build_directory=str(directory), verbose=verbose, **load_arguments())
        if not announced and library.exists() and library.stat().st_mtime_ns != before:
            _announce(directory)  # ninja rebuilt what looked up to date: still say so
        if not torch._C._dispatch_has_kernel_for_dispatch_key("asft::fused_anchored_adamw_", "CPU"):
            raise RuntimeError(f"{path} loaded but registered no CPU kernel for asft::fused_anchored_adamw_")
        if phase_clock_requested():
            print(f"asft_kernels: C++ kernels with the phase clock ({PHASE_CLOCK_ENV}=1): each phase is timed",
                  file=sys.stderr, flush=True)
        _State.library = Path(path) if path else library
        _State.loaded = True
        _State.error = None
        return _State.library


def is_available(warn: bool = True) -> bool:
    """True when the C++ kernels are loaded (building them on the first call).

    On failure returns False and, with ``warn`` (``backend="auto"``: eager runs instead),
    emits one :class:`CppBackendWarning` per process that names the cause; later calls
    return False without retrying. ``warn=False`` (an explicit ``backend="cpp"``, which
    raises with :func:`unavailable_reason` instead) records the failure without warning.
    """
    if _State.loaded is None:
        try:
            build()
        except Exception as exc:  # any build/load failure means: use eager
            with _State.lock:
                _State.loaded = False
                _State.error = f"{type(exc).__name__}: {exc}".strip()
    if not _State.loaded and warn:
        with _State.lock:
            if not _State.warned:
                _State.warned = True
                warnings.warn(
                    f"asft_kernels: the C++ CPU backend is unavailable ({unavailable_reason()}); CPU tensors use the "
                    "eager backend. Install a C++ compiler (g++) and ninja, then run `asft build-ext`.",
                    CppBackendWarning,
                    stacklevel=2,
                )
    return bool(_State.loaded)


def unavailable_reason() -> str | None:
    """Why the C++ kernels could not be built or loaded (first line of the error), or None."""
    if _State.loaded or _State.error is None:
        return None
    return _State.error.splitlines()[0] if _State.error else "unknown error"


# ----------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``asft build-ext``: compile (or find in the cache) the C++ CPU kernels."""
    p = subparsers.add_parser(
        "build-ext", help="compile the C++ CPU kernels ahead of time",
        description="Compile the C++ CPU kernels (asft_kernels/csrc/) into the cache and load them once.")
    p.add_argument("--verbose", action="store_true", help="show the compiler's command lines and output")
    p.set_defaults(func=_cli_build)


def _cli_build(args: argparse.Namespace) -> int:
    try:
        path = build(verbose=args.verbose)
    except Exception as exc:
        print(f"asft build-ext: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"asft build-ext: {path}")
    return 0


__all__ = [
    "CFLAGS", "LDFLAGS", "SOURCES", "SOURCE_DIR", "CppBackendWarning", "build", "cache_dir", "cache_key",
    "PHASE_CLOCK_ENV", "is_available", "load_arguments", "phase_clock_requested", "register_cli",
]
