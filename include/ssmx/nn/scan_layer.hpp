// ssmx — the engine behind every scan layer. A layer supplies its per-token maps as
// expressions (decay, inject, readout; see the ScanLayer concept in diagonal_ssm.hpp);
// this file derives from them the forward scan and the whole backward pass:
//
//   forward   u = RMSNorm(y_in);  a = decay(u);  b = inject(u);  h = scan(a, b, h0)
//             y_out = y_in + readout(h, u)
//   backward  phase 1 (per shard):  readout VJP  -> dL/dh (direct part), dL/du, dθ
//             adjoint state:        δ^t = dL/dh^t + a^{t+1} ⊙ δ^{t+1}   (reverse scan)
//             phase 2 (per shard):  decay VJP with δ ⊙ h^{t-1}, inject VJP with δ,
//                                   RMSNorm VJP -> dL/dy_in, dθ
//
// Once δ is known every token's VJP is independent (the paper's "sharding"): the tokens
// of a stretch are cut into shards of fixed length run on OpenMP threads, each with its
// own parameter-gradient buffers, summed afterwards in shard order. The result is
// bit-identical whatever the number of threads.
// Host backend. Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include <algorithm>
#include <vector>

#include "../autodiff/autodiff.hpp"
#include "../scan/scan.hpp"
#include "norm.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ssmx::nn {

// A residual block: y_out = y_in + mixer(RMSNorm(y_in)).
template <class Layer>
struct Block {
  using T = typename Layer::value_type;
  RMSNorm<T> norm;
  Layer mixer;
  explicit Block(const std::string& prefix) : norm(prefix + "norm.weight", Layer::d_model), mixer(prefix + "mixer.") {}
  // The norm weight first, then the mixer's parameters in its order.
  ParameterList<T> parameters() {
    ParameterList<T> p{&norm.weight};
    for (auto* q : mixer.parameters()) p.push_back(q);
    return p;
  }
};

template <class Layer>
struct LayerTypes {
  using T = typename Layer::value_type;
  using CV = TensorView<const T>;
  using NormE = decltype(rms_norm(std::declval<CV>(), std::declval<const Tensor<T>&>()));
  using DecayE = decltype(std::declval<const Layer&>().decay(std::declval<CV>()));
  using InjectE = decltype(std::declval<const Layer&>().inject(std::declval<CV>()));
  using ReadoutE = decltype(std::declval<const Layer&>().readout(std::declval<CV>(), std::declval<CV>()));
};

inline index_t state_numel(const Dims& s) { return s.numel(); }

// [n] + state dims, e.g. [n, P, N].
inline Dims with_tokens(index_t n, const Dims& state) {
  Dims d;
  d.rank = state.rank + 1;
  d[0] = n;
  for (int i = 0; i < state.rank; ++i) d[i + 1] = state[i];
  return d;
}

// What one stretch of tokens of one layer computes in the forward pass.
template <class Layer>
struct Stretch {
  using T = typename Layer::value_type;
  TensorView<const T> y_in;  // [n, d_model], the stored layer input (not owned)
  Tensor<T> u;               // [n, d_model], the normalised input
  Tensor<T> a;               // [1, n, S], the decay broadcast to the state
  Tensor<T> h;               // [1, n, S], the states
  Tensor<T> h0;              // [1, S], the state before the stretch
  index_t n() const { return y_in.extent(0); }
};

// The tapes of one shard's per-token maps (every intermediate value, for the VJPs).
template <class Layer>
struct ShardTapes {
  using Ty = LayerTypes<Layer>;
  Tape<typename Ty::NormE> norm;
  Tape<typename Ty::DecayE> decay;
  Tape<typename Ty::InjectE> inject;
  Tape<typename Ty::ReadoutE> readout;
  ShardTapes(const Block<Layer>& blk, typename Ty::CV y, typename Ty::CV u, typename Ty::CV h)
      : norm(rms_norm(y, blk.norm.weight.value, blk.norm.eps)),
        decay(blk.mixer.decay(u)),
        inject(blk.mixer.inject(u)),
        readout(blk.mixer.readout(h, u)) {}
};

// Forward over one stretch: fills st.u, st.a, st.h from y_in and the state h0 before it
// (empty: zero); writes the last state to h_last when given.
template <class Layer>
void compute_stretch(const Block<Layer>& blk, TensorView<const typename Layer::value_type> y_in,
                     TensorView<const typename Layer::value_type> h0, Stretch<Layer>& st,
                     TensorView<typename Layer::value_type> h_last = {}) {
  using T = typename Layer::value_type;
  const Dims sd = Layer::state_dims();
  const index_t n = y_in.extent(0), S = state_numel(sd);
  st.y_in = y_in;
  st.u = Tensor<T>(y_in.dims(), Tag::Activations);
  assign(st.u.view(), rms_norm(y_in, blk.norm.weight.value, blk.norm.eps));
  TensorView<const T> u = st.u.view();
  st.a = Tensor<T>(Dims{1, n, S}, Tag::Activations);
  assign(st.a.view().reshape(with_tokens(n, sd)), broadcast_to(blk.mixer.decay(u), with_tokens(n, sd)));
  st.h = Tensor<T>(Dims{1, n, S}, Tag::Activations);
  assign(st.h.view().reshape(with_tokens(n, sd)), blk.mixer.inject(u));
  st.h0 = zeros<T>(Dims{1, S}, Tag::Activations);
  if (h0.data()) copy<T>(st.h0.view(), h0.reshape(Dims{1, S}));
  linear_scan<T, Space::Host>(st.a.view(), st.h.view(), st.h.view(), st.h0.view(), h_last);
}

// y_out = y_in + readout(h, u) for a computed stretch.
template <class Layer>
void write_output(const Block<Layer>& blk, const Stretch<Layer>& st, TensorView<typename Layer::value_type> y_out) {
  using T = typename Layer::value_type;
  const Dims sd = Layer::state_dims();
  TensorView<const T> h3 = TensorView<const T>(st.h.view()).reshape(with_tokens(st.n(), sd));
  assign(y_out, leaf(st.y_in) + blk.mixer.readout(h3, TensorView<const T>(st.u.view())));
}

// How the adjoint state δ of a stretch is formed from dL/dh (the readout's direct part).
enum class DeltaMethod { exact, truncated, paper };

// Per-shard parameter-gradient buffers for one block, summed in shard order afterwards.
template <class T>
struct ShardGrads {
  std::vector<std::vector<Tensor<T>>> g;  // [shard][parameter]
  void reset(const ParameterList<T>& params, index_t shards) {
    if (index_t(g.size()) != shards) g.resize(std::size_t(shards));
    for (auto& row : g) {
      if (row.size() != params.size()) {
        row.clear();
        for (auto* p : params) row.push_back(Tensor<T>(p->value.dims(), Tag::Gradients));
      }
      for (auto& t : row) fill<T>(t.view(), T(0));
    }
  }
  void add_to(const ParameterList<T>& params) const {
    for (const auto& row : g)
      for (std::size_t i = 0; i < params.size(); ++i) accumulate(params[i]->grad.view(), row[i]);
  }
};

template <class T>
GradTargets<T, Space::Host> param_targets(const ParameterList<T>& params, std::vector<Tensor<T>>& grads) {
  GradTargets<T, Space::Host> tg;
  for (std::size_t i = 0; i < params.size(); ++i) tg.push_back(wrt(params[i]->value, grads[i]));
  return tg;
}

// Options of one backward pass over a stretch.
template <class T>
struct StretchBackward {
  DeltaMethod method = DeltaMethod::exact;
  index_t shard = 64;                 // tokens per VJP shard
  index_t window = 0;                 // T̄ for truncated/paper (0: none)
  TensorView<const T> carry_in;       // exact: a^{end} ⊙ δ^{end} from the next stretch, [1, S]
  TensorView<T> carry_out;            // a^0 ⊙ δ^0 for the stretch before, [1, S]
  const Tensor<T>* q_next = nullptr;  // truncated: the next block's forward accumulation
  Tensor<T>* q_out = nullptr;         // truncated: this block's, for the block before
  TensorView<T> input_grad;           // where dL/dy_in accumulates, [n, d_model]
};

namespace detail {
template <class T>
TensorView<const T> cview(const Tensor<T>& t) {
  return t.view();
}

// Truncated adjoint on one block of length L = window (DESIGN §1.3), O(L·S):
// δ^i = r^i + φ^i ⊙ q_next[i-1], with r the in-block reverse scan, φ^i = Π_{j=i+1..end} a^j
// and q_next[m] = Σ_{t=s'}^{s'+m} (Π_{j=s'..t} a^j) g^t accumulated over the next block.
template <class T>
void truncated_delta(TensorView<const T> a, TensorView<const T> gh, TensorView<T> delta, const Tensor<T>* q_next,
                     Tensor<T>* q_out) {
  const index_t n = a.extent(1), S = a.extent(2);
  reverse_linear_scan<T, Space::Host>(a, gh, delta);
  // Constant sequences as broadcast views of one row (time stride 0): no block-sized buffers.
  Tensor<T> consts(Dims{2, S}, Tag::Workspace);
  std::fill(consts.data(), consts.data() + S, T(0));
  std::fill(consts.data() + S, consts.data() + 2 * S, T(1));
  const TensorView<const T> zero_seq(consts.data(), Dims{1, n, S}, {0, 0, 1, 0});
  const TensorView<const T> one_seq(consts.data() + S, Dims{1, n, S}, {0, 0, 1, 0});
  const TensorView<const T> ones(consts.data() + S, Dims{1, S});
  if (q_next && !q_next->empty() && n > 1) {
    Tensor<T> phi(Dims{1, n, S}, Tag::Workspace);  // φ^i = Π_{j=i+1..end} a^j
    reverse_linear_scan<T, Space::Host>(a, zero_seq, phi.view(), ones);
    const index_t ln = q_next->extent(1);
    for (index_t i = 1; i < n; ++i) {
      const T* q = q_next->data() + std::min(i - 1, ln - 1) * S;
      const T* p = phi.data() + i * S;
      T* d = delta.data() + i * S;
      for (index_t c = 0; c < S; ++c) d[c] += p[c] * q[c];
    }
  }
  if (q_out) {
    *q_out = Tensor<T>(Dims{1, n, S}, Tag::Workspace);
    linear_scan<T, Space::Host>(a, zero_seq, q_out->view(), ones);  // Π_{j=s..t} a^j
    assign(q_out->view(), leaf(*q_out) * leaf(gh));
    linear_scan<T, Space::Host>(one_seq, cview(*q_out), q_out->view());  // running sum, in place
  }
}

// The paper's double sum, literally: δ^i = Σ_{t=i}^{i+T̄-1} (Π_{j=i+1..t} a^j) ⊙ gh^t.
// O(T·T̄·S) work (O(T²·S) without a window).
template <class T>
void paper_delta(TensorView<const T> a, TensorView<const T> gh, TensorView<T> delta, index_t window) {
  const index_t n = a.extent(1), S = a.extent(2);
  const index_t w = window > 0 ? window : n;
  fill<T>(delta, T(0));
#if defined(_OPENMP)
#pragma omp parallel
#endif
  {
    std::vector<T> v(std::size_t(S > 0 ? S : 1));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (index_t c0 = 0; c0 < S; c0 += 64) {
      const index_t c1 = std::min(S, c0 + 64);
      for (index_t t = 0; t < n; ++t) {
        for (index_t c = c0; c < c1; ++c) v[std::size_t(c)] = gh.data()[t * S + c];
        const index_t lo = std::max<index_t>(0, t - w + 1);
        for (index_t i = t; i >= lo; --i) {
          for (index_t c = c0; c < c1; ++c) delta.data()[i * S + c] += v[std::size_t(c)];
          if (i > lo)
            for (index_t c = c0; c < c1; ++c) v[std::size_t(c)] *= a.data()[i * S + c];
        }
      }
    }
  }
}
}  // namespace detail

// Backward over one computed stretch with output cotangent G ([n, d_model]).
// `tapes`: prebuilt tapes for one shard covering the whole stretch (Backprop), or empty
// to build them here per shard (the adjoint strategies). Parameter gradients are added to
// each parameter's grad; dL/dy_in is added to opt.input_grad.
template <class Layer>
void backward_stretch(Block<Layer>& blk, const Stretch<Layer>& st, TensorView<const typename Layer::value_type> G,
                      StretchBackward<typename Layer::value_type>& opt, ShardGrads<typename Layer::value_type>& sg,
                      std::vector<ShardTapes<Layer>>* kept_tapes = nullptr) {
  using T = typename Layer::value_type;
  using CV = TensorView<const T>;
  const Dims sd = Layer::state_dims();
  const index_t n = st.n(), S = state_numel(sd);
  const ParameterList<T> params = blk.parameters();
  const index_t shard = kept_tapes ? n : std::max<index_t>(1, std::min(opt.shard, n));
  const index_t nshards = (n + shard - 1) / shard;
  sg.reset(params, nshards);

  CV h_all = st.h.view();
  CV h3 = h_all.reshape(with_tokens(n, sd));
  CV u = st.u.view();
  Tensor<T> gh = zeros<T>(Dims{1, n, S}, Tag::Workspace);  // dL/dh, direct part
  Tensor<T> du = zeros<T>(u.dims(), Tag::Workspace);       // dL/du
  TensorView<T> gh3 = gh.view().reshape(with_tokens(n, sd));

  std::vector<ShardTapes<Layer>> local;
  std::vector<ShardTapes<Layer>>& tapes = kept_tapes ? *kept_tapes : local;
  if (!kept_tapes) {
    local.reserve(std::size_t(nshards));
    for (index_t s = 0; s < nshards; ++s) {
      const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
      local.emplace_back(blk, st.y_in.slice(s0, s1), u.slice(s0, s1), h3.slice(s0, s1));
    }
  }

  // Phase 1: readout VJPs, shard-parallel.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nshards > 1)
#endif
  for (index_t s = 0; s < nshards; ++s) {
    const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
    CV us = u.slice(s0, s1), hs = h3.slice(s0, s1);
    auto tg = param_targets(params, sg.g[std::size_t(s)]);
    tg.push_back(wrt(hs, gh3.slice(s0, s1)));
    tg.push_back(wrt(us, du.view().slice(s0, s1)));
    backward(blk.mixer.readout(hs, us), tapes[std::size_t(s)].readout, G.slice(s0, s1), tg);
  }

  // The adjoint state.
  Tensor<T> delta(Dims{1, n, S}, Tag::Workspace);
  CV a = st.a.view();
  switch (opt.method) {
    case DeltaMethod::exact:
      reverse_linear_scan<T, Space::Host>(a, detail::cview(gh), delta.view(), opt.carry_in);
      break;
    case DeltaMethod::truncated:
      detail::truncated_delta<T>(a, detail::cview(gh), delta.view(), opt.q_next, opt.q_out);
      break;
    case DeltaMethod::paper:
      detail::paper_delta<T>(a, detail::cview(gh), delta.view(), opt.window);
      break;
  }
  if (opt.carry_out.data())
    assign(opt.carry_out.reshape(Dims{1, 1, S}), leaf(a.slice(1, 0, 1)) * leaf(CV(delta.view()).slice(1, 0, 1)));

  // Phase 2: decay, inject and norm VJPs, shard-parallel.
  CV delta3 = CV(delta.view()).reshape(with_tokens(n, sd));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nshards > 1)
#endif
  for (index_t s = 0; s < nshards; ++s) {
    const index_t s0 = s * shard, s1 = std::min(n, s0 + shard), ns = s1 - s0;
    CV us = u.slice(s0, s1), ys = st.y_in.slice(s0, s1), ds = delta3.slice(s0, s1);
    auto& grads = sg.g[std::size_t(s)];
    // h^{t-1} for the shard's tokens: the stretch's h0 before its first token.
    Tensor<T> hprev_first;
    CV hprev;
    if (s0 > 0) {
      hprev = h3.slice(s0 - 1, s1 - 1);
    } else {
      hprev_first = Tensor<T>(with_tokens(ns, sd), Tag::Workspace);
      std::copy(st.h0.data(), st.h0.data() + S, hprev_first.data());
      if (ns > 1) std::copy(h_all.data(), h_all.data() + (ns - 1) * S, hprev_first.data() + S);
      hprev = hprev_first.view();
    }
    auto decay_e = blk.mixer.decay(us);
    Tensor<T> da_full = eval(leaf(ds) * leaf(hprev), Tag::Workspace);  // dL/da = δ ⊙ h^{t-1}
    Tensor<T> da = autodiff::reduce_to(CV(da_full.view()), decay_e.dims());
    auto tg = param_targets(params, grads);
    tg.push_back(wrt(us, du.view().slice(s0, s1)));
    backward(decay_e, tapes[std::size_t(s)].decay, CV(da.view()), tg);
    backward(blk.mixer.inject(us), tapes[std::size_t(s)].inject, ds, tg);  // dL/db = δ
    // Through the norm to the layer input.
    GradTargets<T, Space::Host> ntg{wrt(blk.norm.weight.value, grads[0]), wrt(ys, opt.input_grad.slice(s0, s1))};
    backward(rms_norm(ys, blk.norm.weight.value, blk.norm.eps), tapes[std::size_t(s)].norm,
             CV(du.view()).slice(s0, s1), ntg);
  }
  sg.add_to(params);
}

}  // namespace ssmx::nn
