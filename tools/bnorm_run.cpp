// bnorm-run: checks bnorm against a double-precision reference and times it against a
// non-temporal memory copy, for problems written as benchdnn batch-normalization descriptors.
// Options, output and tolerances: docs/bnorm-run.md.

#include <bnorm/bnorm.h>
#include <omp.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "problem_descriptor.h"
#include "reference_bnorm.h"
#include "timing.h"

namespace driver {
namespace {

// A check passes when every output's largest error, divided by that output's scale, is at
// most this (the scales are in docs/bnorm-run.md). 1e-5 is about 170 float roundings.
constexpr double tolerance = 1e-5;
// Every problem starts its random data from this seed, so a problem's data does not depend
// on the problems before it.
constexpr uint64_t data_seed = 0x5eed;
// Batch files may name batch files; this stops a file that names itself.
constexpr int max_batch_depth = 16;

enum class direction { fwd_training, fwd_inference, backward };
enum class run_mode { correctness, performance, both };

const char* direction_name(direction d) {
  const char* const names[] = {"fwd_training", "fwd_inference", "backward"};
  return names[static_cast<int>(d)];
}

// The options in force for a descriptor: each option applies to the descriptors after it.
struct settings {
  direction dir = direction::fwd_training;
  bnorm_layout layout = BNORM_NCHW;
  bool relu = false;
  bool global_stats = false;
  bool inplace = false;
  run_mode mode = run_mode::correctness;
  int reps = 20;
  int threads = 0;  // 0: OpenMP's default
};

struct problem {
  settings opt;
  problem_descriptor desc;
};

// A malformed command line or batch file: reported before any problem runs, exit 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A problem that could not run (the library returned an error status, or memory ran out):
// reported as the problem's result, exit 3.
struct problem_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check_status(bnorm_status status, const char* function) {
  if (status != BNORM_SUCCESS)
    throw problem_error(std::string(function) + " returned " + bnorm_status_string(status) + ": " +
                        bnorm_last_error_message());
}

const char usage[] =
    "usage: bnorm-run [--dir=fwd_training|fwd_inference|backward] [--layout=nchw|nhwc]\n"
    "                 [--relu[=BOOL]] [--global-stats[=BOOL]] [--inplace[=BOOL]]\n"
    "                 [--mode=correctness|performance|both] [--reps=N] [--threads=T]\n"
    "                 [--isa=sse2|avx2|avx512] [--reset] DESC... | --batch=FILE\n"
    "  DESC is a benchdnn batch-norm descriptor such as mb32ic256ih56iw56; options apply to\n"
    "  the descriptors after them. See docs/bnorm-run.md.\n";

// ---------------------------------------------------------------------------------------
// Command line and batch files

// The value of an option that takes one of a few words.
template <class T>
T parse_choice(const std::string& option, const std::string& value,
               std::initializer_list<std::pair<const char*, T>> choices) {
  std::string expected;
  for (const auto& choice : choices) {
    if (value == choice.first) return choice.second;
    expected += std::string(expected.empty() ? "" : "|") + choice.first;
  }
  throw usage_error("bad value '" + value + "' for " + option + ": expected " + expected);
}

int parse_positive_int(const std::string& option, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < 1 || v > 1000000)
    throw usage_error("bad value '" + value + "' for " + option +
                      ": expected an integer from 1 to 1000000");
  return static_cast<int>(v);
}

class argument_parser {
 public:
  std::vector<problem> problems;
  std::string isa;  // from --isa, "" if not given
  bool help = false;

  // One word of the command line or of a batch file; where is "" or "FILE:LINE: ", dir is
  // the directory of the batch file the word is in ("" on the command line).
  void parse_word(const std::string& word, const std::string& where, const std::string& dir) {
    try {
      if (word.rfind("-", 0) == 0)
        parse_option(word, dir);
      else
        parse_descriptor(word);
    } catch (const usage_error& e) {
      // A nested batch file's error reads "outer:2: inner:5: ...".
      if (where.empty()) throw;
      throw usage_error(where + e.what());
    }
  }

 private:
  settings current_;
  int batch_depth_ = 0;

  void parse_option(const std::string& word, const std::string& dir) {
    const size_t eq = word.find('=');
    const std::string name = word.substr(0, eq);
    const bool has_value = eq != std::string::npos;
    const std::string value = has_value ? word.substr(eq + 1) : "";
    auto need_value = [&] {
      if (!has_value) throw usage_error("option '" + name + "' needs a value (" + name + "=...)");
    };
    auto no_value = [&] {
      if (has_value) throw usage_error("option '" + name + "' takes no value");
    };
    // --relu is --relu=true.
    auto boolean = [&] {
      return has_value ? parse_choice<bool>(name, value, {{"true", true}, {"false", false}}) : true;
    };

    if (name == "--dir") {
      need_value();
      current_.dir = parse_choice<direction>(name, value,
                                             {{"fwd_training", direction::fwd_training},
                                              {"fwd_inference", direction::fwd_inference},
                                              {"backward", direction::backward}});
    } else if (name == "--layout") {
      need_value();
      current_.layout =
          parse_choice<bnorm_layout>(name, value, {{"nchw", BNORM_NCHW}, {"nhwc", BNORM_NHWC}});
    } else if (name == "--relu") {
      current_.relu = boolean();
    } else if (name == "--global-stats") {
      current_.global_stats = boolean();
    } else if (name == "--inplace") {
      current_.inplace = boolean();
    } else if (name == "--mode") {
      need_value();
      current_.mode = parse_choice<run_mode>(name, value,
                                             {{"correctness", run_mode::correctness},
                                              {"performance", run_mode::performance},
                                              {"both", run_mode::both}});
    } else if (name == "--reps") {
      need_value();
      current_.reps = parse_positive_int(name, value);
    } else if (name == "--threads") {
      need_value();
      current_.threads = parse_positive_int(name, value);
    } else if (name == "--isa") {
      need_value();
      parse_choice<int>(name, value, {{"sse2", 0}, {"avx2", 0}, {"avx512", 0}});
      // The library picks its instruction set once, at its first call.
      if (!isa.empty() && isa != value)
        throw usage_error("conflicting --isa=" + isa + " and --isa=" + value +
                          ": the library picks its instruction set once per process");
      if (!problems.empty() && isa != value)
        throw usage_error("--isa=" + value +
                          " after the first problem: the library picks its instruction set "
                          "once per process, so give --isa before any descriptor");
      isa = value;
    } else if (name == "--batch") {
      need_value();
      read_batch_file(value, dir);
    } else if (name == "--reset") {
      no_value();
      current_ = settings{};
    } else if (name == "--help" || name == "-h") {
      no_value();
      help = true;
    } else {
      throw usage_error("unknown option '" + word + "'");
    }
  }

  void parse_descriptor(const std::string& word) {
    problem p{current_, {}};
    try {
      p.desc = parse_problem_descriptor(word);
    } catch (const descriptor_error& e) {
      throw usage_error("bad descriptor '" + word + "': " + e.what());
    }
    if (p.opt.global_stats && p.opt.dir != direction::backward)
      throw usage_error("--global-stats applies to --dir=backward only (problem '" + word +
                        "' is " + direction_name(p.opt.dir) + ")");
    problems.push_back(p);
  }

  // One word per whitespace-separated token; '#' starts a comment. A relative path is
  // looked up in the working directory, then in the directory of the batch file naming it.
  void read_batch_file(const std::string& path, const std::string& dir) {
    std::string resolved = path;
    std::ifstream in(resolved);
    if (!in && !dir.empty() && path.rfind("/", 0) != 0) {
      resolved = dir + "/" + path;
      in.open(resolved);
    }
    if (!in) throw usage_error("cannot open batch file '" + path + "': " + std::strerror(errno));
    if (batch_depth_ >= max_batch_depth)
      throw usage_error("batch files nested more than " + std::to_string(max_batch_depth) +
                        " deep at '" + path + "'");
    const size_t slash = resolved.rfind('/');
    const std::string file_dir = slash == std::string::npos ? "." : resolved.substr(0, slash);
    ++batch_depth_;
    std::string line;
    for (int number = 1; std::getline(in, line); ++number) {
      std::istringstream words(line.substr(0, line.find('#')));
      for (std::string word; words >> word;)
        parse_word(word, path + ":" + std::to_string(number) + ": ", file_dir);
    }
    --batch_depth_;
  }
};

// ---------------------------------------------------------------------------------------
// Buffers and data

struct free_deleter {
  void operator()(void* p) const { std::free(p); }
};

// 64-byte aligned, every page touched (so that page faults are not timed), and followed by
// 64 to 127 guard bytes that show a write past the end.
template <class T>
class aligned_array {
 public:
  explicit aligned_array(int64_t count = 0) : count_(count) {
    const size_t used = static_cast<size_t>(count) * sizeof(T);
    bytes_ = (used + 63) / 64 * 64 + 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes_)));
    if (!data_) throw problem_error("cannot allocate " + std::to_string(bytes_) + " bytes");
    std::memset(bytes(), 0, used);
    std::memset(bytes() + used, guard_byte, bytes_ - used);
  }
  T* data() const { return data_.get(); }
  T& operator[](int64_t i) const { return data_.get()[i]; }
  void fill(T value) const { std::fill(data(), data() + count_, value); }
  void copy_from(const aligned_array& other) const {
    std::memcpy(data(), other.data(), static_cast<size_t>(count_) * sizeof(T));
  }
  bool same_as(const aligned_array& other) const {
    return std::memcmp(data(), other.data(), static_cast<size_t>(count_) * sizeof(T)) == 0;
  }
  bool guard_intact() const {
    for (size_t i = static_cast<size_t>(count_) * sizeof(T); i < bytes_; ++i)
      if (bytes()[i] != guard_byte) return false;
    return true;
  }

 private:
  static constexpr unsigned char guard_byte = 0xa5;
  unsigned char* bytes() const { return reinterpret_cast<unsigned char*>(data_.get()); }
  int64_t count_;
  size_t bytes_;
  std::unique_ptr<T, free_deleter> data_;
};

// Everything one problem reads and writes. x0 and dy0 keep the generated inputs: the
// reference reads them, and in-place runs restore x and dy from them.
struct problem_data {
  bnorm_shape shape;
  float eps;
  unsigned flags;
  int64_t elements;
  aligned_array<float> x0, x, y, dy0, dy, dx;
  aligned_array<float> gamma, beta, mean, var, dgamma, dbeta;
  aligned_array<uint8_t> mask;
  std::vector<double> given_mean, given_var;  // mean, var as the library reads them

  float* y_out(const settings& opt) const { return opt.inplace ? x.data() : y.data(); }
  float* dx_out(const settings& opt) const { return opt.inplace ? dy.data() : dx.data(); }
};

// Per channel: x = offset + N(0, 1) with offset in [-10, 10] (a one-pass variance loses
// digits to it), gamma = +-[0.5, 1.5], beta in [-1, 1], dy = N(0, 1) + [-1, 1]. Values are
// drawn in (n, c, s) order, so both layouts see the same problem.
problem_data make_problem_data(const problem& p) {
  const settings& opt = p.opt;
  problem_data d;
  d.shape = {p.desc.mb, p.desc.ic, p.desc.spatial(), opt.layout};
  d.eps = p.desc.eps;
  d.flags = (opt.relu ? unsigned{BNORM_FUSE_RELU} : 0u) |
            (opt.global_stats ? unsigned{BNORM_GLOBAL_STATS} : 0u);
  d.elements = d.shape.n * d.shape.c * d.shape.spatial;
  const int64_t channels = d.shape.c;
  const bool backward = opt.dir == direction::backward;
  d.x0 = aligned_array<float>(d.elements);
  d.x = aligned_array<float>(d.elements);
  if (!opt.inplace && !backward) d.y = aligned_array<float>(d.elements);
  if (backward) {
    d.dy0 = aligned_array<float>(d.elements);
    d.dy = aligned_array<float>(d.elements);
    if (!opt.inplace) d.dx = aligned_array<float>(d.elements);
    d.dgamma = aligned_array<float>(channels);
    d.dbeta = aligned_array<float>(channels);
  }
  d.gamma = aligned_array<float>(channels);
  d.beta = aligned_array<float>(channels);
  d.mean = aligned_array<float>(channels);
  d.var = aligned_array<float>(channels);
  if (opt.relu) d.mask = aligned_array<uint8_t>((d.elements + 7) / 8);

  std::mt19937_64 random(data_seed);
  std::uniform_real_distribution<double> offset(-10, 10), scale(0.5, 1.5), shift(-1, 1);
  std::normal_distribution<double> normal(0, 1);
  std::vector<double> x_offset(channels), dy_offset(channels);
  for (int64_t c = 0; c < channels; ++c) {
    x_offset[c] = offset(random);
    d.gamma[c] = static_cast<float>((c % 2 ? -1 : 1) * scale(random));
    d.beta[c] = static_cast<float>(shift(random));
    dy_offset[c] = shift(random);
  }
  const bnorm_shape& sh = d.shape;
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t s = 0; s < sh.spatial; ++s)
        d.x0[tensor_offset(sh, n, c, s)] = static_cast<float>(x_offset[c] + normal(random));
  if (backward)
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t s = 0; s < sh.spatial; ++s)
          d.dy0[tensor_offset(sh, n, c, s)] = static_cast<float>(dy_offset[c] + normal(random));
  d.x.copy_from(d.x0);
  if (backward) d.dy.copy_from(d.dy0);

  // Inference and backward read statistics: the batch's, rounded to float. Backward with
  // relu reads the mask that forward training with those statistics would write.
  if (opt.dir != direction::fwd_training) {
    const reference_moments m = reference_batch_moments(sh, d.x0.data());
    for (int64_t c = 0; c < channels; ++c) {
      d.mean[c] = static_cast<float>(m.mean[c]);
      d.var[c] = static_cast<float>(m.var[c]);
      d.given_mean.push_back(d.mean[c]);
      d.given_var.push_back(d.var[c]);
    }
    if (backward && opt.relu) {
      const std::vector<double> y = reference_forward(sh, d.eps, true, d.x0.data(), d.gamma.data(),
                                                      d.beta.data(), d.given_mean, d.given_var);
      for (int64_t i = 0; i < d.elements; ++i)
        if (y[i] > 0) d.mask[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
    }
  }
  return d;
}

// Puts back the inputs that an in-place call overwrote.
void restore_inputs(const problem& p, const problem_data& d) {
  if (!p.opt.inplace) return;
  if (p.opt.dir == direction::backward)
    d.dy.copy_from(d.dy0);
  else
    d.x.copy_from(d.x0);
}

// One call of the library; the outputs land in d.
void call_library(const problem& p, const problem_data& d) {
  const settings& opt = p.opt;
  uint8_t* mask = opt.relu ? d.mask.data() : nullptr;
  switch (opt.dir) {
    case direction::fwd_training:
      check_status(
          bnorm_forward_training(&d.shape, d.eps, d.flags, d.x.data(), d.gamma.data(),
                                 d.beta.data(), d.y_out(opt), d.mean.data(), d.var.data(), mask),
          "bnorm_forward_training");
      break;
    case direction::fwd_inference:
      check_status(
          bnorm_forward_inference(&d.shape, d.eps, d.flags, d.x.data(), d.gamma.data(),
                                  d.beta.data(), d.mean.data(), d.var.data(), d.y_out(opt)),
          "bnorm_forward_inference");
      break;
    case direction::backward:
      check_status(bnorm_backward(&d.shape, d.eps, d.flags, d.x.data(), d.dy.data(), d.gamma.data(),
                                  d.mean.data(), d.var.data(), mask, d.dx_out(opt), d.dgamma.data(),
                                  d.dbeta.data()),
                   "bnorm_backward");
      break;
  }
}

// ---------------------------------------------------------------------------------------
// Correctness

// The largest error of one output: absolute, and relative to the output's scale at that
// element. A NaN where the reference has a number makes max_rel NaN, which fails.
struct error_summary {
  const char* output;
  double max_abs = 0, max_rel = 0;
  int64_t n = -1, c = -1, s = -1;  // where max_rel is (n, s are -1 for per-channel outputs)
  double got = 0, want = 0;

  void add(double got_value, double want_value, double scale, int64_t n_, int64_t c_, int64_t s_) {
    if (std::isnan(max_rel)) return;
    // NaN is right where the reference is NaN too (eps = 0 and a constant channel: 0/0).
    if (std::isnan(got_value) && std::isnan(want_value)) return;
    const double abs = std::fabs(got_value - want_value);
    const double rel = abs == 0 ? 0 : abs / scale;
    if (!(abs <= max_abs)) max_abs = abs;
    if (!(rel <= max_rel)) {
      max_rel = rel;
      n = n_, c = c_, s = s_, got = got_value, want = want_value;
    }
  }
  bool passed() const { return max_rel <= tolerance; }

  std::string values() const {
    char text[96];
    std::snprintf(text, sizeof text, "max_abs(%s)=%.2e max_rel(%s)=%.2e", output, max_abs, output,
                  max_rel);
    return text;
  }
  std::string worst() const {
    char text[160];
    if (n < 0)
      std::snprintf(text, sizeof text, "%s[c=%lld] got %.9g want %.9g", output,
                    static_cast<long long>(c), got, want);
    else
      std::snprintf(text, sizeof text, "%s[n=%lld,c=%lld,s=%lld] got %.9g want %.9g", output,
                    static_cast<long long>(n), static_cast<long long>(c), static_cast<long long>(s),
                    got, want);
    return text;
  }
};

struct check_result {
  std::vector<error_summary> errors;
  int64_t mask_mismatches = -1;  // -1: no mask to check
  std::string stray_write;       // from find_stray_write

  bool passed() const {
    for (const error_summary& e : errors)
      if (!e.passed()) return false;
    return mask_mismatches <= 0 && stray_write.empty();
  }
  std::string text() const {
    std::string t = passed() ? "PASS" : "FAIL";
    for (const error_summary& e : errors) t += " " + e.values();
    if (mask_mismatches >= 0) t += " relu_mask_mismatches=" + std::to_string(mask_mismatches);
    if (!stray_write.empty()) t += " " + stray_write;
    for (const error_summary& e : errors)
      if (!e.passed()) t += " worst " + e.worst();
    return t;
  }
};

// Scales (the size of the terms each output is computed from, so that the errors a float
// computation cannot avoid stay well below the tolerance):
//   y: |gamma|*invstd*mean|x| + |beta| (the terms of y = gamma*invstd*x + (beta - ...)),
//   mean: mean|x|, var: var.
check_result check_forward(const problem& p, const problem_data& d) {
  const bnorm_shape& sh = d.shape;
  const bool training = p.opt.dir == direction::fwd_training;
  reference_moments m;
  if (training)
    m = reference_batch_moments(sh, d.x0.data());
  else
    m = {d.given_mean, d.given_var};
  const std::vector<double> y_ref = reference_forward(sh, d.eps, p.opt.relu, d.x0.data(),
                                                      d.gamma.data(), d.beta.data(), m.mean, m.var);
  const float* y = d.y_out(p.opt);

  error_summary ey{"y"}, emean{"mean"}, evar{"var"};
  for (int64_t c = 0; c < sh.c; ++c) {
    double sum_abs_x = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s)
        sum_abs_x += std::fabs(d.x0[tensor_offset(sh, n, c, s)]);
    const double mean_abs_x = sum_abs_x / static_cast<double>(sh.n * sh.spatial);
    const double invstd = 1 / std::sqrt(m.var[c] + d.eps);
    const double y_scale = std::fabs(d.gamma[c]) * invstd * mean_abs_x + std::fabs(d.beta[c]);
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = tensor_offset(sh, n, c, s);
        ey.add(y[i], y_ref[i], y_scale, n, c, s);
      }
    if (training) {
      emean.add(d.mean[c], m.mean[c], mean_abs_x, -1, c, -1);
      evar.add(d.var[c], m.var[c], m.var[c], -1, c, -1);
    }
  }
  check_result r;
  r.errors.push_back(ey);
  if (training) {
    r.errors.push_back(emean);
    r.errors.push_back(evar);
    if (p.opt.relu) {  // The mask says which of the library's own outputs are > 0.
      r.mask_mismatches = 0;
      for (int64_t i = 0; i < d.elements; ++i)
        r.mask_mismatches += relu_mask_bit(d.mask.data(), i) != (y[i] > 0);
    }
  }
  return r;
}

// Scales, with g the masked dy and xhat = (x-mean)*invstd:
//   dx: |gamma|*invstd*(mean|g| + max|xhat|*mean|g*xhat|) (the terms of dx and the errors
//       of the two channel sums it uses), dgamma: sum|g*xhat|, dbeta: sum|g|.
check_result check_backward(const problem& p, const problem_data& d) {
  const bnorm_shape& sh = d.shape;
  const uint8_t* mask = p.opt.relu ? d.mask.data() : nullptr;
  const reference_gradients ref =
      reference_backward(sh, d.eps, p.opt.global_stats, d.x0.data(), d.dy0.data(), d.gamma.data(),
                         d.given_mean, d.given_var, mask);
  const float* dx = d.dx_out(p.opt);
  const double count = static_cast<double>(sh.n * sh.spatial);

  error_summary edx{"dx"}, edgamma{"dgamma"}, edbeta{"dbeta"};
  for (int64_t c = 0; c < sh.c; ++c) {
    const double invstd = 1 / std::sqrt(d.given_var[c] + d.eps);
    double sum_abs_g = 0, sum_abs_g_xhat = 0, max_abs_xhat = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = tensor_offset(sh, n, c, s);
        const double g = mask && !relu_mask_bit(mask, i) ? 0.0 : d.dy0[i];
        const double xhat = (d.x0[i] - d.given_mean[c]) * invstd;
        sum_abs_g += std::fabs(g);
        sum_abs_g_xhat += std::fabs(g * xhat);
        max_abs_xhat = std::max(max_abs_xhat, std::fabs(xhat));
      }
    const double dx_scale =
        std::fabs(d.gamma[c]) * invstd * (sum_abs_g + max_abs_xhat * sum_abs_g_xhat) / count;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = tensor_offset(sh, n, c, s);
        edx.add(dx[i], ref.dx[i], dx_scale, n, c, s);
      }
    edgamma.add(d.dgamma[c], ref.dgamma[c], sum_abs_g_xhat, -1, c, -1);
    edbeta.add(d.dbeta[c], ref.dbeta[c], sum_abs_g, -1, c, -1);
  }
  check_result r;
  r.errors = {edx, edgamma, edbeta};
  return r;
}

// A write outside the outputs: past the end of any buffer, or into an input. "" if none.
std::string find_stray_write(const problem& p, const problem_data& d) {
  const std::pair<const char*, bool> guards[] = {
      {"x", d.x.guard_intact()},           {"y", d.y.guard_intact()},
      {"dy", d.dy.guard_intact()},         {"dx", d.dx.guard_intact()},
      {"gamma", d.gamma.guard_intact()},   {"beta", d.beta.guard_intact()},
      {"mean", d.mean.guard_intact()},     {"var", d.var.guard_intact()},
      {"dgamma", d.dgamma.guard_intact()}, {"dbeta", d.dbeta.guard_intact()},
      {"relu_mask", d.mask.guard_intact()}};
  for (const auto& guard : guards)
    if (!guard.second) return std::string("wrote_past_end(") + guard.first + ")";
  const bool backward = p.opt.dir == direction::backward;
  if ((backward || !p.opt.inplace) && !d.x.same_as(d.x0)) return "changed_input(x)";
  if (backward && !p.opt.inplace && !d.dy.same_as(d.dy0)) return "changed_input(dy)";
  if (p.opt.dir != direction::fwd_training)
    for (size_t c = 0; c < d.given_mean.size(); ++c)
      if (d.mean[c] != static_cast<float>(d.given_mean[c]) ||
          d.var[c] != static_cast<float>(d.given_var[c]))
        return "changed_input(mean/var)";
  return "";
}

// Fills the outputs with NaN (the mask with a pattern) so that values the library does not
// write cannot pass.
void poison_outputs(const problem& p, const problem_data& d) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (p.opt.dir == direction::backward) {
    if (!p.opt.inplace) d.dx.fill(nan);
    d.dgamma.fill(nan);
    d.dbeta.fill(nan);
    return;
  }
  if (!p.opt.inplace) d.y.fill(nan);
  if (p.opt.dir == direction::fwd_training) {
    d.mean.fill(nan);
    d.var.fill(nan);
    if (p.opt.relu) d.mask.fill(0xa5);
  }
}

// ---------------------------------------------------------------------------------------
// Performance

// Time of the kernel and of a non-temporal copy that moves as many bytes: forward reads S
// and writes S bytes, backward reads 2S and writes S (S = the tensor's bytes).
std::string measure_performance(const problem& p, const problem_data& d) {
  const int reps = p.opt.reps;
  const timing kernel = time_calls(
      reps, [&] { restore_inputs(p, d); }, [&] { call_library(p, d); });

  const double tensor_bytes = static_cast<double>(d.elements) * sizeof(float);
  const double bytes = tensor_bytes * (p.opt.dir == direction::backward ? 3 : 2);
  const int64_t copy_floats = (static_cast<int64_t>(bytes / 2 / sizeof(float)) + 15) / 16 * 16;
  const aligned_array<float> from(copy_floats), to(copy_floats);
  from.fill(1.0f);
  const timing copy = time_calls(
      reps, [] {}, [&] { nontemporal_copy(to.data(), from.data(), copy_floats); });

  char text[200];
  std::snprintf(text, sizeof text,
                "threads %d min %.4g ms med %.4g ms %.3g GB/s copy %.4g ms copy_ratio %.2f",
                omp_get_max_threads(), kernel.min_seconds * 1e3, kernel.median_seconds * 1e3,
                bytes / kernel.min_seconds / 1e9, copy.min_seconds * 1e3,
                kernel.min_seconds / copy.min_seconds);
  return text;
}

// ---------------------------------------------------------------------------------------

enum class outcome { passed = 0, failed = 1, error = 2 };

std::string problem_label(const problem& p) {
  std::string label = direction_name(p.opt.dir);
  label += p.opt.layout == BNORM_NCHW ? " nchw" : " nhwc";
  if (p.opt.relu) label += " relu";
  if (p.opt.global_stats) label += " global_stats";
  if (p.opt.inplace) label += " inplace";
  return label + " " + to_string(p.desc);
}

// Runs one problem and prints its line.
outcome run_problem(const problem& p, int default_threads) {
  omp_set_num_threads(p.opt.threads > 0 ? p.opt.threads : default_threads);
  std::string line = problem_label(p) + ":";
  outcome result = outcome::passed;
  try {
    const problem_data d = make_problem_data(p);
    if (p.opt.mode != run_mode::performance) {
      poison_outputs(p, d);
      call_library(p, d);
      check_result check =
          p.opt.dir == direction::backward ? check_backward(p, d) : check_forward(p, d);
      check.stray_write = find_stray_write(p, d);
      line += " " + check.text();
      if (!check.passed()) result = outcome::failed;
      restore_inputs(p, d);
    }
    if (p.opt.mode != run_mode::correctness) {
      if (p.opt.mode == run_mode::both) line += " |";
      line += " " + measure_performance(p, d);
    }
  } catch (const problem_error& e) {
    line += std::string(" ERROR ") + e.what();
    result = outcome::error;
  } catch (const std::bad_alloc&) {
    line += " ERROR out of memory";
    result = outcome::error;
  }
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  return result;
}

int run(int argc, char** argv) {
  argument_parser args;
  try {
    for (int i = 1; i < argc; ++i) args.parse_word(argv[i], "", "");
    if (args.help) {
      std::fputs(usage, stdout);
      return 0;
    }
    if (args.problems.empty()) throw usage_error("no problem given (try --help)");
  } catch (const usage_error& e) {
    std::fprintf(stderr, "bnorm-run: %s\n", e.what());
    return 2;
  }

  // Before the library's first call, which picks the instruction set.
  if (!args.isa.empty()) setenv("BNORM_ISA", args.isa.c_str(), 1);
  const std::string isa = bnorm_isa();
  if (!args.isa.empty() && isa != args.isa)
    std::fprintf(stderr, "bnorm-run: warning: --isa=%s requested, the library uses %s\n",
                 args.isa.c_str(), isa.c_str());
  const int default_threads = omp_get_max_threads();
  // Timings mean little while other processes compete for the cores: show the load.
  double load = 0;
  getloadavg(&load, 1);
  std::printf("# bnorm-run isa=%s threads=%d tolerance=%.0e load=%.2f\n", isa.c_str(),
              default_threads, tolerance, load);

  int count[3] = {};  // by outcome
  for (const problem& p : args.problems) ++count[static_cast<int>(run_problem(p, default_threads))];
  const int passed = count[0], failed = count[1], errors = count[2];
  std::printf("# %zu problem%s: %d passed, %d failed, %d errors\n", args.problems.size(),
              args.problems.size() == 1 ? "" : "s", passed, failed, errors);
  return errors ? 3 : failed ? 1 : 0;
}

}  // namespace
}  // namespace driver

int main(int argc, char** argv) { return driver::run(argc, argv); }
