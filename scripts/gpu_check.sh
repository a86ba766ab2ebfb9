#!/usr/bin/env bash
# On the GPU machine: builds sparge for one architecture (default 90a) with the image's python3,
# runs the GPU tests and the benchmark, and writes logs and tables to the directory given.
#   scripts/gpu_check.sh OUT_DIR [ARCH]
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [ARCH]}"
ARCH="${2:-90a}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
nvidia-smi > "$OUT/gpu.txt" 2>&1

echo "==> build (sm_$ARCH)"
python3 -m pip install -q --no-build-isolation --no-deps "$ROOT" -Cbuild-dir="$ROOT/build/gpu" \
  -Ccmake.define.SPARGE_CUDA=ON -Ccmake.define.SPARGE_CUDA_ARCHS="$ARCH" > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }

cd /tmp
echo "==> GPU tests"
python3 -m pytest "$ROOT/tests/python" -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40

echo "==> compute-sanitizer (memcheck, racecheck) on a small problem"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 python3 "$ROOT/scripts/sanitize_case.py" \
    > "$OUT/sanitize_$tool.log" 2>&1 && echo "$tool: clean" || { echo "$tool: FAILED"; tail -20 "$OUT/sanitize_$tool.log"; }
done

# The benchmark cases of bench/RESULTS.md: "label|arguments" per line.
BENCH_CASES="${SPARGE_BENCH_CASES:-
d128_L32k|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5,topk:0.25 --stages
d128_B2_L8k|-B 2 -H 16 -L 8192 -D 128 --modes dense,topk:0.5
d64_L32k|-B 1 -H 32 -L 32768 -D 64 --modes dense,topk:0.5
d128_L32k_causal|-B 1 -H 16 -L 32768 -D 128 --causal --modes dense,topk:0.5}"
echo "==> benchmark"
while IFS='|' read -r label bench_args; do
  [ -n "$label" ] || continue
  echo "--- $label: python -m sparge $bench_args"
  python3 -m sparge $bench_args --json "$OUT/bench_$label.json" 2>"$OUT/bench_${label}_progress.log" \
    | tee "$OUT/bench_$label.txt" || tail -5 "$OUT/bench_${label}_progress.log"
done <<< "$BENCH_CASES"
