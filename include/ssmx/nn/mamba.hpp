// ssmx — Mamba: the Mamba-1 (S6) mixer of Gu & Dao, "Mamba: Linear-Time Sequence Modeling
// with Selective State Spaces" (arXiv 2312.00752), as a ScanLayer. With u the normalised
// block input ([tokens, D]) and E = expand·D:
//
//   [x; z] = in_proj(u)                         in_proj.weight   [2E, D]  (no bias)
//   x      = SiLU(conv1d(x))                    conv1d.weight [E, 1, W], conv1d.bias [E]
//                                               causal, depthwise; its window crosses
//                                               chunk boundaries through the halo
//   [δ; B; C] = x_proj(x)                       x_proj.weight    [R + 2N, E]
//   Δ      = softplus(dt_proj(δ) + dt_bias)     dt_proj.weight [E, R], dt_proj.bias [E]
//   a      = exp(Δ ⊗ A),  A = -exp(A_log)       A_log            [E, N]
//   b      = (Δ ⊙ x) ⊗ B
//   h^t    = a^t ⊙ h^{t-1} + b^t                state [E, N] per token
//   y      = h C + D ⊙ x                        D                [E]
//   out    = out_proj(y ⊙ SiLU(z))              out_proj.weight  [D, E]   (no bias)
//
// Parameter names and shapes are those of the public Mamba checkpoints (Hugging Face
// MambaForCausalLM, state-spaces/mamba), so that they load by name. The convolution and
// in_proj run once per stretch as the layer's features (x after the convolution, and z);
// Δ, B and C are small projections of x recomputed inside each per-token map.
#pragma once

#include <cmath>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>

#include "../expr/expr.hpp"
#include "parameter.hpp"

namespace ssmx::nn {

// Mamba<T, D, N, Expand, W, R>: d_model D, state size N (d_state), E = Expand·D channels
// (d_inner), convolution width W (d_conv), Δ rank R (dt_rank; Mamba's default ceil(D/16)).
template <class T, index_t D, index_t N = 16, index_t Expand = 2, index_t W = 4, index_t R = (D + 15) / 16,
          Space S = Space::Host>
class Mamba {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "Mamba: T must be float or double");
  static_assert(D > 0 && N > 0 && Expand > 0 && R > 0, "Mamba: D, N, Expand and R must be positive");
  static_assert(W >= 1, "Mamba: the convolution width W must be at least 1");

 public:
  using value_type = T;
  static constexpr Space space = S;
  template <Space S2>
  using on = Mamba<T, D, N, Expand, W, R, S2>;  // the same layer in memory space S2
  using CV = TensorView<const T, S>;
  static constexpr index_t d_model = D;
  static constexpr index_t d_inner = Expand * D;
  static constexpr index_t d_state = N;
  static constexpr index_t d_conv = W;
  static constexpr index_t dt_rank = R;
  static constexpr index_t halo = W - 1;  // the convolution reads W - 1 tokens back
  static constexpr int num_features = 2;  // x (after conv1d and SiLU), z (the gate)
  static constexpr index_t E = d_inner;

  Parameter<T, S> in_proj, conv_weight, conv_bias, x_proj, dt_proj_weight, dt_proj_bias, A_log, D_skip, out_proj;

  explicit Mamba(const std::string& prefix = "")
      : in_proj(prefix + "in_proj.weight", Dims{2 * E, D}),
        conv_weight(prefix + "conv1d.weight", Dims{E, 1, W}),
        conv_bias(prefix + "conv1d.bias", Dims{E}),
        x_proj(prefix + "x_proj.weight", Dims{R + 2 * N, E}),
        dt_proj_weight(prefix + "dt_proj.weight", Dims{E, R}),
        dt_proj_bias(prefix + "dt_proj.bias", Dims{E}),
        A_log(prefix + "A_log", Dims{E, N}),
        D_skip(prefix + "D", Dims{E}),
        out_proj(prefix + "out_proj.weight", Dims{D, E}) {
    zero_parameters(parameters());
  }

  static Dims state_dims() { return Dims{E, N}; }
  static constexpr index_t parameter_count() {
    return 2 * E * D + E * W + E + (R + 2 * N) * E + E * R + E + E * N + E + D * E;
  }
  ParameterList<T, S> parameters() {
    return {&in_proj, &conv_weight, &conv_bias, &x_proj, &dt_proj_weight, &dt_proj_bias, &A_log, &D_skip, &out_proj};
  }

  // Mamba's initialisation (mamba_simple.py): PyTorch's default uniform(±1/sqrt(fan_in)) for
  // the projections and the convolution, dt_proj.weight uniform(±R^-1/2), Δ's bias the
  // inverse softplus of Δ log-uniform in [1e-3, 1e-1], A = -(1..N) per channel, D = 1.
  template <class Rng>
  void init(Rng& rng) {
    auto uniform = [&](Parameter<T, S>& p, double bound) {
      std::uniform_real_distribution<double> ud(-bound, bound);
      set_values(p, [&](index_t) { return ud(rng); });
    };
    uniform(in_proj, 1.0 / std::sqrt(double(D)));
    uniform(conv_weight, 1.0 / std::sqrt(double(W)));
    uniform(conv_bias, 1.0 / std::sqrt(double(W)));
    uniform(x_proj, 1.0 / std::sqrt(double(E)));
    uniform(dt_proj_weight, 1.0 / std::sqrt(double(R)));
    uniform(out_proj, 1.0 / std::sqrt(double(E)));
    std::uniform_real_distribution<double> lu(std::log(1e-3), std::log(1e-1));
    set_values(dt_proj_bias, [&](index_t) {
      const double dt = std::max(std::exp(lu(rng)), 1e-4);
      return dt + std::log(-std::expm1(-dt));  // softplus⁻¹(dt)
    });
    set_values(D_skip, [](index_t) { return 1.0; });
    set_values(A_log, [](index_t i) { return std::log(double(i % N + 1)); });
  }

  // Features of a stretch from U_ext = [halo + n, D] (the halo rows first): x and z, [n, E].
  template <class U>
  auto features(const U& u_ext, CV tap_mask) const {
    const index_t rows = u_ext.extent(0);
    auto x = silu(causal_conv1d(matmul(u_ext, transpose(rows_of(in_proj, 0, E))), cv(conv_weight), cv(conv_bias),
                                tap_mask));
    auto z = matmul(u_ext.slice(halo, rows), transpose(rows_of(in_proj, E, 2 * E)));
    return std::make_tuple(x, z);
  }

  template <class F>
  auto decay(const F& f) const {  // [n, E, N]
    return exp(unsqueeze(delta(f), 2) * unsqueeze(-exp(cv(A_log)), 0));
  }
  template <class F>
  auto inject(const F& f) const {  // [n, E, N]
    return unsqueeze(delta(f) * leaf(f[0]), 2) * unsqueeze(matmul(f[0], transpose(rows_of(x_proj, R, R + N))), 1);
  }
  template <class H, class F>
  auto readout(const H& h, const F& f) const {  // [n, D]
    auto C = matmul(f[0], transpose(rows_of(x_proj, R + N, R + 2 * N)));
    auto y = sum(leaf(h) * unsqueeze(C, 1), 2) + leaf(f[0]) * cv(D_skip);
    return matmul(y * silu(leaf(f[1])), transpose(cv(out_proj)));
  }

 private:
  static CV cv(const Parameter<T, S>& p) { return p.value.view(); }
  // Rows [r0, r1) of a weight: a slice of the parameter, which receives its gradient there.
  static CV rows_of(const Parameter<T, S>& p, index_t r0, index_t r1) { return cv(p).slice(r0, r1); }
  // Δ = softplus(dt_proj(x_proj(x)[:, :R]) + dt_bias), [n, E].
  template <class F>
  auto delta(const F& f) const {
    return softplus(matmul(matmul(f[0], transpose(rows_of(x_proj, 0, R))), transpose(cv(dt_proj_weight))) +
                    cv(dt_proj_bias));
  }
};

}  // namespace ssmx::nn
