// ssmx — CUDA backend of the linear scan and its adjoint (ScanImpl<Space::Cuda>).
// Private header: include <ssmx/cuda.cuh> (compiled with nvcc).
//
// Layered as CUB is: ScanImpl (public entry: sizes and allocates temporaries through the
// tracked allocator) -> DispatchLinearScan (chooses the algorithm, answers CUB's two-phase
// temporary-storage query, launches) -> kernels built from per-thread pieces.
//
// Both directions are one walk over time of an affine state s:
//   forward  (Step::Recurrence, time ascending):   s = a_t s + b_t;   h_t = s
//   reverse  (Step::Adjoint,    time descending):  δ_t = g_t + s;     s = a_t δ_t
// Each step is the affine map s -> x s + y with (x, y) = (a_t, b_t) resp. (a_t, a_t g_t), so
// chunks compose with AffineOp in walking order. Algorithms:
//  - walk: one thread per (batch, channel) lane walks all of time; a warp reads 32
//    consecutive channels per step (coalesced) and each thread loads `unroll` steps ahead
//    so enough bytes are in flight. For many lanes (e.g. batch 8 x 4096 channels).
//  - chunked: for few lanes and long time. Time is cut into chunks so that lanes x chunks
//    fill the GPU: (1) each (lane, chunk) thread composes its chunk's steps into one
//    AffinePair; (2) a forward linear scan over those maps (this dispatch, recursively)
//    gives the state at every chunk boundary; (3) each (lane, chunk) thread re-walks its chunk from that state
//    and writes the output. Reads a and b twice (5 N elements of traffic instead of 3 N).
//  - device_scan: one or a few single-channel lanes of very long time: cub::DeviceScan::
//    InclusiveScan over AffinePair items (a transform iterator builds them from a and b;
//    a tabulate output iterator writes the .b part) with 64-bit item counts; CUB's
//    decoupled look-back makes it a single pass (3 N elements of traffic).
// All index math is 64-bit (index_t). Work is ordered on cudaStreamPerThread; the call
// returns without synchronising (results are stream-ordered like every ssmx CUDA op).
#pragma once

#include <cuda_runtime.h>

#include <cub/device/device_scan.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/tabulate_output_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include <algorithm>
#include <cstddef>

#include "../../core/memory.hpp"
#include "../../scan/scan.hpp"
#include "check.cuh"
#include "memory.cuh"

namespace ssmx::backend::cuda_scan {

using scan::AffineOp;
using scan::AffinePair;
using scan::detail::ScanExtents;
using scan::detail::SeqLayout;

enum class Step { Recurrence, Adjoint };

// One scan call, as the kernels see it (trivially copyable, passed by value).
template <class T>
struct Problem {
  index_t batch, time, channels;
  const T* x;  // a
  SeqLayout lx;
  const T* y;  // b (Recurrence) or g (Adjoint)
  SeqLayout ly;
  T* out;  // h or delta
  SeqLayout lo;
  const T* init;  // h0 or carry_in, [batch, channels] rows of init_stride; may be null
  index_t init_stride;
  T* fin;  // h_final or carry_out; may be null
  index_t fin_stride;
};

// ---- per-thread pieces --------------------------------------------------------------------

// The affine map of one step in walking order.
template <Step K, class T>
SSMX_DEVICE AffinePair<T> step_map(T x, T y) {
  if constexpr (K == Step::Recurrence)
    return {x, y};
  else
    return {x, x * y};
}

// Applies one step to s and returns the output element.
template <Step K, class T>
SSMX_DEVICE T step_apply(T x, T y, T& s) {
  if constexpr (K == Step::Recurrence) {
    s = x * s + y;
    return s;
  } else {
    const T d = y + s;
    s = x * d;
    return d;
  }
}

inline constexpr int unroll = 16;  // steps a thread loads before it computes (bytes in flight)

// Walks steps [t_lo, t_hi) of lane (bi, c) in the step's direction from state s. With
// Write, stores the outputs; without, only advances s. Loads `unroll` steps ahead.
template <Step K, bool Write, class T>
SSMX_DEVICE T walk_range(const Problem<T>& p, index_t bi, index_t c, index_t t_lo, index_t t_hi, T s) {
  const T* x = p.x + p.lx.offset(bi, 0, c);
  const T* y = p.y + p.ly.offset(bi, 0, c);
  T* o = p.out + p.lo.offset(bi, 0, c);
  const index_t sx = p.lx.stride_time, sy = p.ly.stride_time, so = p.lo.stride_time;
  const index_t n = t_hi - t_lo;
  index_t i = 0;
  for (; i + unroll <= n; i += unroll) {
    T xv[unroll], yv[unroll];
#pragma unroll
    for (int k = 0; k < unroll; ++k) {
      const index_t t = K == Step::Recurrence ? t_lo + i + k : t_hi - 1 - i - k;
      xv[k] = x[t * sx];
      yv[k] = y[t * sy];
    }
#pragma unroll
    for (int k = 0; k < unroll; ++k) {
      const T v = step_apply<K>(xv[k], yv[k], s);
      if constexpr (Write) o[(K == Step::Recurrence ? t_lo + i + k : t_hi - 1 - i - k) * so] = v;
    }
  }
  for (; i < n; ++i) {
    const index_t t = K == Step::Recurrence ? t_lo + i : t_hi - 1 - i;
    const T v = step_apply<K>(x[t * sx], y[t * sy], s);
    if constexpr (Write) o[t * so] = v;
  }
  return s;
}

// The composition, in walking order, of the steps [t_lo, t_hi) of lane (bi, c).
template <Step K, class T>
SSMX_DEVICE AffinePair<T> aggregate_range(const Problem<T>& p, index_t bi, index_t c, index_t t_lo, index_t t_hi) {
  const T* x = p.x + p.lx.offset(bi, 0, c);
  const T* y = p.y + p.ly.offset(bi, 0, c);
  const index_t sx = p.lx.stride_time, sy = p.ly.stride_time;
  const AffineOp<T> op;
  AffinePair<T> acc = op.identity();
  const index_t n = t_hi - t_lo;
  index_t i = 0;
  for (; i + unroll <= n; i += unroll) {
    T xv[unroll], yv[unroll];
#pragma unroll
    for (int k = 0; k < unroll; ++k) {
      const index_t t = K == Step::Recurrence ? t_lo + i + k : t_hi - 1 - i - k;
      xv[k] = x[t * sx];
      yv[k] = y[t * sy];
    }
#pragma unroll
    for (int k = 0; k < unroll; ++k) acc = op(acc, step_map<K>(xv[k], yv[k]));
  }
  for (; i < n; ++i) {
    const index_t t = K == Step::Recurrence ? t_lo + i : t_hi - 1 - i;
    acc = op(acc, step_map<K>(x[t * sx], y[t * sy]));
  }
  return acc;
}

template <class T>
SSMX_DEVICE T initial_state(const Problem<T>& p, index_t bi, index_t c) {
  return p.init ? p.init[bi * p.init_stride + c] : T(0);
}

// ---- kernels --------------------------------------------------------------------------------

// walk: one thread per lane (bi, c), channels fastest so that warps read contiguous runs.
template <Step K, class T>
__global__ void walk_kernel(Problem<T> p) {
  const index_t lanes = p.batch * p.channels;
  for (index_t lane = index_t(blockIdx.x) * blockDim.x + threadIdx.x; lane < lanes;
       lane += index_t(gridDim.x) * blockDim.x) {
    const index_t bi = lane / p.channels, c = lane % p.channels;
    const T s = walk_range<K, true>(p, bi, c, 0, p.time, initial_state(p, bi, c));
    if (p.fin) p.fin[bi * p.fin_stride + c] = s;
  }
}

// Temporaries of the chunked algorithm: [batch, chunks, channels] AffinePairs as two arrays.
template <class T>
struct ChunkState {
  index_t chunks, chunk_len;
  T* agg_x;  // multiplier of chunk k's composed map
  T* agg_y;  // offset of chunk k's map; after the carry pass, the state leaving chunk k
  SSMX_HOST_DEVICE index_t at(const Problem<T>& p, index_t bi, index_t k, index_t c) const {
    return (bi * chunks + k) * p.channels + c;
  }
};

// Chunk k of a walk in order: chunk 0 starts at time 0 (Recurrence) or ends at time T (Adjoint).
template <Step K, class T>
SSMX_DEVICE void chunk_bounds(const Problem<T>& p, const ChunkState<T>& cs, index_t k, index_t& lo, index_t& hi) {
  if constexpr (K == Step::Recurrence) {
    lo = k * cs.chunk_len;
    hi = lo + cs.chunk_len < p.time ? lo + cs.chunk_len : p.time;
  } else {
    hi = p.time - k * cs.chunk_len;
    lo = hi - cs.chunk_len > 0 ? hi - cs.chunk_len : 0;
  }
}

// (1) the composed map of every (lane, chunk); threads ordered (bi, k, c), channels fastest.
template <Step K, class T>
__global__ void chunk_aggregate_kernel(Problem<T> p, ChunkState<T> cs) {
  const index_t items = p.batch * cs.chunks * p.channels;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += index_t(gridDim.x) * blockDim.x) {
    const index_t c = i % p.channels, k = (i / p.channels) % cs.chunks, bi = i / (p.channels * cs.chunks);
    index_t lo, hi;
    chunk_bounds<K>(p, cs, k, lo, hi);
    const AffinePair<T> m = aggregate_range<K>(p, bi, c, lo, hi);
    cs.agg_x[i] = m.a;
    cs.agg_y[i] = m.b;
  }
}

// (2) the carry across chunks is itself a forward linear scan over the chunk maps in walking
// order, [batch, chunks, channels], in place on agg_y: DispatchLinearScan recurses on it
// (each level is at least 4 * unroll times shorter), and agg_y[k] becomes the state leaving
// chunk k.

// (3) re-walk every chunk from its incoming state and write the outputs.
template <Step K, class T>
__global__ void chunk_apply_kernel(Problem<T> p, ChunkState<T> cs) {
  const index_t items = p.batch * cs.chunks * p.channels;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += index_t(gridDim.x) * blockDim.x) {
    const index_t c = i % p.channels, k = (i / p.channels) % cs.chunks, bi = i / (p.channels * cs.chunks);
    index_t lo, hi;
    chunk_bounds<K>(p, cs, k, lo, hi);
    const T s = k == 0 ? initial_state(p, bi, c) : cs.agg_y[i - p.channels];
    (void)walk_range<K, true>(p, bi, c, lo, hi, s);
  }
}

// The outgoing state per lane once the outputs exist: the last chunk's state (chunked), the
// last output (device_scan, Recurrence: h_{T-1}) or a_0 δ_0 (device_scan, Adjoint), or the
// incoming state when time is empty. A separate launch, so that fin may alias init.
enum class FinalFrom { ChunkState, Output, Init };

template <Step K, FinalFrom F, class T>
__global__ void final_state_kernel(Problem<T> p, ChunkState<T> cs) {
  const index_t lanes = p.batch * p.channels;
  for (index_t lane = index_t(blockIdx.x) * blockDim.x + threadIdx.x; lane < lanes;
       lane += index_t(gridDim.x) * blockDim.x) {
    const index_t bi = lane / p.channels, c = lane % p.channels;
    T s;
    if constexpr (F == FinalFrom::ChunkState) {
      s = cs.agg_y[cs.at(p, bi, cs.chunks - 1, c)];
    } else if constexpr (F == FinalFrom::Init) {
      s = initial_state(p, bi, c);
    } else if constexpr (K == Step::Recurrence) {
      s = p.out[p.lo.offset(bi, p.time - 1, c)];
    } else {
      s = p.x[p.lx.offset(bi, 0, c)] * p.out[p.lo.offset(bi, 0, c)];
    }
    p.fin[bi * p.fin_stride + c] = s;
  }
}

// ---- device_scan items ------------------------------------------------------------------------

// Item i of lane (bi, c) as an AffinePair on the *output* sequence in walking order, the
// incoming state folded into item 0:
//   Recurrence: t = i,          (a_t, b_t);                 item 0: (a_0, a_0 h0 + b_0)
//   Adjoint:    t = T - 1 - i,  (a_{t+1}, g_t), a_T := 1;   item 0: (1, g_{T-1} + carry_in)
template <Step K, class T>
struct LaneItem {
  const T* x;
  const T* y;
  index_t sx, sy, time;
  const T* init;  // the lane's incoming state (device memory), or null for 0
  SSMX_HOST_DEVICE AffinePair<T> operator()(index_t i) const {
    const T s0 = (i == 0 && init) ? *init : T(0);
    if constexpr (K == Step::Recurrence) {
      const T a = x[i * sx], b = y[i * sy];
      return {a, i == 0 ? a * s0 + b : b};
    } else {
      const index_t t = time - 1 - i;
      const T g = y[t * sy];
      return {i == 0 ? T(1) : x[(t + 1) * sx], i == 0 ? g + s0 : g};
    }
  }
};

template <Step K, class T>
struct LaneOutput {
  T* o;
  index_t so, time;
  SSMX_HOST_DEVICE void operator()(std::ptrdiff_t i, const AffinePair<T>& v) const {
    const index_t t = K == Step::Recurrence ? index_t(i) : time - 1 - index_t(i);
    o[t * so] = v.b;
  }
};

// ---- dispatch -------------------------------------------------------------------------------

enum class Algorithm { Walk, Chunked, DeviceScan, Empty };

inline constexpr int block_threads = 256;

inline int sm_count() {
  int dev = 0, sms = 0;
  SSMX_CUDA_CHECK(cudaGetDevice(&dev));
  SSMX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

inline unsigned grid_for(index_t items, int sms) {
  const index_t blocks = (items + block_threads - 1) / block_threads;
  return unsigned(std::max<index_t>(1, std::min<index_t>(blocks, index_t(sms) * 32)));
}

template <Step K, class T>
struct DispatchLinearScan {
  Problem<T> p;
  cudaStream_t stream;
  int sms;

  static constexpr std::size_t align = 256;
  static std::size_t round_up(std::size_t n) { return (n + align - 1) / align * align; }

  // Threads that fill the GPU (2048 resident per SM).
  index_t target_threads() const { return index_t(sms) * 2048; }

  // Napkin math (H100: 132 SMs, ~3.3 TB/s, ~0.7 us latency -> ~2.3 MB must be in flight):
  // a walk thread has unroll * 2 * sizeof(T) bytes of loads in flight, so >= sms * 128
  // lanes (17k on H100, 4 MB in flight for float) stream at full speed in one pass (3 N);
  // fewer lanes pay the chunked algorithm's second read (5 N) for parallelism over time.
  Algorithm choose() const {
    const index_t lanes = p.batch * p.channels;
    if (p.time == 0) return Algorithm::Empty;
    if (p.channels == 1 && lanes <= 8 && p.time >= (index_t(1) << 16)) return Algorithm::DeviceScan;
    if (lanes >= index_t(sms) * 128 || p.time < 16 * index_t(unroll)) return Algorithm::Walk;
    return Algorithm::Chunked;
  }

  ChunkState<T> chunk_plan() const {
    const index_t lanes = p.batch * p.channels;
    const index_t want_chunks = std::max<index_t>(1, target_threads() / lanes);
    index_t len = std::max<index_t>(4 * unroll, (p.time + want_chunks - 1) / want_chunks);
    len = (len + unroll - 1) / unroll * unroll;
    return {(p.time + len - 1) / len, len, nullptr, nullptr};
  }

  using Items = thrust::transform_iterator<LaneItem<K, T>, thrust::counting_iterator<index_t>, AffinePair<T>>;
  using Outputs = thrust::tabulate_output_iterator<LaneOutput<K, T>>;

  Items lane_items(index_t bi, index_t c) const {
    LaneItem<K, T> f{p.x + p.lx.offset(bi, 0, c), p.y + p.ly.offset(bi, 0, c), p.lx.stride_time, p.ly.stride_time,
                     p.time, p.init ? p.init + bi * p.init_stride + c : nullptr};
    return Items(thrust::counting_iterator<index_t>(0), f);
  }
  Outputs lane_outputs(index_t bi, index_t c) const {
    return Outputs(LaneOutput<K, T>{p.out + p.lo.offset(bi, 0, c), p.lo.stride_time, p.time});
  }

  // CUB's protocol: with d_temp == nullptr, only sets temp_bytes.
  cudaError_t operator()(void* d_temp, std::size_t& temp_bytes) const {
    const Algorithm algo = choose();
    const index_t lanes = p.batch * p.channels;
    ChunkState<T> cs{0, 0, nullptr, nullptr};
    switch (algo) {
      case Algorithm::Empty:
        if (!d_temp) {
          temp_bytes = 0;
          return cudaSuccess;
        }
        break;
      case Algorithm::Walk:
        if (!d_temp) {
          temp_bytes = 0;
          return cudaSuccess;
        }
        walk_kernel<K><<<grid_for(lanes, sms), block_threads, 0, stream>>>(p);
        return cudaPeekAtLastError();
      case Algorithm::Chunked: {
        cs = chunk_plan();
        const index_t items = lanes * cs.chunks;
        const std::size_t n = round_up(std::size_t(items) * sizeof(T));
        // The carry scan over [batch, chunks, channels] chunk maps, seeded with init.
        const SeqLayout lc{cs.chunks * p.channels, p.channels};
        Problem<T> carry{p.batch, cs.chunks, p.channels, nullptr, lc, nullptr, lc, nullptr, lc,
                         p.init, p.init_stride, nullptr, 0};
        std::size_t carry_bytes = 0;
        if (cudaError_t e = DispatchLinearScan<Step::Recurrence, T>{carry, stream, sms}(nullptr, carry_bytes);
            e != cudaSuccess)
          return e;
        if (!d_temp) {
          temp_bytes = 2 * n + carry_bytes;
          return cudaSuccess;
        }
        char* base = static_cast<char*>(d_temp);
        cs.agg_x = reinterpret_cast<T*>(base);
        cs.agg_y = reinterpret_cast<T*>(base + n);
        carry.x = cs.agg_x;
        carry.y = cs.agg_y;
        carry.out = cs.agg_y;
        chunk_aggregate_kernel<K><<<grid_for(items, sms), block_threads, 0, stream>>>(p, cs);
        if (cudaError_t e = cudaPeekAtLastError(); e != cudaSuccess) return e;
        if (cudaError_t e = DispatchLinearScan<Step::Recurrence, T>{carry, stream, sms}(base + 2 * n, carry_bytes);
            e != cudaSuccess)
          return e;
        chunk_apply_kernel<K><<<grid_for(items, sms), block_threads, 0, stream>>>(p, cs);
        if (cudaError_t e = cudaPeekAtLastError(); e != cudaSuccess) return e;
        break;
      }
      case Algorithm::DeviceScan: {
        // One InclusiveScan per lane (channels == 1 here), sharing the temporaries in stream order.
        const AffineOp<T> op;
        if (!d_temp)
          return cub::DeviceScan::InclusiveScan(nullptr, temp_bytes, lane_items(0, 0), lane_outputs(0, 0), op, p.time,
                                                stream);
        for (index_t bi = 0; bi < p.batch; ++bi) {
          std::size_t bytes = temp_bytes;
          cudaError_t e = cub::DeviceScan::InclusiveScan(d_temp, bytes, lane_items(bi, 0), lane_outputs(bi, 0), op,
                                                         p.time, stream);
          if (e != cudaSuccess) return e;
        }
        break;
      }
    }
    if (p.fin) {
      const unsigned g = grid_for(lanes, sms);
      if (algo == Algorithm::Empty)
        final_state_kernel<K, FinalFrom::Init><<<g, block_threads, 0, stream>>>(p, cs);
      else if (algo == Algorithm::Chunked)
        final_state_kernel<K, FinalFrom::ChunkState><<<g, block_threads, 0, stream>>>(p, cs);
      else
        final_state_kernel<K, FinalFrom::Output><<<g, block_threads, 0, stream>>>(p, cs);
      return cudaPeekAtLastError();
    }
    return cudaSuccess;
  }
};

}  // namespace ssmx::backend::cuda_scan

namespace ssmx::backend {

template <>
struct ScanImpl<Space::Cuda> {
  template <class T>
  static void forward(const scan::detail::ScanExtents& e, const T* a, const scan::detail::SeqLayout& la, const T* b,
                      const scan::detail::SeqLayout& lb, T* h, const scan::detail::SeqLayout& lh, const T* h0,
                      index_t h0_stride, T* h_final, index_t hf_stride) {
    run<cuda_scan::Step::Recurrence, T>({e.batch, e.time, e.channels, a, la, b, lb, h, lh, h0, h0_stride, h_final,
                                         hf_stride});
  }
  template <class T>
  static void reverse(const scan::detail::ScanExtents& e, const T* a, const scan::detail::SeqLayout& la, const T* g,
                      const scan::detail::SeqLayout& lg, T* delta, const scan::detail::SeqLayout& ld,
                      const T* carry_in, index_t ci_stride, T* carry_out, index_t co_stride) {
    run<cuda_scan::Step::Adjoint, T>({e.batch, e.time, e.channels, a, la, g, lg, delta, ld, carry_in, ci_stride,
                                      carry_out, co_stride});
  }

 private:
  // Two-phase: query the temporaries, allocate them through the tracked allocator
  // (Tag::Workspace, stream-ordered release), launch.
  template <cuda_scan::Step K, class T>
  static void run(const cuda_scan::Problem<T>& p) {
    const cuda_scan::DispatchLinearScan<K, T> dispatch{p, cudaStreamPerThread, cuda_scan::sm_count()};
    std::size_t bytes = 0;
    SSMX_CUDA_CHECK(dispatch(nullptr, bytes));
    Buffer<std::byte> temp(bytes, Space::Cuda, Tag::Workspace);
    // A null pointer means "query"; an algorithm without temporaries gets a non-null dummy
    // it never dereferences.
    static std::byte no_temp;
    SSMX_CUDA_CHECK(dispatch(bytes ? static_cast<void*>(temp.data()) : static_cast<void*>(&no_temp), bytes));
  }
};

}  // namespace ssmx::backend
