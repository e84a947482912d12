// ssmx — CUDA status checking. Internals check every runtime call and every launch with
// file and line; the edge converts a failure into ssmx::DeviceError (or OutOfMemoryError).
// Private header: include <ssmx/cuda.cuh>.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

#include "../../core/error.hpp"

namespace ssmx::gpu {

// Throws DeviceError naming the call, the CUDA error and the source location.
inline void throw_on_error(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a sticky non-fatal error so later calls start clean
  throw DeviceError(detail::str("CUDA call ", call, " failed at ", file, ":", line, ": ", cudaGetErrorName(status),
                                " (", cudaGetErrorString(status), ")"));
}

// For destructors and other noexcept paths: logs instead of throwing.
inline void log_on_error(cudaError_t status, const char* call, const char* file, int line) noexcept {
  if (status != cudaSuccess)
    std::fprintf(stderr, "ssmx: CUDA call %s failed at %s:%d: %s\n", call, file, line, cudaGetErrorString(status));
}

}  // namespace ssmx::gpu

#define SSMX_CUDA_CHECK(call) ::ssmx::gpu::throw_on_error((call), #call, __FILE__, __LINE__)
#define SSMX_CUDA_LOG(call) ::ssmx::gpu::log_on_error((call), #call, __FILE__, __LINE__)
// After a kernel launch: catches launch-configuration errors without synchronising.
#define SSMX_CUDA_CHECK_LAUNCH() ::ssmx::gpu::throw_on_error(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
