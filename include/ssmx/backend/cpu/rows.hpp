// ssmx — host backend of the embedding gather, its scatter-add and the arg-max count
// (Rows<Space::Host>): plain loops in token order, one core (they move n x d elements, far
// less than the layers around them).
// Private header: include <ssmx/nn/embedding.hpp>.
#pragma once

#include <algorithm>

#include "../../core/dtype.hpp"
#include "../../nn/embedding.hpp"

namespace ssmx::backend {

template <>
struct Rows<Space::Host> {
  template <class T>
  static void gather(const nn::token_t* ids, index_t n, const T* table, index_t d, T* out, index_t rs, index_t cs) {
    for (index_t t = 0; t < n; ++t) {
      const T* src = table + index_t(ids[t]) * d;
      T* dst = out + t * rs;
      if (cs == 1)
        std::copy_n(src, d, dst);
      else
        for (index_t j = 0; j < d; ++j) dst[j * cs] = src[j];
    }
  }

  // Token order: row ids[t] receives g[0], g[1], ... of its positions in turn.
  template <class T>
  static void scatter_add(const nn::token_t* ids, index_t n, index_t /*vocab*/, const T* g, index_t rs, index_t cs,
                          T* table, index_t d) {
    for (index_t t = 0; t < n; ++t) {
      T* row = table + index_t(ids[t]) * d;
      const T* src = g + t * rs;
      if (cs == 1)
        for (index_t j = 0; j < d; ++j) row[j] = T(compute_t<T>(row[j]) + compute_t<T>(src[j]));
      else
        for (index_t j = 0; j < d; ++j) row[j] = T(compute_t<T>(row[j]) + compute_t<T>(src[j * cs]));
    }
  }

  template <class T>
  static void one_hot(const nn::token_t* targets, index_t n, index_t V, T* out) {
    std::fill_n(out, n * V, T(0));
    for (index_t t = 0; t < n; ++t)
      if (targets[t] >= 0) out[t * V + index_t(targets[t])] = T(1);
  }

  template <class T>
  static index_t count_correct(const T* logits, index_t n, index_t V, index_t rs, index_t cs,
                               const nn::token_t* targets) {
    index_t correct = 0;
    for (index_t t = 0; t < n; ++t) {
      if (targets[t] < 0) continue;
      const T* row = logits + t * rs;
      index_t best = 0;
      for (index_t v = 1; v < V; ++v)
        if (compute_t<T>(row[v * cs]) > compute_t<T>(row[best * cs])) best = v;
      correct += best == index_t(targets[t]) ? 1 : 0;
    }
    return correct;
  }
};

}  // namespace ssmx::backend
