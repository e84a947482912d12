// ssmx — Mamba2: the Mamba-2 (SSD) mixer of Dao & Gu, "Transformers are SSMs: Generalized
// Models and Efficient Algorithms Through Structured State Space Duality" (arXiv 2405.21060),
// as a ScanLayer. With u the normalised block input ([tokens, D]), E = Expand·D channels in
// H = E / P heads of P channels, G groups of heads sharing B and C, conv_dim = E + 2GN:
//
//   [z; xBC; dt] = in_proj(u)                 in_proj.weight   [2E + 2GN + H, D]  (no bias)
//   [x; B; C] = SiLU(conv1d(xBC))             conv1d.weight [conv_dim, 1, W], conv1d.bias
//                                             causal, depthwise, over x, B and C together
//   x -> [H, P];  B, C -> [G, N];             head h reads group h / (H / G)
//   Δ      = clamp(softplus(dt + dt_bias))    dt_bias [H]; clamped to time_step_limit
//   a      = exp(Δ · A),  A = -exp(A_log)     A_log [H]: one decay per head, shared by its
//                                             whole [P, N] state
//   h^t[h] = a^t[h] h^{t-1}[h] + Δ^t[h] x^t[h] ⊗ B^t[g(h)]          state [H, P, N]
//   y[h]   = h[h] C[g(h)] + D[h] x[h]         D [H] (on the convolution's output, before Δ)
//   g      = rmsnorm_G(y ⊙ SiLU(z)) ⊙ norm.weight                   norm.weight [E]
//   out    = out_proj(g)                      out_proj.weight  [D, E]  (no bias)
//
// rmsnorm_G normalises each group of E / G channels on its own, as mamba_ssm's
// RMSNormGated(group_size = E / G) and the fused kernels do. Hugging Face's slow path
// (MambaRMSNormGated) normalises over all of E instead; the two agree exactly for G = 1 (every
// public Mamba-2 checkpoint) and differ for G > 1, where ssmx follows mamba_ssm.
//
// Parameter names and shapes are those of Hugging Face Mamba2ForCausalLM and state-spaces
// mamba2 checkpoints (io/mamba2.hpp loads both). The convolution and in_proj run once per
// stretch as the layer's features (x, B, C after the convolution; z; Δ). A head's decay is
// a scalar, so the decay is an [tokens, H] operand broadcast over the state, and the
// structured scan (nn/structured.hpp) runs the chunked SSD form for it; for G > 1 the groups'
// B and C are expanded to the heads once per stretch ([tokens, H, N]).
#pragma once

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>

#include "../expr/expr.hpp"
#include "parameter.hpp"

namespace ssmx::nn {

// Mamba2<T, D, N, P, G, Expand, W>: d_model D, state size N (d_state), head dimension P
// (headdim), G groups (ngroups), E = Expand·D channels (d_inner) in E / P heads, convolution
// width W (d_conv).
template <class T, index_t D, index_t N = 128, index_t P = 64, index_t G = 1, index_t Expand = 2, index_t W = 4,
          Space S = Space::Host>
class Mamba2 {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "Mamba2: T must be float or double");
  static_assert(D > 0 && N > 0 && P > 0 && G > 0 && Expand > 0, "Mamba2: D, N, P, G and Expand must be positive");
  static_assert(W >= 1, "Mamba2: the convolution width W must be at least 1");
  static_assert((Expand * D) % P == 0, "Mamba2: d_inner = Expand·D must be a multiple of the head dimension P");
  static_assert(((Expand * D) / P) % G == 0, "Mamba2: the number of heads must be a multiple of the groups G");

 public:
  using value_type = T;
  static constexpr Space space = S;
  template <Space S2>
  using on = Mamba2<T, D, N, P, G, Expand, W, S2>;  // the same layer in memory space S2
  using CV = TensorView<const T, S>;
  static constexpr index_t d_model = D;
  static constexpr index_t d_inner = Expand * D;
  static constexpr index_t d_state = N;
  static constexpr index_t head_dim = P;
  static constexpr index_t n_heads = d_inner / P;
  static constexpr index_t n_groups = G;
  static constexpr index_t d_conv = W;
  static constexpr index_t conv_dim = d_inner + 2 * G * N;         // x, B and C: what conv1d sees
  static constexpr index_t proj_dim = 2 * d_inner + 2 * G * N + n_heads;  // z, xBC, dt
  static constexpr index_t halo = W - 1;  // the convolution reads W - 1 tokens back
  static constexpr int num_features = 3;  // xBC (after conv1d and SiLU), z (the gate), Δ
  static constexpr index_t E = d_inner, H = n_heads, Hg = n_heads / G;

  Parameter<T, S> in_proj, conv_weight, conv_bias, dt_bias, A_log, D_skip, norm_weight, out_proj;
  // The gated norm's epsilon (Hugging Face: layer_norm_epsilon; mamba_ssm: 1e-5) and the
  // range Δ is clamped to (time_step_limit; [0, ∞) changes nothing).
  double norm_eps = 1e-5;
  double dt_min = 0.0, dt_max = std::numeric_limits<double>::infinity();

  explicit Mamba2(const std::string& prefix = "")
      : in_proj(prefix + "in_proj.weight", Dims{proj_dim, D}),
        conv_weight(prefix + "conv1d.weight", Dims{conv_dim, 1, W}),
        conv_bias(prefix + "conv1d.bias", Dims{conv_dim}),
        dt_bias(prefix + "dt_bias", Dims{H}),
        A_log(prefix + "A_log", Dims{H}),
        D_skip(prefix + "D", Dims{H}),
        norm_weight(prefix + "norm.weight", Dims{E}),
        out_proj(prefix + "out_proj.weight", Dims{D, E}) {
    zero_parameters(parameters());
  }

  static Dims state_dims() { return Dims{H, P, N}; }
  static constexpr index_t parameter_count() {
    return proj_dim * D + conv_dim * W + conv_dim + 3 * H + E + D * E;
  }
  ParameterList<T, S> parameters() {
    return {&in_proj, &conv_weight, &conv_bias, &dt_bias, &A_log, &D_skip, &norm_weight, &out_proj};
  }

  // Sets the clamp of Δ; ValueError unless 0 <= lo <= hi (hi may be infinite).
  void set_time_step_limit(double lo, double hi) {
    SSMX_REQUIRE(std::isfinite(lo) && lo >= 0 && !std::isnan(hi) && hi >= lo, ValueError,
                 "Mamba2: time_step_limit [", lo, ", ", hi, "] is not a range 0 <= lo <= hi");
    dt_min = lo;
    dt_max = hi;
  }

  // mamba_ssm's Mamba2 initialisation: PyTorch's default uniform(±1/sqrt(fan_in)) for the
  // projections and the convolution, Δ's bias the inverse softplus of Δ log-uniform in
  // [1e-3, 1e-1] (floor 1e-4), A uniform in [1, 16] per head, D = 1, the norm's weight 1.
  template <class Rng>
  void init(Rng& rng) {
    auto uniform = [&](Parameter<T, S>& p, double bound) {
      std::uniform_real_distribution<double> ud(-bound, bound);
      set_values(p, [&](index_t) { return ud(rng); });
    };
    uniform(in_proj, 1.0 / std::sqrt(double(D)));
    uniform(conv_weight, 1.0 / std::sqrt(double(W)));
    uniform(conv_bias, 1.0 / std::sqrt(double(W)));
    uniform(out_proj, 1.0 / std::sqrt(double(E)));
    std::uniform_real_distribution<double> lu(std::log(1e-3), std::log(1e-1));
    set_values(dt_bias, [&](index_t) {
      const double dt = std::max(std::exp(lu(rng)), 1e-4);
      return dt + std::log(-std::expm1(-dt));  // softplus⁻¹(dt)
    });
    std::uniform_real_distribution<double> au(1.0, 16.0);
    set_values(A_log, [&](index_t) { return std::log(au(rng)); });
    set_values(D_skip, [](index_t) { return 1.0; });
    set_values(norm_weight, [](index_t) { return 1.0; });
  }

  // Features of a stretch from U_ext = [halo + n, D] (the halo rows first): xBC
  // [n, conv_dim], z [n, E] and Δ [n, H].
  template <class U>
  auto features(const U& u_ext, CV tap_mask) const {
    const index_t rows = u_ext.extent(0);
    const auto u = u_ext.slice(halo, rows);
    auto xbc = silu(causal_conv1d(matmul(u_ext, transpose(rows_of(in_proj, E, E + conv_dim))), cv(conv_weight),
                                  cv(conv_bias), tap_mask));
    auto z = matmul(u, transpose(rows_of(in_proj, 0, E)));
    auto sp = softplus(matmul(u, transpose(rows_of(in_proj, E + conv_dim, proj_dim))) + cv(dt_bias));
    using C = expr::Constant<T>;
    auto dt = -maximum(-maximum(sp, C(T(dt_min))), C(T(-dt_max)));  // clamp(sp, dt_min, dt_max)
    return std::make_tuple(xbc, z, dt);
  }

  template <class F>
  auto decay(const F& f) const {  // [n, H, 1, 1]
    return unsqueeze(unsqueeze(exp(leaf(f[2]) * -exp(cv(A_log))), 2), 3);
  }
  template <class F>
  auto inject(const F& f) const {  // [n, H, P, N]
    return unsqueeze(unsqueeze(leaf(f[2]), 2) * leaf(heads_x(f[0])), 3) * per_head(f[0], E);
  }
  template <class Hs, class F>
  auto readout(const Hs& h, const F& f) const {  // [n, D]
    const index_t n = f[0].extent(0);
    const CV xs = heads_x(f[0]);
    const CV z(f[1].data(), Dims{n, H, P}, {f[1].stride(0), P, 1, 0});
    const CV skip(D_skip.value.data(), Dims{H, 1}, {1, 0, 0, 0});
    const CV weight(norm_weight.value.data(), Dims{G, E / G}, {E / G, 1, 0, 0});
    auto y = sum(leaf(h) * per_head(f[0], E + G * N), 3) + leaf(xs) * leaf(skip);  // [n, H, P]
    auto g = rms_normalize(reshape(y * silu(leaf(z)), Dims{n, G, E / G}), norm_eps) * leaf(weight);
    return matmul(reshape(g, Dims{n, E}), transpose(cv(out_proj)));
  }

 private:
  static CV cv(const Parameter<T, S>& p) { return p.value.view(); }
  // Rows [r0, r1) of a weight: a slice of the parameter, which receives its gradient there.
  static CV rows_of(const Parameter<T, S>& p, index_t r0, index_t r1) { return cv(p).slice(r0, r1); }
  // x of the features, by head: [n, H, P].
  static CV heads_x(const CV& xbc) { return CV(xbc.data(), Dims{xbc.extent(0), H, P}, {xbc.stride(0), P, 1, 0}); }
  // B (columns from E) or C (from E + GN) as each head reads it, broadcastable to
  // [n, H, P, N]: [n, 1, 1, N] for one group (a view); for G > 1 the groups expanded to the
  // heads, [n, H, 1, N].
  static auto per_head(const CV& xbc, index_t col) {
    const index_t n = xbc.extent(0), rs = xbc.stride(0);
    if constexpr (G == 1) {
      return leaf(CV(xbc.data() + col, Dims{n, 1, 1, N}, {rs, 0, 0, 1}));
    } else {
      const CV groups(xbc.data() + col, Dims{n, G, 1, N}, {rs, N, 0, 1});
      return unsqueeze(reshape(broadcast_to(leaf(groups), Dims{n, G, Hg, N}), Dims{n, H, N}), 2);
    }
  }
};

}  // namespace ssmx::nn
