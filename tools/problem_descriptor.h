// A batch-normalization problem as benchdnn writes it: "mb32ic256ih56iw56".
#ifndef BNORM_TOOLS_PROBLEM_DESCRIPTOR_H
#define BNORM_TOOLS_PROBLEM_DESCRIPTOR_H

#include <cstdint>
#include <stdexcept>
#include <string>

namespace driver {

// benchdnn's default epsilon for batch normalization.
constexpr float default_eps = 1.0f / 16;

struct problem_descriptor {
  int64_t mb = 2;
  int64_t ic = 0;
  // Spatial sizes; ndims says which are part of the problem: 2 = (N, C), 3 = W, 4 = H, W,
  // 5 = D, H, W. Sizes outside the problem are 1.
  int64_t id = 1, ih = 1, iw = 1;
  int ndims = 2;
  float eps = default_eps;
  std::string name;

  int64_t spatial() const { return id * ih * iw; }
};

struct descriptor_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parses benchdnn's canonical form mbXicXidXihXiwXepsY_nNAME ('_' is ignored, keys in any
// order, mb defaults to 2, eps to 1/16, ic is required; see docs/bnorm-run.md for the rules
// on missing spatial sizes). Throws descriptor_error with the reason, without the text.
problem_descriptor parse_problem_descriptor(const std::string& text);

// The canonical spelling: every size of the problem's dimensions, eps only if not the
// default, "_n" + name if named. parse(to_string(d)) == d.
std::string to_string(const problem_descriptor& d);

}  // namespace driver

#endif  // BNORM_TOOLS_PROBLEM_DESCRIPTOR_H
