// The machine's limits for this build, the denominators of the roofline fractions in
// RESULTS.md: single-precision GEMM through Eigen (what the engine's matrix products use,
// with the same flags and threads) and memcpy bandwidth over buffers far larger than the
// caches, split over the same OpenMP threads.
//
//   bench_peak [--n 1024] [--bytes 512M] [--repeats 5] [--out FILE]
//
// Output, JSON lines: {"name":"peak_sgemm","n","threads","seconds","gflop_per_s"} (2 n^3
// FLOPs per product, the fastest of --repeats) and {"name":"peak_memcpy","bytes","threads",
// "seconds","gb_per_s"} (bytes read + bytes written per copy, the fastest).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <Eigen/Core>

#include "bench_util.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using bench_util::num;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_peak: SGEMM GFLOP/s and memcpy GB/s of this build on this machine."};
  ssmx::index_t n = 1024, bytes = ssmx::index_t(512) << 20, repeats = 5;
  std::string out;
  bench_util::add_count(app, "--n", n, "GEMM size (n x n times n x n)");
  bench_util::add_count(app, "--bytes", bytes, "memcpy buffer size");
  bench_util::add_count(app, "--repeats", repeats, "runs of each; the fastest is reported");
  app.add_option("--out", out, "also append the JSON lines to FILE");
  CLI11_PARSE(app, argc, argv);
  bench_util::Sink sink(out);
  const int threads = bench_util::threads();

  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Mat a = Mat::Random(n, n), b = Mat::Random(n, n);
  Mat c(n, n);
  c.noalias() = a * b;  // warm-up
  double best = 1e30;
  for (ssmx::index_t r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    c.noalias() = a * b;
    best = std::min(best, seconds_since(t0));
  }
  sink.line("{\"name\":\"peak_sgemm\",\"n\":" + std::to_string(n) + ",\"threads\":" + std::to_string(threads) +
            ",\"seconds\":" + num(best) + ",\"gflop_per_s\":" + num(2.0 * double(n) * double(n) * double(n) / best / 1e9) +
            ",\"check\":" + num(double(c(0, 0))) + "}");

  std::vector<char> src(std::size_t(bytes), 1), dst(std::size_t(bytes), 0);
  auto copy = [&] {
#if defined(_OPENMP)
#pragma omp parallel
    {
      const std::size_t parts = std::size_t(omp_get_num_threads()), k = std::size_t(omp_get_thread_num());
      const std::size_t begin = src.size() * k / parts, end = src.size() * (k + 1) / parts;
      std::memcpy(dst.data() + begin, src.data() + begin, end - begin);
    }
#else
    std::memcpy(dst.data(), src.data(), src.size());
#endif
  };
  copy();  // first touch
  best = 1e30;
  for (ssmx::index_t r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    copy();
    best = std::min(best, seconds_since(t0));
  }
  sink.line("{\"name\":\"peak_memcpy\",\"bytes\":" + std::to_string(bytes) + ",\"threads\":" +
            std::to_string(threads) + ",\"seconds\":" + num(best) +
            ",\"gb_per_s\":" + num(2.0 * double(bytes) / best / 1e9) + ",\"check\":" + std::to_string(int(dst[7])) + "}");
  return 0;
}
