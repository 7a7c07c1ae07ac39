#include "problem_descriptor.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace driver {
namespace {

// Reads the digits at text[pos...] as a positive integer; advances pos past them.
int64_t read_positive_integer(const std::string& text, size_t& pos, const char* key) {
  const std::string expected = std::string("expected a positive integer after '") + key + "'";
  if (pos >= text.size() || !std::isdigit(static_cast<unsigned char>(text[pos])))
    throw descriptor_error(expected);
  int64_t value = 0;
  for (; pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos])); ++pos) {
    if (__builtin_mul_overflow(value, 10, &value) ||
        __builtin_add_overflow(value, text[pos] - '0', &value))
      throw descriptor_error(std::string("'") + key + "' is too large");
  }
  if (value == 0) throw descriptor_error(expected);
  return value;
}

float read_eps(const std::string& text, size_t& pos) {
  const char* begin = text.c_str() + pos;
  char* end = nullptr;
  const float eps = std::strtof(begin, &end);
  if (end == begin) throw descriptor_error("expected a number after 'eps'");
  if (!std::isfinite(eps) || eps < 0) throw descriptor_error("eps must be finite and >= 0");
  pos += static_cast<size_t>(end - begin);
  return eps;
}

}  // namespace

problem_descriptor parse_problem_descriptor(const std::string& text) {
  problem_descriptor d;
  // Zero means "not given" until the spatial rules below have run.
  int64_t mb = 0, ic = 0, id = 0, ih = 0, iw = 0;
  bool have_eps = false;
  struct key {
    const char* text;
    int64_t* value;
  };
  const key keys[] = {{"mb", &mb}, {"ic", &ic}, {"id", &id}, {"ih", &ih}, {"iw", &iw}};

  size_t pos = 0;
  while (pos < text.size()) {
    if (text[pos] == '_') {
      ++pos;
      continue;
    }
    if (text[pos] == 'n') {  // The name is the rest of the text, without quotes.
      d.name = text.substr(pos + 1);
      if (d.name.size() >= 2 && d.name.front() == '"' && d.name.back() == '"')
        d.name = d.name.substr(1, d.name.size() - 2);
      if (d.name.empty()) throw descriptor_error("empty name after 'n'");
      break;
    }
    if (text.compare(pos, 3, "eps") == 0) {
      if (have_eps) throw descriptor_error("'eps' given twice");
      pos += 3;
      d.eps = read_eps(text, pos);
      have_eps = true;
      continue;
    }
    const key* match = nullptr;
    for (const key& k : keys)
      if (text.compare(pos, 2, k.text) == 0) match = &k;
    if (!match)
      throw descriptor_error("unexpected '" + text.substr(pos) +
                             "' (keys are mb, ic, id, ih, iw, eps, n)");
    if (*match->value != 0)
      throw descriptor_error(std::string("'") + match->text + "' given twice");
    pos += 2;
    *match->value = read_positive_integer(text, pos, match->text);
  }

  if (ic == 0) throw descriptor_error("ic is required");
  if (mb != 0) d.mb = mb;
  d.ic = ic;
  // benchdnn's rules (sanitize_desc): the highest spatial size given sets the number of
  // dimensions; a cube or square may be given by its highest size alone.
  if (id != 0) {
    if (ih == 0 && iw == 0) {
      ih = iw = id;
    } else if (ih == 0 || iw == 0) {
      throw descriptor_error("with id, give both ih and iw or neither");
    }
    d.ndims = 5;
  } else if (ih != 0) {
    if (iw == 0) iw = ih;
    d.ndims = 4;
  } else if (iw != 0) {
    d.ndims = 3;
  } else {
    d.ndims = 2;
  }
  d.id = id != 0 ? id : 1;
  d.ih = ih != 0 ? ih : 1;
  d.iw = iw != 0 ? iw : 1;

  // The tensor's byte count must be an int64_t.
  int64_t bytes = sizeof(float);
  for (int64_t size : {d.mb, d.ic, d.id, d.ih, d.iw})
    if (__builtin_mul_overflow(bytes, size, &bytes))
      throw descriptor_error("the tensor has too many elements");
  return d;
}

std::string to_string(const problem_descriptor& d) {
  std::string s = "mb" + std::to_string(d.mb) + "ic" + std::to_string(d.ic);
  if (d.ndims >= 5) s += "id" + std::to_string(d.id);
  if (d.ndims >= 4) s += "ih" + std::to_string(d.ih);
  if (d.ndims >= 3) s += "iw" + std::to_string(d.iw);
  if (d.eps != default_eps) {
    // The shortest spelling that reads back as the same float: "1e-05", not "9.99999975e-06".
    char eps[32];
    for (int digits = 6; digits <= 9; ++digits) {
      std::snprintf(eps, sizeof eps, "%.*g", digits, static_cast<double>(d.eps));
      if (std::strtof(eps, nullptr) == d.eps) break;
    }
    s += std::string("eps") + eps;
  }
  if (!d.name.empty()) s += "_n" + d.name;
  return s;
}

}  // namespace driver
