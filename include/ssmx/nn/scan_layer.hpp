// ssmx — the engine behind every scan layer. A layer supplies its per-token maps as
// expressions (decay, inject, readout; see the ScanLayer concept in diagonal_ssm.hpp);
// this file derives from them the forward scan and the whole backward pass:
//
//   forward   u = RMSNorm(y_in);  f = features(u with its halo rows)   (optional stage)
//             a = decay(f);  b = inject(f);  h = scan(a, b, h0)   (a = 0 at document starts)
//             y_out = y_in + readout(h, f)
//   backward  phase 1 (per shard):  readout VJP  -> dL/dh (direct part), dL/df, dθ
//             adjoint state:        δ^t = dL/dh^t + a^{t+1} ⊙ δ^{t+1}   (reverse scan)
//             phase 2 (per shard):  decay VJP with δ ⊙ h^{t-1}, inject VJP with δ
//             phase 3 (per shard):  features VJP -> dL/du, the halo rows included
//             phase 4 (per shard):  RMSNorm VJP -> dL/dy_in (and dL/d(halo rows) for the
//                                   caller to add once the rows' owner has read G)
// Without a feature stage f is u itself and phase 3 is empty.
//
// Once δ is known every token's VJP is independent (the paper's "sharding"): the tokens
// of a stretch are cut into shards of fixed length, each with its own parameter-gradient
// buffers, summed afterwards in shard order. The result is bit-identical whatever the
// number of threads.
// One source for both memory spaces (the layer's `space`): on the host the shards run on
// OpenMP threads and every expression is a loop; on the GPU a stretch is one shard, every
// expression, scan and product a kernel, cuBLAS or CUB call on the calling thread's stream.
// Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../autodiff/autodiff.hpp"
#include "../scan/scan.hpp"
#include "fused.hpp"
#include "norm.hpp"
#include "structured.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__GNUG__)
#include <cxxabi.h>
#endif

namespace ssmx::nn {

// The memory space of a layer (Layer::space; host for a layer that does not say), and the
// same layer in another space (Layer::on<S>; a layer without it lives on the host only).
template <class L, class = void>
struct layer_space : std::integral_constant<Space, Space::Host> {};
template <class L>
struct layer_space<L, std::void_t<decltype(L::space)>> : std::integral_constant<Space, L::space> {};
template <class L, Space S, class = void>
struct layer_on {
  static_assert(S == layer_space<L>::value,
                "ssmx: this layer cannot move to another memory space; give it `template <Space S2> using on = ...` "
                "(see DiagonalSSM)");
  using type = L;
};
template <class L, Space S>
struct layer_on<L, S, std::void_t<typename L::template on<S>>> {
  static_assert(std::is_same_v<typename L::template on<layer_space<L>::value>, L>,
                "ssmx: Layer::on<S> in the layer's own space names another layer; a layer derived from "
                "another inherits its `on`: declare `template <Space S2> using on = ...` naming the derived layer");
  using type = typename L::template on<S>;
};
template <class L, Space S>
using layer_on_t = typename layer_on<L, S>::type;

// A residual block: y_out = y_in + mixer(RMSNorm(y_in)).
template <class Layer>
struct Block {
  using T = typename Layer::value_type;
  static constexpr Space S = layer_space<Layer>::value;
  RMSNorm<T, S> norm;
  Layer mixer;
  explicit Block(const std::string& prefix) : norm(prefix + "norm.weight", Layer::d_model), mixer(prefix + "mixer.") {}
  // The norm weight first, then the mixer's parameters in its order.
  ParameterList<T, S> parameters() {
    ParameterList<T, S> p{&norm.weight};
    for (auto* q : mixer.parameters()) p.push_back(q);
    return p;
  }
};

// Optional parts of the ScanLayer concept (see diagonal_ssm.hpp and mamba.hpp):
//   L::num_features, L::features(U_ext, tap_mask) -> std::tuple of [n, F_i] expressions,
//     evaluated once per stretch; decay/inject/readout then take std::array<view, F> of
//     them instead of U (a layer with a convolution computes it once, not per map);
//   L::halo  tokens of left context the features read: U_ext has halo + n rows, the halo
//     rows (the stretch's predecessors, or the carried-in rows before the first token)
//     first. tap_mask is [halo + 1, n] (1: the tap stays inside the token's document) or
//     empty when nothing resets.
template <class L, class = void>
struct layer_halo : std::integral_constant<index_t, 0> {};
template <class L>
struct layer_halo<L, std::void_t<decltype(L::halo)>> : std::integral_constant<index_t, L::halo> {};
template <class L, class = void>
struct layer_feature_count : std::integral_constant<std::size_t, 0> {};
template <class L>
struct layer_feature_count<L, std::void_t<decltype(L::num_features)>>
    : std::integral_constant<std::size_t, std::size_t(L::num_features)> {};

namespace detail {
template <class Layer, bool has_features>
struct FeatureTypes {  // no feature stage: the maps read U
  using CV = TensorView<const typename Layer::value_type, layer_space<Layer>::value>;
  using MapInput = CV;
  using Expr = std::tuple<>;
  using Tapes = std::tuple<>;
};
template <class... E>
struct TapesOf {
  using type = std::tuple<Tape<E>...>;
};
template <class... E>
struct TapesOf<std::tuple<E...>> {
  using type = std::tuple<Tape<E>...>;
};
template <class Layer>
struct FeatureTypes<Layer, true> {
  using CV = TensorView<const typename Layer::value_type, layer_space<Layer>::value>;
  using MapInput = std::array<CV, layer_feature_count<Layer>::value>;
  using Expr = decltype(std::declval<const Layer&>().features(std::declval<CV>(), std::declval<CV>()));
  using Tapes = typename TapesOf<Expr>::type;
};

template <std::size_t... I, class F>
void for_each_index(std::index_sequence<I...>, F&& f) {
  (f(std::integral_constant<std::size_t, I>{}), ...);
}
template <std::size_t N, class F>
void for_each_index(F&& f) {
  for_each_index(std::make_index_sequence<N>{}, std::forward<F>(f));
}
}  // namespace detail

template <class Layer>
struct LayerTypes {
  using T = typename Layer::value_type;
  static constexpr Space space = layer_space<Layer>::value;
  using CV = TensorView<const T, space>;
  using Tens = Tensor<T, space>;
  static constexpr index_t halo = layer_halo<Layer>::value;
  static constexpr std::size_t num_features = layer_feature_count<Layer>::value;
  static_assert(halo >= 0, "ScanLayer: halo must be >= 0");
  static_assert(halo == 0 || num_features > 0, "ScanLayer: a layer with a halo must read it through features()");
  using Features = detail::FeatureTypes<Layer, (num_features > 0)>;
  using MapInput = typename Features::MapInput;  // what decay/inject/readout take
  using NormE = decltype(rms_norm(std::declval<CV>(), std::declval<const Tens&>()));
  using DecayE = decltype(std::declval<const Layer&>().decay(std::declval<MapInput>()));
  using InjectE = decltype(std::declval<const Layer&>().inject(std::declval<MapInput>()));
  using ReadoutE = decltype(std::declval<const Layer&>().readout(std::declval<CV>(), std::declval<MapInput>()));
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

// ---- which layers take the fused scan (nn/fused.hpp states the rule) ----------------------

template <class L, class = void>
struct layer_opts_out_of_fusion : std::false_type {};
template <class L>
struct layer_opts_out_of_fusion<L, std::void_t<decltype(L::fused)>> : std::bool_constant<!L::fused> {};

namespace detail {
template <class Red>
struct ReduceParts {  // no reduction of the state in the readout
  static constexpr bool ok = false;
  using Child = void;
};
template <class Op, class X>
struct ReduceParts<expr::Reduce<Op, X>> {
  static constexpr bool ok =
      (std::is_same_v<Op, op::SumReduce> || std::is_same_v<Op, op::MeanReduce>) && expr::liftable<X>::value;
  using Child = X;
};
template <class V, Space S, class E, bool = ReduceParts<typename expr::state_reduce<E>::type>::ok>
struct RestOf {
  using type = void;
  static constexpr bool ok = false;
};
template <class V, Space S, class E>
struct RestOf<V, S, E, true> {
  using type = decltype(expr::SubstituteStateReduce<V, S>{expr::Leaf<V, S>(TensorView<const V, S>())}(std::declval<E>()));
  static constexpr bool ok = !expr::has_state<type>::value;
};
}  // namespace detail

// Fusion<Layer>::value: the layer's maps compile into the fused scan (host backend).
template <class Layer, bool = layer_opts_out_of_fusion<Layer>::value || LayerTypes<Layer>::space != Space::Host>
struct Fusion {
  static constexpr bool value = false;
};
template <class Layer>
struct Fusion<Layer, false> {
  using Ty = LayerTypes<Layer>;
  using T = typename Ty::T;
  static constexpr Space S = Ty::space;
  using MapInput = typename Ty::MapInput;
  using DecayE = typename Ty::DecayE;
  using InjectE = typename Ty::InjectE;
  using ReadoutE =
      decltype(std::declval<const Layer&>().readout(std::declval<StateRef<T, S>>(), std::declval<MapInput>()));
  using Reduction = typename expr::state_reduce<ReadoutE>::type;  // the readout's Reduce over the state
  using X = typename detail::ReduceParts<Reduction>::Child;       // what it reduces (lifted)
  using Rest = typename detail::RestOf<T, S, ReadoutE>::type;     // the readout above it
  static constexpr bool value = expr::liftable<DecayE>::value && !expr::has_state<DecayE>::value &&
                                expr::liftable<InjectE>::value && !expr::has_state<InjectE>::value &&
                                expr::state_reduce_count<ReadoutE>::value == 1 &&
                                detail::ReduceParts<Reduction>::ok && detail::RestOf<T, S, ReadoutE>::ok;
};

// Document boundaries inside a stretch (packed sequences). starts[t] = 1 where a document
// begins: the state resets there (a^t = 0) and the features' window stops there.
// since[t] = tokens since the last start, capped at the halo (halo: no start in reach).
struct Resets {
  const std::uint8_t* starts = nullptr;
  const index_t* since = nullptr;
  bool any() const { return starts != nullptr; }
  Resets offset(index_t t) const { return any() ? Resets{starts + t, since + t} : Resets{}; }
};

namespace detail {
// Zeroes rows t of x ([1, n, S]) where a document starts (the decay, or dL/d(decay)).
template <class T, Space S>
void zero_rows_at_starts(TensorView<T, S> x, Resets resets) {
  if (!resets.any()) return;
  const index_t n = x.extent(1), row = x.extent(2);
  for (index_t t = 0; t < n; ++t)
    if (resets.starts[t]) ssmx::detail::zero_bytes(x.data() + t * row, S, std::size_t(row) * sizeof(T));
}

// [1, n, S] views repeating one row (time stride 0): constant sequences without buffers.
template <class T, Space S>
TensorView<const T, S> repeat_row(const T* row, index_t n, index_t width) {
  return TensorView<const T, S>(row, Dims{1, n, width}, {0, 0, 1, 0});
}

}  // namespace detail

// What one stretch of tokens of one layer computes in the forward pass.
template <class Layer>
struct Stretch {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  using Tens = typename Ty::Tens;
  static constexpr index_t halo = Ty::halo;
  CV y_ext;                                 // [halo + n, d_model], the stored layer input (not owned)
  Tens y_hold;                              // what y_ext views when the stored input was converted (bf16 storage)
  Tens u;                                   // [halo + n, d_model], normalised
  std::array<Tens, Ty::num_features> f;     // the features, [n, F_i]
  Tens mask;                                // [halo + 1, n] tap mask, or empty
  Tens a;                                   // [1, n, S], the decay broadcast to the state (materialised path)
  Tens h;                                   // [1, n, S], the states (materialised path)
  bool fused = false;                       // a and h are not materialised: the fused scan makes them
  bool structured = false;                  // ... and the structured scan may run (nn/structured.hpp)
  Tens h0;                                  // [1, S], the state before the stretch
  Resets resets;
  index_t n() const { return y_ext.extent(0) - halo; }
  CV y_in() const { return y_ext.slice(halo, halo + n()); }
  CV u_tokens() const { return CV(u.view()).slice(halo, halo + n()); }
  CV mask_cols(index_t s0, index_t s1) const { return mask.empty() ? CV() : CV(mask.view()).slice(1, s0, s1); }
  // The per-token maps' input for tokens [s0, s1).
  typename Ty::MapInput maps(index_t s0, index_t s1) const {
    if constexpr (Ty::num_features == 0) {
      return u_tokens().slice(s0, s1);
    } else {
      typename Ty::MapInput m;
      for (std::size_t i = 0; i < Ty::num_features; ++i) m[i] = CV(f[i].view()).slice(s0, s1);
      return m;
    }
  }
};

// The tapes of one shard: the norm and the features always; the per-token maps (every
// intermediate value, for their VJPs) on the materialised path only.
template <class Layer>
struct ShardTapes {
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  Tape<typename Ty::NormE> norm;
  typename Ty::Features::Tapes features;
  std::optional<Tape<typename Ty::DecayE>> decay;
  std::optional<Tape<typename Ty::InjectE>> inject;
  std::optional<Tape<typename Ty::ReadoutE>> readout;
  // Tapes for tokens [s0, s1) of a computed stretch.
  ShardTapes(const Block<Layer>& blk, const Stretch<Layer>& st, index_t s0, index_t s1)
      : norm(rms_norm(st.y_in().slice(s0, s1), blk.norm.weight.value, blk.norm.eps)),
        features(make_features(blk, st, s0, s1)) {
    if (st.fused) return;
    decay.emplace(blk.mixer.decay(st.maps(s0, s1)));
    inject.emplace(blk.mixer.inject(st.maps(s0, s1)));
    readout.emplace(blk.mixer.readout(h_rows(st, s0, s1), st.maps(s0, s1)));
  }

  static CV h_rows(const Stretch<Layer>& st, index_t s0, index_t s1) {
    return CV(st.h.view()).reshape(with_tokens(st.n(), Layer::state_dims())).slice(s0, s1);
  }
  static CV u_rows(const Stretch<Layer>& st, index_t s0, index_t s1) {  // [halo + s1 - s0] rows
    return CV(st.u.view()).slice(s0, s1 + Ty::halo);
  }

 private:
  static typename Ty::Features::Tapes make_features(const Block<Layer>& blk, const Stretch<Layer>& st, index_t s0,
                                                    index_t s1) {
    if constexpr (Ty::num_features == 0)
      return {};
    else
      return typename Ty::Features::Tapes(blk.mixer.features(u_rows(st, s0, s1), st.mask_cols(s0, s1)));
  }
};

namespace detail {

// The layer's type as written ("ssmx::nn::DiagonalSSM<float, 256l, 16l, ...>"), for messages.
template <class Layer>
std::string layer_name() {
  const char* mangled = typeid(Layer).name();
#if defined(__GNUG__)
  int status = 0;
  char* out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  if (status == 0 && out) {
    std::string r(out);
    std::free(out);
    return r;
  }
#endif
  return mangled;
}

// Whether `from` broadcasts to `to` (aligned right, every extent equal or 1).
inline bool broadcasts_to(const Dims& from, const Dims& to) {
  if (from.rank > to.rank) return false;
  for (int i = 1; i <= from.rank; ++i) {
    const index_t f = from[from.rank - i], t = to[to.rank - i];
    if (f != t && f != 1) return false;
  }
  return true;
}

// Builds a map's expression with the layer and map named in a shape error from inside it.
template <class Layer, class F>
auto build_map(const char* map, index_t n, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ShapeError& e) {
    throw ShapeError(ssmx::detail::str(layer_name<Layer>(), ": its ", map, " map for ", n, " tokens does not build: ", e.what()));
  }
}

// The maps' shapes against the state's (a decay or inject of the wrong rank or extent, a
// readout of the wrong width), named by layer and map; and the decay of the stretch's first
// token in [0, 1] (a decay above 1 grows the state without bound: the loss ends as inf or
// NaN many tokens later; a NaN is left to the loss's own check). Costs the expressions'
// shapes and one token's decay.
template <class Layer>
void check_maps(const Block<Layer>& blk, const Stretch<Layer>& st) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  const Dims sd = Layer::state_dims();
  const index_t n = st.n();
  const Dims domain = with_tokens(n, sd);
  const auto maps = st.maps(0, n);
  const Dims dd = build_map<Layer>("decay", n, [&] { return blk.mixer.decay(maps).dims(); });
  SSMX_REQUIRE(broadcasts_to(dd, domain), ShapeError, layer_name<Layer>(), ": decay(u) has shape ", dd,
               " for ", n, " tokens; it must broadcast to [tokens, state] = ", domain,
               " (aligned right, each extent equal or 1)");
  const Dims di = build_map<Layer>("inject", n, [&] { return blk.mixer.inject(maps).dims(); });
  SSMX_REQUIRE(broadcasts_to(di, domain), ShapeError, layer_name<Layer>(), ": inject(u) has shape ", di,
               " for ", n, " tokens; it must broadcast to [tokens, state] = ", domain,
               " (aligned right, each extent equal or 1)");
  const CV h(nullptr, domain);  // shapes only: nothing is evaluated
  const Dims dr = build_map<Layer>("readout", n, [&] { return blk.mixer.readout(h, maps).dims(); });
  SSMX_REQUIRE(dr == Dims({n, Layer::d_model}), ShapeError, layer_name<Layer>(), ": readout(h, u) has shape ",
               dr, " for ", n, " tokens and h of shape ", domain, "; it must be [tokens, d_model] = ",
               Dims({n, Layer::d_model}));
  const Tensor<T> a0 = to_space<Space::Host>(eval(blk.mixer.decay(st.maps(0, 1)), Tag::Workspace));
  for (index_t i = 0; i < a0.numel(); ++i) {
    const double v = double(a0.data()[i]);
    if (std::isnan(v)) continue;  // NaN parameters or inputs: the loss check reports them
    SSMX_REQUIRE(v >= 0.0 && v <= 1.0 + 8.0 * double(std::numeric_limits<T>::epsilon()), ValueError,
                 layer_name<Layer>(), ": decay(u) is ", v, " at element ", i, " of the first token (shape ",
                 a0.dims(), "); a decay must lie in [0, 1], or the state grows without bound "
                 "(e.g. exp(-softplus(x)) or exp(-dt * exp(A_log)) stay in it)");
  }
}

}  // namespace detail

// Normalises the stretch's input and computes its features: fills st from y_ext
// ([halo + n, d_model], the halo rows first) and the state h0 before it (empty: zero).
template <class Layer>
void prepare_stretch(const Block<Layer>& blk, typename LayerTypes<Layer>::CV y_ext, typename LayerTypes<Layer>::CV h0,
                     Stretch<Layer>& st, Resets resets = {}) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using Tens = typename Ty::Tens;
  constexpr Space space = Ty::space;
  constexpr index_t halo = Ty::halo;
  const Dims sd = Layer::state_dims();
  SSMX_REQUIRE(y_ext.extent(0) > halo, ShapeError, "scan layer: a stretch of ", y_ext.extent(0),
               " rows holds no token after its ", halo, " halo rows");
  const index_t n = y_ext.extent(0) - halo, S = state_numel(sd);
  st.y_ext = y_ext;
  st.resets = resets;
  st.fused = false;
  st.a = Tens();
  st.h = Tens();
  st.u = Tens(y_ext.dims(), Tag::Activations);
  assign(st.u.view(), rms_norm(y_ext, blk.norm.weight.value, blk.norm.eps));
  if constexpr (Ty::num_features > 0) {
    st.mask = Tens();
    if (halo > 0 && resets.any()) {  // tap j reaches halo - j tokens back
      Tensor<T> mask(Dims{halo + 1, n}, Tag::Workspace);
      for (index_t j = 0; j <= halo; ++j)
        for (index_t t = 0; t < n; ++t) mask(j, t) = T(halo - j <= resets.since[t] ? 1 : 0);
      st.mask = to_space<space>(mask, Tag::Activations);
    }
    auto fe = blk.mixer.features(ShardTapes<Layer>::u_rows(st, 0, n), st.mask_cols(0, n));
    detail::for_each_index<Ty::num_features>([&](auto I) { st.f[I] = eval(std::get<I>(fe), Tag::Activations); });
  }
  st.h0 = zeros<T, space>(Dims{1, S}, Tag::Activations);
  if (h0.data()) copy<T>(st.h0.view(), h0.reshape(Dims{1, S}));
  detail::check_maps(blk, st);
}

// The materialised scan of a prepared stretch: a and h as [1, n, S] tensors.
template <class Layer>
void materialize_scan(const Block<Layer>& blk, Stretch<Layer>& st,
                      TensorView<typename Layer::value_type, LayerTypes<Layer>::space> h_last = {}) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using Tens = typename Ty::Tens;
  constexpr Space space = Ty::space;
  const Dims sd = Layer::state_dims();
  const index_t n = st.n(), S = state_numel(sd);
  const auto maps = st.maps(0, n);
  st.fused = false;
  st.a = Tens(Dims{1, n, S}, Tag::Activations);
  assign(st.a.view().reshape(with_tokens(n, sd)), broadcast_to(blk.mixer.decay(maps), with_tokens(n, sd)));
  detail::zero_rows_at_starts(st.a.view(), st.resets);
  st.h = Tens(Dims{1, n, S}, Tag::Activations);
  assign(st.h.view().reshape(with_tokens(n, sd)), blk.mixer.inject(maps));
  linear_scan<T, space>(st.a.view(), st.h.view(), st.h.view(), st.h0.view(), h_last);
}

// Forward over one stretch on the materialised path: prepare_stretch, then a and h
// ([1, n, S]); writes the last state to h_last when given.
template <class Layer>
void compute_stretch(const Block<Layer>& blk, typename LayerTypes<Layer>::CV y_ext, typename LayerTypes<Layer>::CV h0,
                     Stretch<Layer>& st, TensorView<typename Layer::value_type, LayerTypes<Layer>::space> h_last = {},
                     Resets resets = {}) {
  prepare_stretch(blk, y_ext, h0, st, resets);
  materialize_scan(blk, st, h_last);
}

// y_out = y_in + readout(h, maps) for a stretch computed on the materialised path.
template <class Layer>
void write_output(const Block<Layer>& blk, const Stretch<Layer>& st,
                  TensorView<typename Layer::value_type, LayerTypes<Layer>::space> y_out) {
  assign(y_out, leaf(st.y_in()) + blk.mixer.readout(ShardTapes<Layer>::h_rows(st, 0, st.n()), st.maps(0, st.n())));
}

// ---- the fused path (nn/fused.hpp) ------------------------------------------------------------

namespace detail {

// The readout's pieces on the fused path: the expression with a StateLeaf, its reduction
// over the state (`red`), and the buffer that holds the reduction's value.
template <class Layer>
struct FusedReadout {
  using Fu = Fusion<Layer>;
  using T = typename Fu::T;
  static constexpr Space S = Fu::S;
  using Red = typename Fu::Reduction;
  typename Fu::ReadoutE expr;
  const Red* red = nullptr;
  FusedReadout(const Layer& layer, const typename Fu::MapInput& maps, const Dims& domain)
      : expr(layer.readout(StateRef<T, S>{domain}, maps)) {
    auto find = [this](const auto& r) {
      if constexpr (std::is_same_v<std::decay_t<decltype(r)>, Red>) red = &r;
    };
    expr::StateReduceVisitor::go(expr, find);
  }
  // The reduction's value (or cotangent) as the domain reads it: the reduced axis broadcast.
  template <class U>
  TensorView<U, S> domain_view(TensorView<U, S> v) const {
    return red->keepdim ? v : expr::unsqueezed_view(v, red->axis);
  }
  // Whether the domain runs this reduction as fused: over a state axis of the whole domain.
  bool runs_fused(const Dims& domain) const { return red->axis > 0 && red->child.dims() == domain; }
  T scale() const {
    return std::is_same_v<typename Fu::Reduction, expr::Reduce<op::MeanReduce, typename Fu::X>>
               ? T(1) / T(red->child.dims()[red->axis])
               : T(1);
  }
  // The reduction's value as the domain accumulates it: [copies, numel] (one copy per tile
  // when the reduced axis is tiled).
  struct Value {
    Tensor<T, S> buf;
    index_t copies = 1, numel = 0;
  };
  Value make_value(const fused::TilePlan& plan) const {
    Value v;
    v.numel = red->dims().numel();
    index_t st[4];
    fused::walk_strides(TensorView<const T, S>(domain_view(TensorView<T, S>(nullptr, red->dims()))), plan, st);
    v.copies = fused::needs_tile_copies(st, plan) ? plan.ntiles : 1;
    v.buf = zeros<T, S>(Dims{v.copies * v.numel}, Tag::Workspace);
    return v;
  }
  expr::LiftDst<T> dst(Value& v, const fused::TilePlan& plan) const {
    return fused::make_dst<T, S>(domain_view(TensorView<T, S>(v.buf.data(), red->dims())), plan,
                                 v.copies > 1 ? v.numel : 0);
  }
  // Sums the tile copies into copy 0, scales a mean, and views the result.
  TensorView<const T, S> finish(Value& v) const {
    TensorView<T, S> total(v.buf.data(), Dims{v.numel});
    for (index_t k = 1; k < v.copies; ++k)
      accumulate(total, leaf(TensorView<const T, S>(v.buf.data() + k * v.numel, Dims{v.numel})));
    const T sc = scale();
    if (sc != T(1)) assign(total, leaf(TensorView<const T, S>(total)) * sc);
    return TensorView<const T, S>(v.buf.data(), red->dims());
  }
  // The readout with the reduction replaced by the leaf `value`.
  auto rest(TensorView<const T, S> value) const {
    return expr::SubstituteStateReduce<T, S>{expr::Leaf<T, S>(value)}(expr);
  }
};

// Whether this stretch can run fused (the runtime half of the rule: the reduction is over a
// state axis of the whole domain).
template <class Layer>
bool stretch_runs_fused(const Block<Layer>& blk, const Stretch<Layer>& st) {
  if constexpr (!Fusion<Layer>::value) {
    return false;
  } else {
    const Dims domain = with_tokens(st.n(), Layer::state_dims());
    return FusedReadout<Layer>(blk.mixer, st.maps(0, st.n()), domain).runs_fused(domain);
  }
}

// ---- the structured chunked scan (nn/structured.hpp) ----------------------------------------

// Whether a fused layer's maps have the structured shape at the type level: the decay one
// operand, the inject a product of two operands, the readout's reduction over the state
// times an operand (the state's rank and the operands' broadcasts are checked at run time).
template <class E>
struct is_plain_operand
    : std::bool_constant<!expr::is_lifted<E>::value && !std::is_same_v<E, expr::Constant<typename E::value_type>>> {};
template <class E>
struct mul_of_operands : std::false_type {};
template <class L, class R>
struct mul_of_operands<expr::Binary<op::Mul, L, R>>
    : std::bool_constant<is_plain_operand<L>::value && is_plain_operand<R>::value> {};
template <class E>
struct state_times_operand : std::false_type {};
template <class T, Space S, class C>
struct state_times_operand<expr::Binary<op::Mul, expr::StateLeaf<T, S>, C>> : is_plain_operand<C> {
  static constexpr bool state_left = true;
};
template <class T, Space S, class C>
struct state_times_operand<expr::Binary<op::Mul, C, expr::StateLeaf<T, S>>> : is_plain_operand<C> {
  static constexpr bool state_left = false;
};
template <class Layer, bool = Fusion<Layer>::value>
struct StructuredShape : std::false_type {};
template <class Layer>
struct StructuredShape<Layer, true>
    : std::bool_constant<is_plain_operand<typename Fusion<Layer>::DecayE>::value &&
                         mul_of_operands<typename Fusion<Layer>::InjectE>::value &&
                         state_times_operand<typename Fusion<Layer>::X>::value> {};

// A walk's strides in the order [t, h, p, n] of a state [H, P, N] (h's stride 0 for a rank-2
// state [P, N]).
inline void natural_strides(const fused::TilePlan& plan, const index_t (&walk)[4], index_t (&st)[4]) {
  index_t w[4] = {walk[0], walk[1], walk[2], walk[3]};
  if (plan.transposed) std::swap(w[2], w[3]);
  const bool heads = plan.state_rank() == 3;
  st[0] = heads ? w[0] : w[1];
  st[1] = heads ? w[1] : 0;
  st[2] = w[2];
  st[3] = w[3];
}

// The structured scan of one fused stretch (state [P, N] or [H, P, N]), when its operands
// have the shape at run time: the decay and β constant along P, x constant along N, c
// constant along P, the reduction over N, and every decay in (0, 1.5] (0 only at a document
// start; a decay of a stable layer is in (0, 1], rounding may put it an ulp above). A decay
// constant along N as well takes the scalar (SSD) form; a rank-3 state needs it.
template <class T>
struct Structured {
  struct Operand {  // an operand's evaluator with strides [t, h, p, n]
    expr::LiftOperand<T> node;
    index_t sv[4], sd[4];  // value and cotangent strides
    T value(index_t t, index_t h, index_t p, index_t k) const {
      return node.src.base[t * sv[0] + h * sv[1] + p * sv[2] + k * sv[3]];
    }
    void add(index_t t, index_t h, index_t p, index_t k, T g) const {
      node.dst.base0[t * sd[0] + h * sd[1] + p * sd[2] + k * sd[3]] += g;
    }
  };
  bool ok = false;
  structured::Inputs<T> in;
  Work<T> a;  // the decays, in the layout of in.la
  Operand oa, ox, ob, oc;

  static Operand make(const fused::TilePlan& plan, const expr::LiftOperand<T>& o) {
    Operand r;
    r.node = o;
    natural_strides(plan, o.src.st, r.sv);
    natural_strides(plan, o.dst.st, r.sd);
    return r;
  }
  // The head whose β and c stand for group g.
  index_t group_head(index_t g) const { return g * (in.H / in.groups); }
  // The operands of the decay (dn), the inject (bn: x * β in either order) and the
  // readout's reduced tree (xn: h * c in either order), reduced over `axis`.
  template <class BN>
  Structured(const fused::TilePlan& plan, const expr::LiftOperand<T>& dn, const BN& bn, const expr::LiftOperand<T>& cn,
             int axis, Resets resets) {
    const int rank = plan.state_rank();
    if ((rank != 2 && rank != 3) || axis != rank) return;
    oa = make(plan, dn);
    Operand l = make(plan, bn.lhs), r = make(plan, bn.rhs);
    if (l.sv[3] == 0 && r.sv[2] == 0) {
      ox = l;
      ob = r;
    } else if (r.sv[3] == 0 && l.sv[2] == 0) {
      ox = r;
      ob = l;
    } else {
      return;
    }
    oc = make(plan, cn);
    if (oa.sv[2] != 0 || oc.sv[2] != 0) return;
    in.scalar = oa.sv[3] == 0;
    if (rank == 3 && !in.scalar) return;
    const index_t n = plan.n, H = rank == 3 ? plan.state_dims[0] : 1;
    const index_t P = plan.state_dims[rank - 2], N = plan.state_dims[rank - 1];
    in.n = n;
    in.H = H;
    in.P = P;
    in.N = N;
    // One β and c for all heads where neither varies by head; else one per head.
    in.groups = ob.sv[1] == 0 && oc.sv[1] == 0 ? 1 : H;
    const index_t decays = in.scalar ? H : N, G = in.groups;
    in.la = Work<T>(std::size_t(n * decays));
    in.beta = Work<T>(std::size_t(n * G * N));
    in.c = Work<T>(std::size_t(n * G * N));
    in.x = Work<T>(std::size_t(n * H * P));
    in.seg.resize(std::size_t(n));
    a = Work<T>(std::size_t(n * decays));
    index_t seg = -1;
    for (index_t t = 0; t < n; ++t) {
      const bool start = resets.any() && resets.starts[t];
      if (start) seg = t;
      in.seg[std::size_t(t)] = seg;
      for (index_t i = 0; i < decays; ++i) {
        const T av = in.scalar ? oa.value(t, i, 0, 0) : oa.value(t, 0, 0, i);
        a[std::size_t(t * decays + i)] = av;
        // Outside (0, 1.5] (or NaN) the elementwise scan: e^{A^t - A^s} stays below 1.5^64.
        if (!start && !(av > T(0) && av <= T(1.5))) return;
        in.la[std::size_t(t * decays + i)] = start ? T(0) : std::log(av);
      }
      for (index_t g = 0; g < G; ++g)
        for (index_t k = 0; k < N; ++k) {
          in.beta[std::size_t((t * G + g) * N + k)] = ob.value(t, group_head(g), 0, k);
          in.c[std::size_t((t * G + g) * N + k)] = oc.value(t, group_head(g), 0, k);
        }
      for (index_t h = 0; h < H; ++h)
        for (index_t p = 0; p < P; ++p) in.x[std::size_t((t * H + h) * P + p)] = ox.value(t, h, p, 0);
    }
    ok = true;
  }
  // Π a over the stretch into prod ([H, P, N]): 0 past a document start.
  void decay_product(T* prod) const {
    const index_t H = in.H, P = in.P, N = in.N, decays = in.scalar ? H : N;
    for (index_t i = 0; i < decays; ++i) {
      T q = T(1);
      for (index_t t = 0; t < in.n; ++t) q = in.seg[std::size_t(t)] >= 0 ? T(0) : q * a[std::size_t(t * decays + i)];
      if (in.scalar)
        for (index_t j = 0; j < P * N; ++j) prod[i * P * N + j] *= q;
      else
        for (index_t p = 0; p < P; ++p) prod[p * N + i] *= q;
    }
  }
  // Adds the gradients into the operands' cotangents (those that want them).
  void scatter(const structured::Grads<T>& g) const {
    const index_t n = in.n, H = in.H, P = in.P, N = in.N, G = in.groups, decays = in.scalar ? H : N;
    for (index_t t = 0; t < n; ++t) {
      if (oa.node.grad && in.seg[std::size_t(t)] != t)
        for (index_t i = 0; i < decays; ++i) {
          const std::size_t j = std::size_t(t * decays + i);
          const T ga = g.la[j] / a[j];  // d(log a) / da = 1 / a
          if (in.scalar)
            oa.add(t, i, 0, 0, ga);
          else
            oa.add(t, 0, 0, i, ga);
        }
      for (index_t gi = 0; gi < G; ++gi)
        for (index_t k = 0; k < N; ++k) {
          const std::size_t j = std::size_t((t * G + gi) * N + k);
          if (ob.node.grad) ob.add(t, group_head(gi), 0, k, g.beta[j]);
          if (oc.node.grad) oc.add(t, group_head(gi), 0, k, g.c[j]);
        }
      if (ox.node.grad)
        for (index_t h = 0; h < H; ++h)
          for (index_t p = 0; p < P; ++p) ox.add(t, h, p, 0, g.x[std::size_t((t * H + h) * P + p)]);
    }
  }
};

// The operand c of the readout's reduced tree h * c (or c * h).
template <class X, class XN>
const auto& readout_operand(const XN& xn) {
  if constexpr (state_times_operand<X>::state_left)
    return xn.rhs;
  else
    return xn.lhs;
}

// Whether the structured scan may run for a layer (the type-level shape).
template <class Layer>
inline constexpr bool structured_shape_v = StructuredShape<Layer>::value;

}  // namespace detail

// How a stretch is scanned: materialised a and h ([tokens x state] tensors, the reference);
// the fused scan (nn/fused.hpp); or the structured chunked scan (nn/structured.hpp) where
// the maps have its shape, else the fused one. Each falls back to the one before it where
// the layer does not fit.
enum class ScanPath { materialised, fused, structured };

// How many stretch passes (forward or backward) took each path since the last reset: the
// way to see that a layer runs the path it should (a silent fall-back shows here).
struct ScanCounts {
  std::uint64_t materialised = 0, fused = 0, structured = 0;
};
namespace detail {
inline std::array<std::atomic<std::uint64_t>, 3>& scan_counters() {
  static std::array<std::atomic<std::uint64_t>, 3> c{};
  return c;
}
inline void count_scan(ScanPath p) { scan_counters()[std::size_t(p)].fetch_add(1, std::memory_order_relaxed); }
}  // namespace detail
inline ScanCounts scan_counts() {
  const auto& c = detail::scan_counters();
  return {c[0].load(), c[1].load(), c[2].load()};
}
inline void reset_scan_counts() {
  for (auto& c : detail::scan_counters()) c.store(0);
}

// What a forward pass over one stretch writes (each optional).
template <class T, Space S>
struct StretchForward {
  TensorView<T, S> h_last;      // [1, S], the state after the stretch
  TensorView<T, S> y_out;       // [n, d_model], y_in + readout
  TensorView<T, S> decay_prod;  // [1, S], multiplied by Π a over the stretch (sequence sharding)
};

// The forward pass of one stretch: prepare_stretch, then the scan. On the fused paths (for a
// layer whose maps fuse: Fusion), one pass computes what `out` asks for and st keeps no
// [tokens × state] tensor (st.fused; backward_stretch recomputes on the fly); otherwise a
// and h are materialised in st.
template <class Layer>
void forward_stretch(const Block<Layer>& blk, typename LayerTypes<Layer>::CV y_ext, typename LayerTypes<Layer>::CV h0,
                     Stretch<Layer>& st, Resets resets, ScanPath path,
                     const StretchForward<typename Layer::value_type, LayerTypes<Layer>::space>& out = {}) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  constexpr Space space = Ty::space;
  prepare_stretch(blk, y_ext, h0, st, resets);
  const index_t n = st.n();
  if constexpr (Fusion<Layer>::value) {
    if (path != ScanPath::materialised && detail::stretch_runs_fused(blk, st)) {
      using Fu = Fusion<Layer>;
      st.fused = true;
      st.structured = path == ScanPath::structured;
      if (!out.h_last.data() && !out.y_out.data() && !out.decay_prod.data()) return;  // for backward_stretch
      const Dims sd = Layer::state_dims(), domain = with_tokens(n, sd);
      const fused::TilePlan plan = fused::make_plan<T>(n, sd);
      const fused::BuildContext<T, space> ctx{&plan, nullptr, false};
      const auto maps = st.maps(0, n);
      fused::LiftBuild<typename Fu::DecayE, T, space> decay(blk.mixer.decay(maps), ctx);
      fused::LiftBuild<typename Fu::InjectE, T, space> inject(blk.mixer.inject(maps), ctx);
      fused::host::ForwardIO<T> io;
      io.h0 = st.h0.data();
      io.h_last = out.h_last.data();
      io.decay_prod = out.decay_prod.data();
      io.starts = resets.starts;
      const auto dn = decay.node();
      const auto bn = inject.node();
      if (!out.y_out.data()) {
        using XN = expr::lift_node_t<typename Fu::X, T>;
        detail::count_scan(ScanPath::fused);
        fused::host::forward<T>(plan, dn, bn, static_cast<const XN*>(nullptr), nullptr, io);
        return;
      }
      const detail::FusedReadout<Layer> ro(blk.mixer, maps, domain);
      fused::LiftBuild<typename Fu::X, T, space> x(ro.red->child, ctx);
      auto value = ro.make_value(plan);
      const auto xn = x.node();
      if constexpr (detail::structured_shape_v<Layer>) {
        if (st.structured) {
          const detail::Structured<T> sp(plan, dn, bn, detail::readout_operand<typename Fu::X>(xn), ro.red->axis,
                                         resets);
          if (sp.ok) {  // the reduction's value is copy 0 of `value`, [n, P] or [n, H, P]
            detail::count_scan(ScanPath::structured);
            structured::forward<T>(sp.in, st.h0.data(), value.buf.data(), out.h_last.data());
            if (out.decay_prod.data()) sp.decay_product(out.decay_prod.data());
            assign(out.y_out, leaf(st.y_in()) + ro.rest(ro.finish(value)));
            return;
          }
        }
      }
      const auto yd = ro.dst(value, plan);
      detail::count_scan(ScanPath::fused);
      fused::host::forward<T>(plan, dn, bn, &xn, &yd, io);
      assign(out.y_out, leaf(st.y_in()) + ro.rest(ro.finish(value)));
      return;
    }
  }
  detail::count_scan(ScanPath::materialised);
  materialize_scan(blk, st, out.h_last);
  if (out.y_out.data()) write_output(blk, st, out.y_out);
  if (out.decay_prod.data()) {  // Π a in token order: the scan of (a, 0) from decay_prod
    const Tensor<T, space> zero = zeros<T, space>(Dims{1, state_numel(Layer::state_dims())}, Tag::Workspace);
    Tensor<T, space> prods(st.a.dims(), Tag::Workspace);
    linear_scan<T, space>(CV(st.a.view()), detail::repeat_row<T, space>(zero.data(), n, zero.extent(1)), prods.view(),
                          CV(out.decay_prod), out.decay_prod);
  }
}

// ---- the recurrent step (generation) ---------------------------------------------------------

namespace detail {

// One token for each of B independent sequences: the scan of length one, h_b <- a_b ⊙ h_b + b_b,
// with the layer's own maps, so every ScanLayer can generate with nothing extra written.
//   y_ext  [B·(halo + 1), d_model]: per sequence its last halo input rows, then its token's row
//   H      [B, S]: the sequences' states, updated in place
//   starts [B]: 1 where the token starts a document (its state is cut there); null: none
//   since  [B]: tokens of each sequence before this one since its document start, capped at the
//          halo (0 at a start): the window reaches no further back; null: nothing is cut
//   y_out  [B, d_model] = y_in + readout(h, maps)
// The norm and the features run once over all B·(halo + 1) rows, so a product reads its weight
// once for the whole batch (the rows between two sequences' tokens are computed and not read);
// decay, inject and readout run over the B tokens only. Work and memory per token do not
// depend on how many tokens came before.
template <class Layer>
void step_stretch(const Block<Layer>& blk, typename LayerTypes<Layer>::CV y_ext,
                  TensorView<typename Layer::value_type, LayerTypes<Layer>::space> H, const std::uint8_t* starts,
                  const index_t* since, TensorView<typename Layer::value_type, LayerTypes<Layer>::space> y_out) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  using Tens = typename Ty::Tens;
  constexpr Space space = Ty::space;
  constexpr index_t halo = Ty::halo;
  const Dims sd = Layer::state_dims();
  const index_t S = state_numel(sd), B = H.extent(0), P = Layer::d_model, rows = B * (halo + 1);
  SSMX_REQUIRE(H.dims() == (Dims{B, S}) && B > 0, ShapeError, "step: the states are ", H.dims(), ", expected [batch, ",
               S, "]");
  SSMX_REQUIRE(y_ext.dims() == (Dims{rows, P}), ShapeError, "step: the layer input is ", y_ext.dims(), ", expected [",
               rows, ", ", P, "] (", halo, " halo rows and one token for each of ", B, " sequences)");
  SSMX_REQUIRE(y_out.dims() == (Dims{B, P}), ShapeError, "step: the output is ", y_out.dims(), ", expected [", B,
               ", ", P, "]");
  // Output position j of the concatenated rows reads rows [j, j + halo]: sequence b's token is
  // position b·(halo + 1). Its window is cut at a document start; the other positions' are not read.
  const index_t n_all = rows - halo;
  std::vector<std::uint8_t> starts_v;
  std::vector<index_t> since_v;
  Resets resets;
  if (halo > 0 && since) {
    starts_v.assign(std::size_t(n_all), 0);
    since_v.assign(std::size_t(n_all), halo);
    for (index_t b = 0; b < B; ++b) {
      SSMX_REQUIRE(since[b] >= 0, ValueError, "step: since[", b, "] = ", since[b], " is negative");
      starts_v[std::size_t(b * (halo + 1))] = starts && starts[b] ? 1 : 0;
      since_v[std::size_t(b * (halo + 1))] = std::min(since[b], halo);
    }
    resets = Resets{starts_v.data(), since_v.data()};
  }
  Stretch<Layer> st;
  prepare_stretch(blk, y_ext, CV(), st, resets);
  // The B tokens' rows, compact: y_in and the maps' input.
  auto gather = [&](CV src, index_t offset) {  // rows offset + b·(halo + 1) of src
    Tens out(Dims{B, src.extent(1)}, Tag::Activations);
    for (index_t b = 0; b < B; ++b) {
      const index_t r = offset + b * (halo + 1);
      copy<T>(out.view().slice(b, b + 1), src.slice(r, r + 1));
    }
    return out;
  };
  const Tens y_in = halo > 0 ? gather(y_ext, halo) : Tens();
  const CV y_rows = halo > 0 ? CV(y_in.view()) : y_ext;
  typename Ty::MapInput maps;
  std::array<Tens, Ty::num_features> f_rows;
  if constexpr (Ty::num_features == 0) {
    maps = st.u_tokens();
  } else {
    for (std::size_t i = 0; i < Ty::num_features; ++i) {
      if (halo > 0) f_rows[i] = gather(CV(st.f[i].view()), 0);
      maps[i] = halo > 0 ? CV(f_rows[i].view()) : CV(st.f[i].view());
    }
  }
  const Dims dom = with_tokens(B, sd);
  Tens a(Dims{B, S}, Tag::Activations), h(Dims{B, S}, Tag::Activations);
  assign(a.view().reshape(dom), broadcast_to(blk.mixer.decay(maps), dom));
  assign(h.view().reshape(dom), blk.mixer.inject(maps));
  if (starts)  // a document start: a = 0, the state before it is not read
    for (index_t b = 0; b < B; ++b)
      if (starts[b]) ssmx::detail::zero_bytes(a.data() + b * S, space, std::size_t(S) * sizeof(T));
  assign(h.view(), leaf(CV(a.view())) * leaf(CV(H)) + leaf(CV(h.view())));
  copy<T>(H, CV(h.view()));
  assign(y_out, leaf(y_rows) + blk.mixer.readout(CV(h.view()).reshape(dom), maps));
}
}  // namespace detail

// How the adjoint state δ of a stretch is formed from dL/dh (the readout's direct part).
enum class DeltaMethod { exact, truncated, paper };

// Per-shard parameter-gradient buffers for one block, summed in shard order afterwards.
template <class T, Space S = Space::Host>
struct ShardGrads {
  std::vector<std::vector<Tensor<T, S>>> g;  // [shard][parameter]
  void reset(const ParameterList<T, S>& params, index_t shards) {
    if (index_t(g.size()) != shards) g.resize(std::size_t(shards));
    for (auto& row : g) {
      if (row.size() != params.size()) {
        row.clear();
        for (auto* p : params) row.push_back(Tensor<T, S>(p->value.dims(), Tag::Gradients));
      }
      for (auto& t : row) ssmx::detail::zero_bytes(t.data(), S, t.bytes());
    }
  }
  void add_to(const ParameterList<T, S>& params) const {
    for (const auto& row : g)
      for (std::size_t i = 0; i < params.size(); ++i) accumulate(params[i]->grad.view(), row[i]);
  }
};

template <class T, Space S>
GradTargets<T, S> param_targets(const ParameterList<T, S>& params, std::vector<Tensor<T, S>>& grads) {
  GradTargets<T, S> tg;
  for (std::size_t i = 0; i < params.size(); ++i) tg.push_back(wrt(params[i]->value, grads[i]));
  return tg;
}

// Options of one backward pass over a stretch.
template <class T, Space S = Space::Host>
struct StretchBackward {
  DeltaMethod method = DeltaMethod::exact;
  index_t shard = 64;                    // tokens per VJP shard (host; on the GPU a stretch is one shard)
  index_t window = 0;                    // T̄ for truncated/paper (0: none)
  TensorView<const T, S> carry_in;       // exact: a^{end} ⊙ δ^{end} from the next stretch, [1, S]
  TensorView<T, S> carry_out;            // a^0 ⊙ δ^0 for the stretch before, [1, S]
  const Tensor<T, S>* q_next = nullptr;  // truncated: the next block's forward accumulation
  Tensor<T, S>* q_out = nullptr;         // truncated: this block's, for the block before
  TensorView<T, S> input_grad;           // where dL/dy_in accumulates, [n, d_model]
  TensorView<T, S> halo_grad;            // where dL/d(halo rows of y_ext) accumulates, [halo, d_model]
  bool adjoint_only = false;          // stop once carry_out is known: no gradient is written (the
                                      // carry summary of a sequence-sharded stretch, dist/)
};

namespace detail {
template <class T, Space S>
TensorView<const T, S> cview(const Tensor<T, S>& t) {
  return t.view();
}

// Truncated adjoint on one block of length L = window (DESIGN §1.3), O(L·S):
// δ^i = r^i + φ^i ⊙ q_next[min(i-1, L'-1)], with r the in-block reverse scan,
// φ^i = Π_{j=i+1..end} a^j and q_next[m] = Σ_{t=s'}^{s'+m} (Π_{j=s'..t} a^j) g^t accumulated
// over the next block (of length L').
// q_next ([1, L', W], empty for the last block) and q_out ([1, L, W], empty when not wanted)
// may be column slices of wider tensors.
template <class T, Space S>
void truncated_delta(TensorView<const T, S> a, TensorView<const T, S> gh, TensorView<T, S> delta,
                     TensorView<const T, S> q_next, TensorView<T, S> q_out) {
  using CV = TensorView<const T, S>;
  const index_t n = a.extent(1), W = a.extent(2);
  reverse_linear_scan<T, S>(a, gh, delta);
  Tensor<T, S> consts(Dims{2, W}, Tag::Workspace);  // a row of zeros, a row of ones
  fill<T>(consts.view().slice(0, 1), T(0));
  fill<T>(consts.view().slice(1, 2), T(1));
  const CV zero_seq = repeat_row<T, S>(consts.data(), n, W);
  const CV one_seq = repeat_row<T, S>(consts.data() + W, n, W);
  const CV ones(consts.data() + W, Dims{1, W});
  if (q_next.data() && n > 1) {
    Tensor<T, S> phi(Dims{1, n, W}, Tag::Workspace);  // φ^i = Π_{j=i+1..end} a^j
    reverse_linear_scan<T, S>(a, zero_seq, phi.view(), ones);
    const CV q = q_next, p = phi.view();
    const index_t ln = q.extent(1), i1 = std::min(n, ln + 1);
    // i in [1, i1): q_next[i - 1]; i in [i1, n): its last row.
    accumulate(delta.slice(1, 1, i1), leaf(p.slice(1, 1, i1)) * leaf(q.slice(1, 0, i1 - 1)));
    if (i1 < n)
      accumulate(delta.slice(1, i1, n),
                 leaf(p.slice(1, i1, n)) * leaf(repeat_row<T, S>(q.data() + (ln - 1) * q.stride(1), n - i1, W)));
  }
  if (q_out.data()) {
    linear_scan<T, S>(a, zero_seq, q_out, ones);  // Π_{j=s..t} a^j
    assign(q_out, leaf(CV(q_out)) * leaf(gh));
    linear_scan<T, S>(one_seq, CV(q_out), q_out);  // running sum, in place
  }
}

// The paper's double sum, literally: δ^i = Σ_{t=i}^{i+T̄-1} (Π_{j=i+1..t} a^j) ⊙ gh^t.
// O(T·T̄·S) work (O(T²·S) without a window). Two schedules of the same sums, with the same
// products and the terms of δ^i added in increasing t, hence the same numbers:
//   by distance (any space; the GPU's): one pass per d, v_d^i = a^{i+1} ⊙ v_{d-1}^{i+1}
//     (v_0 = gh), δ += v_d; each pass is one kernel;
//   by token (the host's): blocks of 64 channels on threads, each token's term carried down.
template <class T, Space S>
void paper_delta_by_distance(TensorView<const T, S> a, TensorView<const T, S> gh, TensorView<T, S> delta,
                             index_t window) {
  const index_t n = a.extent(1);
  const index_t w = window > 0 ? std::min(window, n) : n;
  copy<T>(delta, gh);
  Tensor<T, S> v[2] = {Tensor<T, S>(gh.dims(), Tag::Workspace), Tensor<T, S>(gh.dims(), Tag::Workspace)};
  for (index_t d = 1; d < w; ++d) {
    TensorView<const T, S> prev = d == 1 ? gh : TensorView<const T, S>(v[(d - 1) % 2].view());  // v_0 = gh
    TensorView<T, S> cur = v[d % 2].view().slice(1, 0, n - d);
    assign(cur, leaf(a.slice(1, 1, n - d + 1)) * leaf(prev.slice(1, 1, n - d + 1)));
    accumulate(delta.slice(1, 0, n - d), leaf(TensorView<const T, S>(cur)));
  }
}

template <class T>
void paper_delta_by_token(TensorView<const T> a, TensorView<const T> gh, TensorView<T> delta, index_t window) {
  const index_t n = a.extent(1), W = a.extent(2);
  const index_t w = window > 0 ? window : n;
  fill<T>(delta, T(0));
#if defined(_OPENMP)
#pragma omp parallel
#endif
  {
    std::vector<T> v(std::size_t(W > 0 ? W : 1));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (index_t c0 = 0; c0 < W; c0 += 64) {
      const index_t c1 = std::min(W, c0 + 64);
      for (index_t t = 0; t < n; ++t) {
        for (index_t c = c0; c < c1; ++c) v[std::size_t(c)] = gh.data()[t * W + c];
        const index_t lo = std::max<index_t>(0, t - w + 1);
        for (index_t i = t; i >= lo; --i) {
          for (index_t c = c0; c < c1; ++c) delta.data()[i * W + c] += v[std::size_t(c)];
          if (i > lo)
            for (index_t c = c0; c < c1; ++c) v[std::size_t(c)] *= a.data()[i * W + c];
        }
      }
    }
  }
}

template <class T, Space S>
void paper_delta(TensorView<const T, S> a, TensorView<const T, S> gh, TensorView<T, S> delta, index_t window) {
  if constexpr (S == Space::Host)
    paper_delta_by_token<T>(a, gh, delta, window);
  else
    paper_delta_by_distance<T, S>(a, gh, delta, window);
}

// TruncatedAdjoint's carried sums: the next block's (read) and this block's ([1, n, S],
// allocated here when wanted).
template <class T, Space S>
TensorView<const T, S> q_next_view(const StretchBackward<T, S>& opt) {
  return opt.q_next && !opt.q_next->empty() ? TensorView<const T, S>(opt.q_next->view()) : TensorView<const T, S>();
}
template <class T, Space S>
TensorView<T, S> q_out_view(StretchBackward<T, S>& opt, index_t n, index_t width) {
  if (!opt.q_out) return {};
  *opt.q_out = Tensor<T, S>(Dims{1, n, width}, Tag::Workspace);
  return opt.q_out->view();
}
}  // namespace detail

namespace detail {
// Phases 1 and 2 of a fused stretch (see nn/fused.hpp): the reduction's value (one forward
// pass), dL/d(reduction) through the rest of the readout, then one backward pass that
// recomputes a and h, reverse-scans δ and collects the operands' cotangents; finally the
// operands' own backward passes into `tg` (parameters and maps' input).
template <class Layer>
void fused_maps_backward(Block<Layer>& blk, const Stretch<Layer>& st, typename LayerTypes<Layer>::CV G,
                         StretchBackward<typename Layer::value_type, LayerTypes<Layer>::space>& opt,
                         const GradTargets<typename Layer::value_type, LayerTypes<Layer>::space>& tg) {
  using T = typename Layer::value_type;
  using Fu = Fusion<Layer>;
  using CV = typename LayerTypes<Layer>::CV;
  constexpr Space space = LayerTypes<Layer>::space;
  const Dims sd = Layer::state_dims();
  const index_t n = st.n(), S = state_numel(sd);
  const Dims domain = with_tokens(n, sd);
  const fused::TilePlan plan = fused::make_plan<T>(n, sd);
  const bool grads = !opt.adjoint_only;
  const fused::BuildContext<T, space> ctx{&plan, grads ? &tg : nullptr, true};
  const auto maps = st.maps(0, n);
  fused::LiftBuild<typename Fu::DecayE, T, space> decay(blk.mixer.decay(maps), ctx);
  fused::LiftBuild<typename Fu::InjectE, T, space> inject(blk.mixer.inject(maps), ctx);
  const FusedReadout<Layer> ro(blk.mixer, maps, domain);
  fused::LiftBuild<typename Fu::X, T, space> x(ro.red->child, ctx);
  const auto dn = decay.node();
  const auto bn = inject.node();
  const auto xn = x.node();
  if constexpr (structured_shape_v<Layer>) {
    if (st.structured && opt.method == DeltaMethod::exact) {
      const Structured<T> sp(plan, dn, bn, readout_operand<typename Fu::X>(xn), ro.red->axis, st.resets);
      if (sp.ok) {
        count_scan(ScanPath::structured);
        // The reduction's value ([n, P] or [n, H, P]), its cotangent through the rest of the readout, then
        // the structured backward pass.
        Tensor<T, space> value(ro.red->dims(), Tag::Workspace);
        structured::Saved<T> saved;
        structured::forward<T>(sp.in, st.h0.data(), value.data(), nullptr, &saved);
        if (ro.scale() != T(1)) assign(value.view(), leaf(CV(value.view())) * ro.scale());
        Tensor<T, space> g_red = zeros<T, space>(ro.red->dims(), Tag::Workspace);
        {
          auto rest = ro.rest(CV(value.view()));
          Tape<decltype(rest), space> tape(rest);
          GradTargets<T, space> rtg;
          if (grads) rtg = tg;
          rtg.push_back(wrt(CV(value.view()), g_red));
          backward(rest, tape, G, rtg);
        }
        if (ro.scale() != T(1)) assign(g_red.view(), leaf(CV(g_red.view())) * ro.scale());
        structured::Grads<T> sg;
        structured::backward<T>(sp.in, saved, g_red.data(), opt.carry_in.data(), sg);
        if (opt.carry_out.data()) std::copy(sg.h0.begin(), sg.h0.end(), opt.carry_out.data());
        if (!grads) return;
        sp.scatter(sg);
        decay.backward(tg);
        inject.backward(tg);
        x.backward(tg);
        return;
      }
    }
  }
  count_scan(ScanPath::fused);
  // The reduction's value (a forward pass), and its cotangent from the rest of the readout.
  auto value = ro.make_value(plan);
  {
    const auto fd = decay.node(false);
    const auto fb = inject.node(false);
    const auto fx = x.node(false);
    const auto yd = ro.dst(value, plan);
    fused::host::ForwardIO<T> io;
    io.h0 = st.h0.data();
    io.starts = st.resets.starts;
    fused::host::forward<T>(plan, fd, fb, &fx, &yd, io);
  }
  const CV red_value = ro.finish(value);
  Tensor<T, space> g_red = zeros<T, space>(ro.red->dims(), Tag::Workspace);
  {
    auto rest = ro.rest(red_value);
    Tape<decltype(rest), space> tape(rest);
    GradTargets<T, space> rtg;
    if (grads) rtg = tg;
    rtg.push_back(wrt(red_value, g_red));
    backward(rest, tape, G, rtg);
  }
  // The backward pass over the tiles.
  fused::host::BackwardIO<T> io;
  io.h0 = st.h0.data();
  io.starts = st.resets.starts;
  io.carry_in = opt.method == DeltaMethod::exact ? opt.carry_in.data() : nullptr;
  io.carry_out = opt.carry_out.data();
  io.maps_grad = grads;
  TensorView<const T, space> q_next = q_next_view(opt);
  TensorView<T, space> q_out;
  if (opt.method == DeltaMethod::truncated) {
    q_out = q_out_view(opt, n, S);
    io.delta = [&](TensorView<const T> a, TensorView<const T> gh, TensorView<T> delta, index_t k) {
      // The tile's columns of the carried sums ([1, L, S] <-> [1, L, w]), in its order.
      const index_t w = a.extent(2);
      Tensor<T> qn, qo;
      if (q_next.data()) {
        qn = Tensor<T>(Dims{1, q_next.extent(1), w}, Tag::Workspace);
        for (index_t r = 0; r < q_next.extent(1); ++r)
          fused::host::gather_state(plan, k, q_next.data() + r * S, qn.data() + r * w);
      }
      if (q_out.data()) qo = Tensor<T>(Dims{1, n, w}, Tag::Workspace);
      truncated_delta<T, space>(a, gh, delta, qn.empty() ? TensorView<const T>() : TensorView<const T>(qn.view()),
                                qo.empty() ? TensorView<T>() : qo.view());
      if (q_out.data())
        for (index_t r = 0; r < n; ++r) fused::host::scatter_state(plan, k, qo.data() + r * w, q_out.data() + r * S);
    };
  } else if (opt.method == DeltaMethod::paper) {
    io.delta = [&](TensorView<const T> a, TensorView<const T> gh, TensorView<T> delta, index_t) {
      paper_delta<T, space>(a, gh, delta, opt.window);
    };
  }
  const expr::LiftSrc<T> gs = fused::make_src<T, space>(ro.domain_view(CV(g_red.view())), plan);
  fused::host::backward<T>(plan, dn, bn, xn, gs, ro.scale(), io);
  if (!grads) return;
  decay.backward(tg);
  inject.backward(tg);
  x.backward(tg);
}
}  // namespace detail

// Backward over one computed stretch with output cotangent G ([n, d_model]).
// `tapes`: prebuilt tapes for one shard covering the whole stretch (Backprop), or empty
// to build them here per shard (the adjoint strategies). Parameter gradients are added to
// each parameter's grad; dL/dy_in is added to opt.input_grad and, for a layer with a halo,
// dL/d(halo rows) to opt.halo_grad.
template <class Layer>
void backward_stretch(Block<Layer>& blk, const Stretch<Layer>& st, typename LayerTypes<Layer>::CV G,
                      StretchBackward<typename Layer::value_type, LayerTypes<Layer>::space>& opt,
                      ShardGrads<typename Layer::value_type, LayerTypes<Layer>::space>& sg,
                      std::vector<ShardTapes<Layer>>* kept_tapes = nullptr) {
  using T = typename Layer::value_type;
  using Ty = LayerTypes<Layer>;
  using CV = typename Ty::CV;
  using Tens = typename Ty::Tens;
  constexpr Space space = Ty::space;
  // Host: shards on OpenMP threads. Device: one shard, ordered on the calling thread's
  // stream like every allocation and kernel.
  constexpr bool threads = space == Space::Host;
  constexpr index_t halo = Ty::halo;
  constexpr std::size_t NF = Ty::num_features;
  const Dims sd = Layer::state_dims();
  const index_t n = st.n(), S = state_numel(sd), P = Layer::d_model;
  const ParameterList<T, space> params = blk.parameters();
  // On the device a stretch is one shard: the parallelism is inside every kernel, and
  // shorter shards would only add launches (each shard's tapes are built up front anyway).
  const index_t shard = kept_tapes || !threads ? n : std::max<index_t>(1, std::min(opt.shard, n));
  const index_t nshards = (n + shard - 1) / shard;
  sg.reset(params, nshards);

  // dL/d(maps' input): U's token rows, or each feature.
  std::array<Tens, NF == 0 ? 1 : NF> dmaps;
  if constexpr (NF == 0)
    dmaps[0] = zeros<T, space>(Dims{n, P}, Tag::Workspace);
  else
    for (std::size_t i = 0; i < NF; ++i) dmaps[i] = zeros<T, space>(st.f[i].dims(), Tag::Workspace);
  auto map_targets = [&](GradTargets<T, space>& tg, index_t s0, index_t s1) {
    const auto m = st.maps(s0, s1);
    if constexpr (NF == 0)
      tg.push_back(wrt(m, dmaps[0].view().slice(s0, s1)));
    else
      for (std::size_t i = 0; i < NF; ++i) tg.push_back(wrt(m[i], dmaps[i].view().slice(s0, s1)));
  };

  std::vector<ShardTapes<Layer>> local;
  std::vector<ShardTapes<Layer>>& tapes = kept_tapes ? *kept_tapes : local;
  if (!kept_tapes) {
    local.reserve(std::size_t(nshards));
    for (index_t s = 0; s < nshards; ++s) local.emplace_back(blk, st, s * shard, std::min(n, (s + 1) * shard));
  }

  if (st.fused) {
    // Phases 1 and 2 in one fused pass; parameter gradients of the whole stretch go to
    // shard 0's buffers (the products are GEMMs over the stretch).
    if constexpr (Fusion<Layer>::value) {
      auto tg = param_targets(params, sg.g[0]);
      map_targets(tg, 0, n);
      detail::fused_maps_backward(blk, st, G, opt, tg);
    }
    if (opt.adjoint_only) return;
  } else {
    detail::count_scan(ScanPath::materialised);
    CV h_all = st.h.view();
    CV h3 = h_all.reshape(with_tokens(n, sd));
    Tens gh = zeros<T, space>(Dims{1, n, S}, Tag::Workspace);  // dL/dh, direct part
    TensorView<T, space> gh3 = gh.view().reshape(with_tokens(n, sd));

    // Phase 1: readout VJPs, shard-parallel.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threads && nshards > 1)
#endif
    for (index_t s = 0; s < nshards; ++s) {
      const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
      CV hs = h3.slice(s0, s1);
      auto tg = param_targets(params, sg.g[std::size_t(s)]);
      tg.push_back(wrt(hs, gh3.slice(s0, s1)));
      map_targets(tg, s0, s1);
      backward(blk.mixer.readout(hs, st.maps(s0, s1)), *tapes[std::size_t(s)].readout, G.slice(s0, s1), tg);
    }

    // The adjoint state.
    Tens delta(Dims{1, n, S}, Tag::Workspace);
    CV a = st.a.view();
    switch (opt.method) {
      case DeltaMethod::exact:
        reverse_linear_scan<T, space>(a, detail::cview(gh), delta.view(), opt.carry_in);
        break;
      case DeltaMethod::truncated:
        detail::truncated_delta<T, space>(a, detail::cview(gh), delta.view(), detail::q_next_view(opt), detail::q_out_view(opt, n, S));
        break;
      case DeltaMethod::paper:
        detail::paper_delta<T, space>(a, detail::cview(gh), delta.view(), opt.window);
        break;
    }
    if (opt.carry_out.data())
      assign(opt.carry_out.reshape(Dims{1, 1, S}), leaf(a.slice(1, 0, 1)) * leaf(CV(delta.view()).slice(1, 0, 1)));
    if (opt.adjoint_only) return;  // the shards' parameter gradients are dropped, never added

    // Phase 2: decay and inject VJPs, shard-parallel.
    CV delta3 = CV(delta.view()).reshape(with_tokens(n, sd));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threads && nshards > 1)
#endif
    for (index_t s = 0; s < nshards; ++s) {
      const index_t s0 = s * shard, s1 = std::min(n, s0 + shard), ns = s1 - s0;
      CV ds = delta3.slice(s0, s1);
      auto& grads = sg.g[std::size_t(s)];
      // h^{t-1} for the shard's tokens: the stretch's h0 before its first token.
      Tens hprev_first;
      CV hprev;
      if (s0 > 0) {
        hprev = h3.slice(s0 - 1, s1 - 1);
      } else {
        hprev_first = Tens(with_tokens(ns, sd), Tag::Workspace);
        TensorView<T, space> rows = hprev_first.view().reshape(Dims{ns, S});
        copy<T>(rows.slice(0, 1), CV(st.h0.view()));
        if (ns > 1) copy<T>(rows.slice(1, ns), h_all.reshape(Dims{n, S}).slice(0, ns - 1));
        hprev = hprev_first.view();
      }
      const auto maps = st.maps(s0, s1);
      auto decay_e = blk.mixer.decay(maps);
      Tens da_full = eval(leaf(ds) * leaf(hprev), Tag::Workspace);  // dL/da = δ ⊙ h^{t-1}
      // a^t = 0 at a document start: no gradient reaches the decay map there.
      detail::zero_rows_at_starts(da_full.view().reshape(Dims{1, ns, S}), st.resets.offset(s0));
      Tens da = autodiff::reduce_to(CV(da_full.view()), decay_e.dims());
      auto tg = param_targets(params, grads);
      map_targets(tg, s0, s1);
      backward(decay_e, *tapes[std::size_t(s)].decay, CV(da.view()), tg);
      backward(blk.mixer.inject(maps), *tapes[std::size_t(s)].inject, ds, tg);  // dL/db = δ
    }
  }

  // Phase 3: the features' VJPs down to U (halo rows included). Shards' windows overlap,
  // so each shard writes its own buffer; they are summed in shard order.
  Tens du_ext;  // dL/dU for the halo + n rows of st.u
  if constexpr (NF == 0) {
    du_ext = std::move(dmaps[0]);
  } else {
    du_ext = zeros<T, space>(Dims{halo + n, P}, Tag::Workspace);
    std::vector<Tens> du_shard(static_cast<std::size_t>(nshards));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threads && nshards > 1)
#endif
    for (index_t s = 0; s < nshards; ++s) {
      const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
      Tens& du = du_shard[std::size_t(s)];
      du = zeros<T, space>(Dims{halo + s1 - s0, P}, Tag::Workspace);
      CV us = ShardTapes<Layer>::u_rows(st, s0, s1);
      auto fe = blk.mixer.features(us, st.mask_cols(s0, s1));
      auto tg = param_targets(params, sg.g[std::size_t(s)]);
      tg.push_back(wrt(us, du.view()));
      // Later features may read earlier ones: walk them last to first.
      detail::for_each_index<NF>([&](auto J) {
        constexpr std::size_t I = NF - 1 - decltype(J)::value;
        backward(std::get<I>(fe), std::get<I>(tapes[std::size_t(s)].features),
                 CV(dmaps[I].view()).slice(s0, s1), tg);
      });
    }
    for (index_t s = 0; s < nshards; ++s) {
      const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
      accumulate(du_ext.view().slice(s0, s1 + halo), du_shard[std::size_t(s)]);
    }
  }

  // Phase 4: through the norm to the layer input, shard-parallel.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threads && nshards > 1)
#endif
  for (index_t s = 0; s < nshards; ++s) {
    const index_t s0 = s * shard, s1 = std::min(n, s0 + shard);
    CV ys = st.y_in().slice(s0, s1);
    GradTargets<T, space> ntg{wrt(blk.norm.weight.value, sg.g[std::size_t(s)][0]),
                              wrt(ys, opt.input_grad.slice(s0, s1))};
    backward(rms_norm(ys, blk.norm.weight.value, blk.norm.eps), tapes[std::size_t(s)].norm,
             CV(du_ext.view()).slice(halo + s0, halo + s1), ntg);
  }
  if constexpr (halo > 0) {  // the halo rows: norm VJP once, into the first shard's buffers
    SSMX_REQUIRE(opt.halo_grad.data(), ValueError, "backward_stretch: a layer with a halo needs opt.halo_grad");
    CV yh = st.y_ext.slice(0, halo);
    auto ne = rms_norm(yh, blk.norm.weight.value, blk.norm.eps);
    Tape<decltype(ne)> tape(ne);
    GradTargets<T, space> ntg{wrt(blk.norm.weight.value, sg.g[0][0]), wrt(yh, opt.halo_grad)};
    backward(ne, tape, CV(du_ext.view()).slice(0, halo), ntg);
  }
  sg.add_to(params);
}

}  // namespace ssmx::nn
