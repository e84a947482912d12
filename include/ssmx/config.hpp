// ssmx — configuration: version, the host/device macro, the index type.
#pragma once

#include <cstdint>

#define SSMX_VERSION_MAJOR 0
#define SSMX_VERSION_MINOR 1
#define SSMX_VERSION_PATCH 0
#define SSMX_VERSION_STRING "0.1.0"

// SSMX_HOST_DEVICE marks the per-token math shared by the CPU and CUDA backends.
// Without nvcc it degrades to plain `inline`, so the CPU build needs no CUDA at all.
#if defined(__CUDACC__)
#define SSMX_HOST_DEVICE __host__ __device__ __forceinline__
#define SSMX_DEVICE __device__ __forceinline__
#define SSMX_HAS_CUDA_COMPILER 1
#else
#define SSMX_HOST_DEVICE inline
#define SSMX_DEVICE inline
#define SSMX_HAS_CUDA_COMPILER 0
#endif

// SSMX_INLINE: a function of the fused scan's inner loops that must be inlined (nested
// lambdas and node trees otherwise leave calls in the loop over registers).
// SSMX_HOST_INLINE: the same for host-only code.
#if defined(__CUDACC__)
#define SSMX_INLINE __host__ __device__ __forceinline__
#define SSMX_HOST_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define SSMX_INLINE inline __attribute__((always_inline))
#define SSMX_HOST_INLINE inline __attribute__((always_inline))
#else
#define SSMX_INLINE inline
#define SSMX_HOST_INLINE inline
#endif
// The same for a lambda: [&](int i) SSMX_LAMBDA_INLINE { ... }.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define SSMX_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SSMX_LAMBDA_INLINE
#endif

namespace ssmx {

// 64-bit signed indices everywhere: T x channels routinely exceeds 2^31 for long contexts.
using index_t = std::int64_t;

struct Version {
  int major, minor, patch;
};
inline constexpr Version version{SSMX_VERSION_MAJOR, SSMX_VERSION_MINOR, SSMX_VERSION_PATCH};

}  // namespace ssmx
