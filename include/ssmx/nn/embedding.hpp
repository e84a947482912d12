// ssmx — token embedding: a gather forward, a deterministic scatter-add backward.
#pragma once

#include <cstdint>
#include <random>

#include "parameter.hpp"

namespace ssmx::nn {

using token_t = std::int32_t;

// Throws ValueError naming `what` and the first token id outside [0, vocab).
inline void check_tokens(const token_t* ids, index_t n, index_t vocab, const char* what, bool allow_ignore = false) {
  for (index_t i = 0; i < n; ++i) {
    const token_t t = ids[i];
    if (allow_ignore && t == -1) continue;
    SSMX_REQUIRE(t >= 0 && index_t(t) < vocab, ValueError, what, "[", i, "] = ", t, " is outside the vocabulary [0, ",
                 vocab, ")");
  }
}

template <class T>
struct Embedding {
  Parameter<T> weight;  // [vocab, d_model]

  Embedding(std::string name, index_t vocab, index_t d_model) : weight(std::move(name), Dims{vocab, d_model}) {
    fill<T>(weight.grad.view(), T(0));
  }
  index_t vocab() const { return weight.value.extent(0); }
  index_t d_model() const { return weight.value.extent(1); }

  // out[t] = weight[ids[t]]; out is [n, d_model].
  void forward(const token_t* ids, index_t n, TensorView<T> out) const {
    check_tokens(ids, n, vocab(), "tokens");
    const index_t d = d_model();
    check_dims(out.dims(), Dims{n, d}, "embedding output");
    for (index_t t = 0; t < n; ++t)
      for (index_t j = 0; j < d; ++j) out(t, j) = weight.value(index_t(ids[t]), j);
  }
  // weight.grad[ids[t]] += g[t], in token order (deterministic).
  void backward(const token_t* ids, index_t n, TensorView<const T> g) {
    const index_t d = d_model();
    for (index_t t = 0; t < n; ++t)
      for (index_t j = 0; j < d; ++j) weight.grad(index_t(ids[t]), j) += g(t, j);
  }
};

}  // namespace ssmx::nn
