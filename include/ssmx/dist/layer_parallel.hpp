// ssmx — layer sharding (the paper's scheme, made exact): rank r of R holds a contiguous
// block of layers (layer_block) with their parameters and optimiser state; rank 0 also the
// embedding, the last rank the final norm and the head (and, tied, a copy of the
// embedding). Per sequence:
//   forward   rank 0 embeds and runs its layers, storing their inputs and boundary
//             states; the residual stream y goes up, rank to rank; the last rank scores
//   backward  the last rank's loss gives dL/dy_K; each rank runs the exact adjoint
//             backward of its layers and sends dL/dy_{b-1} down
// Memory per rank: its layers' inputs and parameters, about 1/R of the model's. The ranks
// work one after another on a sequence (no pipelining across sequences), so a step takes
// about as long as on one process plus the transfers of T·P values per rank boundary.
//
// The paper's multi-layer formula (PaperAdjoint) is not exact and is not offered here;
// Adjoint, Checkpointed, Backprop and TruncatedAdjoint run per layer as on one process.
#pragma once

#include <algorithm>
#include <cmath>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "../nn/model.hpp"
#include "../nn/train.hpp"
#include "../optim/optim.hpp"
#include "communicator.hpp"
#include "data_parallel.hpp"

namespace ssmx::dist {

// Rank `rank`'s layers [k0, k1) of K: contiguous, sizes differing by at most one, the
// larger blocks first. Every rank needs a layer: K >= size.
inline std::pair<index_t, index_t> layer_block(index_t K, int rank, int size) {
  SSMX_REQUIRE(size > 0 && rank >= 0 && rank < size, ValueError, "layer_block: rank ", rank, " of ", size);
  SSMX_REQUIRE(K >= size, ValueError, "layer sharding: ", K, " layers cannot be split over ", size,
               " ranks (each rank needs at least one layer): use at most ", K, " ranks");
  return detail::even_part(K, rank, size);
}

// The nn::SequenceLink of a layer-sharded rank: the residual stream goes up, its gradient
// down, over `comm`.
template <class T>
class LayerShardLink final : public nn::SequenceLink<T> {
 public:
  explicit LayerShardLink(Communicator& comm) : comm_(comm) {}
  void receive_input(TensorView<T> y) override { comm_.recv(y, comm_.rank() - 1, tag_stream); }
  void send_output(TensorView<const T> y) override { comm_.send(y, comm_.rank() + 1, tag_stream); }
  void receive_grad(TensorView<T> g) override { comm_.recv(g, comm_.rank() + 1, tag_grad); }
  void send_grad(TensorView<const T> g) override { comm_.send(g, comm_.rank() - 1, tag_grad); }

 private:
  static constexpr int tag_stream = 201, tag_grad = 202;
  Communicator& comm_;
};

namespace detail {

// Every rank's model must hold exactly its layer_block; checked collectively, so that a
// mismatch is the same clear error on every rank instead of a hang.
template <class Model>
void check_layer_sharding(const Model& model, Communicator& comm, const char* who) {
  constexpr index_t K = Model::num_layers;
  std::exception_ptr failure;
  try {
    const auto [k0, k1] = layer_block(K, comm.rank(), comm.size());
    SSMX_REQUIRE(model.layer_begin() == k0 && model.layer_end() == k1, ValueError, who, ": rank ", comm.rank(),
                 " holds layers [", model.layer_begin(), ", ", model.layer_end(), ") instead of its block [", k0, ", ",
                 k1, ") (construct it with Config::layer_begin/layer_end from dist::layer_block)");
  } catch (...) {
    failure = std::current_exception();
  }
  agree_on_totals(comm, nn::StepResult{}, failure, who, [] {}, "the layer split is wrong");
}

// With tied embeddings and R > 1 the embedding is on rank 0 (input) and the last rank
// (head): their two gradient parts are summed so that both copies take the same step.
template <class Model>
void sum_tied_embedding(Model& model, Communicator& comm) {
  const int R = comm.size(), r = comm.rank();
  if (!model.tied_embeddings() || R == 1 || (r != 0 && r != R - 1)) return;
  auto& g = model.embedding().weight.grad;
  Tensor<typename Model::T> other(g.dims(), Tag::Workspace);
  const int peer = r == 0 ? R - 1 : 0;
  comm.sendrecv(TensorView<const typename Model::T>(g.view()), peer, other.view(), peer, 203);
  // The same order on both ranks (rank 0's part first), so both copies get the same bits.
  if (r == 0)
    accumulate(g.view(), other);
  else
    g = eval(leaf(other) + leaf(g), Tag::Gradients);
}

// Parameters whose gradient counts once in the global norm: the last rank's copy of a tied
// embedding is left out when rank 0 holds it too.
template <class Model>
ParameterList<typename Model::T> norm_parameters(Model& model, const Communicator& comm) {
  auto params = model.parameters();
  if (model.tied_embeddings() && comm.size() > 1 && comm.rank() == comm.size() - 1 && model.layer_begin() > 0)
    params.erase(std::find(params.begin(), params.end(), &model.embedding().weight));
  return params;
}

}  // namespace detail

// Forward and backward of the whole batch, layer-sharded over `comm`: every rank passes
// the same batch (and its model holds layer_block(K, rank, size)); every rank gets the
// summed loss totals, and the gradients of its own parameters. `states` as in
// Model::forward_backward, for the layers this rank holds. `replicas`: the ranks holding
// the same layers in other data-parallel groups, over which totals and gradients are
// summed as well.
template <class Model, class Strategy = Adjoint>
nn::StepResult layer_parallel_forward_backward(Model& model, Communicator& comm, const nn::Batch& batch,
                                               const Strategy& strategy = {},
                                               nn::LayerStates<typename Model::T>* states = nullptr,
                                               Communicator* replicas = nullptr) {
  static_assert(!std::is_same_v<Strategy, PaperAdjoint>,
                "layer sharding: PaperAdjoint is the paper's inexact multi-layer formula; use Adjoint");
  using T = typename Model::T;
  constexpr const char* who = "layer_parallel_forward_backward";
  detail::check_layer_sharding(model, comm, who);
  LayerShardLink<T> link(comm);
  const nn::StepResult r =
      detail::run_agreed(model, comm, replicas, who, [&] { return model.forward_backward(batch, strategy, states, &link); });
  detail::sum_tied_embedding(model, comm);
  if (replicas) allreduce_gradients(*replicas, model.parameters());
  return r;
}

// One optimisation step, layer-sharded: the gradients above, scaled to the mean loss,
// clipped by the global norm (summed over the ranks), then every rank steps its own
// parameters. If anything fails on any rank, every rank throws and nothing changes.
template <class Model, class Optimizer, class Strategy = Adjoint>
nn::TrainStepResult layer_parallel_train_step(Model& model, Optimizer& opt, Communicator& comm, const nn::Batch& batch,
                                              const Strategy& strategy = {}, const nn::StepOptions& so = {},
                                              nn::LayerStates<typename Model::T>* states = nullptr,
                                              Communicator* replicas = nullptr) {
  constexpr const char* who = "layer_parallel_train_step";
  model.zero_grad();
  nn::TrainStepResult r;
  static_cast<nn::StepResult&>(r) = layer_parallel_forward_backward(model, comm, batch, strategy, states, replicas);
  detail::check_step_totals(r, who);
  const auto params = model.parameters();
  nn::scale_to_mean_loss(params, r.tokens);
  double ss = optim_detail::sum_of_squares(detail::norm_parameters(model, comm));
  comm.allreduce_sum(&ss, 1);
  const double norm = std::sqrt(ss);
  r.grad_norm = norm;
  // The norm is the same on every rank, so this throws on every rank alike.
  SSMX_REQUIRE(std::isfinite(norm), ValueError, who, ": the global gradient norm is not finite (", norm,
               "): the parameters were left unchanged");
  if (so.clip_norm > 0) clip_to_norm(params, norm, so.clip_norm);
  opt.step(params);
  return r;
}

// Loss and accuracy of the batch, layer-sharded (no gradients). The totals are the same on
// every rank.
template <class Model>
nn::StepResult layer_parallel_evaluate(Model& model, Communicator& comm, const nn::Batch& batch,
                                       nn::LayerStates<typename Model::T>* states = nullptr) {
  using T = typename Model::T;
  constexpr const char* who = "layer_parallel_evaluate";
  detail::check_layer_sharding(model, comm, who);
  LayerShardLink<T> link(comm);
  return detail::run_agreed(model, comm, nullptr, who, [&] { return model.forward(batch, link, states); });
}

}  // namespace ssmx::dist
