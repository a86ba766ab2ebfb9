#!/usr/bin/env bash
# On a machine with two or more GPUs, in one run: builds sparge for one architecture (default
# 90a), runs the NCCL tests of tests/python/test_distributed.py and the sequence-parallel
# benchmark (bench/distributed_bench.py under torchrun), and writes the logs to OUT_DIR.
#   scripts/gpu_distributed.sh OUT_DIR [ARCH]
# SPARGE_DIST_CASES overrides the benchmark cases (lines of distributed_bench.py arguments).
set -uo pipefail
OUT="${1:?usage: scripts/gpu_distributed.sh OUT_DIR [ARCH]}"
ARCH="${2:-90a}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
nvidia-smi > "$OUT/gpu.txt" 2>&1
phase() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }

phase "build sm_$ARCH"
python3 -m pip install -q --no-build-isolation --no-deps "$ROOT" -Cbuild-dir="$ROOT/build/gpu" \
  -Ccmake.define.SPARGE_CUDA=ON -Ccmake.define.SPARGE_CUDA_ARCHS="$ARCH" > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp

phase "NCCL tests"
timeout 300 python3 -m pytest "$ROOT/tests/python/test_distributed.py" -m gpu -q -rs -p no:cacheprovider \
  > "$OUT/nccl_tests.log" 2>&1
echo "pytest exit: $?"
grep -E "passed|failed|error|SKIPPED" "$OUT/nccl_tests.log" | tail -5

CASES="${SPARGE_DIST_CASES:-
--len 131072
--len 131072 --causal}"
phase "sequence-parallel benchmark"
GPUS="$(nvidia-smi -L | wc -l)"
i=0
while read -r args; do
  [ -n "$args" ] || continue
  i=$((i + 1))
  echo "--- torchrun --nproc-per-node $GPUS bench/distributed_bench.py $args"
  timeout 240 torchrun --standalone --nproc-per-node "$GPUS" "$ROOT/bench/distributed_bench.py" $args \
    --json "$OUT/dist_$i.json" 2> "$OUT/dist_${i}_progress.log" | tee "$OUT/dist_$i.txt" \
    || tail -20 "$OUT/dist_${i}_progress.log"
done <<< "$CASES"
phase "done"
