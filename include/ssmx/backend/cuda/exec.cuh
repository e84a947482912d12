// ssmx — the CUDA executor: one grid-stride kernel per assignment (the evaluator is
// passed by value), cuBLAS for matrix products, CUB for full reductions and block
// reductions along an axis.
// Private header: include <ssmx/cuda.cuh>.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/device/device_reduce.cuh>
#include <cstddef>

#include "../../expr/evaluator.hpp"
#include "check.cuh"
#include "memory.cuh"

namespace ssmx::gpu {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

inline void cublas_check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(::ssmx::detail::str("cuBLAS call ", call, " failed at ", file, ":", line, ": ", cublas_status_name(s)));
}
#define SSMX_CUBLAS_CHECK(call) ::ssmx::gpu::cublas_check((call), #call, __FILE__, __LINE__)

// One cuBLAS handle per host thread, bound to cudaStreamPerThread.
inline cublasHandle_t cublas_handle() {
  struct Holder {
    cublasHandle_t h = nullptr;
    Holder() {
      require_device();
      SSMX_CUBLAS_CHECK(cublasCreate(&h));
      SSMX_CUBLAS_CHECK(cublasSetStream(h, cudaStreamPerThread));
    }
    ~Holder() {
      if (h) cublasDestroy(h);
    }
  };
  thread_local Holder holder;
  return holder.h;
}

namespace kernels {
struct OutLayout {
  index_t ext[4];
  index_t st[4];
};

template <class T, class Ev>
__global__ void assign(T* out, OutLayout lay, Ev ev, index_t n, bool accumulate) {
  for (index_t lin = index_t(blockIdx.x) * blockDim.x + threadIdx.x; lin < n; lin += index_t(gridDim.x) * blockDim.x) {
    expr::Index4 i;
    index_t r = lin;
    for (int k = 3; k >= 0; --k) {
      i.i[k] = r % lay.ext[k];
      r /= lay.ext[k];
    }
    T* p = out + i.i[0] * lay.st[0] + i.i[1] * lay.st[1] + i.i[2] * lay.st[2] + i.i[3] * lay.st[3];
    if (accumulate)
      *p = T(compute_t<T>(*p) + compute_t<T>(ev.coeff(i)));
    else
      *p = T(ev.coeff(i));
  }
}

template <class Op>
struct CombineOp {
  template <class V>
  __host__ __device__ V operator()(V a, V b) const {
    return Op::combine(a, b);
  }
};

template <class Op, class V>
__global__ void finish(V* out, index_t n) {
  *out = Op::finish(*out, n);
}

// Reductions along one axis of a contiguous x viewed as [outer, L, inner] into [outer, inner].
// Both combine in an order fixed by the shape alone: deterministic run to run.
//
// inner > 1: a block of 32 x 8 threads takes 32 neighbouring columns (coalesced loads);
// row lane y combines rows y, y + 8, ... in order, then the 8 lanes are combined in order.
template <class Op, class V>
__global__ void reduce_columns(const V* x, V* out, index_t outer, index_t L, index_t inner) {
  __shared__ V part[8][33];
  const index_t tiles = (inner + 31) / 32;
  for (index_t b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
    const index_t o = b / tiles, c = (b % tiles) * 32 + threadIdx.x;
    V acc = Op::template init<V>();
    if (c < inner)
      for (index_t l = threadIdx.y; l < L; l += 8) acc = Op::combine(acc, x[(o * L + l) * inner + c]);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < inner) {
      V r = part[0][threadIdx.x];
      for (int y = 1; y < 8; ++y) r = Op::combine(r, part[y][threadIdx.x]);
      out[o * inner + c] = Op::finish(r, L);
    }
    __syncthreads();  // part is reused by the next tile
  }
}

// inner == 1 (the last axis): a block per row, each thread combining a strided part of the
// row in order, then cub::BlockReduce (a fixed tree for a fixed block size).
template <class Op, class V, int Block>
__global__ void reduce_rows(const V* x, V* out, index_t outer, index_t L) {
  using Reduce = cub::BlockReduce<V, Block>;
  __shared__ typename Reduce::TempStorage temp;
  for (index_t o = blockIdx.x; o < outer; o += gridDim.x) {
    V acc = Op::template init<V>();
    for (index_t l = threadIdx.x; l < L; l += Block) acc = Op::combine(acc, x[o * L + l]);
    const V r = Reduce(temp).Reduce(acc, CombineOp<Op>{});
    if (threadIdx.x == 0) out[o] = Op::finish(r, L);
    __syncthreads();  // temp is reused by the next row
  }
}
}  // namespace kernels

inline int grid_for(index_t n, int block) {
  index_t blocks = (n + block - 1) / block;
  const index_t cap = 65535LL * 8;  // grid-stride beyond this
  return int(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

}  // namespace ssmx::gpu

namespace ssmx::backend {

template <>
struct Exec<Space::Cuda> {
  template <class T, class Ev>
  static void run(TensorView<T, Space::Cuda> out, const Ev& ev, bool accumulate) {
    const index_t n = out.numel();
    if (n == 0) return;
    gpu::kernels::OutLayout lay{{1, 1, 1, 1}, {0, 0, 0, 0}};
    const expr::Ext4 e = expr::pad_extents(out.dims());
    for (int k = 0; k < 4; ++k) lay.ext[k] = e[std::size_t(k)];
    for (int k = 0; k < out.rank(); ++k) lay.st[4 - out.rank() + k] = out.stride(k);
    constexpr int block = 256;
    gpu::kernels::assign<<<gpu::grid_for(n, block), block, 0, cudaStreamPerThread>>>(out.data(), lay, ev, n,
                                                                                        accumulate);
    SSMX_CUDA_CHECK_LAUNCH();
  }

  // Row-major c = a x b (+ beta c) through column-major cuBLAS: cᵀ = bᵀ aᵀ.
  template <class V>
  static void gemm(TensorView<const V, Space::Cuda> a, TensorView<const V, Space::Cuda> b,
                   TensorView<V, Space::Cuda> c, V beta) {
    static_assert(std::is_same_v<V, float> || std::is_same_v<V, double>, "gemm: float or double");
    const int m = int(a.extent(0)), k = int(a.extent(1)), n = int(b.extent(1));
    SSMX_REQUIRE(c.stride(1) == 1 || n == 1, ShapeError, "gemm: the output must be row-contiguous");
    auto layout = [](const TensorView<const V, Space::Cuda>& v, cublasOperation_t& op, int& ld) {
      if (v.stride(1) == 1 || v.extent(1) == 1) {
        op = CUBLAS_OP_N;
        ld = int(v.stride(0) > 0 ? v.stride(0) : v.extent(1));
      } else {
        SSMX_REQUIRE(v.stride(0) == 1, ShapeError, "gemm: operand of shape ", v.dims().str(),
                     " is neither row- nor column-contiguous");
        op = CUBLAS_OP_T;
        ld = int(v.stride(1));
      }
      if (ld < 1) ld = 1;
    };
    cublasOperation_t opa, opb;
    int lda, ldb;
    layout(a, opa, lda);
    layout(b, opb, ldb);
    const int ldc = int(c.stride(0) > 0 ? c.stride(0) : n);
    const V one = V(1);
    if constexpr (std::is_same_v<V, float>)
      SSMX_CUBLAS_CHECK(cublasSgemm(gpu::cublas_handle(), opb, opa, n, m, k, &one, b.data(), ldb, a.data(), lda, &beta,
                                    c.data(), ldc > 0 ? ldc : 1));
    else
      SSMX_CUBLAS_CHECK(cublasDgemm(gpu::cublas_handle(), opb, opa, n, m, k, &one, b.data(), ldb, a.data(), lda, &beta,
                                    c.data(), ldc > 0 ? ldc : 1));
  }

  // out = Op over `axis` of x; x and out contiguous, out holding x's extents without the axis.
  template <class Op, class V>
  static void reduce_axis(TensorView<const V, Space::Cuda> x, int axis, TensorView<V, Space::Cuda> out) {
    SSMX_REQUIRE(x.is_contiguous() && out.is_contiguous(), ShapeError, "reduce_axis: operands must be contiguous");
    index_t outer = 1, inner = 1;
    for (int i = 0; i < axis; ++i) outer *= x.extent(i);
    for (int i = axis + 1; i < x.rank(); ++i) inner *= x.extent(i);
    const index_t L = x.extent(axis);
    SSMX_REQUIRE(out.numel() == outer * inner, ShapeError, "reduce_axis: ", out.numel(), " outputs for ",
                 x.dims().str(), " reduced along axis ", axis);
    if (outer * inner == 0) return;
    constexpr index_t cap = 65535LL * 8;
    if (inner == 1) {
      constexpr int block = 256;
      const int grid = int(outer < cap ? outer : cap);
      gpu::kernels::reduce_rows<Op, V, block><<<grid, block, 0, cudaStreamPerThread>>>(x.data(), out.data(), outer, L);
    } else {
      const index_t tiles = outer * ((inner + 31) / 32);
      const int grid = int(tiles < cap ? tiles : cap);
      gpu::kernels::reduce_columns<Op, V><<<grid, dim3(32, 8), 0, cudaStreamPerThread>>>(x.data(), out.data(), outer,
                                                                                          L, inner);
    }
    SSMX_CUDA_CHECK_LAUNCH();
  }

  // out[0] = Op over all of x (contiguous) with cub::DeviceReduce (deterministic run to run).
  template <class Op, class V>
  static void reduce_all(TensorView<const V, Space::Cuda> x, TensorView<V, Space::Cuda> out) {
    const index_t n = x.numel();
    std::size_t temp_bytes = 0;
    SSMX_CUDA_CHECK(cub::DeviceReduce::Reduce(nullptr, temp_bytes, x.data(), out.data(), n,
                                              gpu::kernels::CombineOp<Op>{}, Op::template init<V>(),
                                              cudaStreamPerThread));
    Buffer<std::byte> temp(temp_bytes, Space::Cuda, Tag::Workspace);
    SSMX_CUDA_CHECK(cub::DeviceReduce::Reduce(temp.data(), temp_bytes, x.data(), out.data(), n,
                                              gpu::kernels::CombineOp<Op>{}, Op::template init<V>(),
                                              cudaStreamPerThread));
    gpu::kernels::finish<Op, V><<<1, 1, 0, cudaStreamPerThread>>>(out.data(), n);
    SSMX_CUDA_CHECK_LAUNCH();
  }
};

}  // namespace ssmx::backend
