"""The built wheel carries the C++ sources and builds its CPU backend once installed.

Builds a wheel from a copy of the project, installs it into a fresh virtual environment,
and from a directory outside any checkout checks that the package imported is the
installed one and that ``backend="auto"`` on CPU resolves to ``cpp``, compiled from the
installed package data into a temporary cache. Takes about a minute (the C++ build).
"""

from __future__ import annotations

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
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
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
