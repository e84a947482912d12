// Helpers shared by the JSON-lines benchmarks (bench_memory, bench_throughput): flag
// parsing, the token generator shared with benchmarks/reference/, JSON lines, affine fits.
// Not part of the library.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include <ssmx/config.hpp>
#include <ssmx/nn/embedding.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench_util {

using ssmx::index_t;

// "4096", "4K" (x1024), "1M" (x1048576).
inline index_t parse_count(const std::string& s) {
  if (s.empty()) throw std::invalid_argument("empty number");
  index_t mult = 1;
  std::string digits = s;
  const char last = s.back();
  if (last == 'K' || last == 'k') mult = 1024, digits.pop_back();
  if (last == 'M' || last == 'm') mult = 1024 * 1024, digits.pop_back();
  std::size_t used = 0;
  const long long v = std::stoll(digits, &used);
  if (used != digits.size() || v <= 0) throw std::invalid_argument("not a positive count: " + s);
  return index_t(v) * mult;
}

inline std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

inline std::vector<index_t> parse_counts(const std::string& s) {
  std::vector<index_t> out;
  for (const auto& t : split(s)) out.push_back(parse_count(t));
  return out;
}

inline double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 16.0 * double(1ull << 30);
}

inline int threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The token stream shared with benchmarks/reference/diagonal_ssm.py:
//   x_t = (7t + 3) mod vocab,  target_t = x_{t+1} = (7(t+1) + 3) mod vocab  (t = 0..T-1).
struct Tokens {
  std::vector<ssmx::nn::token_t> inputs, targets;
  Tokens(index_t T, index_t vocab) : inputs(static_cast<std::size_t>(T)), targets(static_cast<std::size_t>(T)) {
    for (index_t t = 0; t < T; ++t) {
      inputs[std::size_t(t)] = ssmx::nn::token_t((7 * t + 3) % vocab);
      targets[std::size_t(t)] = ssmx::nn::token_t((7 * (t + 1) + 3) % vocab);
    }
  }
};

// Writes each line to stdout (flushed, so long runs show progress) and to a file.
class Sink {
 public:
  explicit Sink(const std::string& path) {
    if (!path.empty()) {
      file_.open(path, std::ios::out | std::ios::trunc);
      if (!file_) throw std::runtime_error("cannot open --out file " + path);
    }
  }
  void line(const std::string& s) {
    std::cout << s << std::endl;
    if (file_.is_open()) file_ << s << std::endl;
  }

 private:
  std::ofstream file_;
};

inline std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.10g", v);
  return b;
}

// Least-squares line y = a + b·x; with one point, the line through the origin (an upper
// bound for an affine cost with a non-negative intercept).
struct Affine {
  double a = 0, b = 0;
  double operator()(double x) const { return a + b * x; }
};
inline Affine fit(const std::vector<double>& x, const std::vector<double>& y) {
  const std::size_t n = x.size();
  if (n == 0) return {};
  if (n == 1) return {0.0, y[0] / x[0]};
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (std::size_t i = 0; i < n; ++i) sx += x[i], sy += y[i], sxx += x[i] * x[i], sxy += x[i] * y[i];
  const double dn = double(n), den = dn * sxx - sx * sx;
  if (den == 0) return {0.0, sy / sx};
  const double b = (dn * sxy - sx * sy) / den;
  return {(sy - b * sx) / dn, b};
}

}  // namespace bench_util
