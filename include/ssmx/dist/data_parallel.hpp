// ssmx — data parallelism: every rank trains on its own rows of the batch; gradients,
// losses and token counts are summed over ranks, then every rank takes the same step.
//
// A step gives the result of nn::train_step on the concatenated batch, up to the order of
// the gradient summation. Call check_same("parameters", parameter_layout_hash(params))
// once at setup so that ranks with different models fail loudly instead of summing
// unrelated buffers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "../nn/model.hpp"
#include "../nn/parameter.hpp"
#include "../nn/train.hpp"
#include "../optim/optim.hpp"
#include "communicator.hpp"

namespace ssmx::dist {

inline constexpr std::size_t default_bucket_bytes = std::size_t(32) << 20;

// FNV-1a over the parameters' names and shapes, in list order.
template <class T>
std::uint64_t parameter_layout_hash(const ParameterList<T>& params) {
  std::uint64_t h = 14695981039346656037ull;
  auto mix = [&](const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  };
  for (auto* p : params) {
    mix(p->name.data(), p->name.size() + 1);
    for (int i = 0; i < p->value.dims().rank; ++i) {
      const index_t e = p->value.extent(i);
      mix(&e, sizeof e);
    }
  }
  return h;
}

// Sums every gradient over the ranks, in place. Gradients are packed in parameter order
// into buckets of at most bucket_bytes (a large gradient spans several), one all-reduce
// per bucket: few, large messages without a second copy of all gradients.
template <class T>
void allreduce_gradients(Communicator& comm, const ParameterList<T>& params,
                         std::size_t bucket_bytes = default_bucket_bytes) {
  std::size_t total = 0;
  for (auto* p : params) {
    SSMX_REQUIRE(p != nullptr, ValueError, "allreduce_gradients: a parameter of the list is null");
    SSMX_REQUIRE(p->grad.numel() == p->value.numel(), ShapeError, "allreduce_gradients: gradient of '", p->name,
                 "' has shape ", p->grad.dims().str(), ", expected ", p->value.dims().str());
    total += std::size_t(p->grad.numel());
  }
  const std::size_t cap = std::max<std::size_t>(1, bucket_bytes / sizeof(T));
  std::vector<T> bucket;
  bucket.reserve(std::min(cap, total));
  struct Piece {
    T* dst;
    std::size_t n;
  };
  std::vector<Piece> pieces;
  auto flush = [&] {
    if (bucket.empty()) return;
    comm.allreduce_sum(bucket.data(), bucket.size());
    const T* src = bucket.data();
    for (const Piece& pc : pieces) {
      std::copy_n(src, pc.n, pc.dst);
      src += pc.n;
    }
    bucket.clear();
    pieces.clear();
  };
  for (auto* p : params) {
    T* g = p->grad.data();
    const std::size_t n = std::size_t(p->grad.numel());
    for (std::size_t i = 0; i < n;) {
      const std::size_t take = std::min(n - i, cap - bucket.size());
      bucket.insert(bucket.end(), g + i, g + i + take);
      pieces.push_back(Piece{g + i, take});
      i += take;
      if (bucket.size() == cap) flush();
    }
  }
  flush();
}

namespace detail {

// Part `rank` of `size` contiguous parts of [0, n): lengths differ by at most one, the
// longer parts first.
inline std::pair<index_t, index_t> even_part(index_t n, int rank, int size) {
  const index_t base = n / size, extra = n % size, r = rank;
  const index_t begin = r * base + std::min(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

// Sums a step's local totals over `comm` with every rank's failure flag. If any rank
// failed, every rank zeroes its gradients (`zero_grad`) and throws: the failing rank its
// own error, the others DistError naming it ("<who>: <what> on rank(s) ...").
template <class ZeroGrad>
nn::StepResult agree_on_totals(Communicator& comm, const nn::StepResult& local, const std::exception_ptr& failure,
                               const char* who, ZeroGrad&& zero_grad, const char* what = "forward_backward failed") {
  // [loss, tokens, correct, failed flag of each rank], in double: counts stay exact below 2^53.
  std::vector<double> totals(3 + std::size_t(comm.size()), 0.0);
  totals[0] = local.loss;
  totals[1] = double(local.tokens);
  totals[2] = double(local.correct);
  if (failure) totals[3 + std::size_t(comm.rank())] = 1.0;
  comm.allreduce_sum(totals.data(), totals.size());
  std::string failed;
  for (int q = 0; q < comm.size(); ++q)
    if (totals[3 + std::size_t(q)] != 0.0) failed += ::ssmx::detail::str(failed.empty() ? "" : ", ", q);
  if (!failed.empty()) {
    zero_grad();
    if (failure) std::rethrow_exception(failure);
    throw DistError(::ssmx::detail::str(who, ": ", what, " on rank(s) ", failed,
                                        "; the parameters were left unchanged on every rank"));
  }
  nn::StepResult r;
  r.loss = totals[0];
  r.tokens = index_t(totals[1]);
  r.correct = index_t(totals[2]);
  return r;
}

// The checks of a summed step result, identical on every rank (the sums are).
inline void check_step_totals(const nn::StepResult& r, const char* who) {
  SSMX_REQUIRE(r.tokens > 0, ValueError, who, ": the batch has no target tokens on any rank (all targets are -1)");
  SSMX_REQUIRE(std::isfinite(r.loss), ValueError, who, ": the summed loss is not finite (", r.loss,
               "): the parameters were left unchanged");
}

// Runs `body` (this rank's part of a forward/backward), catching its failure, then agrees
// on the totals over `comm` and, when given, over `replicas` (data-parallel copies).
template <class Model, class Body>
nn::StepResult run_agreed(Model& model, Communicator& comm, Communicator* replicas, const char* who, Body&& body) {
  nn::StepResult local;
  std::exception_ptr failure;
  try {
    local = body();
  } catch (...) {
    failure = std::current_exception();
  }
  auto zero = [&] { model.zero_grad(); };
  nn::StepResult r = agree_on_totals(comm, local, failure, who, zero);
  if (replicas) r = agree_on_totals(*replicas, r, nullptr, who, zero);
  return r;
}

}  // namespace detail

// One data-parallel optimisation step. Every rank passes its own rows (local_batch; a
// rank may have none: batch = 0) and runs forward_backward on them; the gradient sums,
// losses, token and correct counts are all-reduced; then the mean-loss scaling, clipping
// and the optimiser step run identically on every rank. Returns the global totals.
//
// As nn::train_step: if any rank fails (bad input, non-finite loss, non-finite summed
// gradient, no target tokens in the whole batch) every rank throws and no parameter or
// optimiser state changes anywhere. The failing rank rethrows its own error; the others
// throw DistError naming it. (The MPI reductions give every rank the same sums, so the
// finiteness checks after the all-reduce agree.)
template <class Model, class Optimizer, class Strategy = Adjoint>
nn::TrainStepResult data_parallel_train_step(Model& model, Optimizer& opt, Communicator& comm,
                                             const nn::Batch& local_batch, const Strategy& strategy = {},
                                             const nn::StepOptions& so = {},
                                             nn::LayerStates<typename Model::T>* states = nullptr,
                                             std::size_t bucket_bytes = default_bucket_bytes) {
  constexpr const char* who = "data_parallel_train_step";
  model.zero_grad();
  nn::TrainStepResult r;
  static_cast<nn::StepResult&>(r) = detail::run_agreed(model, comm, nullptr, who, [&] {
    return local_batch.batch > 0 ? model.forward_backward(local_batch, strategy, states) : nn::StepResult{};
  });
  detail::check_step_totals(r, who);
  const auto params = model.parameters();
  allreduce_gradients(comm, params, bucket_bytes);
  // The sums are the same on every rank, so a non-finite gradient throws on every rank alike.
  r.grad_norm = nn::mean_loss_update(params, opt, r.tokens, so);
  return r;
}

}  // namespace ssmx::dist
