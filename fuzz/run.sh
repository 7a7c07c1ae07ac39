#!/usr/bin/env bash
# Builds the libFuzzer target fuzz/fuzz_bnorm.cpp against a clang build of
# the library with AddressSanitizer and UndefinedBehaviorSanitizer, then
# fuzzes for about SECONDS (default 60) from a fresh copy of fuzz/corpus/,
# a third each with the CPU's best instruction set, BNORM_ISA=avx2 and
# BNORM_ISA=sse2. Every phase first runs every input of the corpus. Exits
# non-zero on any failure; the input that failed is in build-fuzz/artifacts/.
#
#   bash fuzz/run.sh [SECONDS]
#
# Needs clang-14, libclang-rt-14-dev (libFuzzer) and libomp-14-dev (clang's
# OpenMP); everything goes to build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
out=build-fuzz
for tool in clang-14 clang++-14 cmake; do
  command -v "$tool" >/dev/null || { echo "fuzz/run.sh: $tool not found" >&2; exit 1; }
done

mkdir -p "$out"
echo "== fuzz: building the library (clang, ASan + UBSan, coverage for libFuzzer)"
# CMAKE_BUILD_TYPE=Debug with -O2: optimized, but asserts stay on.
CC=clang-14 CXX=clang++-14 cmake -S . -B "$out/lib" -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-O2 -g" -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link" \
  -DBNORM_SANITIZE=ON -DBUILD_SHARED_LIBS=OFF -DBNORM_BUILD_TESTS=OFF \
  -DBNORM_BUILD_BENCH=OFF -DBNORM_BUILD_TOOLS=OFF -DBNORM_MPI=OFF >"$out/cmake.log" 2>&1 ||
  { cat "$out/cmake.log"; exit 1; }
cmake --build "$out/lib" --target bnorm -j"$(nproc)" >"$out/build.log" 2>&1 ||
  { cat "$out/build.log"; exit 1; }
lib=$(find "$out/lib" -name libbnorm.a | head -n 1)
[ -n "$lib" ] || { echo "fuzz/run.sh: libbnorm.a not built" >&2; exit 1; }

echo "== fuzz: building fuzz_bnorm"
sanitize=("-fsanitize=address,undefined" -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
clang-14 -std=c11 -O1 -g -Wall -Wextra -Werror "${sanitize[@]}" -fsanitize=fuzzer-no-link \
  -I include -c fuzz/status_from_c.c -o "$out/status_from_c.o"
clang++-14 -std=c++17 -O1 -g -Wall -Wextra -Werror "${sanitize[@]}" -fsanitize=fuzzer -fopenmp \
  -I include fuzz/fuzz_bnorm.cpp "$out/status_from_c.o" "$lib" -pthread -o "$out/fuzz_bnorm"

corpus=$out/corpus-work
artifacts=$out/artifacts
rm -rf "$corpus"
mkdir -p "$corpus" "$artifacts"
cp fuzz/corpus/* "$corpus"/

export OMP_NUM_THREADS=2  # the second run of each case uses 1
export UBSAN_OPTIONS=print_stacktrace=1
phase=$(( seconds / 3 > 0 ? seconds / 3 : 1 ))
for isa in best avx2 sse2; do
  log=$out/fuzz-$isa.log
  if [ "$isa" = best ]; then isa_env=(-u BNORM_ISA); repro=""; else
    isa_env=(BNORM_ISA="$isa"); repro="BNORM_ISA=$isa "; fi
  echo "== fuzz: ${phase}s, instruction set $isa, $(find "$corpus" -type f | wc -l) inputs to start from"
  if ! env "${isa_env[@]}" "$out/fuzz_bnorm" -max_total_time="$phase" -timeout=30 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz/run.sh: FAILED (instruction set $isa); full log in $log. Reproduce with" >&2
    echo "  ${repro}OMP_NUM_THREADS=$OMP_NUM_THREADS $out/fuzz_bnorm $artifacts/<file>" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units" "$log" || true
done
echo "== fuzz: no failures"
