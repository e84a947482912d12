// ssmx — token embedding (a gather forward, a deterministic scatter-add backward) and the
// accuracy count of a head's logits, in any memory space.
//
// Token ids and targets always live on the host (token batches do); tensors live in S.
// The per-space loops are backend::Rows<S>: Host in backend/cpu/rows.hpp (included here),
// Cuda in backend/cuda/rows.cuh (included by <ssmx/cuda.cuh>).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/memory.hpp"
#include "../core/tensor.hpp"
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

// The positions of a token batch grouped by token (CSR): token[k] is the k-th distinct id
// in increasing order, its positions are position[offset[k] .. offset[k+1]) in increasing
// order. A parallel scatter-add that walks each group in order sums in token order, as the
// host loop does, without atomics. Built by a counting sort: O(n + vocab) time and memory.
struct TokenGroups {
  std::vector<index_t> token;     // [groups]
  std::vector<index_t> offset;    // [groups + 1]
  std::vector<index_t> position;  // [n]
  index_t groups() const { return index_t(token.size()); }
};

// Ids must be in [0, vocab) (check_tokens).
inline TokenGroups group_by_token(const token_t* ids, index_t n, index_t vocab) {
  std::vector<index_t> slot(std::size_t(vocab) + 1, 0);  // counts, then each id's next slot
  for (index_t t = 0; t < n; ++t) ++slot[std::size_t(ids[t]) + 1];
  TokenGroups g;
  for (index_t v = 0; v < vocab; ++v) {
    if (slot[std::size_t(v) + 1] != 0) g.token.push_back(v);
    slot[std::size_t(v) + 1] += slot[std::size_t(v)];
  }
  g.offset.reserve(g.token.size() + 1);
  for (index_t v : g.token) g.offset.push_back(slot[std::size_t(v)]);
  g.offset.push_back(n);
  g.position.resize(std::size_t(n));
  for (index_t t = 0; t < n; ++t) g.position[std::size_t(slot[std::size_t(ids[t])]++)] = t;  // t ascending: stable
  return g;
}

}  // namespace ssmx::nn

namespace ssmx::backend {

// Row gathers, scatter-adds and arg-max counts per memory space. A specialisation provides
// the following (ids and targets: host pointers, already checked; table: a contiguous
// [vocab, d] tensor in S; out, g, logits: rows in S at row stride rs and column stride cs,
// cs == 1 on Cuda; n, d, V > 0):
//   template <class T> static void gather(const nn::token_t* ids, index_t n, const T* table,
//                                         index_t d, T* out, index_t rs, index_t cs);
//       out[t] = table[ids[t]]
//   template <class T> static void scatter_add(const nn::token_t* ids, index_t n, index_t vocab,
//                                              const T* g, index_t rs, index_t cs, T* table, index_t d);
//       table[ids[t]] += g[t], each row summed in token order (bit-identical run to run)
//   template <class T> static void one_hot(const nn::token_t* targets, index_t n, index_t V, T* out);
//       out ([n, V], contiguous) = 1 at (t, targets[t]) for targets[t] >= 0, else 0
//   template <class T> static index_t count_correct(const T* logits, index_t n, index_t V, index_t rs,
//                                                   index_t cs, const nn::token_t* targets);
//       rows t with targets[t] >= 0 whose first arg-max equals targets[t]
template <Space S>
struct Rows {
  static_assert(S != Space::Cuda,
                "ssmx: Embedding and count_correct on Space::Cuda need the CUDA backend: include <ssmx/cuda.cuh> and "
                "compile with nvcc");
  static_assert(S == Space::Host || S == Space::Cuda, "ssmx::backend::Rows: unknown memory space");
};

}  // namespace ssmx::backend

#include "../backend/cpu/rows.hpp"

namespace ssmx::nn {

namespace detail {
// Checks a [n, d] row view and names it. The GPU kernels need unit column stride.
template <class T, Space S>
void check_rows(const TensorView<T, S>& v, index_t n, index_t d, const char* what) {
  check_dims(v.dims(), Dims{n, d}, what);
  SSMX_REQUIRE(S == Space::Host || d <= 1 || v.stride(1) == 1, ShapeError, "tensor '", what, "' of shape ",
               v.dims().str(), " on ", space_name(S), " needs unit column stride, got ", v.stride(1));
}
}  // namespace detail

// A [vocab, d_model] table of token vectors. weight.grad starts at zero.
template <class T, Space S = Space::Host>
struct Embedding {
  Parameter<T, S> weight;  // [vocab, d_model]

  Embedding(std::string name, index_t vocab, index_t d_model) : weight(std::move(name), Dims{vocab, d_model}) {
    ssmx::detail::zero_bytes(weight.grad.data(), S, weight.grad.bytes());
  }
  index_t vocab() const { return weight.value.extent(0); }
  index_t d_model() const { return weight.value.extent(1); }

  // out[t] = weight[ids[t]]; ids: n host token ids; out is [n, d_model] in S (any row stride).
  void forward(const token_t* ids, index_t n, TensorView<T, S> out) const {
    check_tokens(ids, n, vocab(), "tokens");
    const index_t d = d_model();
    detail::check_rows(out, n, d, "embedding output");
    // Overlapping rows would be written concurrently on the GPU.
    SSMX_REQUIRE(S == Space::Host || n <= 1 || out.stride(0) >= d, ShapeError, "tensor 'embedding output' of shape ",
                 out.dims().str(), " has row stride ", out.stride(0), " < ", d, ": its rows overlap");
    if (n == 0 || d == 0) return;
    backend::Rows<S>::gather(ids, n, weight.value.data(), d, out.data(), out.stride(0), out.stride(1));
  }
  // weight.grad[ids[t]] += g[t], each row summed in token order: deterministic, and on the
  // GPU bit-identical to the host. g is [n, d_model] in S (any row stride).
  void backward(const token_t* ids, index_t n, TensorView<const T, S> g) {
    check_tokens(ids, n, vocab(), "tokens");
    const index_t d = d_model();
    detail::check_rows(g, n, d, "embedding gradient");
    if (n == 0 || d == 0) return;
    backend::Rows<S>::scatter_add(ids, n, vocab(), g.data(), g.stride(0), g.stride(1), weight.grad.data(), d);
  }
};

// The [n, V] one-hot rows of targets (n host entries in [0, V), or -1: a row of zeros), built
// where they are used: on the GPU from the n uploaded targets, not from n x V host values.
template <class T, Space S>
Tensor<T, S> one_hot(const token_t* targets, index_t n, index_t V, Tag tag = Tag::Workspace) {
  check_tokens(targets, n, V, "targets", /*allow_ignore=*/true);
  Tensor<T, S> out(Dims{n, V}, tag);
  if (n > 0 && V > 0) backend::Rows<S>::one_hot(targets, n, V, out.data());
  return out;
}

// The number of rows t of logits [n, V] with targets[t] >= 0 whose arg-max equals targets[t]
// (targets: n host entries in [0, V), or -1 to ignore the row). The arg-max is the FIRST
// index of the largest logit, as the host loop `if (l(t, v) > l(t, best)) best = v;` finds
// it, NaNs included: a NaN at column 0 makes 0 the arg-max, a NaN elsewhere never wins.
template <class T, Space S>
index_t count_correct(TensorView<const T, S> logits, const token_t* targets) {
  SSMX_REQUIRE(logits.rank() == 2, ShapeError, "count_correct: logits must be [n, V], got ", logits.dims().str());
  const index_t n = logits.extent(0), V = logits.extent(1);
  check_tokens(targets, n, V, "targets", /*allow_ignore=*/true);
  detail::check_rows(logits, n, V, "logits");
  if (n == 0 || V == 0) return 0;  // V == 0: every target is -1
  return backend::Rows<S>::count_correct(logits.data(), n, V, logits.stride(0), logits.stride(1), targets);
}
template <class T, Space S, class = std::enable_if_t<!std::is_const_v<T>>>
index_t count_correct(TensorView<T, S> logits, const token_t* targets) {
  return count_correct<T, S>(TensorView<const T, S>(logits), targets);
}
template <class T, Space S>
index_t count_correct(const Tensor<T, S>& logits, const token_t* targets) {
  return count_correct<T, S>(logits.view(), targets);
}

}  // namespace ssmx::nn
