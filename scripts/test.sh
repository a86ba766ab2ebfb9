#!/usr/bin/env bash
# All tests: installs everything into .venv, builds sparge once (library, CUDA sources when nvcc
# exists, GoogleTest suite, C++ example, Python extension) and runs the C++ and Python tests.
# GPU tests run when a GPU is present and are skipped (with a reason) otherwise.
source "$(dirname "$0")/common.sh"
setup_env
build_and_install -Ccmake.define.SPARGE_BUILD_TESTS=ON -Ccmake.define.SPARGE_BUILD_EXAMPLES=ON
step "C++ tests (ctest)"
ctest --test-dir "$ROOT/build/wheel" --output-on-failure -j "$CMAKE_BUILD_PARALLEL_LEVEL"
step "C++ example"
"$ROOT/build/wheel/sparge_example_cpu"
step "Python tests (pytest)"
cd "$ROOT/build" && "$PY" -m pytest "$ROOT/tests/python" -q -rs -p no:cacheprovider
