// Benchmark of the CPU linear scan and its reverse (float), against a copy of the same bytes.
//
// Napkin math: the forward scan reads a and b and writes h: 3 * N * sizeof(T) bytes for
// N = batch * time * channels elements, one multiply-add per element (memory bound). The
// reverse reads a and g and writes delta: the same bytes.
// The limit ("copy") moves the same bytes with memcpy: 1.5 N elements read and 1.5 N
// written (3 N * sizeof(T) bytes of traffic), split over the same OpenMP threads. Both
// count only the bytes the program asks for; memcpy's streaming stores skip the
// read-for-ownership that the scan's ordinary stores to h pay, so ratio ~1 is the ceiling.
//
// Counters: elements/s, bytes/s (3 N sizeof(T) per iteration), copy_bytes/s (measured in
// the same run on the same buffers), ratio = bytes/s / copy_bytes/s.
// Shapes run from 2^20 to 2^26 elements; set SSMX_BENCH_LARGE=1 for 2^27 and 2^28 (3 GiB).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <ssmx/scan/scan.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench_scan {

using ssmx::Dims;
using ssmx::index_t;
using ssmx::Tensor;

struct Shape3 {
  index_t batch, time, channels;
};

// Many channels (a [P, N] state per token, flattened) and a few long channels.
inline std::vector<Shape3> shapes() {
  std::vector<Shape3> s = {
      {4, 256, 1024},      {16, 1024, 1024},  {16, 4096, 1024}, {8, 2048, 4096},   // many channels
      {1, 1 << 20, 1},     {1, 1 << 24, 1},   {4, 1 << 24, 1},   {2, 1 << 22, 4},   // long channels
      {1, 1 << 16, 16},    {4, 1 << 20, 16},
  };
  const char* large = std::getenv("SSMX_BENCH_LARGE");
  if (large && std::string(large) == "1") {
    s.push_back({8, 4096, 4096});    // 2^27
    s.push_back({16, 4096, 4096});   // 2^28
    s.push_back({1, 1 << 28, 1});    // 2^28
  }
  return s;
}

template <class T>
void fill_parallel(T* p, index_t n, std::uint64_t seed, double lo, double hi) {
#if defined(_OPENMP)
#pragma omp parallel
#endif
  {
#if defined(_OPENMP)
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int nt = 1, id = 0;
#endif
    const index_t begin = n * id / nt, end = n * (id + 1) / nt;
    std::mt19937_64 rng(seed + std::uint64_t(id));
    std::uniform_real_distribution<double> u(lo, hi);
    for (index_t i = begin; i < end; ++i) p[i] = T(u(rng));
  }
}

// memcpy of `bytes`, split over the threads as the scan is.
inline void parallel_copy(void* dst, const void* src, std::size_t bytes) {
#if defined(_OPENMP)
#pragma omp parallel
  {
    const std::size_t nt = std::size_t(omp_get_num_threads()), id = std::size_t(omp_get_thread_num());
    const std::size_t begin = bytes * id / nt / 64 * 64, end = id + 1 == nt ? bytes : bytes * (id + 1) / nt / 64 * 64;
    std::memcpy(static_cast<char*>(dst) + begin, static_cast<const char*>(src) + begin, end - begin);
  }
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Seconds of one copy moving 3 N sizeof(T) bytes (1.5 N elements read, 1.5 N written).
template <class T>
double time_copy(T* dst, const T* src, index_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  parallel_copy(dst, src, std::size_t(n) * sizeof(T) * 3 / 2);
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Each iteration times one scan (the reported, manual time) and then one copy of the same
// bytes, so that the ratio compares the two under the same machine conditions.
template <class T, bool Reverse>
void BM_scan(benchmark::State& state, Shape3 s) {
  const Dims d{s.batch, s.time, s.channels};
  const index_t n = d.numel();
  Tensor<T> a(d), b(d), h(d);
  fill_parallel(a.data(), n, 1, 0.9, 0.999);
  fill_parallel(b.data(), n, 2, -1.0, 1.0);
  fill_parallel(h.data(), n, 3, 0.0, 1.0);
  std::vector<T> dst(std::size_t(n) * 3 / 2 + 1), src(std::size_t(n) * 3 / 2 + 1);
  fill_parallel(dst.data(), index_t(dst.size()), 4, 0.0, 1.0);
  fill_parallel(src.data(), index_t(src.size()), 5, 0.0, 1.0);

  double scan_seconds = 0, copy_seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    if constexpr (Reverse)
      ssmx::reverse_linear_scan(a.view(), b.view(), h.view());
    else
      ssmx::linear_scan(a.view(), b.view(), h.view());
    benchmark::DoNotOptimize(h.data());
    benchmark::ClobberMemory();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(t);
    scan_seconds += t;
    copy_seconds += time_copy(dst.data(), src.data(), n);
  }
  const double bytes = 3.0 * double(n) * sizeof(T);
  const double iters = double(state.iterations());
  state.counters["elements/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1024);
  state.counters["copy_bytes/s"] = benchmark::Counter(copy_seconds > 0 ? bytes * iters / copy_seconds : 0,
                                                      benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  state.counters["ratio"] = scan_seconds > 0 ? copy_seconds / scan_seconds : 0;  // same bytes: time ratio
}

inline std::string name(const char* what, const Shape3& s) {
  return std::string(what) + "/batch:" + std::to_string(s.batch) + "/time:" + std::to_string(s.time) +
         "/channels:" + std::to_string(s.channels);
}

inline bool register_all() {
  for (const Shape3& s : shapes()) {
    benchmark::RegisterBenchmark(name("linear_scan<float>", s).c_str(), BM_scan<float, false>, s)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime();
    benchmark::RegisterBenchmark(name("reverse_linear_scan<float>", s).c_str(), BM_scan<float, true>, s)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime();
  }
  return true;
}
const bool registered = register_all();

}  // namespace bench_scan

BENCHMARK_MAIN();
