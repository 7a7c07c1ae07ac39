#!/usr/bin/env bash
# The main job of the README: installs dependencies, builds, and runs the quick
# benchmark (three problems, every operation, each against a non-temporal copy
# of the same bytes measured in the same process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_BENCH=ON
cmake --build build -j"$(nproc)" --target bnorm_bench
exec bash bench/run_bench.sh --quick --build build
