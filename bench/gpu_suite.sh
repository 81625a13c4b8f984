#!/usr/bin/env bash
# One command for a machine with a CUDA device:
#   1. the whole test suite (tests run their CUDA cases where a GPU is present);
#   2. the GPU benchmarks of bench/ (ASFT_BENCH_SUITE=gpu: Llama-2-7B q/v shapes,
#      4096 x 4096 x 64 layers, r in {8, 64}, k in {64, 256, 4096}; paper_eager, eager,
#      triton, adamw_fused and the copy floor; plus the end-to-end step);
#   3. the report: markdown table of ratios and PNG plot.
# Everything lands in $OUT (default bench/results/gpu): nvidia-smi.txt, tests.log,
# bench.log, gpu.json, gpu.md, gpu.png. Extra arguments go to the benchmark run
# (e.g. -k r8). ASFT_BENCH_DTYPE=bfloat16 benchmarks bf16 LoRA parameters.
# Exit status: non-zero if the tests, the benchmarks or the report failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: torch sees no CUDA device" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

python -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

ASFT_BENCH_SUITE=gpu python -m pytest bench --benchmark-only -q -rs -p no:cacheprovider \
  --benchmark-json "$OUT/gpu.json" --benchmark-columns=median,min,rounds "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

report_rc=1
if [ -s "$OUT/gpu.json" ]; then
  python -m bench.report "$OUT/gpu.json" --markdown "$OUT/gpu.md" --plot "$OUT/gpu.png" \
    --note "GPU suite (bench/gpu_suite.sh); times are host-timed steps followed by torch.cuda.synchronize()." \
    2>&1 | tee "$OUT/report.log"
  report_rc=${PIPESTATUS[0]}
fi

echo "gpu_suite.sh: tests rc=$tests_rc, benchmarks rc=$bench_rc, report rc=$report_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
