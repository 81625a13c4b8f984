"""The built wheel carries the C++ sources and builds its CPU backend once installed.

Builds a wheel from a copy of the project, installs it into a fresh virtual environment
that sees the packages of the environment running the tests (torch and the rest, whether
that is a virtual environment, a plain interpreter or CI's), and from a directory outside
any checkout checks that the package imported is the installed one and that
``backend="auto"`` on CPU resolves to ``cpp``, compiled from the installed package data
into a temporary cache. Takes about a minute (the C++ build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel

_CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    import asft_kernels
    from asft_kernels.ops import cpp_build, resolve_backend

    venv = Path(sys.argv[1]).resolve()
    package = Path(asft_kernels.__file__).resolve().parent
    assert venv in package.parents, f"imported {package}, not the wheel installed in {venv}"
    assert cpp_build.SOURCE_DIR == package / "csrc", cpp_build.SOURCE_DIR
    name = resolve_backend("auto", torch.device("cpu")).name
    assert name == "cpp", f"backend auto on CPU resolved to {name}: {cpp_build._State.error}"
    print("package", package)
    print("library", cpp_build._State.library)
    """
)


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


_SYS_PATH = "import json, sys; print(json.dumps(sys.path))"


def _site_paths(python) -> list[str]:
    """The entries ``site`` adds to ``python``'s import path: its site-packages, the user
    site and what their ``.pth`` files name (the import path with ``site`` minus without)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with_site = json.loads(_run([str(python), "-c", _SYS_PATH], cwd="/", env=env).stdout)
    bare = set(json.loads(_run([str(python), "-S", "-c", _SYS_PATH], cwd="/", env=env).stdout))
    return [p for p in with_site if p and p not in bare]


def _see_outer_packages(python) -> None:
    """Lets the venv of ``python`` import the packages of the interpreter running the tests.

    ``venv --system-site-packages`` is not that: made from inside a virtual environment it
    inherits the base interpreter's packages, not the environment's (where torch is). The
    outer entries go into a ``.pth`` file, so they come after the venv's own site-packages
    and the installed wheel is the ``asft_kernels`` imported."""
    outer = _site_paths(sys.executable)
    inner = next(p for p in _site_paths(python) if p.endswith("site-packages"))
    Path(inner, "outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))


def test_wheel_installs_with_a_working_cpp_backend(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    # build from a copy, so the checkout gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "asft_kernels", src / "asft_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("asft_kernels-*.whl")

    import zipfile

    assert "asft_kernels/csrc/asft_cpu.cpp" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _see_outer_packages(python)
    # --ignore-installed: an asft-kernels of the outer environment stays where it is
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed",
          str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    env["OMP_NUM_THREADS"] = "1"
    first = _run([str(python), "-c", _CHECK, str(venv)], cwd=work, env=env)
    out = dict(line.split(" ", 1) for line in first.stdout.splitlines() if " " in line)
    assert Path(out["library"]).is_relative_to(tmp_path / "extensions" / "asft_kernels")
    compiled = [line for line in first.stderr.splitlines() if "compiling the C++ CPU kernels" in line]
    assert len(compiled) == 1, first.stderr[-3000:]

    # the installed console script finds the cached build: no compiler run, nothing printed
    again = _run([str(venv / "bin" / "asft"), "build-ext"], cwd=work, env=env)
    assert again.stdout.strip() == f"asft build-ext: {out['library']}"
    assert "compiling" not in again.stderr, again.stderr[-3000:]
