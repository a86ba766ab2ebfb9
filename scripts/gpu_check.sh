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

echo "==> benchmark"
python3 -m sparge ${SPARGE_BENCH_ARGS:-} --json "$OUT/bench.json" 2>"$OUT/bench_progress.log" | tee "$OUT/bench.txt"
