// Helpers shared by the JSON-lines benchmarks (bench_memory, bench_throughput): the flags
// both take (CLI11), the token generator shared with benchmarks/reference/, JSON lines,
// affine fits. Not part of the library.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>

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

// ---- flags --------------------------------------------------------------------------

// The flags both benchmarks take; each benchmark's Options derives from this.
struct CommonOptions {
  std::vector<index_t> T = {1024, 4096, 16384, 65536, 262144};
  std::vector<std::string> strategies = {"backprop", "checkpointed", "adjoint", "truncated"};
  index_t vocab = 256;
  index_t chunk = 256;    // Adjoint chunk
  index_t shard = 64;     // Adjoint / TruncatedAdjoint VJP shard
  index_t window = 1024;  // TruncatedAdjoint T̄
  std::uint64_t seed = 0;
  double mem_limit_gib = 0;    // 0: 3/4 of physical memory
  double max_run_seconds = 0;  // 0: no limit
  std::string out;
};

// CLI11 transform: rewrites "4K" as "4096" before CLI11 converts the value, so counts and
// lists of counts accept the suffixes. An error message (not an exception) makes CLI11
// report it against the flag.
inline CLI::Validator count_suffixes() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        try {
          s = std::to_string(parse_count(s));
          return {};
        } catch (const std::exception&) {
          return "not a positive count (e.g. 4096, 4K, 1M): " + s;
        }
      },
      "", "count");
}

inline CLI::Option* add_count(CLI::App& app, const std::string& flag, index_t& v, const std::string& help) {
  return app.add_option(flag, v, help)->transform(count_suffixes())->type_name("N")->capture_default_str();
}

// A comma-separated list of counts; `shown` is the default as --help prints it (option_text
// replaces CLI11's "LIST:... ..." for vectors).
inline CLI::Option* add_counts(CLI::App& app, const std::string& flag, std::vector<index_t>& v,
                               const std::string& help, const std::string& shown) {
  return app.add_option(flag, v, help)->delimiter(',')->transform(count_suffixes())->option_text("LIST=" + shown);
}

inline void add_common_options(CLI::App& app, CommonOptions& o) {
  app.get_formatter()->column_width(34);
  app.footer("Counts take K = 1024 and M = 1048576 suffixes: --T 1K,4K,1M.");
  add_counts(app, "--T", o.T, "sequence lengths", "1K,4K,16K,64K,256K");
  app.add_option("--strategies", o.strategies, "of backprop,checkpointed,adjoint,truncated")
      ->delimiter(',')
      ->check(CLI::IsMember({"backprop", "checkpointed", "adjoint", "truncated"}))
      ->option_text("LIST=all four");
  add_count(app, "--chunk", o.chunk, "Adjoint chunk length");
  add_count(app, "--shard", o.shard, "VJP shard length of Adjoint/TruncatedAdjoint");
  add_count(app, "--window", o.window, "TruncatedAdjoint window T-bar");
  add_count(app, "--vocab", o.vocab, "vocabulary size");
  app.add_option("--seed", o.seed, "parameter seed")->type_name("N")->capture_default_str();
  app.add_option("--mem-limit-gib", o.mem_limit_gib, "skip runs whose predicted peak exceeds X GiB (0: 3/4 of RAM)")
      ->type_name("X")
      ->capture_default_str();
  app.add_option("--max-run-seconds", o.max_run_seconds, "skip runs predicted to take longer (0: no limit)")
      ->type_name("S")
      ->capture_default_str();
  app.add_option("--out", o.out, "also write the JSON lines to FILE")->type_name("FILE");
}

// Lengths run in increasing order (the fits extrapolate upwards), each once.
inline void sort_unique(std::vector<index_t>& v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
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
