// ssmx — the structured chunked scan (the chunked matrix form of Mamba-2's SSD) for a layer
// whose decay is shared across a state axis, derived like the fused scan (nn/fused.hpp)
// from the layer's expressions.
//
// The rule. A state [P, N] or [H, P, N] whose maps have this shape, read off the lifted trees:
//   decay    a^t[h, n]              constant along P (every operand of the decay has stride 0 there)
//   inject   x^t[h, p] * β^t[h, n]  a product of two operands, one constant along N, one along P
//   readout  Σ_n h^t[h, p, n] c^t[h, n] (a sum or mean over N of the state times an operand
//                                    constant along P)
// Two forms, chosen from the decay's broadcast shape:
//   vector decay (a^t[n] varies along N; a rank-2 state: DiagonalSSM, the example GatedSSM):
//     with log-decays accumulated inside a chunk of L tokens, A^t[n] = Σ_{j ≤ t} log a^j[n]
//     (restarted at document starts),
//       y^t[p]   = Σ_{s ≤ t} M[t, s] x^s[p] + Σ_n c^t[n] e^{A^t[n]} h0[p, n]
//       M[t, s]  = Σ_n c^t[n] β^s[n] e^{A^t[n] - A^s[n]}          (exponents <= 0: no overflow)
//       h_end    = e^{A^end} ⊙ h0 + Σ_s e^{A^end - A^s} β^s x^s ⊗
//     GEMMs over [L × L], [L × P] and [P × N] blocks plus L² N exponentials per chunk;
//   scalar decay (one a^t[h] per head, constant along N as well: Mamba2; the SSD form proper):
//     per head, with the scalar A^t[h],
//       M_h      = (C Bᵀ) ⊙ E_h,  E_h[t, s] = e^{A^t[h] - A^s[h]}   (s ≤ t, same document)
//     so that C Bᵀ ([L × N]·[N × L]) is one GEMM per chunk and group of heads sharing β and c,
//     and each head adds GEMMs [L × L]·[L × P], [P × L]·[L × N], [L × N]·[N × P] and L²/2
//     exponentials, instead of coefficient-wise passes over [tokens × H × P × N].
// A rank-3 state whose decay varies along N takes the elementwise fused scan. The backward
// pass is the exact adjoint of the same sums (the chunk-to-chunk carry is dL/dh at chunk ends,
// the same carry as the elementwise scan's a ⊙ δ).
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

// One stretch's inputs, compact and row-major, and which tokens start a document:
//   vector decay (scalar = false, H = 1): la, beta, c [n, N]; x [n, P]
//   scalar decay (scalar = true):         la [n, H]; beta, c [n, groups, N]; x [n, H, P]
// la holds log a (0 at a document start). Head h reads β and c of group h / (H / groups).
template <class T>
struct Inputs {
  index_t n = 0, H = 1, P = 0, N = 0;
  index_t groups = 1;
  bool scalar = false;
  Work<T> la, beta, c, x;
  std::vector<index_t> seg;  // seg[t]: the last document start at or before t, or -1
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

// out[k] = m[k] e^{a[k] - b[k]} for k < n, a register of k at a time; b null: e^{a[k]},
// m null: no factor.
template <class T>
void exp_rows(index_t n, const T* a, const T* b, const T* m, T* out) {
  using Pk = simd::Pack<T>;
  index_t k = 0;
  for (; k + Pk::size <= n; k += Pk::size) {
    Pk x = Pk::load(a + k);
    if (b) x = x - Pk::load(b + k);
    Pk e = simd::exp(x);
    if (m) e = e * Pk::load(m + k);
    e.store(out + k);
  }
  for (; k < n; ++k) {
    const T e = std::exp(b ? a[k] - b[k] : a[k]);
    out[k] = m ? m[k] * e : e;
  }
}

// Lanes [0, n) set, the rest clear (n < the register's lanes).
template <class T>
simd::Pack<T> first_lanes(index_t n) {
  using Pk = simd::Pack<T>;
  alignas(64) T lane[Pk::size];
  for (int i = 0; i < Pk::size; ++i) lane[i] = T(i);
  return simd::lt(Pk::load(lane), Pk(T(n)));
}

}  // namespace detail

// What the forward pass keeps for the backward pass: the state before every chunk
// ([chunks, H, P, N]). The decay factors e^{A^t - A^s} of a chunk ([l, N, l]) are recomputed
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
      if (s < s1 && s + P::size <= l) {  // the row's tail as one register, lanes past t zero
        const P e = simd::select(first_lanes<T>(s1 - s), simd::exp(at - P::load(ATk + s)), P(0));
        e.store(Kr + s);
        (P::load(Mr + s) + cb * P::load(BTk + s) * e).store(Mr + s);
        s = s1;
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

// Gradients of one stretch (each buffer is written, not added to), in the layout of Inputs:
// dL/d(log a), dL/dβ, dL/dc, dL/dx; and dL/d(state before the stretch), [H, P, N].
template <class T>
struct Grads {
  Work<T> la, beta, c, x;
  Work<T> h0;
};

// ---- the scalar decay: the SSD form --------------------------------------------------------

namespace ssd {

template <class T>
using Rows = Eigen::Map<const Mat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;  // rows of a wider buffer
template <class T>
using RowsW = Eigen::Map<Mat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// A chunk [t0, t1) of the stretch and the views of its rows.
template <class T>
struct Chunk {
  const Inputs<T>& in;
  index_t t0, t1, l;
  index_t end_seen;  // chunk-relative first token the chunk's last token sees
  bool keeps;        // whether the last token sees the state before the chunk
  Chunk(const Inputs<T>& i, index_t ci) : in(i), t0(ci * chunk_len), t1(std::min(i.n, t0 + chunk_len)), l(t1 - t0) {
    end_seen = detail::first_seen(in, t0, t1 - 1) - t0;
    keeps = detail::sees_start(in, t0, t1 - 1);
  }
  index_t group(index_t h) const { return h / (in.H / in.groups); }
  // x, or a [n, H, P] buffer like it, of head h: [l, P].
  Rows<T> heads(const T* base, index_t h) const {
    return Rows<T>(base + (t0 * in.H + h) * in.P, l, in.P, Eigen::OuterStride<>(in.H * in.P));
  }
  RowsW<T> heads(T* base, index_t h) const {
    return RowsW<T>(base + (t0 * in.H + h) * in.P, l, in.P, Eigen::OuterStride<>(in.H * in.P));
  }
  // β, c, or a [n, groups, N] buffer like them, of group g: [l, N].
  Rows<T> group_rows(const T* base, index_t g) const {
    return Rows<T>(base + (t0 * in.groups + g) * in.N, l, in.N, Eigen::OuterStride<>(in.groups * in.N));
  }
  RowsW<T> group_rows(T* base, index_t g) const {
    return RowsW<T>(base + (t0 * in.groups + g) * in.N, l, in.N, Eigen::OuterStride<>(in.groups * in.N));
  }
  bool sees_start(index_t r) const { return detail::sees_start(in, t0, t0 + r); }
  // Head h's cumulative log-decay A[r] since the chunk start or the last document start.
  void cumulative(index_t h, T* A) const {
    for (index_t r = 0; r < l; ++r) {
      const index_t t = t0 + r;
      const T la = in.la[std::size_t(t * in.H + h)];
      A[r] = in.seg[std::size_t(t)] == t ? T(0) : r == 0 ? la : A[r - 1] + la;
    }
  }
  // E[r, s] = e^{A[r] - A[s]} where token r sees token s (0 elsewhere): [l, l].
  void factors(const T* A, T* E) const {
    using Pk = simd::Pack<T>;
    for (index_t r = 0; r < l; ++r) {
      const index_t s0 = detail::first_seen(in, t0, t0 + r) - t0, s1 = r + 1;
      T* Er = E + r * l;
      std::fill(Er, Er + s0, T(0));
      std::fill(Er + s1, Er + l, T(0));
      const Pk ar(A[r]);
      index_t s = s0;
      for (; s + Pk::size <= s1; s += Pk::size) simd::exp(ar - Pk::load(A + s)).store(Er + s);
      if (s < s1 && s + Pk::size <= l) {  // the tail as one register, lanes past r zero
        simd::select(detail::first_lanes<T>(s1 - s), simd::exp(ar - Pk::load(A + s)), Pk(0)).store(Er + s);
        s = s1;
      }
      for (; s < s1; ++s) Er[s] = std::exp(A[r] - A[s]);
    }
  }
  // e^{A^end - A^s} for the tokens the last one sees, else 0: [l].
  void to_end(const T* A, T* r_) const {
    using Pk = simd::Pack<T>;
    std::fill(r_, r_ + end_seen, T(0));
    const Pk ae(A[l - 1]);
    index_t s = end_seen;
    for (; s + Pk::size <= l; s += Pk::size) simd::exp(ae - Pk::load(A + s)).store(r_ + s);
    for (; s < l; ++s) r_[s] = std::exp(A[l - 1] - A[s]);
  }
  // e^{A^t} for the tokens that see the state before the chunk (a prefix), else 0: [l].
  void from_start(const T* A, T* q) const {
    index_t e = 0;
    while (e < l && sees_start(e)) ++e;
    detail::exp_rows<T>(e, A, nullptr, nullptr, q);
    std::fill(q + e, q + l, T(0));
  }
};

template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using MapV = Eigen::Map<Vec<T>>;

template <class T>
void forward(const Inputs<T>& in, const T* h0, T* y, T* h_last, Saved<T>* saved) {
  const index_t n = in.n, H = in.H, P = in.P, N = in.N, PN = P * N, HPN = H * PN;
  const index_t nc = (n + chunk_len - 1) / chunk_len, Hg = H / in.groups;
  Work<T> states(std::size_t((nc + 1) * HPN), T(0));
  if (h0) std::copy(h0, h0 + HPN, states.begin());
  // Per chunk, in parallel: the intra-chunk part of y, and per head what the chunk adds to
  // the state (Xᵀ diag(e^{A^end - A^s}) B) with the decay it applies (e^{A^end}).
  Work<T> added(std::size_t(nc * HPN)), decay_end(std::size_t(nc * H));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const Chunk<T> ch(in, ci);
    const index_t l = ch.l;
    Mat<T> CB, M(l, l);
    Vec<T> A(l), r(l);
    for (index_t g = 0; g < in.groups; ++g) {
      const auto B = ch.group_rows(in.beta.data(), g);
      if (y) CB.noalias() = ch.group_rows(in.c.data(), g) * B.transpose();
      for (index_t h = g * Hg; h < (g + 1) * Hg; ++h) {
        ch.cumulative(h, A.data());
        const auto X = ch.heads(in.x.data(), h);
        if (y) {
          ch.factors(A.data(), M.data());
          M.array() *= CB.array();
          ch.heads(y, h).noalias() = M * X;
        }
        ch.to_end(A.data(), r.data());
        MapM<T>(added.data() + ci * HPN + h * PN, P, N).noalias() = X.transpose() * (r.asDiagonal() * B);
        decay_end[std::size_t(ci * H + h)] = ch.keeps ? std::exp(A[l - 1]) : T(0);
      }
    }
  }
  // The states before each chunk, in order.
  for (index_t ci = 0; ci < nc; ++ci)
    for (index_t h = 0; h < H; ++h) {
      const T de = decay_end[std::size_t(ci * H + h)];
      const T* s0 = states.data() + ci * HPN + h * PN;
      const T* add = added.data() + ci * HPN + h * PN;
      T* s1 = states.data() + (ci + 1) * HPN + h * PN;
      for (index_t i = 0; i < PN; ++i) s1[i] = de * s0[i] + add[i];
    }
  // The state's part of y: diag(e^{A^t}) C h0ᵀ per head.
  if (y) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
    for (index_t ci = 0; ci < nc; ++ci) {
      const Chunk<T> ch(in, ci);
      if (!ch.sees_start(0)) continue;  // a document starts at the chunk's first token
      Vec<T> A(ch.l), q(ch.l);
      for (index_t h = 0; h < H; ++h) {
        ch.cumulative(h, A.data());
        ch.from_start(A.data(), q.data());
        ch.heads(y, h).noalias() += q.asDiagonal() * ch.group_rows(in.c.data(), ch.group(h)) *
                                    CMapM<T>(states.data() + ci * HPN + h * PN, P, N).transpose();
      }
    }
  }
  if (h_last) std::copy(states.begin() + nc * HPN, states.end(), h_last);
  if (saved) saved->states = std::move(states);
}

template <class T>
void backward(const Inputs<T>& in, const Saved<T>& saved, const T* dy, const T* dh_end, Grads<T>& g) {
  const index_t n = in.n, H = in.H, P = in.P, N = in.N, PN = P * N, HPN = H * PN;
  const index_t nc = (n + chunk_len - 1) / chunk_len, Hg = H / in.groups;
  const Work<T>& states = saved.states;
  g.la = Work<T>(std::size_t(n * H), T(0));
  g.beta = Work<T>(std::size_t(n * in.groups * N), T(0));
  g.c = Work<T>(std::size_t(n * in.groups * N), T(0));
  g.x = Work<T>(std::size_t(n * H * P));  // every chunk writes its rows
  g.h0 = Work<T>(std::size_t(HPN), T(0));
  // dL/d(state at the end of each chunk), last chunk to first:
  //   dH_{c-1} = dYᵀ diag(e^{A^t}) C (the chunk's readout of its start) + e^{A^end} dH_c
  // The first term of every chunk in parallel, then the carry in order.
  Work<T> start_grad(std::size_t(nc * HPN)), decay_end(std::size_t(nc * H));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const Chunk<T> ch(in, ci);
    Vec<T> A(ch.l), q(ch.l);
    for (index_t h = 0; h < H; ++h) {
      ch.cumulative(h, A.data());
      ch.from_start(A.data(), q.data());
      MapM<T>(start_grad.data() + ci * HPN + h * PN, P, N).noalias() =
          ch.heads(dy, h).transpose() * (q.asDiagonal() * ch.group_rows(in.c.data(), ch.group(h)));
      decay_end[std::size_t(ci * H + h)] = ch.keeps ? std::exp(A[ch.l - 1]) : T(0);
    }
  }
  Work<T> dH(std::size_t(nc * HPN));
  Work<T> carry(std::size_t(HPN), T(0));  // dL/d(state at the end of chunk ci)
  if (dh_end) std::copy(dh_end, dh_end + HPN, carry.begin());
  for (index_t ci = nc - 1; ci >= 0; --ci) {
    std::copy(carry.begin(), carry.end(), dH.begin() + ci * HPN);
    for (index_t h = 0; h < H; ++h) {
      const T de = decay_end[std::size_t(ci * H + h)];
      const T* d0 = start_grad.data() + ci * HPN + h * PN;
      T* c = carry.data() + h * PN;
      for (index_t i = 0; i < PN; ++i) c[i] = d0[i] + de * c[i];
    }
  }
  std::copy(carry.begin(), carry.end(), g.h0.begin());
  // Per chunk, in parallel: everything else.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nc > 1 && !omp_in_parallel())
#endif
  for (index_t ci = 0; ci < nc; ++ci) {
    const Chunk<T> ch(in, ci);
    const index_t l = ch.l;
    Mat<T> CB, dCB(l, l), E(l, l), M(l, l), dM(l, l), dQ, dR;
    Vec<T> A(l), dA(l), r(l), q(l);
    for (index_t gi = 0; gi < in.groups; ++gi) {
      const auto B = ch.group_rows(in.beta.data(), gi);
      const auto C = ch.group_rows(in.c.data(), gi);
      auto dB = ch.group_rows(g.beta.data(), gi);
      auto dC = ch.group_rows(g.c.data(), gi);
      CB.noalias() = C * B.transpose();
      dCB.setZero();
      for (index_t h = gi * Hg; h < (gi + 1) * Hg; ++h) {
        ch.cumulative(h, A.data());
        ch.factors(A.data(), E.data());
        M = E.cwiseProduct(CB);
        ch.to_end(A.data(), r.data());
        ch.from_start(A.data(), q.data());
        const auto X = ch.heads(in.x.data(), h);
        const auto dY = ch.heads(dy, h);
        const CMapM<T> H0(states.data() + ci * HPN + h * PN, P, N), dHc(dH.data() + ci * HPN + h * PN, P, N);
        // y = M X + diag(q) C H0ᵀ;  added = Xᵀ diag(r) B;  h_end = e^{A^end} H0 + added
        auto dX = ch.heads(g.x.data(), h);
        dX.noalias() = M.transpose() * dY;
        dX.noalias() += r.asDiagonal() * (B * dHc.transpose());
        dM.noalias() = dY * X.transpose();
        dCB.array() += dM.array() * E.array();
        // dL/dA through E (w = dM ⊙ M: + at the row's token, - at the column's)
        M.array() *= dM.array();
        dA = M.rowwise().sum() - M.colwise().sum().transpose();
        if (ch.sees_start(0)) {  // through q: the state's readout
          dQ.noalias() = dY * H0;  // [l, N]
          dC.noalias() += q.asDiagonal() * dQ;
          dA.array() += q.array() * (dQ.cwiseProduct(C)).rowwise().sum().array();
        }
        dR.noalias() = X * dHc;  // [l, N], through r: what the chunk adds to the state
        dB.noalias() += r.asDiagonal() * dR;
        const Vec<T> u = r.cwiseProduct(dR.cwiseProduct(B).rowwise().sum());
        dA -= u;
        dA[l - 1] += u.sum();
        if (ch.keeps) dA[l - 1] += decay_end[std::size_t(ci * H + h)] * dHc.cwiseProduct(H0).sum();
        // log a^j enters A^t for t >= j up to the next restart: a reverse cumulative sum.
        T run = 0;
        for (index_t k = l - 1; k >= 0; --k) {
          const index_t t = ch.t0 + k;
          run += dA[k];
          if (in.seg[std::size_t(t)] != t) g.la[std::size_t(t * H + h)] = run;  // a document start's decay is unused
          if (k == 0 || in.seg[std::size_t(t)] == t) run = 0;
        }
      }
      dC.noalias() += dCB * B;
      dB.noalias() += dCB.transpose() * C;
    }
  }
}

}  // namespace ssd

// The forward pass: y ([n, H, P], the reduction Σ_n h c; null: only the states), and the
// state after the stretch (h_last, [H, P, N]; null: not wanted). h0: [H, P, N] or null.
// `saved`: what the backward pass needs (null: not kept). H = 1 for a rank-2 state.
template <class T>
void forward(const Inputs<T>& in, const T* h0, T* y, T* h_last, Saved<T>* saved = nullptr) {
  if (in.scalar) return ssd::forward(in, h0, y, h_last, saved);
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
    for (index_t s = detail::first_seen(in, t0, te); s <= te; ++s)
      detail::exp_rows(N, Ae, A.data() + (s - t0) * N, in.beta.data() + s * N, R.data() + (s - t0) * N);
    if (detail::sees_start(in, t0, te))
      detail::exp_rows<T>(N, Ae, nullptr, nullptr, decay_end.data() + ci * N);
    else
      std::fill(decay_end.data() + ci * N, decay_end.data() + (ci + 1) * N, T(0));
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
          detail::exp_rows<T>(N, A.data() + (t - t0) * N, nullptr, in.c.data() + t * N, Q.data() + (t - t0) * N);
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

// The backward pass: dy ([n, H, P], dL/d(reduction)), dh_end ([H, P, N], dL/d(state after the
// stretch) from later tokens, or null), with what forward() saved.
template <class T>
void backward(const Inputs<T>& in, const Saved<T>& saved, const T* dy, const T* dh_end, Grads<T>& g) {
  if (in.scalar) return ssd::backward(in, saved, dy, dh_end, g);
  using P_ = simd::Pack<T>;
  const index_t n = in.n, P = in.P, N = in.N, L = chunk_len;
  const index_t nc = (n + L - 1) / L;
  const Work<T>& states = saved.states;
  g.la = Work<T>(std::size_t(n * N), T(0));
  g.beta = Work<T>(std::size_t(n * N), T(0));
  g.c = Work<T>(std::size_t(n * N), T(0));
  g.x = Work<T>(std::size_t(n * P));  // every chunk writes its rows
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
        detail::exp_rows<T>(N, A.data() + (t - t0) * N, nullptr, in.c.data() + t * N, Qs.data() + t * N);
    if (detail::sees_start(in, t0, t1 - 1))
      detail::exp_rows<T>(N, A.data() + (l - 1) * N, nullptr, nullptr, decay_end.data() + ci * N);
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
    // R[s] = β^s e^{A^end - A^s}, and the factor alone (dR's VJP to β) in F.
    Work<T> F(std::size_t(l * N), T(0));
    for (index_t s = s_end; s <= te; ++s) {
      T* Fs = F.data() + (s - t0) * N;
      detail::exp_rows<T>(N, Ae, A.data() + (s - t0) * N, nullptr, Fs);
      for (index_t k = 0; k < N; ++k) R[std::size_t((s - t0) * N + k)] = in.beta[std::size_t(s * N + k)] * Fs[k];
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
    Work<T> Er{std::size_t(N)};
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
        if (s < s1 && s + P_::size <= l) {  // the tail as one register, lanes past t zero
          const P_ dmK = simd::select(detail::first_lanes<T>(s1 - s), P_::load(dMr + s) * P_::load(Kr + s), P_(0));
          const P_ bk = P_::load(BTk + s);
          sc += dmK * bk;
          (P_::load(dBTk + s) + dmK * cb).store(dBTk + s);
          const P_ w = dmK * cb * bk;
          sw += w;
          (P_::load(dATk + s) - w).store(dATk + s);
          s = s1;
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
      if (detail::sees_start(in, t0, t)) {
        T* E = Er.data();
        detail::exp_rows<T>(N, A.data() + r * N, nullptr, nullptr, E);
        for (index_t k = 0; k < N; ++k) {
          dct[k] += dQ(r, k) * E[k];
          dAT[std::size_t(k * l + r)] += dQ(r, k) * ct[k] * E[k];
        }
      }
    }
    for (index_t s = s_end; s <= te; ++s) {
      const T* Rs = R.data() + (s - t0) * N;
      const T* Fs = F.data() + (s - t0) * N;
      for (index_t k = 0; k < N; ++k) {
        const T u = dR(s - t0, k) * Rs[k];  // dL/d(A^end - A^s)
        dBT[std::size_t(k * l + (s - t0))] += dR(s - t0, k) * Fs[k];
        dAT[std::size_t(k * l + (l - 1))] += u;
        dAT[std::size_t(k * l + (s - t0))] -= u;
      }
    }
    if (detail::sees_start(in, t0, te))
      for (index_t k = 0; k < N; ++k) {
        T s = 0;
        for (index_t p = 0; p < P; ++p) s += dHc(p, k) * H0(p, k);
        dAT[std::size_t(k * l + (l - 1))] += s * decay_end[std::size_t(ci * N + k)];
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
