#!/bin/sh
# Runs bnorm_bench the way docs/performance.md was measured.
#
#   bench/run_bench.sh --quick            three problems, all operations (< 1 min), a table
#   bench/run_bench.sh                    the full suite (~1500 rows, ~25 min), JSON
#   bench/run_bench.sh --out r.json --benchmark_filter='fwd_inference/.*/bnorm/'
#   bench/run_bench.sh --passes 2         the full suite twice, each row's best pass (docs)
#
# Options: --quick, --build DIR (the CMake build directory; default build,
# then build-bench), --out FILE (JSON; default DIR/bench/bnorm_bench[_quick].json),
# --wait-quiet (wait until the CPUs have been idle for 20 s before the run,
# and hold every row until other processes leave the CPUs idle), --reruns N (default 2: rows that ran while other processes
# used the CPUs, or failed, are run again up to N times and merged into FILE),
# --no-build (by default the script first brings bnorm_bench and the library
# up to date with `cmake --build`, so that the commit it records is the one
# measured), --passes N (default 1: run the suite N times, into FILE.pass1 ..
# FILE.passN, and write to FILE each row's fastest pass against the fastest
# copy in any pass: this machine runs at full or half speed for seconds to
# minutes at a time, and a row and its peers' rows can fall into different
# states; see report.py best_of_json), --close-passes N (default 2; with
# --passes 2 or more: the comparisons whose speed-up over the faster peer is
# below report.py's CLOSE_MARGIN (1.25) after the passes, bnorm's rows and the peers' alike, run N more
# times into FILE.close1 .. FILE.closeN and take part in each row's best:
# with a few passes a state of the machine decides the close calls).
# Everything else goes to the binary (--problems=LIST, Google Benchmark flags),
# before or after the options above.
#
# PyTorch allocates its outputs on every call. glibc returns large blocks to
# the kernel on free, so every call would fault its output in again; jemalloc
# with decay off and retain keeps the pages: the rows time batch norm, not
# page faults. The same allocator is preloaded for bnorm and oneDNN (they
# allocate nothing in their timed loops).
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
quick=0
build=""
out=""
wait_quiet=0
reruns=2
passes=1
close_passes=2
rebuild=1
# Options may come in any order; the others go to the binary in theirs
# (each is moved to the end of "$@" as the loop meets it).
left=$#
while [ $left -gt 0 ]; do
  n=1
  case "$1" in
    --quick) quick=1 ;;
    --wait-quiet) wait_quiet=1 ;;
    --no-build) rebuild=0 ;;
    --reruns) reruns=${2-}; n=2 ;;
    --passes) passes=${2-}; n=2 ;;
    --passes=*) passes=${1#--passes=} ;;
    --close-passes) close_passes=${2-}; n=2 ;;
    --close-passes=*) close_passes=${1#--close-passes=} ;;
    --reruns=*) reruns=${1#--reruns=} ;;
    --build) build=${2-}; n=2 ;;
    --build=*) build=${1#--build=} ;;
    --out) out=${2-}; n=2 ;;
    --out=*) out=${1#--out=} ;;
    *) set -- "$@" "$1" ;;
  esac
  if [ $n -gt $left ]; then echo "run_bench.sh: $1 needs a value" >&2; exit 2; fi
  shift $n
  left=$((left - n))
done
case $passes in
  '' | *[!0-9]* | 0) echo "run_bench.sh: --passes takes a number >= 1" >&2; exit 2 ;;
esac
case $close_passes in
  '' | *[!0-9]*) echo "run_bench.sh: --close-passes takes a number >= 0" >&2; exit 2 ;;
esac

if [ -z "$build" ]; then
  for d in "$repo/build" "$repo/build-bench"; do
    if [ -x "$d/bench/bnorm_bench" ]; then build=$d; break; fi
  done
fi
build=${build:-$repo/build}
if [ $rebuild = 1 ] && [ -f "$build/CMakeCache.txt" ]; then
  cmake --build "$build" -j"$(nproc)" --target bnorm_bench >&2
fi
bin="$build/bench/bnorm_bench"
if [ ! -x "$bin" ]; then
  echo "run_bench.sh: no $bin; build it first:" >&2
  echo "  cmake -S $repo -B $repo/build && cmake --build $repo/build -j2 --target bnorm_bench" >&2
  exit 1
fi
if [ -z "$out" ]; then
  if [ $quick = 1 ]; then out="$build/bench/bnorm_bench_quick.json"; else out="$build/bench/bnorm_bench.json"; fi
fi
case $out in  # the pass files' names are split on spaces below
  *" "*) echo "run_bench.sh: the output path ($out) may not contain spaces: give --out" >&2; exit 2 ;;
esac

jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -r "$jemalloc" ]; then
  LD_PRELOAD="$jemalloc${LD_PRELOAD:+:$LD_PRELOAD}"
  MALLOC_CONF=${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true}
  export LD_PRELOAD MALLOC_CONF
else
  echo "run_bench.sh: $jemalloc not found (apt install libjemalloc2);" \
       "PyTorch rows will include page faults" >&2
fi

# Percentage of all CPUs' time spent busy over the next $1 seconds.
busy_percent() {
  before=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  sleep "$1"
  awk -v before="$before" '/^cpu /{split(before, b, " ");
    work = $2+$3+$4+$7+$8+$9 - b[1]; idle = $5+$6 - b[2];
    printf "%.0f", 100 * work / (work + idle + 1e-9)}' /proc/stat
}

# A busy machine makes every row slower and the ratios meaningless.
wait_until_quiet() {
  [ $wait_quiet = 1 ] || return 0
  quiet=0
  while [ $quiet -lt 4 ]; do
    if [ "$(busy_percent 5)" -le 3 ]; then quiet=$((quiet + 1)); else quiet=0; fi
  done
}

python=python3
python3 -c "import matplotlib" 2>/dev/null || { [ -x /usr/bin/python3 ] && python=/usr/bin/python3; }

wait_until_quiet
busy=$(busy_percent 1)
load=$(cut -d' ' -f1 /proc/loadavg)
if [ "$busy" -gt 10 ]; then
  echo "run_bench.sh: the CPUs were ${busy}% busy before the run: results will be noisy" >&2
fi

# Context values may not contain ',' (Google Benchmark splits on it).
# The library's commit; "+local" when its sources differ from it.
git_rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git -C "$repo" diff --quiet HEAD -- kernels include CMakeLists.txt cmake 2>/dev/null; then
  git_rev="$git_rev+local"
fi
model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | tr ',' ';' | head -n1)
packages=$(dpkg-query -W -f='${Package} ${Version};' libdnnl-dev libtorch-dev libbenchmark-dev \
           libjemalloc2 2>/dev/null | tr ',' ';' || true)
context="git=$git_rev,lscpu_model=${model:-unknown},load_before=$load,busy_before=${busy}%,packages=${packages:-unknown}"

[ $wait_quiet = 1 ] && set -- --wait_quiet "$@"
set -- --benchmark_out="$out" --benchmark_out_format=json --benchmark_context="$context" "$@"
if [ $quick = 1 ]; then
  log="${out%.json}.log"
  echo "bnorm_bench --quick: $bin (log: $log)" >&2
  if ! "$bin" --quick "$@" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  # The table needs no plotting library; any python3 will do.
  exec python3 "$repo/bench/report.py" --summary "$out"
else
  shift 3  # the --benchmark_out/_format/_context set above
  # One pass of the suite into $1, then the rows that ran next to other
  # processes (others_cpu in the JSON) or failed, again, the new rows
  # replacing the old ones.
  run_pass() {
    file=$1
    shift
    "$bin" --benchmark_out="$file" --benchmark_out_format=json --benchmark_context="$context" "$@"
    i=0
    while [ "$i" -lt "$reruns" ]; do
      filter=$("$python" "$repo/bench/report.py" --disturbed-filter "$file")
      [ -n "$filter" ] || break
      i=$((i + 1))
      echo "run_bench.sh: rerun $i: $(echo "$filter" | tr '|' '\n' | wc -l) disturbed or failed rows" >&2
      wait_until_quiet
      "$bin" --benchmark_out="$file.rerun" --benchmark_out_format=json \
        --benchmark_context="$context" "$@" --benchmark_filter="$filter"
      "$python" "$repo/bench/report.py" --merge-into "$file" "$file" "$file.rerun"
      rm -f "$file.rerun"
    done
  }
  if [ "$passes" -le 1 ]; then
    run_pass "$out" "$@"
  else
    k=1
    while [ "$k" -le "$passes" ]; do
      echo "run_bench.sh: pass $k of $passes" >&2
      wait_until_quiet
      run_pass "$out.pass$k" "$@"
      k=$((k + 1))
    done
    files=""
    k=1
    while [ "$k" -le "$passes" ]; do
      files="$files $out.pass$k"
      k=$((k + 1))
    done
    # shellcheck disable=SC2086  # the file names hold no spaces
    "$python" "$repo/bench/report.py" --best-of "$out" $files
    close=""  # not $filter: run_pass sets that
    [ "$close_passes" -gt 0 ] && close=$("$python" "$repo/bench/report.py" --close-filter "$out")
    if [ -n "$close" ]; then
      k=1
      while [ "$k" -le "$close_passes" ]; do
        echo "run_bench.sh: close calls, pass $k of $close_passes:" \
             "$(echo "$close" | tr '|' '\n' | wc -l) rows" >&2
        wait_until_quiet
        run_pass "$out.close$k" "$@" --benchmark_filter="$close"
        files="$files $out.close$k"
        k=$((k + 1))
      done
      # shellcheck disable=SC2086
      "$python" "$repo/bench/report.py" --best-of "$out" $files
    fi
  fi
  echo "results: $out" >&2
  echo "report:  $python $repo/bench/report.py $out   (writes docs/performance.md, docs/img/)" >&2
fi
