#!/usr/bin/env bash
# One command for a machine with a CUDA device, sized to fit one device call of <= 6 minutes
# (issue #24): each stage runs under its own time limit, and writes its own files, so a stage
# that runs out of time loses only itself.
#   1. tests (default limit 120 s): the prepared-step tests first (no host synchronisation
#      under torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture and replay bitwise
#      equal to uncaptured steps), then every CUDA case of the backend and optimizer tests;
#   2. bench (160 s): bench/triton_suite.py --parts bench: triton, triton_step, triton_graph,
#      eager, eager_compiled, adamw_fused, paper_eager, floor at 64 pairs of 4096 x 4096,
#      (r, k) = (8, 64), (8, 256), (64, 256), (8, 4096), (64, 4096) fp32 and (16, 64) bf16;
#   3. accuracy + profile (60 s): each U-product dot precision against float64 (errors after
#      3 steps, step time at k = 4096), and the host-vs-device profile of one prepared step;
#   4. (only with ASFT_GPU_PYTEST_BENCH=1) the older pytest-benchmark stages of bench/ and
#      bench/host_overhead.py, merged by bench.report into gpu.json / gpu.md / gpu.png.
# Everything lands in $OUT (default bench/results/gpu): env.txt, nvidia-smi.txt, commit.txt,
# tests.log, bench.log, accuracy.log, triton_bench.json, triton_accuracy.json,
# triton_profile.json, triton_suite.md.
#
# Settings (environment):
#   ASFT_GPU_TESTS          pytest paths and options of the test stage ("skip": none)
#   ASFT_GPU_TEST_K         a pytest -k expression for the test stage (default: "triton or gpu or cuda")
#   ASFT_GPU_LIMITS         "tests bench accuracy" time limits in seconds (default "120 160 60")
#   ASFT_GPU_BENCH_ARGS     extra arguments of triton_suite.py's bench stage (e.g. "--shapes 8-64-float32")
# Exit status: non-zero if a stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
# The files whose tests run on CUDA where it is present (the backend fixture's triton cases,
# test_triton.py's contract and GPU-only tests); the whole suite also needs the demo's and
# QLoRA's packages (datasets, bitsandbytes), which a GPU image may lack.
TESTS="${ASFT_GPU_TESTS:-tests/test_triton_step.py tests/test_triton.py tests/test_optim.py tests/test_plan.py tests/test_reliability.py tests/test_memory.py tests/test_optim_errors.py tests/test_compile.py}"
TEST_K="${ASFT_GPU_TEST_K-triton or gpu or cuda}"
read -r LIMIT_TESTS LIMIT_BENCH LIMIT_ACC <<< "${ASFT_GPU_LIMITS:-120 160 60}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the checkout's package, also where it is not installed (a GPU image with its own Python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: torch sees no CUDA device" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), platform.platform())
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
print("torch", torch.__version__, "cuda", torch.version.cuda)
for pkg in ("triton", "transformers", "peft", "safetensors", "pytest-benchmark"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
EOF
cat "$OUT/env.txt"
{ git rev-parse HEAD 2>/dev/null || echo "no git"; git status --porcelain 2>/dev/null | head -20; } > "$OUT/commit.txt"

# stage NAME LIMIT CMD...: run CMD under LIMIT seconds (SIGINT first, so pytest writes what
# it has; 0: no limit), its output teed to $OUT/NAME.log; returns CMD's status.
stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "gpu_suite.sh: stage $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  return "$rc"
}

tests_rc=0
if [ "$TESTS" != "skip" ]; then
  # word splitting of $TESTS is intended: paths and options
  # shellcheck disable=SC2086
  if [ -n "$TEST_K" ]; then
    stage tests "$LIMIT_TESTS" python -m pytest $TESTS -q -rs -p no:cacheprovider -k "$TEST_K"
  else
    stage tests "$LIMIT_TESTS" python -m pytest $TESTS -q -rs -p no:cacheprovider
  fi
  tests_rc=$?
fi

bench_rc=0
# shellcheck disable=SC2086
stage bench "$LIMIT_BENCH" python bench/triton_suite.py --out "$OUT" --parts bench ${ASFT_GPU_BENCH_ARGS:-} || bench_rc=1
stage accuracy "$LIMIT_ACC" python bench/triton_suite.py --out "$OUT" --parts accuracy profile || bench_rc=1

report_rc=0
if [ "${ASFT_GPU_PYTEST_BENCH:-0}" = 1 ]; then
  parts=()
  for part in "step-r8:bench/test_bench_step.py:r8-" "e2e:bench/test_bench_e2e.py:" "step-r64:bench/test_bench_step.py:r64-"; do
    IFS=: read -r name file select <<< "$part"
    args=(--benchmark-only -q -rs -p no:cacheprovider --benchmark-json "$OUT/gpu-$name.json"
          --benchmark-columns=median,min,rounds)
    [ -n "$select" ] && args+=(-k "$select")
    ASFT_BENCH_SUITE=gpu stage "bench-$name" 0 python -m pytest "$file" "${args[@]}" "$@" || bench_rc=1
    [ -s "$OUT/gpu-$name.json" ] && parts+=("$OUT/gpu-$name.json")
  done
  stage host-overhead 0 python bench/host_overhead.py --device cuda --json "$OUT/host_overhead.json" || bench_rc=1
  report_rc=1
  if [ "${#parts[@]}" -gt 0 ]; then
    python -m bench.report "${parts[@]}" --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" --plot "$OUT/gpu.png" \
      --note "GPU suite (bench/gpu_suite.sh); times are host-timed steps followed by torch.cuda.synchronize()." \
      2>&1 | tee "$OUT/report.log"
    report_rc=${PIPESTATUS[0]}
  fi
fi

echo "gpu_suite.sh: tests rc=$tests_rc, benchmarks rc=$bench_rc, report rc=$report_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
