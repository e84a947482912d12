// ssmx — named parameters with their gradients, and parameter lists.
#pragma once

#include <string>
#include <vector>

#include "../core/tensor.hpp"

namespace ssmx {

// A trainable tensor, its gradient (same shape, Tag::Gradients) and a dotted name that
// follows the checkpoint naming ("layers.0.mixer.W_a").
template <class T, Space S = Space::Host>
struct Parameter {
  std::string name;
  Tensor<T, S> value;
  Tensor<T, S> grad;

  Parameter() = default;
  Parameter(std::string n, const Dims& d) : name(std::move(n)), value(d, Tag::Parameters), grad(d, Tag::Gradients) {}
  index_t numel() const { return value.numel(); }
};

// Non-owning, ordered list of a model's parameters. The order is fixed by the model and
// defines the order of every reduction over parameters (deterministic norms and updates).
template <class T, Space S = Space::Host>
using ParameterList = std::vector<Parameter<T, S>*>;

template <class T, Space S>
void zero_grad(const ParameterList<T, S>& params) {
  for (auto* p : params) detail::zero_bytes(p->grad.data(), S, p->grad.bytes());
}

template <class T, Space S>
index_t parameter_count(const ParameterList<T, S>& params) {
  index_t n = 0;
  for (auto* p : params) n += p->numel();
  return n;
}

}  // namespace ssmx
