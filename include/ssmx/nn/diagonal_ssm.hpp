// ssmx — DiagonalSSM: the selective diagonal SSM of the adjoint-sharding paper
// (arXiv 2501.00692, §3), written as per-token expressions.
//
// Shape reading. The paper writes one state h ∈ R^N with B^t ∈ R^{N×P}, but gives each of
// 𝒜, ℬ, 𝒞 only PN + N parameters (a map R^P → R^N). The reading that fits that count is a
// state per input channel, as in Mamba's S6 without Δ:
//
//   a^t = exp(-softplus(W_a u^t + b_a))    ∈ (0,1)^N   decay, shared by the P channels
//   β^t = W_b u^t + b_b                    ∈ R^N
//   c^t = W_c u^t + b_c                    ∈ R^N
//   h^t = a^t ⊙ h^{t-1} + u^t ⊗ β^t        ∈ R^{P×N}
//   y^t = h^t c^t + D ⊙ u^t                ∈ R^P       (D: a skip, as in Mamba)
//
// Parameters: 3(PN + N) + P. The decay exp(-softplus(·)) stays in (0, 1): the recurrence
// is stable for any weights.
#pragma once

#include <cmath>
#include <random>
#include <string>

#include "../expr/expr.hpp"
#include "parameter.hpp"

namespace ssmx::nn {

// Concept ScanLayer (C++17 comment-concept), what the engine (scan_layer.hpp) needs:
//   typename L::value_type                        float or double
//   L::d_model                                    width of the token stream
//   Dims L::state_dims() const                    per-token state, e.g. {P, N}
//   ParameterList<T> L::parameters()              in a fixed order
//   L::decay(U)     -> expr, broadcastable to [tokens, state...], entries in (0, 1)
//   L::inject(U)    -> expr [tokens, state...]
//   L::readout(H,U) -> expr [tokens, d_model]
// with U a [tokens, d_model] view of the normalised layer input and H a
// [tokens, state...] view of the scan states. Optionally a feature stage (num_features,
// halo, features(U_ext, tap_mask); see scan_layer.hpp and mamba.hpp), whose outputs the
// three maps then take instead of U.
template <class T, index_t P, index_t N, Space S = Space::Host>
class DiagonalSSM {
  static_assert(P > 0 && N > 0, "DiagonalSSM: P (model width) and N (state size) must be positive");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "DiagonalSSM: T must be float or double");

 public:
  using value_type = T;
  static constexpr Space space = S;
  template <Space S2>
  using on = DiagonalSSM<T, P, N, S2>;  // the same layer in memory space S2
  static constexpr index_t d_model = P;
  static constexpr index_t state_size = N;

  Parameter<T, S> W_a, b_a, W_b, b_b, W_c, b_c, D;

  explicit DiagonalSSM(const std::string& prefix = "")
      : W_a(prefix + "W_a", Dims{P, N}),
        b_a(prefix + "b_a", Dims{N}),
        W_b(prefix + "W_b", Dims{P, N}),
        b_b(prefix + "b_b", Dims{N}),
        W_c(prefix + "W_c", Dims{P, N}),
        b_c(prefix + "b_c", Dims{N}),
        D(prefix + "D", Dims{P}) {
    zero_parameters(parameters());
  }

  static Dims state_dims() { return Dims{P, N}; }
  static constexpr index_t parameter_count() { return 3 * (P * N + N) + P; }

  ParameterList<T, S> parameters() { return {&W_a, &b_a, &W_b, &b_b, &W_c, &b_c, &D}; }

  // Weights ~ N(0, 1/P); decay timescales spread log-uniformly over [1, 10^4] tokens so
  // that the layer can hold information across long contexts from the start.
  template <class Rng>
  void init(Rng& rng) {
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(P)));
    for (auto* w : {&W_a, &W_b, &W_c}) {
      const double scale = w == &W_a ? 0.1 : 1.0;
      set_values(*w, [&](index_t) { return nd(rng) * scale; });
    }
    std::uniform_real_distribution<double> ud(std::log(1e-4), std::log(1.0));
    set_values(b_a, [&](index_t) {
      const double rate = std::exp(ud(rng));  // -log(a) = softplus(b_a)
      return std::log(std::expm1(rate));      // softplus⁻¹(rate)
    });
    set_values(b_b, [](index_t) { return 0.0; });
    set_values(b_c, [](index_t) { return 0.0; });
    set_values(D, [](index_t) { return 1.0; });
  }

  template <class U>
  auto decay(const U& u) const {  // [tokens, 1, N]
    return unsqueeze(exp(-softplus(matmul(u, W_a.value) + b_a.value)), 1);
  }
  template <class U>
  auto inject(const U& u) const {  // [tokens, P, N]
    return unsqueeze(leaf(u), 2) * unsqueeze(matmul(u, W_b.value) + b_b.value, 1);
  }
  template <class H, class U>
  auto readout(const H& h, const U& u) const {  // [tokens, P]
    return sum(leaf(h) * unsqueeze(matmul(u, W_c.value) + b_c.value, 1), 2) + leaf(u) * D.value;
  }
};

}  // namespace ssmx::nn
