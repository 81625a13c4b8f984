"""C++ backend: the ``asft::`` ops for CPU tensors, compiled just in time from ``csrc/``.

The sources register CPU kernels (``TORCH_LIBRARY_IMPL(asft, CPU, m)``) for the two ops
that :mod:`asft_kernels.ops.schema` declares, so once the library is loaded every call of
``torch.ops.asft.stats_pass`` / ``torch.ops.asft.fused_anchored_adamw_`` on CPU tensors
runs the C++ kernel; other devices keep their own implementations.

The first call of :func:`is_available` (or ``asft build-ext``) compiles the library with
``torch.utils.cpp_extension.load`` into a cache directory whose name is a hash of the
sources, the torch version, the compiler, the compile flags and the CPU's instruction set
flags (the kernels are built with ``-march=native``), so a cache shared between machines or
environments never loads an incompatible build. The cache lives under
``$TORCH_EXTENSIONS_DIR/asft_kernels`` when that variable is set, else under
``$XDG_CACHE_HOME/asft_kernels`` (default ``~/.cache/asft_kernels``). Building prints one
line; later processes load the cached library in milliseconds.

If no C++ compiler is found or the build fails, :func:`is_available` returns False and
warns once (:class:`CppBackendWarning`); ``backend="auto"`` then runs the eager backend.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import AsFTError, OptimizerInputError
from .schema import AdamWHyper, AnchoredBatch  # importing schema declares the ops before the kernels load

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("asft_cpu.cpp",)
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
#: pairs of larger LoRA rank run the eager (BLAS) implementation inside :func:`fused_step`
FUSED_MAX_RANK = 32
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


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


def cache_key() -> str:
    """Hex digest (16 chars) of everything the compiled library depends on: the sources,
    the torch version and C++ ABI, the compiler, the flags and the CPU's instruction set."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    for part in (torch.__version__, str(torch.compiled_with_cxx11_abi()), _compiler(), " ".join(CFLAGS),
                 " ".join(LDFLAGS), platform.machine(), _cpu_flags()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Directory of this build: ``<cache root>/asft_kernels/cpu_<cache_key()>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        base = Path(root) / "asft_kernels"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asft_kernels"
    return base / f"cpu_{cache_key()}"


def build(verbose: bool = False) -> Path:
    """Compile (if not cached) and load the C++ kernels; returns the library's path.

    Idempotent within a process. Raises ``RuntimeError`` (or the compiler's error) when no
    compiler is found or the build fails.
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
        if not (directory / f"{name}.so").exists():
            print(f"asft_kernels: compiling the C++ CPU kernels into {directory} (once; about a minute)",
                  file=sys.stderr, flush=True)
        path = cpp_extension.load(
            name=name, sources=[str(SOURCE_DIR / n) for n in SOURCES], extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=verbose, is_python_module=False,
        )
        if not torch._C._dispatch_has_kernel_for_dispatch_key("asft::fused_anchored_adamw_", "CPU"):
            raise RuntimeError(f"{path} loaded but registered no CPU kernel for asft::fused_anchored_adamw_")
        _State.library = Path(path) if path else directory / f"{name}.so"
        _State.loaded = True
        _State.error = None
        return _State.library


def is_available() -> bool:
    """True when the C++ kernels are loaded (building them on the first call).

    On failure returns False and emits one :class:`CppBackendWarning` per process that
    names the cause; later calls return False without retrying.
    """
    if _State.loaded is not None:
        return _State.loaded
    try:
        build()
    except Exception as exc:  # any build/load failure means: use eager
        with _State.lock:
            _State.loaded = False
            _State.error = f"{type(exc).__name__}: {exc}".strip()
            if not _State.warned:
                _State.warned = True
                first = _State.error.splitlines()[0] if _State.error else "unknown error"
                warnings.warn(
                    f"asft_kernels: the C++ CPU backend is unavailable ({first}); CPU tensors use the eager "
                    "backend. Install a C++ compiler (g++) and ninja, then run `asft build-ext`.",
                    CppBackendWarning,
                    stacklevel=2,
                )
    return bool(_State.loaded)


def _require() -> None:
    if not is_available():
        raise OptimizerInputError(f"the C++ CPU backend is unavailable: {_State.error}")


def stats_pass(U: Sequence[Tensor], B: Sequence[Tensor], A: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
    """``(P, G, M)`` per pair from the stored parameters, by the C++ kernel.

    Args:
        U: per pair (m, k) basis (fp64/fp32/bf16). B: per pair (m, r). A: per pair (r, n);
            CPU, contiguous, fp64/fp32/bf16/fp16.

    Returns:
        Lists ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) in the math dtype (fp64 for fp64
        params, else fp32). Deterministic for any thread count.

    Raises:
        OptimizerInputError: a shape, dtype, device or layout the contract does not allow.
    """
    _require()
    try:
        P, G, M = torch.ops.asft.stats_pass(list(U), list(B), list(A))
    except ValueError as exc:
        raise (exc if isinstance(exc, AsFTError) else OptimizerInputError(str(exc))) from None
    return list(P), list(G), list(M)


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Pairs the C++ kernel runs: fp64/fp32/bf16/fp16 parameters of LoRA rank up to
    :data:`FUSED_MAX_RANK` (wider ranks are routed to eager, whose BLAS products are faster
    there: measured in bench/results/cpu.md at r = 64)."""
    return dtype in _DTYPES and rank <= FUSED_MAX_RANK


def fused_step(batch: AnchoredBatch, hyper: AdamWHyper) -> None:
    """One anchored AdamW step for a batch of pairs, one grouped C++ call.

    Semantics of ``asft::fused_anchored_adamw_`` (:mod:`asft_kernels.ops.schema`): A (r, n),
    B (m, r) and their moments are updated in place, P (k, r), G (r, r), M (r, r) receive the
    statistics of the stored new values. Every input is validated before anything is written.

    Raises:
        OptimizerInputError: a shape, dtype, device or layout the contract does not allow.
    """
    _require()
    try:
        torch.ops.asft.fused_anchored_adamw_(*batch.op_args(), *hyper.op_args())
    except ValueError as exc:
        raise (exc if isinstance(exc, AsFTError) else OptimizerInputError(str(exc))) from None


# ----------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``asft build-ext``: compile (or find in the cache) the C++ CPU kernels."""
    p = subparsers.add_parser("build-ext", help="compile the C++ CPU kernels ahead of time",
                              description="Compile the C++ CPU kernels (csrc/) into the cache and load them once.")
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
