"""Every Python example in README.md runs (blocks preceded by ``<!-- skip-test -->`` are
shown only: they need a GPU or large checkpoints)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    out = []
    for match in re.finditer(r"(<!-- skip-test -->\s*)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1):
            continue
        line = text[: match.start()].count("\n") + 1
        out.append(pytest.param(match.group(2), id=f"line{line}"))
    return out


def test_readme_has_examples():
    assert len(_blocks()) >= 1


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------ the main job's install
ROOT = README.parent
_BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _main_job_line() -> str:
    block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    return block.splitlines()[0]


def test_main_job_command_installs_the_package_without_the_test_extras():
    line = _main_job_line()
    assert "asft demo" in line and "main job" in line
    install = line.split("&&")[0].split()
    assert install[:3] == ["pip", "install", "-e"], line
    assert install[3] in (".", '"."'), f"the main job installs {install[3]}, not the package alone"


def _distribution(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _closure(names) -> set[str]:
    """``names`` and every distribution they require (markers evaluated here, no extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def _site_paths() -> list[str]:
    """The entries ``site`` adds to this interpreter's import path, in order: site-packages
    (of a virtual environment or not), the user site, and what their ``.pth`` files name."""
    import json
    import os
    import subprocess
    import sys

    code = "import json, sys; print(json.dumps(sys.path))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    full = json.loads(subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True,
                                     text=True, check=True).stdout)
    bare = set(json.loads(subprocess.run([sys.executable, "-S", "-c", code], cwd="/", env=env, capture_output=True,
                                         text=True, check=True).stdout))
    return [p for p in full if p and p not in bare]


def _without_test_extras(tmp_path) -> list[str]:
    """A directory of links to the entries of this environment's site directories less the distributions
    that only the ``test`` extras bring (pytest, Triton, bitsandbytes, ...): an environment
    made by the main job's command. Returns the import path to run a child with (``-S``)."""
    import importlib.metadata as md
    import os

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _closure(_distribution(r) for r in project["dependencies"])
    extra = {_distribution(r) for r in project["optional-dependencies"]["test"]}
    dropped = extra - core
    assert {"pytest", "bitsandbytes", "triton"} <= dropped, dropped
    hidden = set()
    for top, dists in md.packages_distributions().items():
        if any(d.lower().replace("_", "-") in dropped for d in dists):
            hidden.add(top)
    farm = tmp_path / "main_job" / "site-packages"  # named so: dill pickles modules outside one by value
    farm.mkdir(parents=True)
    for directory in filter(os.path.isdir, _site_paths()):
        for entry in Path(directory).iterdir():
            stem = entry.name.split("-")[0].removesuffix(".py").removesuffix(".dist-info")
            if stem in hidden or stem.lower().replace("_", "-") in dropped or entry.suffix == ".pth":
                continue
            if not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return [str(ROOT), str(farm)]


_MAIN_JOB = """
import sys
for name in ("pytest", "bitsandbytes", "triton"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable: the environment is not the main job's")
exec(compile(sys.argv[1], "README.md", "exec"), {"__name__": "__readme__"})  # the Quick start
from asft_kernels.cli import main
from asft_kernels.demo.experiment import DemoConfig

# the --quick path at the test suite's sizes
DemoConfig.quick_config = classmethod(lambda cls, seeds=(0,): cls.smoke_config(seeds))
sys.exit(main(["demo", "--out", "demo_out", "--quick", "--seeds", "0", "--jobs", "1", "--no-progress"]))
"""


@pytest.mark.slow
def test_main_job_runs_without_the_test_extras(tmp_path):
    """The Quick start and ``asft demo`` run where only the
    main job's command installed packages, with the C++ backend built, and print nothing
    about bitsandbytes."""
    import os
    import subprocess
    import sys

    path = _without_test_extras(tmp_path)
    quick_start = _blocks()[0].values[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", _MAIN_JOB, quick_start], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "anchor loss before the last step:" in proc.stdout
    assert (tmp_path / "demo_out" / "results.json").is_file()
    assert "CppBackendWarning" not in proc.stderr and "bitsandbytes" not in proc.stderr, proc.stderr[-3000:]


def test_bitsandbytes_notice_is_silenced_in_every_process_importing_the_package():
    """A fresh interpreter whose first import is the demo's experiment module (what a demo
    worker process unpickles first) imports peft, and with it bitsandbytes; bitsandbytes'
    import-time notice on its CPU-kernel logger prints nothing. Errors still do."""
    import os
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = f"""
import logging, sys
import asft_kernels.demo.experiment
import peft
assert "bitsandbytes" in sys.modules, "peft did not import bitsandbytes"
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning({_BNB_NOTICE!r})
log.error("an error still shows")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _BNB_NOTICE not in proc.stderr
    assert "an error still shows" in proc.stderr
