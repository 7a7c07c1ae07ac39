#!/usr/bin/env bash
# The test command of the README: installs dependencies, builds, runs every test.
#   1. Release build (with the MPI layer): unit tests per instruction set,
#      examples, installed-package consumer, bnorm-run, MPI with 1-4 ranks.
#   2. The same suite built with AddressSanitizer + UndefinedBehaviorSanitizer.
#   3. The libFuzzer target over the C ABI for about a minute (fuzz/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/deps.sh
jobs=$(nproc)

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_BENCH=OFF -DBNORM_MPI=ON
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build and tests"
cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBNORM_SANITIZE=ON \
      -DBNORM_BUILD_BENCH=OFF -DBNORM_MPI=OFF
cmake --build build-sanitize -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-sanitize --output-on-failure -j"$jobs" -E package_consumer

if [ -x fuzz/run.sh ]; then
  echo "== libFuzzer, bounded time"
  bash fuzz/run.sh 60
fi
