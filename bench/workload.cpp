#include "workload.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <sstream>
#include <thread>

namespace bnorm_bench {

const char* layout_name(layout l) {
  switch (l) {
    case layout::nchw:
      return "nchw";
    case layout::nhwc:
      return "nhwc";
    case layout::nc:
      return "nc";
  }
  return "?";
}

std::string op::name() const {
  std::string s = kind == op_kind::fwd_training    ? "fwd_training"
                  : kind == op_kind::fwd_inference ? "fwd_inference"
                                                   : "backward";
  return relu ? s + "_relu" : s;
}

const std::vector<op>& all_ops() {
  static const std::vector<op> ops = {
      {op_kind::fwd_training, false},  {op_kind::fwd_training, true},
      {op_kind::fwd_inference, false}, {op_kind::fwd_inference, true},
      {op_kind::backward, false},      {op_kind::backward, true},
  };
  return ops;
}

std::string problem::descriptor() const {
  std::string s = "mb" + std::to_string(n) + "ic" + std::to_string(c);
  if (!two_d) s += "ih" + std::to_string(h) + "iw" + std::to_string(w);
  return s;
}

namespace {

constexpr size_t kMaxTensorBytes = size_t{2} << 30;

struct layer {
  int64_t c, hw;
};
// ResNet-50's batch-norm inputs, channels x (height = width).
constexpr layer kResnet50[] = {{64, 112}, {64, 56},   {256, 56}, {128, 28}, {512, 28},
                               {256, 14}, {1024, 14}, {512, 7},  {2048, 7}};

void add_if_fits(std::vector<problem>& out, const problem& p) {
  if (p.bytes() <= kMaxTensorBytes) out.push_back(p);
}

}  // namespace

std::vector<problem> full_problems() {
  std::vector<problem> out;
  for (const layer& l : kResnet50)
    for (int64_t n : {1, 8, 32, 128}) add_if_fits(out, {n, l.c, l.hw, l.hw, false});
  for (int64_t c : {256, 1024})
    for (int64_t n : {256, 4096, 65536}) add_if_fits(out, {n, c, 1, 1, true});
  return out;
}

std::vector<problem> quick_problems() {
  // One tensor far beyond L3 (103 MB), one near its size (12.8 MB), one 2-D.
  return {{32, 256, 56, 56, false}, {8, 512, 28, 28, false}, {4096, 1024, 1, 1, true}};
}

bool parse_problems(const std::string& list, std::vector<problem>* out, std::string* error) {
  size_t at = 0;
  while (at <= list.size()) {
    const size_t end = std::min(list.find(',', at), list.size());
    const std::string d = list.substr(at, end - at);
    long long n = 0, c = 0, h = 0, w = 0;
    int used = 0;
    problem p{};
    if (std::sscanf(d.c_str(), "mb%lldic%lldih%lldiw%lld%n", &n, &c, &h, &w, &used) == 4 &&
        used == static_cast<int>(d.size())) {
      p = {n, c, h, w, false};
    } else if (std::sscanf(d.c_str(), "mb%lldic%lld%n", &n, &c, &used) == 2 &&
               used == static_cast<int>(d.size())) {
      p = {n, c, 1, 1, true};
    }
    int64_t nc = 0, hw = 0, values = 0;
    if (p.n < 1 || p.c < 1 || p.h < 1 || p.w < 1 || __builtin_mul_overflow(p.n, p.c, &nc) ||
        __builtin_mul_overflow(p.h, p.w, &hw) || __builtin_mul_overflow(nc, hw, &values) ||
        static_cast<uint64_t>(values) > kMaxTensorBytes / sizeof(float)) {
      *error = d;
      return false;
    }
    const auto same = [&p](const problem& q) { return q.descriptor() == p.descriptor(); };
    if (std::none_of(out->begin(), out->end(), same)) out->push_back(p);
    at = end + 1;
  }
  return true;
}

size_t traffic_bytes(op_kind k, size_t s) { return k == op_kind::backward ? 3 * s : 2 * s; }

size_t copy_bytes(op_kind k, size_t s) {
  return k == op_kind::backward ? (3 * s / 2) / sizeof(float) * sizeof(float) : s;
}

namespace {
size_t arena_capacity = 0;
size_t arena_offset = 0;  // bytes
}  // namespace

void arena::set_capacity(size_t max_tensor_bytes) { arena_capacity = max_tensor_bytes; }

void arena::set_offset(size_t bytes) { arena_offset = bytes; }
size_t arena::offset() { return arena_offset; }

arena& arena::get() {
  static arena a;
  if (a.base_ == nullptr) a.allocate(arena_capacity);
  return a;
}

namespace {
// 2 MiB granularity keeps every buffer 64-byte aligned and page aligned
// (unless set_offset moves them; then with a page to spare).
constexpr size_t kGranule = size_t{2} << 20;
size_t stride_bytes_for(size_t max_tensor_bytes) {
  const size_t bytes = max_tensor_bytes + (arena_offset ? 4096 : 0);
  return (bytes + kGranule - 1) / kGranule * kGranule;
}
}  // namespace

size_t arena::copy_span_bytes(size_t max_tensor_bytes) {
  return 2 * stride_bytes_for(max_tensor_bytes);
}

void arena::allocate(size_t max_tensor_bytes) {
  const size_t granule = kGranule;
  const size_t stride_bytes = stride_bytes_for(max_tensor_bytes);
  // x | dy | y | spare: the copy destination (1.5x) runs from y into spare.
  const size_t total = 4 * stride_bytes;
  base_ = static_cast<float*>(std::aligned_alloc(granule, total));
  const size_t mask_bytes = (max_tensor_bytes / sizeof(float) + 7) / 8 + 64;
  mask_ = static_cast<uint8_t*>(std::aligned_alloc(64, (mask_bytes + 63) / 64 * 64));
  if (base_ == nullptr || mask_ == nullptr) throw std::bad_alloc();
  stride_ = stride_bytes / sizeof(float);
  offset_ = arena_offset / sizeof(float);

  // Values in [-2, 2) from a hash of the index: no denormals, about half
  // negative (the ReLU mask is mixed), different in x and dy. Filled in
  // parallel so that the pages are spread like the kernels' accesses.
  const int64_t n = static_cast<int64_t>(total / sizeof(float));
  float* p = base_;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = static_cast<float>(h >> 8) * (4.0f / 16777216.0f) - 2.0f;
  }
  std::memset(mask_, 0, mask_bytes);
}

namespace {

// Clock ticks all CPUs spent busy (user, nice, system, irq, softirq, steal).
long long machine_busy_ticks() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  return user + nice + system + irq + softirq + steal;
}

// Clock ticks this process ran (utime + stime, fields 14 and 15).
long long self_ticks() {
  std::ifstream in("/proc/self/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream fields(text.substr(paren + 2));
  std::string field;
  long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::atoll(field.c_str());
    if (i == 15) stime = std::atoll(field.c_str());
  }
  return utime + stime;
}

}  // namespace

others_cpu_meter::others_cpu_meter()
    : busy_(machine_busy_ticks()), self_(self_ticks()), start_(std::chrono::steady_clock::now()) {}

double others_cpu_meter::share() const {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double capacity = seconds * static_cast<double>(sysconf(_SC_CLK_TCK)) *
                          static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN));
  if (capacity <= 0) return 0.0;
  const double others =
      static_cast<double>((machine_busy_ticks() - busy_) - (self_ticks() - self_));
  return std::max(0.0, others / capacity);
}

double wait_until_quiet(double max_seconds) {
  const auto start = std::chrono::steady_clock::now();
  // One tick of one CPU in a 0.1 s sample of all CPUs.
  const double one_tick = 1.0 / (0.1 * static_cast<double>(sysconf(_SC_CLK_TCK)) *
                                 static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN)));
  for (;;) {
    const others_cpu_meter sample;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (sample.share() <= 1.01 * one_tick || waited >= max_seconds) return waited;
  }
}

void measure(benchmark::State& state, op_kind kind, const problem& p,
             const std::function<run_result()>& call) {
  using clock = std::chrono::steady_clock;
  const arena& a = arena::get();
  const size_t traffic = traffic_bytes(kind, p.bytes());
  const double copy_s = nt_copy_seconds(a.copy_dst(), a.copy_src(), copy_bytes(kind, p.bytes()));

  run_result r = call();
  if (!r.ok) {
    state.SkipWithError(r.error.c_str());
    return;
  }
  double total = 0.0, best = 1e30;
  const others_cpu_meter others;
  for (auto _ : state) {
    const auto t0 = clock::now();
    r = call();
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (!r.ok) {
      state.SkipWithError(r.error.c_str());
      return;
    }
    state.SetIterationTime(s);
    total += s;
    best = std::min(best, s);
  }
  const double iters = static_cast<double>(state.iterations());
  const double mean = total / iters;
  state.counters["GB/s"] = static_cast<double>(traffic) / mean * 1e-9;
  state.counters["copy_GB/s"] = static_cast<double>(traffic) / copy_s * 1e-9;
  state.counters["copy_ratio"] = mean / copy_s;
  state.counters["best_ratio"] = best / copy_s;
  state.counters["others_cpu"] = others.share();
}

}  // namespace bnorm_bench
