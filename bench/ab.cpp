// bnorm_ab: compares two (or more) builds of libbnorm in one process.
//
//   bnorm_ab old/libbnorm.so new/libbnorm.so  mb32ic256ih56iw56 nhwc fwd_training
//
// This machine's memory bandwidth drifts by tens of percent between runs
// (other virtual machines share it), so two benchmark runs of two builds
// cannot resolve a 5-10% change. bnorm_ab loads every library with dlopen
// (RTLD_LOCAL: each keeps its own symbols), then runs them in turn, nine
// rounds: in each round every library is timed right after a non-temporal
// copy of the same traffic (forward: S bytes, backward: 1.5 S): the mean
// time of enough calls to last ~20 ms, against the copy's best (as the
// benchmark's copy_ratio). It prints the median and range over the rounds
// of time / copy per library. (The best call, which it timed before session
// 8, hid a bimodal cost: small NHWC tensors whose threads split rows took
// 13 us at best and 35 us in the median call, 1x1024x14x14 inference.)
// Buffers are page aligned, as the benchmark's; --offset=BYTES (a multiple
// of 4 below 4096) puts x, y, dy and dx that many bytes past a page boundary
// instead (16: where glibc's malloc puts large blocks).
//
// Operations: fwd_training, fwd_training_relu, fwd_inference,
// fwd_inference_relu, backward, backward_relu (mask from the first
// library's ReLU forward), moments (bnorm_moments alone), backward_reduce
// and backward_apply (the two halves of backward, each compared with the
// copy of backward's traffic), backward_reduce_relu and backward_apply_relu
// (the same with the ReLU mask).
// A LIB named `read` is no library: it reads x (and for the backward
// operations dy) once, for the reading speed of the same run.
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bnorm/bnorm.h"
#include "memory_reference.h"

namespace {

struct library {
  std::string path;
  decltype(&bnorm_moments) moments;
  decltype(&bnorm_forward_inference) inference;
  decltype(&bnorm_forward_training) training;
  decltype(&bnorm_backward) backward;
  decltype(&bnorm_backward_reduce) backward_reduce;
  decltype(&bnorm_backward_apply) backward_apply;
};

template <class F>
F symbol(void* handle, const char* name) {
  return reinterpret_cast<F>(dlsym(handle, name));
}

bool parse_problem(const char* s, int64_t* n, int64_t* c, int64_t* spatial) {
  long long mb = 1, ic = 0, ih = 1, iw = 1;
  if (std::sscanf(s, "mb%lldic%lldih%lldiw%lld", &mb, &ic, &ih, &iw) == 4 ||
      std::sscanf(s, "mb%lldic%lld", &mb, &ic) == 2) {
    *n = mb;
    *c = ic;
    *spatial = ih * iw;
    return mb > 0 && ic > 0 && ih > 0 && iw > 0;
  }
  return false;
}

template <class F>
double best_seconds(F f, int calls) {
  double best = 1e30;
  for (int i = 0; i < calls; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

template <class F>
double mean_seconds(F f, int calls) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls;
}

float* buffer(size_t floats, size_t offset_bytes = 0) {
  const size_t bytes = (floats * sizeof(float) + offset_bytes + 4095) / 4096 * 4096;
  auto* p = static_cast<float*>(std::aligned_alloc(4096, bytes));
  if (!p) {
    std::fprintf(stderr, "bnorm_ab: out of memory\n");
    std::exit(1);
  }
  return p + offset_bytes / sizeof(float);
}

}  // namespace

int main(int argc, char** argv) {
  size_t offset = 0;
  if (argc > 1 && std::strncmp(argv[1], "--offset=", 9) == 0) {
    const long v = std::atol(argv[1] + 9);
    if (v < 0 || v >= 4096 || v % 4 != 0) {
      std::fprintf(stderr, "bnorm_ab: --offset takes a multiple of 4 below 4096\n");
      return 2;
    }
    offset = static_cast<size_t>(v);
    argv[1] = argv[0];
    ++argv;
    --argc;
  }
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: %s [--offset=BYTES] LIB [LIB...] PROBLEM nchw|nhwc "
                 "fwd_training|fwd_training_relu|fwd_inference|fwd_inference_relu|backward|"
                 "backward_relu|backward_reduce|backward_reduce_relu|"
                 "backward_apply|backward_apply_relu|moments\n",
                 argv[0]);
    return 2;
  }
  const std::string op = argv[argc - 1], layout_name = argv[argc - 2];
  int64_t n = 0, c = 0, spatial = 0;
  if (!parse_problem(argv[argc - 3], &n, &c, &spatial) ||
      (layout_name != "nchw" && layout_name != "nhwc")) {
    std::fprintf(stderr, "bnorm_ab: bad problem or layout\n");
    return 2;
  }
  std::vector<library> libs;
  for (int i = 1; i < argc - 3; ++i) {
    if (std::string(argv[i]) == "read") {
      libs.push_back({argv[i], nullptr, nullptr, nullptr, nullptr, nullptr, nullptr});
      continue;
    }
    void* h = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      std::fprintf(stderr, "bnorm_ab: %s\n", dlerror());
      return 1;
    }
    libs.push_back({argv[i], symbol<decltype(&bnorm_moments)>(h, "bnorm_moments"),
                    symbol<decltype(&bnorm_forward_inference)>(h, "bnorm_forward_inference"),
                    symbol<decltype(&bnorm_forward_training)>(h, "bnorm_forward_training"),
                    symbol<decltype(&bnorm_backward)>(h, "bnorm_backward"),
                    symbol<decltype(&bnorm_backward_reduce)>(h, "bnorm_backward_reduce"),
                    symbol<decltype(&bnorm_backward_apply)>(h, "bnorm_backward_apply")});
  }

  const int64_t total = n * c * spatial;
  const bool backward = op.compare(0, 8, "backward") == 0;
  const size_t copy_bytes = static_cast<size_t>(total) * sizeof(float) * (backward ? 3 : 2) / 2;
  float* x = buffer(total, offset);
  float* y = buffer(total, offset);
  float* dy = buffer(total, offset);
  float* dx = buffer(total, offset);
  float* copy_src = buffer(copy_bytes / sizeof(float) + 16);
  float* copy_dst = buffer(copy_bytes / sizeof(float) + 16);
  for (int64_t i = 0; i < total; ++i) {
    x[i] = static_cast<float>(i % 97) * 0.1f;
    dy[i] = static_cast<float>(i % 13) * 0.1f - 0.6f;
    y[i] = dx[i] = 0.f;
  }
  std::memset(copy_src, 0, copy_bytes);
  std::memset(copy_dst, 0, copy_bytes);
  std::vector<float> mean(c), var(c, 1.f), gamma(c, 1.f), beta(c, 0.f), dgamma(c), dbeta(c);
  std::vector<double> dmean(c), m2(c), sum_dy(c), sum_dy_xhat(c);
  std::vector<uint8_t> mask(static_cast<size_t>(total / 8 + 1));
  const bnorm_shape shape{n, c, spatial, layout_name == "nhwc" ? BNORM_NHWC : BNORM_NCHW};

  const bool relu = op.size() > 5 && op.compare(op.size() - 5, 5, "_relu") == 0;
  const unsigned relu_flags = relu ? unsigned(BNORM_FUSE_RELU) : 0u;
  uint8_t* const relu_mask = relu ? mask.data() : nullptr;
  auto call = [&](const library& l) {
    bnorm_status s = BNORM_SUCCESS;
    if (!l.moments) {
      volatile float sink = bnorm_bench::read_sum(x, static_cast<size_t>(total) * sizeof(float));
      if (backward) sink = bnorm_bench::read_sum(dy, static_cast<size_t>(total) * sizeof(float));
      (void)sink;
    } else if (op == "moments") s = l.moments(&shape, x, dmean.data(), m2.data());
    else if (op == "fwd_inference" || op == "fwd_inference_relu")
      s = l.inference(&shape, 1e-5f, relu_flags, x, gamma.data(), beta.data(), mean.data(),
                      var.data(), y);
    else if (op == "fwd_training" || op == "fwd_training_relu")
      s = l.training(&shape, 1e-5f, relu_flags, x, gamma.data(), beta.data(), y, mean.data(),
                     var.data(), mask.data());
    else if (op == "backward_reduce" || op == "backward_reduce_relu")
      s = l.backward_reduce(&shape, 1e-5f, relu_flags, x, dy, mean.data(), var.data(), relu_mask,
                            sum_dy.data(), sum_dy_xhat.data());
    else if (op == "backward_apply" || op == "backward_apply_relu")
      s = l.backward_apply(&shape, 1e-5f, relu_flags, x, dy, gamma.data(), mean.data(), var.data(),
                           relu_mask, sum_dy.data(), sum_dy_xhat.data(), n * spatial, dx);
    else if (op == "backward" || op == "backward_relu")
      s = l.backward(&shape, 1e-5f, relu_flags, x, dy, gamma.data(), mean.data(), var.data(),
                     mask.data(), dx, dgamma.data(), dbeta.data());
    else {
      std::fprintf(stderr, "bnorm_ab: unknown operation %s\n", op.c_str());
      std::exit(2);
    }
    if (s != BNORM_SUCCESS) {
      std::fprintf(stderr, "bnorm_ab: %s failed\n", l.path.c_str());
      std::exit(1);
    }
  };

  // backward_relu's mask: the ReLU forward of the first library (not `read`).
  if (backward && relu) {
    const auto first = std::find_if(libs.begin(), libs.end(),
                                    [](const library& l) { return l.training != nullptr; });
    if (first == libs.end() ||
        first->training(&shape, 1e-5f, BNORM_FUSE_RELU, x, gamma.data(), beta.data(), y,
                        mean.data(), var.data(), mask.data()) != BNORM_SUCCESS) {
      std::fprintf(stderr, "bnorm_ab: backward_relu needs a library for its mask\n");
      return 1;
    }
  }
  const double traffic = static_cast<double>(total) * sizeof(float) * (backward ? 3 : 2);
  const int calls = std::max(3, static_cast<int>(0.02 / (traffic / 50e9)));
  constexpr int kRounds = 9;
  std::vector<std::vector<double>> ratio(libs.size()), seconds(libs.size());
  std::vector<double> copy_seconds;
  for (int round = 0; round < kRounds; ++round)
    for (size_t k = 0; k < libs.size(); ++k) {
      const double copy_s =
          best_seconds([&] { bnorm_bench::nt_copy(copy_dst, copy_src, copy_bytes); }, calls);
      call(libs[k]);
      seconds[k].push_back(mean_seconds([&] { call(libs[k]); }, calls));
      ratio[k].push_back(seconds[k].back() / copy_s);
      copy_seconds.push_back(copy_s);
    }
  std::sort(copy_seconds.begin(), copy_seconds.end());
  std::printf("%s %s %s, %d threads, buffers %zu bytes past a page, mean time / best copy (median "
              "[min-max] of %d rounds), median time (copy: %.1f us median, %.1f GB/s):\n",
              argv[argc - 3], layout_name.c_str(), op.c_str(), omp_get_max_threads(), offset, kRounds,
              1e6 * copy_seconds[copy_seconds.size() / 2],
              2 * copy_bytes / copy_seconds[copy_seconds.size() / 2] * 1e-9);
  for (size_t k = 0; k < libs.size(); ++k) {
    std::sort(ratio[k].begin(), ratio[k].end());
    std::sort(seconds[k].begin(), seconds[k].end());
    std::printf("  %-40s %.3f [%.3f-%.3f] %.1f us\n", libs[k].path.c_str(), ratio[k][kRounds / 2],
                ratio[k].front(), ratio[k].back(), 1e6 * seconds[k][kRounds / 2]);
  }
  return 0;
}
