// ssmx — host kernels of the causal depthwise convolution (expr::CausalConv1d) and its VJP.
// One pass over the [tokens, channels] rows for all W taps, vectorised along the channels
// (the taps transposed to [W, C] rows first), instead of one strided pass per tap:
//   forward   out[t, c] = bias[c] + Σ_j x[t + j, c] · w[c, j] · m[j, t]
//   input     gx[r, c]  = Σ_j g[r - j, c] · w[c, j] · m[j, r - j]   (each row on its own: no
//                                                                   two threads add to one row)
//   weight    gw[c, j]  = Σ_t g[t, c] · x[t + j, c] · m[j, t],  gb[c] = Σ_t g[t, c]
//             (blocks of channels, tokens in order: the same sums for any thread count)
// Taps are added in order j = 0, 1, ...; m is the optional tap mask [W, tokens] (0 where a
// tap would reach across a document start). Rows have unit column stride.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../core/memory.hpp"
#include "../../core/tensor.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ssmx::backend::cpu {

// A [channels, W] or [channels, 1, W] weight's taps as rows: taps[j * C + c] = w[c, j].
template <class V, Space S>
Work<V> conv1d_taps(TensorView<const V, S> w, index_t W) {
  const index_t C = w.extent(0), sc = w.stride(0), sj = w.stride(w.rank() - 1);
  Work<V> taps(std::size_t(W * C));
  for (index_t j = 0; j < W; ++j)
    for (index_t c = 0; c < C; ++c) taps[std::size_t(j * C + c)] = w.data()[c * sc + j * sj];
  return taps;
}

// The tap mask's element for tap j at token t, 1 without a mask.
struct Conv1dMask {
  const void* data = nullptr;
  index_t s0 = 0, s1 = 0;
  template <class V>
  V at(index_t j, index_t t) const {
    return data ? static_cast<const V*>(data)[j * s0 + t * s1] : V(1);
  }
};

// Whether a pass is worth a parallel region.
inline bool conv1d_parallel(index_t work) { return work >= (index_t(1) << 15); }

// out [n, C] (row stride os) from x [n + W - 1, C] (row stride xs); bias [C] or null.
template <class V>
void conv1d_forward(const V* x, index_t xs, const V* taps, const V* bias, Conv1dMask mask, index_t n, index_t C,
                    index_t W, V* out, index_t os) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (conv1d_parallel(n * C * W) && !omp_in_parallel())
#endif
  for (index_t t = 0; t < n; ++t) {
    V* o = out + t * os;
    if (bias)
      std::copy(bias, bias + C, o);
    else
      std::fill(o, o + C, V(0));
    for (index_t j = 0; j < W; ++j) {
      const V* xr = x + (t + j) * xs;
      const V* wj = taps + j * C;
      if (mask.data) {
        const V m = mask.at<V>(j, t);
        for (index_t c = 0; c < C; ++c) o[c] += xr[c] * wj[c] * m;
      } else {
        for (index_t c = 0; c < C; ++c) o[c] += xr[c] * wj[c];
      }
    }
  }
}

// gx [n + W - 1, C] (contiguous, written) from g [n, C] (row stride gs).
template <class V>
void conv1d_backward_input(const V* g, index_t gs, const V* taps, Conv1dMask mask, index_t n, index_t C, index_t W,
                           V* gx) {
  const index_t rows = n + W - 1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (conv1d_parallel(n * C * W) && !omp_in_parallel())
#endif
  for (index_t r = 0; r < rows; ++r) {
    V* o = gx + r * C;
    std::fill(o, o + C, V(0));
    for (index_t j = 0; j < W; ++j) {
      const index_t t = r - j;
      if (t < 0 || t >= n) continue;
      const V* gr = g + t * gs;
      const V* wj = taps + j * C;
      if (mask.data) {
        const V m = mask.at<V>(j, t);
        for (index_t c = 0; c < C; ++c) o[c] += gr[c] * wj[c] * m;
      } else {
        for (index_t c = 0; c < C; ++c) o[c] += gr[c] * wj[c];
      }
    }
  }
}

// gtaps [W, C] (written, null: not wanted) and gbias [C] (written, null: not wanted) from
// g [n, C] and x [n + W - 1, C].
template <class V>
void conv1d_backward_weight(const V* g, index_t gs, const V* x, index_t xs, Conv1dMask mask, index_t n, index_t C,
                            index_t W, V* gtaps, V* gbias) {
  constexpr index_t block = 64;  // channels per block: a few SIMD registers per tap
  const index_t blocks = (C + block - 1) / block;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (conv1d_parallel(n * C * W) && !omp_in_parallel())
#endif
  for (index_t b = 0; b < blocks; ++b) {
    const index_t c0 = b * block, w = std::min(C, c0 + block) - c0;
    V acc[16][block] = {};  // taps beyond 16 take the loop below
    V accb[block] = {};
    const index_t Wa = std::min<index_t>(W, 16);
    for (index_t t = 0; t < n; ++t) {
      const V* gr = g + t * gs + c0;
      if (gbias)
        for (index_t c = 0; c < w; ++c) accb[c] += gr[c];
      if (!gtaps) continue;
      for (index_t j = 0; j < Wa; ++j) {
        const V* xr = x + (t + j) * xs + c0;
        V* a = acc[j];
        if (mask.data) {
          const V m = mask.at<V>(j, t);
          for (index_t c = 0; c < w; ++c) a[c] += gr[c] * xr[c] * m;
        } else {
          for (index_t c = 0; c < w; ++c) a[c] += gr[c] * xr[c];
        }
      }
    }
    if (gbias) std::copy(accb, accb + w, gbias + c0);
    if (!gtaps) continue;
    for (index_t j = 0; j < Wa; ++j) std::copy(acc[j], acc[j] + w, gtaps + j * C + c0);
    for (index_t j = Wa; j < W; ++j) {  // wide kernels: one tap at a time
      V* a = gtaps + j * C + c0;
      std::fill(a, a + w, V(0));
      for (index_t t = 0; t < n; ++t) {
        const V* gr = g + t * gs + c0;
        const V* xr = x + (t + j) * xs + c0;
        const V m = mask.at<V>(j, t);
        for (index_t c = 0; c < w; ++c) a[c] += gr[c] * xr[c] * m;
      }
    }
  }
}

}  // namespace ssmx::backend::cpu
