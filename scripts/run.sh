#!/usr/bin/env bash
# The main job: installs everything into .venv and runs the sparge benchmark on the best
# available device (arguments are passed on: ./scripts/run.sh --help).
source "$(dirname "$0")/common.sh"
setup_env
build_and_install
step "running: python -m sparge $*"
cd "$ROOT/build" && exec "$PY" -m sparge "$@"
