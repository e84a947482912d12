// ssmx — device memory for Space::Cuda through the tracked allocator. Including this header
// (via <ssmx/cuda.cuh>) installs the CUDA raw allocator. Allocations are served from a
// caching pool (cudaMallocAsync's default pool on the current device) so per-chunk
// workspaces in the hot loop do not hit cudaMalloc.
// Private header: include <ssmx/cuda.cuh>.
#pragma once

#include <cuda_runtime.h>

#include "../../core/memory.hpp"
#include "../../core/tensor.hpp"
#include "check.cuh"

namespace ssmx::gpu {

// Throws DeviceError unless a usable CUDA device is present.
inline int require_device() {
  int n = 0;
  cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    throw DeviceError(detail::str("no usable CUDA device: cudaGetDeviceCount returned ",
                                  st == cudaSuccess ? "0 devices" : cudaGetErrorString(st)));
  }
  int dev = 0;
  SSMX_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// True when at least one CUDA device can be used (never throws).
inline bool device_available() noexcept {
  int n = 0;
  cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess) (void)cudaGetLastError();
  return st == cudaSuccess && n > 0;
}

namespace detail {
inline void* device_allocate(std::size_t bytes) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  cudaError_t st = cudaMallocAsync(&p, bytes, cudaStreamPerThread);
  if (st == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    std::size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    throw OutOfMemoryError(bytes, "Cuda", ::ssmx::detail::str(free_b, " bytes free of ", total_b));
  }
  throw_on_error(st, "cudaMallocAsync", __FILE__, __LINE__);
  return p;
}
inline void device_deallocate(void* p, std::size_t) noexcept {
  if (p) SSMX_CUDA_LOG(cudaFreeAsync(p, cudaStreamPerThread));
}
// Copies and zeroing are ordered on cudaStreamPerThread like every ssmx CUDA operation; a
// copy that touches host memory synchronises the stream, so host data may be read (or
// freed) when it returns.
inline void device_copy(void* dst, Space ds, const void* src, Space ss, std::size_t bytes) {
  SSMX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cudaStreamPerThread));
  if (ds == Space::Host || ss == Space::Host) SSMX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
}
inline void device_zero(void* p, Space, std::size_t bytes) {
  SSMX_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cudaStreamPerThread));
}
inline bool install_device_allocator() noexcept {
  ::ssmx::detail::raw_allocator(Space::Cuda) = {&device_allocate, &device_deallocate};
  ::ssmx::detail::raw_transfer() = {&device_copy, &device_zero};
  return true;
}
inline const bool device_allocator_installed = install_device_allocator();
}  // namespace detail

}  // namespace ssmx::gpu
