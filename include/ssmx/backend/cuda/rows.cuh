// ssmx — CUDA backend of the embedding gather, its scatter-add and the arg-max count
// (Rows<Space::Cuda>). Private header: include <ssmx/cuda.cuh> (compiled with nvcc).
//
// Layered as CUB is: Rows<Space::Cuda> (public entry: checks, host-side planning, uploads
// and downloads through the tracked allocator) -> dispatch_* (launch shapes) -> kernels ->
// per-row pieces (FirstMax over cub::BlockReduce).
//
//  - gather: ids are uploaded (n int32); a work item is (row t, tile of `threads` columns),
//    one thread per column: coalesced reads of the table row and writes of the output row.
//  - scatter_add: deterministic without atomics. The host groups the positions by token
//    (nn::group_by_token, a counting sort: distinct tokens ascending, each token's positions
//    ascending) and uploads that CSR in one copy. A work item is (distinct token, column
//    tile); each thread owns one column of one gradient row, starts from its value and adds
//    g[p] for the token's positions p in increasing order. That is the host loop's order
//    exactly, so the result is bit-identical run to run and to Space::Host. No two items
//    touch the same element. A token repeated m times costs its items m dependent adds
//    (the loads are independent and unrolled); rows of distinct tokens run in parallel.
//  - count_correct: one block per row (grid-stride over rows) folds its columns into a
//    (value, index) pair with FirstMax, then cub::BlockReduce combines the threads' pairs.
//    FirstMax keeps the larger value and, on equal values, the lower index: a total order on
//    the pairs (indices are distinct), so the result does not depend on the reduction tree.
//    The n arg-max indices (8 bytes a row, not V logits) go to the host, which compares them
//    with the targets. NaN follows the host loop: a NaN in column 0 enters as +inf (nothing
//    beats it there), a NaN elsewhere as the identity (-inf at index V, never chosen).
// All index math is 64-bit. Work is ordered on cudaStreamPerThread. Uploads and the download
// go through detail::copy_bytes, which synchronises the stream when host memory is involved
// (so the host buffers may be reused once a call returns).
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cuda/std/limits>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "../../core/dtype.hpp"
#include "../../core/memory.hpp"
#include "../../nn/embedding.hpp"
#include "check.cuh"
#include "memory.cuh"

namespace ssmx::backend::cuda_rows {

// ---- per-row pieces -------------------------------------------------------------------------

// A candidate arg-max: a logit (in compute precision) and its column.
template <class V>
struct ArgMax {
  V value;
  index_t index;
};

// The better of two candidates: the larger value; on equal values (also -0 and +0) the
// lower index. Operands are never NaN (see load_candidate).
struct FirstMax {
  template <class V>
  SSMX_HOST_DEVICE ArgMax<V> operator()(const ArgMax<V>& a, const ArgMax<V>& b) const {
    if (b.value > a.value) return b;
    if (a.value > b.value) return a;
    return b.index < a.index ? b : a;
  }
};

// Column v of a row as a candidate, with the host loop's NaN behaviour.
template <class V, class T>
SSMX_DEVICE ArgMax<V> load_candidate(const T* row, index_t v, index_t num_cols) {
  const V x = V(row[v]);
  if (x != x)  // NaN
    return v == 0 ? ArgMax<V>{cuda::std::numeric_limits<V>::infinity(), 0}
                  : ArgMax<V>{-cuda::std::numeric_limits<V>::infinity(), num_cols};
  return {x, v};
}

// ---- kernels --------------------------------------------------------------------------------

// out[t, targets[t]] = 1 for targets[t] >= 0 (out zeroed before), one thread per row.
template <class T>
__global__ void set_ones(const nn::token_t* targets, index_t n, index_t V, T* out) {
  for (index_t t = index_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += index_t(gridDim.x) * blockDim.x)
    if (targets[t] >= 0) out[t * V + index_t(targets[t])] = T(1);
}

// out[t, j] = table[ids[t], j]; item = t * tiles + tile, one thread per column.
template <class T>
__global__ void gather_rows(const nn::token_t* ids, index_t n, const T* table, index_t d, T* out, index_t out_stride,
                            index_t tiles) {
  const index_t items = n * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t t = item / tiles, j = (item % tiles) * index_t(blockDim.x) + threadIdx.x;
    if (j < d) out[t * out_stride + j] = table[index_t(ids[t]) * d + j];
  }
}

// grad[token[k], j] += g[position[p], j] for p in [offset[k], offset[k+1]), p ascending;
// item = k * tiles + tile, one thread per column.
template <class T>
__global__ void scatter_add_groups(const index_t* token, const index_t* offset, const index_t* position, index_t groups,
                                   const T* g, index_t g_stride, T* grad, index_t d, index_t tiles) {
  const index_t items = groups * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t k = item / tiles, j = (item % tiles) * index_t(blockDim.x) + threadIdx.x;
    if (j >= d) continue;
    T* dst = grad + token[k] * d + j;
    T acc = *dst;
    const index_t end = offset[k + 1];
#pragma unroll 4
    for (index_t p = offset[k]; p < end; ++p) acc = T(compute_t<T>(acc) + compute_t<T>(g[position[p] * g_stride + j]));
    *dst = acc;
  }
}

// best[t] = the first arg-max of row t (logits[t * stride + v], v < num_cols).
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    first_argmax_rows(const T* logits, index_t n, index_t num_cols, index_t stride, index_t* best) {
  using V = compute_t<T>;
  using Reduce = cub::BlockReduce<ArgMax<V>, Threads>;
  __shared__ typename Reduce::TempStorage temp;
  const ArgMax<V> identity{-cuda::std::numeric_limits<V>::infinity(), num_cols};
  for (index_t t = blockIdx.x; t < n; t += gridDim.x) {
    const T* row = logits + t * stride;
    ArgMax<V> mine = identity;
    for (index_t v = threadIdx.x; v < num_cols; v += Threads)
      mine = FirstMax{}(mine, load_candidate<V>(row, v, num_cols));
    const ArgMax<V> winner = Reduce(temp).Reduce(mine, FirstMax{});
    if (threadIdx.x == 0) best[t] = winner.index;
    __syncthreads();  // temp is reused by the next row
  }
}

// ---- dispatch -------------------------------------------------------------------------------

// At most this many blocks; kernels stride over the rest of their items.
inline constexpr index_t max_blocks = 65535LL * 8;

// Threads per block for rows of d columns: a whole number of warps, at most 256.
inline int column_threads(index_t d) {
  const index_t warps = std::min<index_t>((d + 31) / 32, 8);
  return int(std::max<index_t>(warps, 1) * 32);
}
inline unsigned grid_for_items(index_t items) { return unsigned(std::clamp<index_t>(items, 1, max_blocks)); }

template <class T>
void dispatch_gather(const nn::token_t* ids, index_t n, const T* table, index_t d, T* out, index_t rs) {
  const int threads = column_threads(d);
  const index_t tiles = (d + threads - 1) / threads;
  gather_rows<<<grid_for_items(n * tiles), threads, 0, cudaStreamPerThread>>>(ids, n, table, d, out, rs, tiles);
  SSMX_CUDA_CHECK_LAUNCH();
}

template <class T>
void dispatch_scatter_add(const index_t* token, const index_t* offset, const index_t* position, index_t groups,
                          const T* g, index_t rs, T* grad, index_t d) {
  const int threads = column_threads(d);
  const index_t tiles = (d + threads - 1) / threads;
  scatter_add_groups<<<grid_for_items(groups * tiles), threads, 0, cudaStreamPerThread>>>(
      token, offset, position, groups, g, rs, grad, d, tiles);
  SSMX_CUDA_CHECK_LAUNCH();
}

template <class T>
void dispatch_first_argmax(const T* logits, index_t n, index_t num_cols, index_t rs, index_t* best) {
  constexpr int threads = 256;
  first_argmax_rows<threads><<<grid_for_items(n), threads, 0, cudaStreamPerThread>>>(logits, n, num_cols, rs, best);
  SSMX_CUDA_CHECK_LAUNCH();
}

}  // namespace ssmx::backend::cuda_rows

namespace ssmx::backend {

template <>
struct Rows<Space::Cuda> {
  template <class T>
  static void gather(const nn::token_t* ids, index_t n, const T* table, index_t d, T* out, index_t rs, index_t cs) {
    require_unit_columns(cs, d, "gather");
    Buffer<nn::token_t> dev_ids(std::size_t(n), Space::Cuda, Tag::Workspace);
    ssmx::detail::copy_bytes(dev_ids.data(), Space::Cuda, ids, Space::Host, std::size_t(n) * sizeof(nn::token_t));
    cuda_rows::dispatch_gather(dev_ids.data(), n, table, d, out, rs);
  }

  template <class T>
  static void scatter_add(const nn::token_t* ids, index_t n, index_t vocab, const T* g, index_t rs, index_t cs,
                          T* table, index_t d) {
    require_unit_columns(cs, d, "scatter_add");
    const nn::TokenGroups groups = nn::group_by_token(ids, n, vocab);
    const index_t u = groups.groups();
    // One upload: [token (u) | offset (u + 1) | position (n)].
    std::vector<index_t> plan;
    plan.reserve(std::size_t(2 * u + 1 + n));
    plan.insert(plan.end(), groups.token.begin(), groups.token.end());
    plan.insert(plan.end(), groups.offset.begin(), groups.offset.end());
    plan.insert(plan.end(), groups.position.begin(), groups.position.end());
    Buffer<index_t> dev(plan.size(), Space::Cuda, Tag::Workspace);
    ssmx::detail::copy_bytes(dev.data(), Space::Cuda, plan.data(), Space::Host, plan.size() * sizeof(index_t));
    cuda_rows::dispatch_scatter_add(dev.data(), dev.data() + u, dev.data() + 2 * u + 1, u, g, rs, table, d);
  }

  template <class T>
  static void one_hot(const nn::token_t* targets, index_t n, index_t V, T* out) {
    ssmx::detail::zero_bytes(out, Space::Cuda, std::size_t(n * V) * sizeof(T));
    Buffer<nn::token_t> dev(std::size_t(n), Space::Cuda, Tag::Workspace);
    ssmx::detail::copy_bytes(dev.data(), Space::Cuda, targets, Space::Host, std::size_t(n) * sizeof(nn::token_t));
    constexpr int block = 256;
    cuda_rows::set_ones<T><<<cuda_rows::grid_for_items((n + block - 1) / block), block, 0, cudaStreamPerThread>>>(
        dev.data(), n, V, out);
    SSMX_CUDA_CHECK_LAUNCH();
  }

  template <class T>
  static index_t count_correct(const T* logits, index_t n, index_t V, index_t rs, index_t cs,
                               const nn::token_t* targets) {
    require_unit_columns(cs, V, "count_correct");
    Buffer<index_t> dev_best(std::size_t(n), Space::Cuda, Tag::Workspace);
    cuda_rows::dispatch_first_argmax(logits, n, V, rs, dev_best.data());
    std::vector<index_t> best(static_cast<std::size_t>(n));
    ssmx::detail::copy_bytes(best.data(), Space::Host, dev_best.data(), Space::Cuda, best.size() * sizeof(index_t));
    index_t correct = 0;
    for (index_t t = 0; t < n; ++t) correct += targets[t] >= 0 && best[std::size_t(t)] == index_t(targets[t]) ? 1 : 0;
    return correct;
  }

 private:
  static void require_unit_columns(index_t cs, index_t d, const char* op) {
    SSMX_REQUIRE(cs == 1 || d <= 1, ShapeError, "Rows<Cuda>::", op, ": rows need unit column stride, got ", cs);
  }
};

}  // namespace ssmx::backend
