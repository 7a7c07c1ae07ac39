// bnorm_bench: bnorm, oneDNN and PyTorch on the same problems, threads and
// buffers, each row also timed against a non-temporal copy of the same bytes.
//
//   bnorm_bench [--quick | --problems=LIST] [--wait_quiet] [--buffer_offset=BYTES]
//               [Google Benchmark flags]
//
// --quick runs three problems instead of the full suite; --problems the
// comma-separated benchdnn-style descriptors given (mb32ic3ih224iw224 for
// N x C x H x W, mb65536ic100 for (N, C) input), e.g. a network's own
// layers. --buffer_offset puts x, dy and y (the tensors every
// implementation reads and writes) that many bytes past a page boundary:
// 16 is where glibc's malloc puts large blocks, and so where a C or NumPy
// user's tensors are. The copy keeps its
// page-aligned buffers: it stays the same reference. --wait_quiet holds
// each row until the other processes on the machine have been idle for a
// 0.1 s sample (at most 10 minutes per row): the suite can then share a
// machine with builds that come and go. Without
// --benchmark_min_time, rows run for 0.1 s (0.05 s with --quick): the full
// suite has about 1500 rows.
#include <bnorm/bnorm.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "workload.h"

namespace bnorm_bench {
namespace {

void run_copy(benchmark::State& state, size_t bytes) {
  using clock = std::chrono::steady_clock;
  arena& a = arena::get();
  const double best_s = nt_copy_seconds(a.copy_dst(), a.copy_src(), bytes);
  double total = 0.0;
  const others_cpu_meter others;
  for (auto _ : state) {
    const auto t0 = clock::now();
    nt_copy(a.copy_dst(), a.copy_src(), bytes);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    state.SetIterationTime(s);
    total += s;
  }
  // A copy of B bytes moves 2B: the same traffic unit as the kernels' rows.
  const double traffic = 2.0 * static_cast<double>(bytes);
  state.counters["GB/s"] = traffic / (total / static_cast<double>(state.iterations())) * 1e-9;
  state.counters["copy_GB/s"] = traffic / best_s * 1e-9;
  state.counters["others_cpu"] = others.share();
}

// What the machine's memory does today: read-only, copy with ordinary
// stores, copy with streaming stores, on the working sets of
// /work/shared/PERFORMANCE.md's table. GB/s counts reads + writes.
enum class machine_kind { read, copy, nt_copy };

void run_machine(benchmark::State& state, machine_kind kind, size_t bytes) {
  using clock = std::chrono::steady_clock;
  arena& a = arena::get();
  auto call = [&] {
    switch (kind) {
      case machine_kind::read:
        benchmark::DoNotOptimize(read_sum(a.copy_src(), bytes));
        break;
      case machine_kind::copy:
        plain_copy(a.copy_dst(), a.copy_src(), bytes);
        break;
      case machine_kind::nt_copy:
        nt_copy(a.copy_dst(), a.copy_src(), bytes);
        break;
    }
  };
  call();
  double total = 0.0, best = 1e30;
  const others_cpu_meter others;
  for (auto _ : state) {
    const auto t0 = clock::now();
    call();
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    state.SetIterationTime(s);
    total += s;
    best = std::min(best, s);
  }
  const double traffic = static_cast<double>(kind == machine_kind::read ? bytes : 2 * bytes);
  state.counters["GB/s"] = traffic / (total / static_cast<double>(state.iterations())) * 1e-9;
  state.counters["best_GB/s"] = traffic / best * 1e-9;
  state.counters["others_cpu"] = others.share();
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(std::min(line.size(), colon + 2));
    }
  }
  return "unknown";
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

void register_machine_rows(size_t span_bytes) {
  const std::pair<machine_kind, const char*> kinds[] = {{machine_kind::read, "read"},
                                                        {machine_kind::copy, "copy"},
                                                        {machine_kind::nt_copy, "nt_copy"}};
  for (size_t mib : {1, 4, 16, 64, 256}) {
    const size_t bytes = mib << 20;
    if (bytes > span_bytes) continue;
    for (const auto& k : kinds)
      benchmark::RegisterBenchmark(
          (std::string("machine/") + k.second + "/bytes:" + std::to_string(bytes)).c_str(),
          run_machine, k.first, bytes)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
  }
}

void register_rows(const std::vector<problem>& problems, const std::vector<implementation>& impls,
                   bool wait_quiet) {
  // Copy rows first: every size the kernels' rows are compared with.
  std::set<size_t> sizes;
  for (const problem& p : problems)
    for (op_kind k : {op_kind::fwd_training, op_kind::backward})
      sizes.insert(copy_bytes(k, p.bytes()));
  for (size_t b : sizes)
    benchmark::RegisterBenchmark(("copy_nt/bytes:" + std::to_string(b)).c_str(), run_copy, b)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);

  // Implementations of one problem run next to each other, and so do the
  // operations of one problem, so that a drift of the machine during the run
  // shifts them together (with the operations outermost, a ReLU row ran
  // minutes after its operation's row, often in another state of the
  // machine, and the two could not be compared).
  // Google Benchmark calls a row's body several times while it sizes the
  // iteration count; the quiet gate is passed once, before the first call.
  auto add = [wait_quiet](const op& o, layout l, const implementation& impl, const problem& p) {
    const std::string name =
        o.name() + "/" + layout_name(l) + "/" + impl.name + "/" + p.descriptor();
    auto run = impl.run;
    auto gated = std::make_shared<bool>(!wait_quiet);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [run, o, l, p, gated](benchmark::State& s) {
                                   if (!*gated) {
                                     wait_until_quiet(600.0);
                                     *gated = true;
                                   }
                                   run(s, o, l, p);
                                 })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  };
  for (const problem& p : problems) {
    for (const op& o : all_ops()) {
      if (!p.two_d) {
        for (layout l : {layout::nchw, layout::nhwc})
          for (const implementation& impl : impls) add(o, l, impl, p);
        continue;
      }
      for (const implementation& impl : impls) {
        if (impl.peer) {
          add(o, layout::nc, impl, p);
        } else {
          for (layout l : {layout::nchw, layout::nhwc}) add(o, l, impl, p);
        }
      }
    }
  }
}

}  // namespace
}  // namespace bnorm_bench

int main(int argc, char** argv) {
  using namespace bnorm_bench;
  bool quick = false;
  bool wait_quiet = false;
  bool has_min_time = false;
  std::vector<problem> chosen;  // --problems
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
      continue;
    }
    if (i > 0 && std::strcmp(argv[i], "--wait_quiet") == 0) {
      wait_quiet = true;
      continue;
    }
    if (i > 0 && std::strncmp(argv[i], "--buffer_offset=", 16) == 0) {
      const long v = std::atol(argv[i] + 16);
      if (v < 0 || v >= 4096 || v % 4 != 0) {
        std::fprintf(stderr, "bnorm_bench: --buffer_offset takes a multiple of 4 below 4096\n");
        return 2;
      }
      arena::set_offset(static_cast<size_t>(v));
      continue;
    }
    if (i > 0 && std::strncmp(argv[i], "--problems=", 11) == 0) {
      std::string bad;
      if (!parse_problems(argv[i] + 11, &chosen, &bad)) {
        std::fprintf(stderr,
                     "bnorm_bench: --problems: '%s' is not a descriptor like mb32ic3ih224iw224 or "
                     "mb65536ic100 (every dimension at least 1, at most 2 GiB of floats)\n",
                     bad.c_str());
        return 2;
      }
      continue;
    }
    if (std::strncmp(argv[i], "--benchmark_min_time", 20) == 0) has_min_time = true;
    args.push_back(argv[i]);
  }
  std::string min_time = quick ? "0.05" : "0.1";
  std::string min_time_flag = "--benchmark_min_time=" + min_time;
  if (!has_min_time) args.insert(args.begin() + 1, min_time_flag.data());
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;

  const std::vector<problem> problems = !chosen.empty() ? chosen
                                        : quick         ? quick_problems()
                                                        : full_problems();
  size_t max_bytes = 0;
  for (const problem& p : problems) max_bytes = std::max(max_bytes, p.bytes());
  arena::set_capacity(max_bytes);

  std::vector<implementation> impls = {bnorm_implementation()};
  std::string peers;
#ifdef BNORM_BENCH_ONEDNN
  impls.push_back(onednn_implementation());
  benchmark::AddCustomContext("onednn_version", onednn_version());
  peers += "onednn ";
#endif
#ifdef BNORM_BENCH_TORCH
  impls.push_back(torch_implementation());
  benchmark::AddCustomContext("torch_version", torch_version());
  peers += "torch ";
#endif
  if (!quick && chosen.empty()) register_machine_rows(arena::copy_span_bytes(max_bytes));
  register_rows(problems, impls, wait_quiet);

  benchmark::AddCustomContext("bnorm_isa", bnorm_isa());
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("copy_isa", memory_reference_isa());
  benchmark::AddCustomContext("suite", !chosen.empty() ? "problems" : quick ? "quick" : "full");
  benchmark::AddCustomContext("wait_quiet", wait_quiet ? "yes" : "no");
  benchmark::AddCustomContext("buffer_offset", std::to_string(arena::offset()));
  benchmark::AddCustomContext("min_time_s", has_min_time ? "from command line" : min_time);
  benchmark::AddCustomContext("peers", peers.empty() ? "none" : peers);
  benchmark::AddCustomContext("ld_preload", env_or("LD_PRELOAD", "none"));
  benchmark::AddCustomContext("malloc_conf", env_or("MALLOC_CONF", "none"));
  benchmark::AddCustomContext(
      "copy_ratio",
      "row mean time / best of 9 batches of a non-temporal copy moving the same traffic, "
      "timed right before the row (forward: copy of S bytes; backward: copy of 1.5 S "
      "bytes); best_ratio: the row's best iteration instead of its mean");
  benchmark::AddCustomContext("others_cpu",
                              "share of all CPUs' time used by other processes during the row");
  benchmark::AddCustomContext(
      "GB/s", "tensor traffic / mean time; forward read S + write S, backward read 2S + write S");

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
