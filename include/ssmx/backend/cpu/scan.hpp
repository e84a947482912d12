// ssmx — CPU backend of the linear scan and its adjoint (ScanImpl<Space::Host>).
// Private header: include <ssmx/scan/scan.hpp>.
//
// The recurrence is sequential in time per channel, so the parallelism is across channels:
//  - wide layouts (channels >= narrow_channels): each work item is one (batch, block of up
//    to channel_block contiguous channels). Per time step it reads one contiguous run of
//    `a` and `b` and writes one of `h`, vectorised across the block's lanes, keeping the
//    block's state in an L1-resident array. Items run in parallel under OpenMP.
//  - narrow layouts (a few long channels): the per-step dependency chain (one multiply-add
//    per element) would bound the speed by latency, not memory. Time is cut into runs of
//    sub_len steps; inside a run the local composition (A_k, B_k) of steps 0..k is
//    computed without the incoming state (AffineOp), for several runs at once so that their
//    chains overlap, and only h_k = A_k s + B_k depends on the state: the chain through
//    the state is one multiply-add per run of sub_len steps.
// Batch items are independent and parallel too. A single very long channel (batch 1,
// channels 1) runs on one core: a time-parallel version reads a and b twice, which on a
// memory-bound 2-core machine does not pay.
#pragma once

#include <algorithm>

#include "../../scan/scan.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

// Marks a loop whose iterations are independent (also under exact in-place aliasing, since
// iteration l reads and writes element l only) so that it is vectorised.
#if defined(_OPENMP)
#define SSMX_SIMD_LOOP _Pragma("omp simd")
#elif defined(__clang__)
#define SSMX_SIMD_LOOP _Pragma("clang loop vectorize(enable)")
#elif defined(__GNUC__)
#define SSMX_SIMD_LOOP _Pragma("GCC ivdep")
#else
#define SSMX_SIMD_LOOP
#endif

namespace ssmx::backend {

namespace cpu_scan {

using scan::detail::ScanExtents;
using scan::detail::SeqLayout;

inline constexpr index_t narrow_channels = 4;  // below this, the time-blocked kernel
inline constexpr int sub_blocks = 8;           // narrow kernel: independent runs per time block
inline constexpr int sub_len = 8;              // narrow kernel: steps per run
inline constexpr index_t max_channel_block = 4096;

inline int num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Lanes per work item: whole 64-byte lines, small enough to give every thread a few items.
template <class T>
index_t channel_block(const ScanExtents& e) {
  const index_t line = index_t(64 / sizeof(T));
  index_t block = max_channel_block * index_t(sizeof(float)) / index_t(sizeof(T));
  const index_t want_items = 4 * index_t(num_threads());
  while (block > line && e.batch * ((e.channels + block - 1) / block) < want_items) block /= 2;
  return block;
}

// ---- forward: h_t = a_t h_{t-1} + b_t ---------------------------------------------------

template <class T>
void forward_wide(index_t steps, index_t width, const T* a, index_t sa, const T* b, index_t sb, T* h, index_t sh,
                  T* state) {
  for (index_t t = 0; t < steps; ++t) {
    const T* at = a + t * sa;
    const T* bt = b + t * sb;
    T* ht = h + t * sh;
    SSMX_SIMD_LOOP
    for (index_t l = 0; l < width; ++l) {
      const T s = at[l] * state[l] + bt[l];
      state[l] = s;
      ht[l] = s;
    }
  }
}

// A time block is sub_blocks runs of sub_len steps. Phase 1 composes each run's steps
// (independent chains, interleaved so that they overlap); phase 2 threads the state through
// the runs (one multiply-add per run on the chain) and writes h. Leftover steps go one by one.
template <class T>
void forward_narrow(index_t steps, index_t channels, const T* a, index_t sa, const T* b, index_t sb, T* h,
                    index_t sh, T* state) {
  constexpr int R = sub_blocks, L = sub_len;
  T A[R][L], B[R][L];
  index_t t0 = 0;
  for (; t0 + R * L <= steps; t0 += R * L) {
    for (index_t c = 0; c < channels; ++c) {
      T pa[R], pb[R];
      for (int j = 0; j < R; ++j) pa[j] = T(1), pb[j] = T(0);
      for (int k = 0; k < L; ++k)
        for (int j = 0; j < R; ++j) {
          const index_t t = t0 + j * L + k;
          const T at = a[t * sa + c];
          pb[j] = at * pb[j] + b[t * sb + c];
          pa[j] = pa[j] * at;
          A[j][k] = pa[j];
          B[j][k] = pb[j];
        }
      T s = state[c];
      for (int j = 0; j < R; ++j) {
        for (int k = 0; k < L; ++k) h[(t0 + j * L + k) * sh + c] = A[j][k] * s + B[j][k];
        s = A[j][L - 1] * s + B[j][L - 1];
      }
      state[c] = s;
    }
  }
  for (; t0 < steps; ++t0)
    for (index_t c = 0; c < channels; ++c) {
      const T s = a[t0 * sa + c] * state[c] + b[t0 * sb + c];
      state[c] = s;
      h[t0 * sh + c] = s;
    }
}

// ---- reverse: δ_t = g_t + s, then s = a_t δ_t (s enters as carry_in, leaves as carry_out) --

template <class T>
void reverse_wide(index_t steps, index_t width, const T* a, index_t sa, const T* g, index_t sg, T* delta, index_t sd,
                  T* state) {
  for (index_t t = steps - 1; t >= 0; --t) {
    const T* at = a + t * sa;
    const T* gt = g + t * sg;
    T* dt = delta + t * sd;
    SSMX_SIMD_LOOP
    for (index_t l = 0; l < width; ++l) {
      const T d = gt[l] + state[l];
      dt[l] = d;
      state[l] = at[l] * d;
    }
  }
}

// As forward_narrow, walking time downwards from the top: the state entering step k of a
// run is p s + q (s: the run's incoming state), so δ = (g + q) + p s.
template <class T>
void reverse_narrow(index_t steps, index_t channels, const T* a, index_t sa, const T* g, index_t sg, T* delta,
                    index_t sd, T* state) {
  constexpr int R = sub_blocks, L = sub_len;
  T P[R][L], D[R][L];
  index_t t1 = steps;  // the block is [t1 - R L, t1); run j covers t1 - 1 - j L - k, k = 0..L-1
  for (; t1 - R * L >= 0; t1 -= R * L) {
    for (index_t c = 0; c < channels; ++c) {
      T p[R], q[R];
      for (int j = 0; j < R; ++j) p[j] = T(1), q[j] = T(0);
      for (int k = 0; k < L; ++k)
        for (int j = 0; j < R; ++j) {
          const index_t t = t1 - 1 - j * L - k;
          const T dk = g[t * sg + c] + q[j];
          P[j][k] = p[j];
          D[j][k] = dk;
          const T at = a[t * sa + c];
          q[j] = at * dk;
          p[j] = at * p[j];
        }
      T s = state[c];
      for (int j = 0; j < R; ++j) {
        for (int k = 0; k < L; ++k) delta[(t1 - 1 - j * L - k) * sd + c] = P[j][k] * s + D[j][k];
        s = p[j] * s + q[j];
      }
      state[c] = s;
    }
  }
  for (index_t t = t1 - 1; t >= 0; --t)
    for (index_t c = 0; c < channels; ++c) {
      const T d = g[t * sg + c] + state[c];
      delta[t * sd + c] = d;
      state[c] = a[t * sa + c] * d;
    }
}

// Runs `kernel` over every (batch, channel block) with state initialised from `init` (or 0)
// and stored to `fin` afterwards. Shared by both directions.
template <class T, class Wide, class Narrow>
void run_items(const ScanExtents& e, const T* x, const SeqLayout& lx, const T* y, const SeqLayout& ly, T* out,
               const SeqLayout& lo, const T* init, index_t init_stride, T* fin, index_t fin_stride, Wide wide,
               Narrow narrow) {
  const bool is_narrow = e.channels < narrow_channels;
  const index_t block = is_narrow ? narrow_channels : channel_block<T>(e);
  const index_t blocks = (e.channels + block - 1) / block;
  const index_t items = e.batch * blocks;
  const bool parallel = items > 1 && e.batch * e.time * e.channels >= (index_t(1) << 15);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (index_t item = 0; item < items; ++item) {
    const index_t bi = item / blocks;
    const index_t c0 = (item % blocks) * block;
    const index_t width = std::min(block, e.channels - c0);
    alignas(64) T state[max_channel_block];
    for (index_t l = 0; l < width; ++l) state[l] = init ? init[bi * init_stride + c0 + l] : T(0);
    if (e.time > 0) {
      const T* xb = x + lx.offset(bi, 0, c0);
      const T* yb = y + ly.offset(bi, 0, c0);
      T* ob = out + lo.offset(bi, 0, c0);
      if (is_narrow)
        narrow(e.time, width, xb, lx.stride_time, yb, ly.stride_time, ob, lo.stride_time, state);
      else
        wide(e.time, width, xb, lx.stride_time, yb, ly.stride_time, ob, lo.stride_time, state);
    }
    if (fin)
      for (index_t l = 0; l < width; ++l) fin[bi * fin_stride + c0 + l] = state[l];
  }
}

}  // namespace cpu_scan

template <>
struct ScanImpl<Space::Host> {
  template <class T>
  static void forward(const scan::detail::ScanExtents& e, const T* a, const scan::detail::SeqLayout& la, const T* b,
                      const scan::detail::SeqLayout& lb, T* h, const scan::detail::SeqLayout& lh, const T* h0,
                      index_t h0_stride, T* h_final, index_t hf_stride) {
    cpu_scan::run_items<T>(e, a, la, b, lb, h, lh, h0, h0_stride, h_final, hf_stride, &cpu_scan::forward_wide<T>,
                           &cpu_scan::forward_narrow<T>);
  }
  template <class T>
  static void reverse(const scan::detail::ScanExtents& e, const T* a, const scan::detail::SeqLayout& la, const T* g,
                      const scan::detail::SeqLayout& lg, T* delta, const scan::detail::SeqLayout& ld,
                      const T* carry_in, index_t ci_stride, T* carry_out, index_t co_stride) {
    cpu_scan::run_items<T>(e, a, la, g, lg, delta, ld, carry_in, ci_stride, carry_out, co_stride,
                           &cpu_scan::reverse_wide<T>, &cpu_scan::reverse_narrow<T>);
  }
};

}  // namespace ssmx::backend
