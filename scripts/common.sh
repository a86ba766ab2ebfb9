# Shared by scripts/run.sh and scripts/test.sh: creates the project's virtual environment (once),
# installs the Python packages sparge builds, tests and benchmarks with, and builds + installs
# sparge itself (CUDA sources are compiled whenever nvcc is found, even without a GPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARGE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PATH="$VENV/bin:$PATH"
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

step() { printf '\n==> %s\n' "$*" >&2; }

setup_env() {
  if [ ! -x "$PY" ]; then
    step "creating $VENV"
    python3 -m venv "$VENV"
  fi
  step "installing Python packages (torch is large the first time)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.11.*" numpy pytest nanobind "scikit-build-core>=0.10" ninja "cmake>=3.26" matplotlib \
    "transformers==5.*" "diffusers==0.42.*"
}

# build_and_install [extra -C options...]: one CMake build in build/wheel, installed into the venv.
build_and_install() {
  step "building and installing sparge (build/wheel)"
  "$PY" -m pip install -q --no-build-isolation --no-deps "$ROOT" -Cbuild-dir="$ROOT/build/wheel" "$@"
}
