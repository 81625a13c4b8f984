#!/usr/bin/env bash
# The Triton tests against the oldest supported Triton release (the lower bound of the
# range pyproject.toml declares, asft_kernels/ops/triton/version.py): the ahead-of-time
# compile test (registers and spills for sm_80/sm_90), the interpreter tests of the backend,
# and the optimizer's triton trajectory tests under the interpreter.
#
# A second virtual environment sees the main one's packages (a .pth file lists the entries
# `site` adds to the main interpreter's import path; --system-site-packages would, from inside
# a virtual environment, give the base interpreter's packages instead) and installs only
# that Triton, plus NumPy < 2.4: the interpreter of Triton < 3.8 converts
# one-element arrays with int(), which NumPy 2.4 refuses. The main environment's Triton is
# left alone. The environment is kept in $ASFT_TRITON_OLDEST_VENV (default under $TMPDIR)
# and reused when it already has the right Triton.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(python -c "from asft_kernels.ops.triton.version import MIN_TRITON; print('%d.%d.0' % MIN_TRITON)")
venv="${ASFT_TRITON_OLDEST_VENV:-${TMPDIR:-/tmp}/asft-triton-$version}"
if ! "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null; then
    python -m venv "$venv"
    site_dir=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    python - "$site_dir/outer_environment.pth" <<'PY'
import json, subprocess, sys
code = "import json, sys; print(json.dumps(sys.path))"
full = json.loads(subprocess.check_output([sys.executable, "-c", code], cwd="/"))
bare = set(json.loads(subprocess.check_output([sys.executable, "-S", "-c", code], cwd="/")))
with open(sys.argv[1], "w") as fh:
    fh.write("".join(p + "\n" for p in full if p and p not in bare))
PY
    "$venv/bin/python" -m pip install -q "triton==$version" "numpy<2.4"
fi
"$venv/bin/python" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
# NumPy 2.3 deprecates what 2.4 refuses: once per loop bound in the interpreter, not news.
quiet=(-W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q tests/test_triton_aot.py tests/test_triton.py tests/test_triton_step.py "${quiet[@]}"
# The optimizer's trajectories on the triton backend (interpreter on from the start).
OMP_NUM_THREADS=1 TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q tests/test_optim.py tests/test_memory.py tests/test_reliability.py \
    tests/test_plan.py -k triton "${quiet[@]}"
