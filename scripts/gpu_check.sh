#!/usr/bin/env bash
# On the GPU machine, in one run: builds sparge for one architecture (default 90a) with the
# image's python3, runs the GPU tests, the benchmark cases of bench/RESULTS.md and
# compute-sanitizer on a small problem, and writes every log and table to OUT_DIR.
#   scripts/gpu_check.sh OUT_DIR [ARCH]
# SPARGE_BENCH_CASES overrides the benchmark cases ("label|arguments of python -m sparge|optional
# VAR=value environment" lines); SPARGE_SKIP="build tests ptx bench quality calibration profile sanitize" skips phases
# (without "build", the previous call's install on a still-warm machine is used). The "ptx" phase
# builds compute_80 and compute_89 PTX-only variants (SPARGE_PTX_ARCHS), which this GPU runs by
# JIT, and runs the mma.sync kernel's GPU tests and one benchmark case on each.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [ARCH]}"
ARCH="${2:-90a}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SKIP="${SPARGE_SKIP:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
nvidia-smi > "$OUT/gpu.txt" 2>&1
phase() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }

if [[ " $SKIP " != *" build "* ]]; then
  phase "build sm_$ARCH"
  python3 -m pip install -q --no-build-isolation --no-deps "$ROOT" -Cbuild-dir="$ROOT/build/gpu" \
    -Ccmake.define.SPARGE_CUDA=ON -Ccmake.define.SPARGE_CUDA_ARCHS="$ARCH" > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  grep -iE "spill|warning" "$OUT/build.log" | grep -v " 0 bytes spill" | head -20
fi
cd /tmp

if [[ " $SKIP " != *" tests "* ]]; then
  phase "GPU tests"
  timeout 420 python3 -m pytest "$ROOT/tests/python" -m gpu -q -rs -x -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit: $?"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/gpu_tests.log" | head -20
fi

BENCH_CASES="${SPARGE_BENCH_CASES:-
d128_L32k|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5,topk:0.25 --stages --power
d128_L32k_idle|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5,topk:0.25 --idle-ms 50
d128_L32k_singles|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5|SPARGE_WGMMA_TILE_BLOCKS=1
d128_L32k_pv16|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5 --pv-precision fp16
d128_B2_L8k|-B 2 -H 16 -L 8192 -D 128 --modes dense,topk:0.5
d128_B2_L8k_idle|-B 2 -H 16 -L 8192 -D 128 --modes dense,topk:0.5 --idle-ms 50
d64_L32k|-B 1 -H 32 -L 32768 -D 64 --modes dense,topk:0.5
d64_L32k_idle|-B 1 -H 32 -L 32768 -D 64 --modes dense,topk:0.5 --idle-ms 50
d128_L32k_causal|-B 1 -H 16 -L 32768 -D 128 --causal --modes dense
d128_L32k_causal_idle|-B 1 -H 16 -L 32768 -D 128 --causal --modes dense --idle-ms 50
d128_L32k_mma|-B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5|SPARGE_CUDA_KERNEL=mma
overhead|-B 1 -H 8 -L 256 -D 64 --modes dense --overhead}"
if [[ " $SKIP " != *" bench "* ]]; then
  phase "matrix-unit ceilings"
  timeout 60 python3 "$ROOT/scripts/gemm_ceiling.py" 2>&1 | tee "$OUT/gemm_ceiling.txt"
  if [[ "$ARCH" == "90a" ]]; then
    nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a -I "$ROOT/src" "$ROOT/bench/wgmma_forms.cu" \
      -o /tmp/sparge_wgmma_forms && timeout 60 /tmp/sparge_wgmma_forms 2>&1 | tee "$OUT/wgmma_forms.md"
  fi

  phase "benchmark"
  while IFS='|' read -r label bench_args bench_env; do
    [ -n "$label" ] || continue
    echo "--- $label: $bench_env python -m sparge $bench_args"
    timeout 150 env $bench_env python3 -m sparge $bench_args --repeats 10 --warmup 3 --json "$OUT/bench_$label.json" \
      2>"$OUT/bench_${label}_progress.log" | tee "$OUT/bench_$label.txt" || tail -5 "$OUT/bench_${label}_progress.log"
  done <<< "$BENCH_CASES"
fi

if [[ " $SKIP " != *" ptx "* ]]; then
  for arch in ${SPARGE_PTX_ARCHS:-80-virtual 89-virtual}; do
    phase "PTX-only build $arch (JIT on this GPU): mma.sync kernel tests"
    pkg="/tmp/sparge_$arch"
    python3 -m pip install -q --no-build-isolation --no-deps "$ROOT" -Cbuild-dir="$ROOT/build/gpu_$arch" \
      --target "$pkg" -Ccmake.define.SPARGE_CUDA=ON -Ccmake.define.SPARGE_CUDA_ARCHS="$arch" \
      > "$OUT/build_$arch.log" 2>&1 || { tail -30 "$OUT/build_$arch.log"; continue; }
    PYTHONPATH="$pkg" timeout 240 python3 -m pytest "$ROOT/tests/python/test_gpu.py" -q -rs -p no:cacheprovider \
      -k "(fp32_truth and mma and float16) or (identical_inputs and mma) or kernel_choice or fp8_runs or head_dims or graph" > "$OUT/gpu_tests_$arch.log" 2>&1
    echo "pytest exit ($arch): $?"
    grep -E "passed|failed|error" "$OUT/gpu_tests_$arch.log" | tail -2
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests_$arch.log" | head -10
    pv=fp8; [[ "$arch" == 80* ]] && pv=fp16
    PYTHONPATH="$pkg" timeout 150 python3 -m sparge -B 1 -H 16 -L 32768 -D 128 --modes dense,topk:0.5 \
      --pv-precision "$pv" --repeats 5 --warmup 2 2>/dev/null | tee "$OUT/bench_ptx_$arch.txt"
  done
fi

if [[ " $SKIP " != *" quality "* ]]; then
  phase "prediction quality vs the oracle (L=8192, 4 heads)"
  timeout 300 python3 "$ROOT/bench/prediction_quality.py" --len 8192 --heads 4 --device cuda \
    > "$OUT/quality.md" 2> "$OUT/quality_progress.log"
  echo "quality exit: $?"; grep -c "^| " "$OUT/quality.md"
fi

if [[ " $SKIP " != *" calibration "* ]]; then
  phase "calibration time per layer (L=32768)"
  timeout 300 python3 "$ROOT/bench/calibration_bench.py" --device cuda ${SPARGE_CALIB_ARGS:-} \
    2> "$OUT/calibration_progress.log" | tee "$OUT/calibration.txt"
fi

if [[ " $SKIP " != *" profile "* ]]; then
  phase "Nsight Compute: one dense launch of each stage (B1 H16 L8192 D128)"
  timeout 240 ncu --clock-control none --target-processes all -k "regex:wgmma_attend|quantize|predict" --launch-count 6 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section InstructionStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    python3 -c "import torch, sparge; from sparge.testing import structured_qkv; \
q, k, v = structured_qkv(1, 16, 16, 8192, 8192, 128, dtype=torch.float16, device='cuda', seed=0); \
sparge.attention(q, k, v, mode='dense'); torch.cuda.synchronize()" > "$OUT/ncu.txt" 2>&1
  echo "ncu exit: $?"; grep -E "^  [a-z_].*\(|Duration|Issue Slots Busy|Executed Ipc A|No Eligible|Registers Per|Achieved Occ" "$OUT/ncu.txt" | head -60
  phase "Nsight Compute: duration of every kernel of one call (B2 H16 L8192 D128, topk 0.5)"
  timeout 120 ncu --clock-control none --section SpeedOfLight \
    python3 -c "import torch, sparge; from sparge.testing import structured_qkv; \
q, k, v = structured_qkv(2, 16, 16, 8192, 8192, 128, dtype=torch.float16, device='cuda', seed=0); \
sparge.attention(q, k, v, topk=0.5); torch.cuda.synchronize()" > "$OUT/ncu_all.txt" 2>&1
  grep -E "^  [a-zA-Z_].*\(|^    Duration" "$OUT/ncu_all.txt" | head -40
fi

if [[ " $SKIP " != *" sanitize "* ]]; then
  phase "compute-sanitizer on a small problem"
  for tool in memcheck racecheck; do
    # racecheck ran 20-46 s per call in session 16; twice, on one machine held for ~30 minutes, it
    # hung without a report (killed by the timeout: exit 124). Not reproduced on fresh machines.
    timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 1 python3 "$ROOT/scripts/sanitize_case.py" \
      > "$OUT/sanitize_$tool.log" 2>&1 && echo "$tool: clean ($(date +%T))" \
      || { echo "$tool: FAILED (exit $?)"; tail -15 "$OUT/sanitize_$tool.log"; }
  done
fi
phase "done"
