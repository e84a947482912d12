// ssmx tests — shared helpers. Every tests/unit/*.cpp includes this first:
//
//     #include "support/test_support.hpp"
//
// The same sources build two binaries:
//   ssmx_tests       g++, SSMX_TEST_CUDA=0, ssmx::test::space == Space::Host
//   ssmx_tests_cuda  nvcc, SSMX_TEST_CUDA=1, ssmx::test::space == Space::Cuda; ALL files are
//                    #included into ONE translation unit (tests/CMakeLists.txt), every case
//                    in doctest suite "gpu".
// Hence the rules for a test file:
//   - File-local helpers live in a namespace named after the file (test_core.cpp ->
//     `namespace test_core { ... }`), never at global or anonymous-namespace scope: in the
//     unity TU they would collide with another file's helpers.
//   - Test case names are unique across all files and start with the area ("core: ...",
//     "scan: ..."). ctest gets one test per case, "cpu: <name>", so avoid ; [ ] * ? \ and
//     commas in names (doctest filters treat , * ? specially).
//   - Host-only tests (Eigen interop, host element access, ...) are guarded with
//     `#if !SSMX_TEST_CUDA`. Tests that hold on both backends use `space`, to_space() and
//     to_host(), and compare on the host.
//   - No file defines DOCTEST_CONFIG_IMPLEMENT*; the mains are support/main.cpp and
//     support/main_cuda.cu. Tests never assert on time.
#pragma once

#ifndef SSMX_TEST_CUDA
#define SSMX_TEST_CUDA 0
#endif

#include <doctest/doctest.h>

#if SSMX_TEST_CUDA
#include <ssmx/cuda.cuh>
#else
#include <ssmx/ssmx.hpp>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#if !SSMX_TEST_CUDA
#include <stdlib.h>  // mkdtemp

#include <filesystem>
#include <system_error>
#endif

namespace ssmx::test {

// The memory space the tests of this binary run in.
inline constexpr Space space = SSMX_TEST_CUDA ? Space::Cuda : Space::Host;

template <class T>
using SpaceTensor = Tensor<T, space>;

// A copy of a host tensor in the test space (a clone on the CPU build).
template <class T>
Tensor<T, space> to_space(const Tensor<T>& h) {
  return ssmx::to_space<space>(h);
}

// A host copy of a tensor in any space.
template <class T, Space S>
Tensor<T> to_host(const Tensor<T, S>& t) {
  return ssmx::to_space<Space::Host>(t);
}

// max_i |a_i - b_i| / max(|a_i|, |b_i|, floor). Elements below `floor` in magnitude are
// compared absolutely, so exact zeros do not blow up the ratio. Different sizes, or a NaN
// on one side only, give +inf; NaN against NaN and equal infinities count as equal.
template <class A, class B>
double max_rel_err(const std::vector<A>& a, const std::vector<B>& b, double floor = 1e-12) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(static_cast<compute_t<A>>(a[i]));
    const double y = static_cast<double>(static_cast<compute_t<B>>(b[i]));
    if (std::isnan(x) || std::isnan(y)) {
      if (std::isnan(x) != std::isnan(y)) return std::numeric_limits<double>::infinity();
      continue;
    }
    if (x == y) continue;  // also equal infinities
    if (std::isinf(x) || std::isinf(y)) return std::numeric_limits<double>::infinity();
    const double scale = std::max({std::fabs(x), std::fabs(y), floor});
    worst = std::max(worst, std::fabs(x - y) / scale);
  }
  return worst;
}

// The same for two tensors in any space (compared on the host; shapes must match).
template <class T, Space S1, class U, Space S2>
double max_rel_err(const Tensor<T, S1>& a, const Tensor<U, S2>& b, double floor = 1e-12) {
  if (a.dims() != b.dims()) return std::numeric_limits<double>::infinity();
  return max_rel_err(to_vector(to_host(a)), to_vector(to_host(b)), floor);
}

// The message of the exception `f` throws as type E; fails the test if it throws nothing.
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("expected an exception");
  return {};
}

inline bool contains(const std::string& text, const std::string& piece) { return text.find(piece) != std::string::npos; }

// A seeded generator: the same seed gives the same numbers on every run (same standard library).
class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0x55a5c0ffeeull) : gen_(seed) {}
  double uniform(double lo = -1.0, double hi = 1.0) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  double normal(double mean = 0.0, double stddev = 1.0) { return std::normal_distribution<double>(mean, stddev)(gen_); }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // in [lo, hi]
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(gen_);
  }
  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

namespace impl {
template <class T, class Draw>
void fill_with(TensorView<T> v, Draw&& draw) {
  Tensor<T> tmp(v.dims(), Tag::Workspace);
  for (index_t i = 0; i < tmp.numel(); ++i) tmp[i] = static_cast<T>(static_cast<compute_t<T>>(draw()));
  copy<T>(v, tmp.view());
}
}  // namespace impl

// Fills a host view (any strides) with U(lo, hi) values, in row-major order.
template <class T>
void fill_uniform(TensorView<T> v, Rng& rng, double lo = -1.0, double hi = 1.0) {
  impl::fill_with(v, [&] { return rng.uniform(lo, hi); });
}
// Fills a host view (any strides) with N(mean, stddev^2) values, in row-major order.
template <class T>
void fill_normal(TensorView<T> v, Rng& rng, double mean = 0.0, double stddev = 1.0) {
  impl::fill_with(v, [&] { return rng.normal(mean, stddev); });
}

// A new host tensor of U(lo, hi) values drawn from a generator seeded with `seed`.
template <class T>
Tensor<T> uniform(const Dims& d, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Tensor<T> t(d);
  Rng rng(seed);
  fill_uniform<T>(t.view(), rng, lo, hi);
  return t;
}
// A new host tensor of N(mean, stddev^2) values drawn from a generator seeded with `seed`.
template <class T>
Tensor<T> normal(const Dims& d, std::uint64_t seed, double mean = 0.0, double stddev = 1.0) {
  Tensor<T> t(d);
  Rng rng(seed);
  fill_normal<T>(t.view(), rng, mean, stddev);
  return t;
}

// The bytes of n elements, for bit-identity checks (NaN-safe, unlike ==).
template <class T>
std::vector<unsigned char> bytes_of(const T* data, index_t n) {
  std::vector<unsigned char> b(std::size_t(n) * sizeof(T));
  if (n) std::memcpy(b.data(), data, b.size());
  return b;
}

#if !SSMX_TEST_CUDA
// A fresh directory under the system temp directory, removed with everything in it
// (permissions restored first, so a test may make it read-only).
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "ssmx_test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    const char* p = ::mkdtemp(tmpl.data());
    REQUIRE(p != nullptr);
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // The names in the directory, sorted: shows that no temporary file was left behind.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  std::string path_;
};
#endif

}  // namespace ssmx::test
