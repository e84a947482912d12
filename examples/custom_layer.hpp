// A selective SSM variant written by a user of ssmx: only the per-token maps, as
// expressions. The engine derives the chunked scan and the exact adjoint backward.
// Here: sigmoid decay, unbiased injection, a sigmoid output gate that starts open (2σ(0) = 1)
// and a skip D ⊙ u. (With a SiLU gate, silu(W_g u), which starts half closed, the same layer
// stays near chance on the recall task of custom_layer.cpp.)
#pragma once

#include <ssmx/ssmx.hpp>

template <class T, ssmx::index_t P, ssmx::index_t N, ssmx::Space S = ssmx::Space::Host>
struct GatedSSM {
  using value_type = T;
  static constexpr ssmx::Space space = S;  // where its parameters live
  template <ssmx::Space S2>
  using on = GatedSSM<T, P, N, S2>;  // the same layer in another space: Model<GatedSSM<...>, K, Space::Cuda>
  static constexpr ssmx::index_t d_model = P;
  ssmx::Parameter<T, S> W_a, b_a, W_b, W_c, W_g, D;

  explicit GatedSSM(const std::string& prefix = "")
      : W_a(prefix + "W_a", {P, N}), b_a(prefix + "b_a", {N}), W_b(prefix + "W_b", {P, N}),
        W_c(prefix + "W_c", {P, N}), W_g(prefix + "W_g", {P, P}), D(prefix + "D", {P}) {}
  static ssmx::Dims state_dims() { return {P, N}; }
  ssmx::ParameterList<T, S> parameters() { return {&W_a, &b_a, &W_b, &W_c, &W_g, &D}; }
  // Weights ~ N(0, 1/P) (the decay's 10 times smaller, so that it starts nearly the same for
  // every token); the decay's timescales 1/(1 - a) spread log-uniformly over [1, 10^4]
  // tokens, so that some states hold a value across a long context from the start.
  template <class Rng>
  void init(Rng& rng) {
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(P)));
    for (auto* p : parameters()) {
      const double scale = p == &W_a ? 0.1 : 1.0;
      ssmx::set_values(*p, [&](ssmx::index_t) { return scale * nd(rng); });  // drawn on the host
    }
    std::uniform_real_distribution<double> ud(std::log(1e-4), 0.0);
    ssmx::set_values(b_a, [&](ssmx::index_t) {  // sigmoid(b_a) = a = exp(-rate)
      const double rate = std::exp(ud(rng));
      return -std::log(std::expm1(rate));
    });
    ssmx::set_values(D, [](ssmx::index_t) { return 1.0; });  // the skip passes the token through
  }

  template <class U>
  auto decay(const U& u) const { return unsqueeze(sigmoid(matmul(u, W_a.value) + b_a.value), 1); }
  template <class U>
  auto inject(const U& u) const { return unsqueeze(ssmx::leaf(u), 2) * unsqueeze(matmul(u, W_b.value), 1); }
  template <class H, class U>
  auto readout(const H& h, const U& u) const {
    return sum(ssmx::leaf(h) * unsqueeze(matmul(u, W_c.value), 1), 2) * (T(2) * sigmoid(matmul(u, W_g.value))) +
           ssmx::leaf(u) * D.value;
  }
};
