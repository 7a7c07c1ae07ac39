// What the suite measures (problems, operations, layouts), the buffers every
// row shares, and the timing loop that turns a call into the reported counters.
#ifndef BNORM_BENCH_WORKLOAD_H
#define BNORM_BENCH_WORKLOAD_H

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "memory_reference.h"

namespace bnorm_bench {

// Peers see 2-D (N, C) input as one layout, "nc"; bnorm is run on it as both
// NCHW and NHWC with spatial 1, because it is free to take different paths.
enum class layout { nchw, nhwc, nc };
const char* layout_name(layout l);

enum class op_kind { fwd_training, fwd_inference, backward };

struct op {
  op_kind kind;
  bool relu;
  std::string name() const;  // "fwd_training", "backward_relu", ...
};
const std::vector<op>& all_ops();

struct problem {
  int64_t n, c, h, w;  // h == w == 1 and two_d for (N, C) input
  bool two_d;
  int64_t spatial() const { return h * w; }
  int64_t numel() const { return n * c * h * w; }
  size_t bytes() const { return static_cast<size_t>(numel()) * sizeof(float); }
  // benchdnn-style: "mb32ic256ih56iw56", "mb4096ic1024".
  std::string descriptor() const;
};

// The ResNet-50 batch-norm layers at batch 1, 8, 32, 128 (tensors over 2 GiB
// left out), then (N, C) input; and the small set of --quick.
std::vector<problem> full_problems();
std::vector<problem> quick_problems();
// Problems from benchdnn-style descriptors separated by commas
// ("mb32ic3ih224iw224,mb65536ic100"), each once; false, with the bad
// descriptor in *error, if one does not parse, has a dimension below 1 or
// a tensor over 2 GiB (as the suite skips).
bool parse_problems(const std::string& list, std::vector<problem>* out, std::string* error);

// Tensor traffic an operation must cause at least: forward reads S and writes
// S, backward reads x and dy and writes dx. The ReLU mask (S/32) is not counted.
size_t traffic_bytes(op_kind k, size_t tensor_bytes);
// The copy it is compared with moves the same traffic: S bytes for forward,
// 1.5 S for backward (rounded down to whole floats).
size_t copy_bytes(op_kind k, size_t tensor_bytes);

// Buffers shared by every row, sized once for the largest problem and filled
// once, so that a row's setup is cheap and no row pays first-touch faults.
// x, dy and y are disjoint; the copy source and destination each span 1.5x
// the largest tensor (they overlap x/dy and y, never each other).
class arena {
 public:
  // Sets the largest tensor; the buffers are allocated and filled on the
  // first get() after it, so listing or filtering rows stays instant.
  static void set_capacity(size_t max_tensor_bytes);
  // Puts x, dy and y (not the copy's buffers) this many bytes (a multiple of
  // 4 below 4096) past a page boundary; 0 by default. Call before get().
  static void set_offset(size_t bytes);
  static size_t offset();
  static arena& get();
  // Bytes the copy source and destination each span for that capacity.
  static size_t copy_span_bytes(size_t max_tensor_bytes);
  float* x() const { return base_ + offset_; }
  float* dy() const { return base_ + stride_ + offset_; }
  float* y() const { return base_ + 2 * stride_ + offset_; }
  uint8_t* relu_mask() const { return mask_; }
  const float* copy_src() const { return base_; }
  float* copy_dst() const { return base_ + 2 * stride_; }

 private:
  void allocate(size_t max_tensor_bytes);
  float* base_ = nullptr;
  size_t stride_ = 0;  // floats between x, dy and y
  size_t offset_ = 0;  // floats
  uint8_t* mask_ = nullptr;
};

struct run_result {
  bool ok;
  std::string error;
};

// Runs one row: one untimed call (JIT, page faults of outputs, thread pool),
// then `call` once per iteration, each timed on its own (manual time). Sets the
// counters GB/s (tensor traffic / mean time), copy_GB/s (the same traffic /
// the time of nt_copy_seconds, taken just before), copy_ratio (mean time /
// copy time),
// best_ratio (best iteration / copy time) and others_cpu (others_cpu_meter
// over the timed iterations).
void measure(benchmark::State& state, op_kind kind, const problem& p,
             const std::function<run_result()>& call);

// Share of the machine's CPU time that other processes (and the hypervisor's
// steal) used between two samples: the suite shares its machine, and a row
// that ran next to a compiler is worth rerunning, not reporting.
class others_cpu_meter {
 public:
  others_cpu_meter();
  double share() const;  // 0..1 of all CPUs since construction

 private:
  long long busy_, self_;
  std::chrono::steady_clock::time_point start_;
};

// Sleeps in 0.1 s samples until one shows other processes using at most one
// clock tick of the CPUs (or max_seconds pass). Returns the seconds waited.
double wait_until_quiet(double max_seconds);

// One implementation of the three operations, as a row body.
struct implementation {
  const char* name;  // "bnorm", "onednn", "torch"
  bool peer;         // peers take 2-D input as layout::nc
  std::function<void(benchmark::State&, const op&, layout, const problem&)> run;
};

// Defined by the peer files when they are built.
implementation bnorm_implementation();
implementation onednn_implementation();
implementation torch_implementation();
std::string onednn_version();
std::string torch_version();

}  // namespace bnorm_bench

#endif  // BNORM_BENCH_WORKLOAD_H
