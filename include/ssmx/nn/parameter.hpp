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

// Sets every value of p to f(i), i the row-major index, evaluated on the host in index order
// (random draws give the same values in every memory space), then copied to p's space.
template <class T, Space S, class F>
void set_values(Parameter<T, S>& p, F&& f) {
  if constexpr (S == Space::Host) {
    for (index_t i = 0; i < p.numel(); ++i) p.value[i] = T(f(i));
  } else {
    Tensor<T> h(p.value.dims(), Tag::Workspace);
    for (index_t i = 0; i < h.numel(); ++i) h[i] = T(f(i));
    detail::copy_bytes(p.value.data(), S, h.data(), Space::Host, h.bytes());
  }
}

// Zero values and gradients.
template <class T, Space S>
void zero_parameters(const ParameterList<T, S>& params) {
  for (auto* p : params) {
    detail::zero_bytes(p->value.data(), S, p->value.bytes());
    detail::zero_bytes(p->grad.data(), S, p->grad.bytes());
  }
}

template <class T, Space S>
index_t parameter_count(const ParameterList<T, S>& params) {
  index_t n = 0;
  for (auto* p : params) n += p->numel();
  return n;
}

}  // namespace ssmx
