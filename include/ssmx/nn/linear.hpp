// ssmx — a linear map y = x W + b as an expression (x: [tokens, in], W: [in, out]).
#pragma once

#include <cmath>
#include <random>
#include <string>

#include "../expr/expr.hpp"
#include "parameter.hpp"

namespace ssmx::nn {

template <class T, Space S = Space::Host>
struct Linear {
  Parameter<T, S> weight;  // [in, out]
  Parameter<T, S> bias;    // [out]

  Linear(const std::string& prefix, index_t in, index_t out)
      : weight(prefix + "weight", Dims{in, out}), bias(prefix + "bias", Dims{out}) {
    zero_parameters(parameters());
  }
  ParameterList<T, S> parameters() { return {&weight, &bias}; }

  // W ~ N(0, 1/in), b = 0.
  template <class Rng>
  void init(Rng& rng) {
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(weight.value.extent(0))));
    set_values(weight, [&](index_t) { return nd(rng); });
    set_values(bias, [](index_t) { return 0.0; });
  }

  template <class X>
  auto operator()(const X& x) const {
    return matmul(x, weight.value) + bias.value;
  }
};

}  // namespace ssmx::nn
