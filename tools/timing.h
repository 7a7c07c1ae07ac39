// Wall-clock timing of repeated calls, and the memory copy that timings are compared with.
#ifndef BNORM_TOOLS_TIMING_H
#define BNORM_TOOLS_TIMING_H

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace driver {

struct timing {
  double min_seconds = 0, median_seconds = 0;
};

// Calls prepare() then run() once to warm up (page faults, caches, thread start-up), then
// reps times, timing only run(). prepare() restores inputs that run() overwrites.
template <class Prepare, class Run>
timing time_calls(int reps, Prepare&& prepare, Run&& run) {
  using clock = std::chrono::steady_clock;
  prepare();
  run();
  std::vector<double> seconds(static_cast<size_t>(reps));
  for (double& t : seconds) {
    prepare();
    const auto start = clock::now();
    run();
    t = std::chrono::duration<double>(clock::now() - start).count();
  }
  std::sort(seconds.begin(), seconds.end());
  const size_t mid = seconds.size() / 2;
  const double median = seconds.size() % 2 ? seconds[mid] : (seconds[mid - 1] + seconds[mid]) / 2;
  return {seconds.front(), median};
}

// dst[i] = src[i] for i < count with non-temporal (streaming) stores, split across the
// OpenMP threads: what a kernel that reads and writes the same bytes once can at best reach
// once its data no longer fits in cache. src and dst are 64-byte aligned; count is a
// multiple of 16.
void nontemporal_copy(float* dst, const float* src, int64_t count);

}  // namespace driver

#endif  // BNORM_TOOLS_TIMING_H
