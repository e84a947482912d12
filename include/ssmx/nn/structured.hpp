// ssmx — the structured chunked scan (the chunked matrix form of Mamba-2's SSD) for a layer
// whose decay is shared across a state axis, derived like the fused scan (nn/fused.hpp)
// from the layer's expressions.
//
// The rule. A state [P, N] whose maps have this shape, read off the lifted trees:
//   decay    a^t[n]              constant along P (every operand of the decay has stride 0 there)
//   inject   x^t[p] * β^t[n]     a product of two operands, one constant along N, one along P
//   readout  Σ_n h^t[p, n] c^t[n] (a sum or mean over N of the state times an operand
//                                constant along P)
// DiagonalSSM and the example GatedSSM have it (Mamba2's state, [H, P, N] with one decay per
// head, is not of this rank-2 shape: it takes the fused scan). With log-decays accumulated
// inside a chunk of L tokens, A^t[n] = Σ_{j ≤ t} log a^j[n] (restarted at document starts),
//   y^t[p]   = Σ_{s ≤ t} M[t, s] x^s[p] + Σ_n c^t[n] e^{A^t[n]} h0[p, n]
//   M[t, s]  = Σ_n c^t[n] β^s[n] e^{A^t[n] - A^s[n]}          (exponents <= 0: no overflow)
//   h_end    = e^{A^end} ⊙ h0 + Σ_s e^{A^end - A^s} β^s x^s ⊗
// so that the work is GEMMs over [L × L], [L × P] and [P × N] blocks plus L² N exponentials per
// chunk, instead of coefficient-wise passes over [tokens × P × N]. The backward pass is the
// exact adjoint of the same sums (the chunk-to-chunk carry is dL/dh at chunk ends, the same
// carry as the elementwise scan's a ⊙ δ).
//
// Exactness: the same sums as the recurrence in another order. The exponent A^t - A^s is a
// difference of cumulative sums, so each decay factor carries a relative error of about
// ε·|A| (|A| ≤ L · max |log a|): 1e-14 in double for the decays of trained models; in float
// it is of the order of the recurrence's own rounding over a few hundred steps. A decay
// outside (0, 1.5], or exactly 0 away from a document start, takes the elementwise fused scan.
// Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include "../core/eigen_core.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fused.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ssmx::nn::structured {

using expr::Index4;

// One stretch's inputs, compact: [n, N] log-decays, β and c; [n, P] x; and which tokens
// start a document.
template <class T>
struct Inputs {
  index_t n = 0, P = 0, N = 0;
  Work<T> la, beta, c, x;  // row-major [n, N] (la, beta, c), [n, P] (x)
  std::vector<index_t> seg;       // seg[t]: the last document start at or before t, or -1
};

// The chunk length of the structured scan.
inline constexpr index_t chunk_len = 64;

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapM = Eigen::Map<Mat<T>>;
template <class T>
using CMapM = Eigen::Map<const Mat<T>>;

namespace detail {

// Per chunk [t0, t1): A (cumulative log-decay since the chunk start or the last document
// start), stored [L, N].
template <class T>
void cumulative(const Inputs<T>& in, index_t t0, index_t t1, T* A) {
  const index_t N = in.N;
  for (index_t t = t0; t < t1; ++t) {
    T* a = A + (t - t0) * N;
    const T* la = in.la.data() + t * N;
    if (t == t0 || in.seg[std::size_t(t)] == t) {  // restart: the chunk's first token, or a document start
      for (index_t k = 0; k < N; ++k) a[k] = in.seg[std::size_t(t)] == t ? T(0) : la[k];
    } else {
      const T* prev = a - N;
      for (index_t k = 0; k < N; ++k) a[k] = prev[k] + la[k];
    }
  }
}

// The first token s of the chunk that token t still sees (no document start in (s, t]).
template <class T>
index_t first_seen(const Inputs<T>& in, index_t t0, index_t t) {
  return std::max(t0, in.seg[std::size_t(t)]);
}
// Whether token t of the chunk still sees the state before the chunk.
template <class T>
bool sees_start(const Inputs<T>& in, index_t t0, index_t t) {
  return in.seg[std::size_t(t)] < t0;
}

// e^{A^t - A^s} for t's chunk-relative row of A and a row of s (or e^{A^t} from the start).
template <class T>
T factor(const T* At, const T* As, index_t k, bool from_start) {
  return from_start ? std::exp(At[k]) : std::exp(At[k] - As[k]);
}

}  // namespace detail

// What the forward pass keeps for the backward pass: the state before every chunk
// ([chunks, P, N]). The decay factors e^{A^t - A^s} of a chunk ([l, N, l]) are recomputed
// by the backward pass: kept, they would be L / P times the states of every token.
template <class T>
struct Saved {
  Work<T> states;
};

namespace detail {

using simd::Pack;

// Chunk ci's decay factors K[t][k][s] = e^{A^t[k] - A^s[k]} for s in [first_seen(t), t], and
// M[t][s] = Σ_k c^t[k] β^s[k] K[t][k][s]. A: [l, N]; AT, BT: A and β transposed ([N, l]).
template <class T>
void chunk_mask(const Inputs<T>& in, index_t t0, index_t t1, const T* A, const T* AT, const T* BT, T* K, T* M) {
  using P = Pack<T>;
  const index_t N = in.N, l = t1 - t0;
  for (index_t t = t0; t < t1; ++t) {
    const index_t r = t - t0, s0 = first_seen(in, t0, t) - t0, s1 = r + 1;
    T* Mr = M + r * l;
    std::fill(Mr, Mr + l, T(0));
    const T* At = A + r * N;
    const T* ct = in.c.data() + t * N;
    for (index_t k = 0; k < N; ++k) {
      T* Kr = K + (r * N + k) * l;
      const T* ATk = AT + k * l;
      const T* BTk = BT + k * l;
      const P at(At[k]), cb(ct[k]);
      index_t s = s0;
      for (; s + P::size <= s1; s += P::size) {
        const P e = simd::exp(at - P::load(ATk + s));
        e.store(Kr + s);
        (P::load(Mr + s) + cb * P::load(BTk + s) * e).store(Mr + s);
      }
      for (; s < s1; ++s) {
        const T e = std::exp(At[k] - ATk[s]);
        Kr[s] = e;
        Mr[s] += ct[k] * BTk[s] * e;
      }
    }
  }
}

template <class T>
void transpose_rows(const T* src, index_t rows, index_t cols, T* dst) {  // dst[c][r] = src[r][c]
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

}  // namespace detail

// The forward pass: y ([n, P], the reduction Σ_n h c; null: only the states), and the state
// after the stretch (h_last, [P, N]; null: not wanted). h0: [P, N] or null. `saved`: what the
// backward pass needs (null: not kept).
template <class T>
void forward(const Inputs<T>& in, const T* h0, T* y, T* h_last, Saved<T>* saved = nullptr) {
  const index_t n = in.n, P = in.P, N = in.N, L = chunk_len;
  const index_t nc = (n + L - 1) / L;
  Work<T> states(std::size_t((nc + 1) * P * N), T(0));
  if (h0) std::copy(h0, h0 + P * N, states.begin());
  // Per chunk, in parallel: the intra-chunk part of y, and what the chunk adds to the state
  // (Σ_s e^{A^end - A^s} β^s x^s ⊗) with the decay it applies (e^{A^end}).
  Work<T> added(std::size_t(nc * P * N)), decay_end(std::size_t(nc * N));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const index_t t0 = ci * L, t1 = std::min(n, t0 + L), l = t1 - t0;
    Work<T> A(std::size_t(l * N)), R(std::size_t(l * N), T(0));
    detail::cumulative(in, t0, t1, A.data());
    CMapM<T> X(in.x.data() + t0 * P, l, P);
    if (y) {
      Work<T> AT(std::size_t(l * N)), BT(std::size_t(l * N)), K(std::size_t(l * N * l)), M(std::size_t(l * l));
      detail::transpose_rows(A.data(), l, N, AT.data());
      detail::transpose_rows(in.beta.data() + t0 * N, l, N, BT.data());
      detail::chunk_mask(in, t0, t1, A.data(), AT.data(), BT.data(), K.data(), M.data());
      MapM<T>(y + t0 * P, l, P).noalias() = CMapM<T>(M.data(), l, l) * X;
    }
    const index_t te = t1 - 1;
    const T* Ae = A.data() + (te - t0) * N;
    for (index_t s = detail::first_seen(in, t0, te); s <= te; ++s) {
      const T* As = A.data() + (s - t0) * N;
      for (index_t k = 0; k < N; ++k)
        R[std::size_t((s - t0) * N + k)] = in.beta[std::size_t(s * N + k)] * std::exp(Ae[k] - As[k]);
    }
    for (index_t k = 0; k < N; ++k)
      decay_end[std::size_t(ci * N + k)] = detail::sees_start(in, t0, te) ? std::exp(Ae[k]) : T(0);
    MapM<T>(added.data() + ci * P * N, P, N).noalias() = X.transpose() * CMapM<T>(R.data(), l, N);
  }
  // The states before each chunk, in order.
  for (index_t ci = 0; ci < nc; ++ci) {
    const T* s0 = states.data() + ci * P * N;
    T* s1 = states.data() + (ci + 1) * P * N;
    const T* add = added.data() + ci * P * N;
    const T* de = decay_end.data() + ci * N;
    for (index_t p = 0; p < P; ++p)
      for (index_t k = 0; k < N; ++k) s1[p * N + k] = de[k] * s0[p * N + k] + add[p * N + k];
  }
  // The state's part of y: Σ_n c^t e^{A^t} h0.
  if (y) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
    for (index_t ci = 0; ci < nc; ++ci) {
      const index_t t0 = ci * L, t1 = std::min(n, t0 + L), l = t1 - t0;
      Work<T> A(std::size_t(l * N)), Q(std::size_t(l * N), T(0));
      detail::cumulative(in, t0, t1, A.data());
      bool any = false;
      for (index_t t = t0; t < t1; ++t)
        if (detail::sees_start(in, t0, t)) {
          any = true;
          for (index_t k = 0; k < N; ++k)
            Q[std::size_t((t - t0) * N + k)] = in.c[std::size_t(t * N + k)] * std::exp(A[std::size_t((t - t0) * N + k)]);
        }
      if (any)
        MapM<T>(y + t0 * P, l, P).noalias() +=
            CMapM<T>(Q.data(), l, N) * CMapM<T>(states.data() + ci * P * N, P, N).transpose();
    }
  }
  if (h_last) std::copy(states.begin() + nc * P * N, states.end(), h_last);
  if (saved) {
    saved->states = std::move(states);
  }
}

// Gradients of one stretch (each [n, ·] buffer is written, not added to).
template <class T>
struct Grads {
  Work<T> la, beta, c, x;  // dL/d(log a), dL/dβ, dL/dc ([n, N]); dL/dx ([n, P])
  Work<T> h0;              // dL/d(state before the stretch), [P, N]
};

// The backward pass: dy ([n, P], dL/d(reduction)), dh_end ([P, N], dL/d(state after the
// stretch) from later tokens, or null), with what forward() saved.
template <class T>
void backward(const Inputs<T>& in, const Saved<T>& saved, const T* dy, const T* dh_end, Grads<T>& g) {
  using P_ = simd::Pack<T>;
  const index_t n = in.n, P = in.P, N = in.N, L = chunk_len;
  const index_t nc = (n + L - 1) / L;
  const Work<T>& states = saved.states;
  g.la = Work<T>(std::size_t(n * N), T(0));
  g.beta = Work<T>(std::size_t(n * N), T(0));
  g.c = Work<T>(std::size_t(n * N), T(0));
  g.x = Work<T>(std::size_t(n * P), T(0));
  g.h0 = Work<T>(std::size_t(P * N), T(0));
  // dL/d(state at the end of each chunk): from the chunk after it, last to first.
  //   dH_{c-1} = Σ_t dy^tᵀ ⊗ c^t e^{A^t} (over the tokens of c that see its start) + e^{A^end} ⊙ dH_c
  Work<T> dH(std::size_t(nc * P * N), T(0));
  Work<T> Qs(std::size_t(n * N), T(0)), decay_end(std::size_t(nc * N), T(0));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const index_t t0 = ci * L, t1 = std::min(n, t0 + L), l = t1 - t0;
    Work<T> A(std::size_t(l * N));
    detail::cumulative(in, t0, t1, A.data());
    for (index_t t = t0; t < t1; ++t)
      if (detail::sees_start(in, t0, t))
        for (index_t k = 0; k < N; ++k)
          Qs[std::size_t(t * N + k)] = in.c[std::size_t(t * N + k)] * std::exp(A[std::size_t((t - t0) * N + k)]);
    if (detail::sees_start(in, t0, t1 - 1))
      for (index_t k = 0; k < N; ++k) decay_end[std::size_t(ci * N + k)] = std::exp(A[std::size_t((l - 1) * N + k)]);
  }
  Work<T> carry(std::size_t(P * N), T(0));  // dL/d(state at the end of chunk ci)
  if (dh_end) std::copy(dh_end, dh_end + P * N, carry.begin());
  for (index_t ci = nc - 1; ci >= 0; --ci) {
    std::copy(carry.begin(), carry.end(), dH.begin() + ci * P * N);
    const index_t t0 = ci * L, t1 = std::min(n, t0 + L), l = t1 - t0;
    Mat<T> d0 = CMapM<T>(dy + t0 * P, l, P).transpose() * CMapM<T>(Qs.data() + t0 * N, l, N);  // [P, N]
    const T* de = decay_end.data() + ci * N;
    for (index_t p = 0; p < P; ++p)
      for (index_t k = 0; k < N; ++k) carry[std::size_t(p * N + k)] = d0(p, k) + de[k] * carry[std::size_t(p * N + k)];
  }
  std::copy(carry.begin(), carry.end(), g.h0.begin());
  // Per chunk, in parallel: everything else.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const index_t t0 = ci * L, t1 = std::min(n, t0 + L), l = t1 - t0, te = t1 - 1;
    Work<T> A(std::size_t(l * N)), R(std::size_t(l * N), T(0));
    detail::cumulative(in, t0, t1, A.data());
    // The chunk's decay factors and M again, as the forward pass made them.
    Work<T> AT(std::size_t(l * N)), BT(std::size_t(N * l)), Kw(std::size_t(l * N * l)), Mw(std::size_t(l * l));
    detail::transpose_rows(A.data(), l, N, AT.data());
    detail::transpose_rows(in.beta.data() + t0 * N, l, N, BT.data());
    detail::chunk_mask(in, t0, t1, A.data(), AT.data(), BT.data(), Kw.data(), Mw.data());
    const T* K = Kw.data();
    const T* Mk = Mw.data();
    const T* Ae = A.data() + (l - 1) * N;
    const index_t s_end = detail::first_seen(in, t0, te);
    for (index_t s = s_end; s <= te; ++s) {
      const T* As = A.data() + (s - t0) * N;
      for (index_t k = 0; k < N; ++k)
        R[std::size_t((s - t0) * N + k)] = in.beta[std::size_t(s * N + k)] * std::exp(Ae[k] - As[k]);
    }
    CMapM<T> X(in.x.data() + t0 * P, l, P), dY(dy + t0 * P, l, P);
    CMapM<T> H0(states.data() + ci * P * N, P, N), dHc(dH.data() + ci * P * N, P, N);
    // dx = Mᵀ dy + R dHᵀ
    MapM<T> dX(g.x.data() + t0 * P, l, P);
    dX.noalias() = CMapM<T>(Mk, l, l).transpose() * dY;
    dX.noalias() += CMapM<T>(R.data(), l, N) * dHc.transpose();
    const Mat<T> dM = dY * X.transpose();  // [l, l], used for s <= t
    const Mat<T> dQ = dY * H0;             // [l, N]
    const Mat<T> dR = X * dHc;             // [l, N]
    // The mask's VJP, a register of s at a time: transposed [N, l] rows of β, dβ and dA.
    Work<T> dBT(std::size_t(N * l), T(0)), dAT(std::size_t(N * l), T(0));
    for (index_t t = t0; t < t1; ++t) {
      const index_t r = t - t0, s0 = detail::first_seen(in, t0, t) - t0, s1 = r + 1;
      const T* ct = in.c.data() + t * N;
      T* dct = g.c.data() + t * N;
      const T* dMr = dM.data() + r * l;
      for (index_t k = 0; k < N; ++k) {
        const T* Kr = K + (r * N + k) * l;
        const T* BTk = BT.data() + k * l;
        T* dBTk = dBT.data() + k * l;
        T* dATk = dAT.data() + k * l;
        const P_ cb(ct[k]);
        P_ sc(0), sw(0);  // Σ_s dM β K, Σ_s dM c β K
        index_t s = s0;
        for (; s + P_::size <= s1; s += P_::size) {
          const P_ dmK = P_::load(dMr + s) * P_::load(Kr + s);
          const P_ bk = P_::load(BTk + s);
          sc += dmK * bk;
          (P_::load(dBTk + s) + dmK * cb).store(dBTk + s);
          const P_ w = dmK * cb * bk;  // dL/d(A^t - A^s)
          sw += w;
          (P_::load(dATk + s) - w).store(dATk + s);
        }
        T scs = sc.sum(), sws = sw.sum();
        for (; s < s1; ++s) {
          const T dmK = dMr[s] * Kr[s];
          scs += dmK * BTk[s];
          dBTk[s] += dmK * ct[k];
          const T w = dmK * ct[k] * BTk[s];
          sws += w;
          dATk[s] -= w;
        }
        dct[k] += scs;
        dATk[r] += sws;
      }
      if (detail::sees_start(in, t0, t))
        for (index_t k = 0; k < N; ++k) {
          const T E = std::exp(A[std::size_t(r * N + k)]);
          dct[k] += dQ(r, k) * E;
          dAT[std::size_t(k * l + r)] += dQ(r, k) * ct[k] * E;
        }
    }
    for (index_t s = s_end; s <= te; ++s) {
      const T* Rs = R.data() + (s - t0) * N;
      const T* As = A.data() + (s - t0) * N;
      for (index_t k = 0; k < N; ++k) {
        const T u = dR(s - t0, k) * Rs[k];  // dL/d(A^end - A^s)
        dBT[std::size_t(k * l + (s - t0))] += dR(s - t0, k) * std::exp(Ae[k] - As[k]);
        dAT[std::size_t(k * l + (l - 1))] += u;
        dAT[std::size_t(k * l + (s - t0))] -= u;
      }
    }
    if (detail::sees_start(in, t0, te))
      for (index_t k = 0; k < N; ++k) {
        T s = 0;
        for (index_t p = 0; p < P; ++p) s += dHc(p, k) * H0(p, k);
        dAT[std::size_t(k * l + (l - 1))] += s * std::exp(Ae[k]);
      }
    for (index_t r = 0; r < l; ++r)
      for (index_t k = 0; k < N; ++k) g.beta[std::size_t((t0 + r) * N + k)] += dBT[std::size_t(k * l + r)];
    // log a^j enters A^t for t >= j up to the next restart: a reverse cumulative sum.
    Work<T> run(std::size_t(N), T(0));
    for (index_t t = t1 - 1; t >= t0; --t) {
      for (index_t k = 0; k < N; ++k) run[std::size_t(k)] += dAT[std::size_t(k * l + (t - t0))];
      const bool restart = t == t0 || in.seg[std::size_t(t)] == t;
      if (in.seg[std::size_t(t)] != t)  // a document start's decay is not used
        for (index_t k = 0; k < N; ++k) g.la[std::size_t(t * N + k)] = run[std::size_t(k)];
      if (restart) std::fill(run.begin(), run.end(), T(0));
    }
  }
}

}  // namespace ssmx::nn::structured
