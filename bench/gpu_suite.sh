#!/usr/bin/env bash
# One command for a machine with a CUDA device:
#   1. the tests (they run their CUDA cases where a GPU is present);
#   2. the GPU benchmarks of bench/ (ASFT_BENCH_SUITE=gpu: Llama-2-7B q/v shapes,
#      4096 x 4096 x 64 layers, r in {8, 64}, k in {64, 256, 4096}; paper_eager, eager,
#      triton, adamw_fused and the copy floor; plus the end-to-end step), in three stages
#      (r = 8 steps, end to end, r = 64 steps), each written to its own JSON so a stage that
#      runs out of time loses only itself;
#   3. the host work of a step with 14, 56 and 224 adapted layers (bench/host_overhead.py);
#   4. the report: the stages merged into gpu.json, a markdown table of ratios and a PNG plot.
# Everything lands in $OUT (default bench/results/gpu): env.txt, nvidia-smi.txt, tests.log,
# bench-*.log, gpu-*.json, host_overhead.json, gpu.json, gpu.md, gpu.png, report.log.
#
# Settings (environment):
#   ASFT_GPU_TESTS          pytest paths and options of the test stage (default: the test files that run
#                           CUDA cases; "tests" for the whole suite; "skip": none)
#   ASFT_GPU_TEST_K         a pytest -k expression for the test stage (default: "triton or gpu or cuda"; empty:
#                           every test of the selected files)
#   ASFT_GPU_STAGE_TIMEOUT  seconds each stage may run before it is interrupted (default 0: no limit)
#   ASFT_BENCH_DTYPE        bfloat16 benchmarks bf16 LoRA parameters (default float32)
# Extra arguments go to every benchmark run (e.g. -k k64).
# Exit status: non-zero if the tests, a benchmark stage or the report failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
# The files whose tests run on CUDA where it is present (the backend fixture's triton cases,
# test_triton.py's contract and GPU-only tests); the whole suite also needs the demo's and
# QLoRA's packages (datasets, bitsandbytes), which a GPU image may lack.
TESTS="${ASFT_GPU_TESTS:-tests/test_triton.py tests/test_optim.py tests/test_reliability.py tests/test_plan.py tests/test_memory.py tests/test_optim_errors.py tests/test_compile.py}"
TEST_K="${ASFT_GPU_TEST_K-triton or gpu or cuda}"
LIMIT="${ASFT_GPU_STAGE_TIMEOUT:-0}"
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

# stage NAME CMD...: run CMD under the stage time limit (SIGINT first, so pytest writes
# what it has), its output teed to $OUT/NAME.log; returns CMD's status.
stage() {
  local name=$1
  shift
  local t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "gpu_suite.sh: stage $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  return "$rc"
}

tests_rc=0
if [ "$TESTS" != "skip" ]; then
  # word splitting of $TESTS is intended: paths and options
  # shellcheck disable=SC2086
  if [ -n "$TEST_K" ]; then
    stage tests python -m pytest $TESTS -q -rs -p no:cacheprovider -k "$TEST_K"
  else
    stage tests python -m pytest $TESTS -q -rs -p no:cacheprovider
  fi
  tests_rc=$?
fi

bench_rc=0
parts=()
for part in "step-r8:bench/test_bench_step.py:r8-" "e2e:bench/test_bench_e2e.py:" "step-r64:bench/test_bench_step.py:r64-"; do
  IFS=: read -r name file select <<< "$part"
  args=(--benchmark-only -q -rs -p no:cacheprovider --benchmark-json "$OUT/gpu-$name.json"
        --benchmark-columns=median,min,rounds)
  [ -n "$select" ] && args+=(-k "$select")
  ASFT_BENCH_SUITE=gpu stage "bench-$name" python -m pytest "$file" "${args[@]}" "$@" || bench_rc=1
  [ -s "$OUT/gpu-$name.json" ] && parts+=("$OUT/gpu-$name.json")
done

# host work of a step on a model with many adapted layers (14, 56, 224 pairs): triton and
# eager against torch.optim.AdamW fused and foreach, torch ops per step
stage host-overhead python bench/host_overhead.py --device cuda --json "$OUT/host_overhead.json" || bench_rc=1

report_rc=1
if [ "${#parts[@]}" -gt 0 ]; then
  python -m bench.report "${parts[@]}" --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" --plot "$OUT/gpu.png" \
    --note "GPU suite (bench/gpu_suite.sh); times are host-timed steps followed by torch.cuda.synchronize()." \
    2>&1 | tee "$OUT/report.log"
  report_rc=${PIPESTATUS[0]}
fi

echo "gpu_suite.sh: tests rc=$tests_rc, benchmarks rc=$bench_rc, report rc=$report_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
