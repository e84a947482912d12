// ssmx — RMSNorm as an expression: x ⊙ rsqrt(mean(x², last) + eps) ⊙ w.
// Its VJP comes from the expression's functors; nothing is written by hand.
#pragma once

#include "../expr/expr.hpp"
#include "parameter.hpp"

namespace ssmx::nn {

inline constexpr double default_norm_eps = 1e-5;

template <class X, class W>
auto rms_norm(const X& x, const W& w, double eps = default_norm_eps) {
  using V = typename expr::expr_t<X>::value_type;
  return leaf(x) * rsqrt(mean(square(leaf(x)), -1, true) + V(eps)) * leaf(w);
}

// A norm with its own weight parameter [d_model], initialised to one.
template <class T, Space S = Space::Host>
struct RMSNorm {
  Parameter<T, S> weight;
  double eps = default_norm_eps;
  RMSNorm(std::string name, index_t d_model) : weight(std::move(name), Dims{d_model}) {
    set_values(weight, [](index_t) { return T(1); });
    zero_grad(ParameterList<T, S>{&weight});
  }
  template <class X>
  auto operator()(const X& x) const {
    return rms_norm(x, weight.value, eps);
  }
};

}  // namespace ssmx::nn
