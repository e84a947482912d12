// Benchmark of the CUDA linear scan and its reverse (float), against a device-to-device copy.
//
// Napkin math: the forward scan reads a and b and writes h, 3 N sizeof(T) bytes for
// N = batch * time * channels (the reverse: a, g -> delta, the same). The limit is
// cudaMemcpy device-to-device of 1.5 N elements: 1.5 N read + 1.5 N written = the same
// 3 N sizeof(T) bytes, timed in the same iteration. The walk and device_scan algorithms
// move 3 N; the chunked one (few lanes, long time) reads a and b twice: 5 N, so expect a
// ratio <= 0.6 there. Times come from cudaEvents on cudaStreamPerThread (manual time).
// Counters: elements/s, bytes/s, copy_bytes/s, ratio = bytes/s / copy_bytes/s.
// Without a GPU it prints a reason and exits 0.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>
#include <vector>

#include <ssmx/cuda.cuh>
#include <ssmx/backend/cuda/scan.cuh>
#include <ssmx/scan/scan.hpp>

namespace bench_scan_cuda {

using ssmx::Dims;
using ssmx::index_t;
using ssmx::Space;
using DTensor = ssmx::Tensor<float, Space::Cuda>;

struct Shape3 {
  index_t batch, time, channels;
};

inline std::vector<Shape3> shapes() {
  return {
      {8, 1024, 4096}, {8, 4096, 4096}, {32, 4096, 1024}, {4, 65536, 256},  // many channels
      {1, 1 << 24, 1}, {1, 1 << 26, 1}, {4, 1 << 24, 1},                    // one long channel per batch
      {1, 1 << 22, 16}, {2, 1 << 20, 64}, {1, 1 << 24, 4},                  // few long channels
  };
}

__global__ void fill_kernel(float* p, index_t n, float lo, float hi, unsigned seed) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2654435761u ^ seed;  // cheap hash: values only need to be in range
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = lo + (hi - lo) * float(x & 0xffffff) / float(0x1000000);
  }
}

inline void fill(float* p, index_t n, float lo, float hi, unsigned seed) {
  fill_kernel<<<1024, 256, 0, cudaStreamPerThread>>>(p, n, lo, hi, seed);
  SSMX_CUDA_CHECK_LAUNCH();
}

template <bool Reverse>
void BM_scan_cuda(benchmark::State& state, Shape3 s) {
  const Dims d{s.batch, s.time, s.channels};
  const index_t n = d.numel();
  DTensor a(d), b(d), h(d);
  ssmx::Buffer<float> src(std::size_t(n) * 3 / 2, Space::Cuda, ssmx::Tag::Workspace);
  ssmx::Buffer<float> dst(std::size_t(n) * 3 / 2, Space::Cuda, ssmx::Tag::Workspace);
  fill(a.data(), n, 0.9f, 0.999f, 1);
  fill(b.data(), n, -1.f, 1.f, 2);
  fill(src.data(), index_t(src.size()), -1.f, 1.f, 3);
  cudaEvent_t e0, e1, e2;
  SSMX_CUDA_CHECK(cudaEventCreate(&e0));
  SSMX_CUDA_CHECK(cudaEventCreate(&e1));
  SSMX_CUDA_CHECK(cudaEventCreate(&e2));
  auto scan = [&] {
    if constexpr (Reverse)
      ssmx::reverse_linear_scan(a.view(), b.view(), h.view());
    else
      ssmx::linear_scan(a.view(), b.view(), h.view());
  };
  scan();  // warm-up: pool allocation of temporaries, module load
  SSMX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  double scan_ms = 0, copy_ms = 0;
  for (auto _ : state) {
    SSMX_CUDA_CHECK(cudaEventRecord(e0, cudaStreamPerThread));
    scan();
    SSMX_CUDA_CHECK(cudaEventRecord(e1, cudaStreamPerThread));
    SSMX_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(float), cudaMemcpyDeviceToDevice,
                                    cudaStreamPerThread));
    SSMX_CUDA_CHECK(cudaEventRecord(e2, cudaStreamPerThread));
    SSMX_CUDA_CHECK(cudaEventSynchronize(e2));
    float t_scan = 0, t_copy = 0;
    SSMX_CUDA_CHECK(cudaEventElapsedTime(&t_scan, e0, e1));
    SSMX_CUDA_CHECK(cudaEventElapsedTime(&t_copy, e1, e2));
    state.SetIterationTime(double(t_scan) * 1e-3);
    scan_ms += t_scan;
    copy_ms += t_copy;
  }
  SSMX_CUDA_LOG(cudaEventDestroy(e0));
  SSMX_CUDA_LOG(cudaEventDestroy(e1));
  SSMX_CUDA_LOG(cudaEventDestroy(e2));
  const double bytes = 3.0 * double(n) * sizeof(float);
  const double iters = double(state.iterations());
  state.counters["elements/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1024);
  state.counters["copy_bytes/s"] = benchmark::Counter(copy_ms > 0 ? bytes * iters / (copy_ms * 1e-3) : 0,
                                                      benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  state.counters["ratio"] = scan_ms > 0 ? copy_ms / scan_ms : 0;  // same bytes: time ratio
}

inline std::string name(const char* what, const Shape3& s) {
  return std::string(what) + "/batch:" + std::to_string(s.batch) + "/time:" + std::to_string(s.time) +
         "/channels:" + std::to_string(s.channels);
}

inline void register_all() {
  for (const Shape3& s : shapes()) {
    benchmark::RegisterBenchmark(name("cuda_linear_scan<float>", s).c_str(), BM_scan_cuda<false>, s)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(name("cuda_reverse_linear_scan<float>", s).c_str(), BM_scan_cuda<true>, s)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace bench_scan_cuda

int main(int argc, char** argv) {
  if (!ssmx::gpu::device_available()) {
    std::printf("bench_scan_cuda: skipped, no CUDA device\n");
    return 0;
  }
  bench_scan_cuda::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
