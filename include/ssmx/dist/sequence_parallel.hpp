// ssmx — sequence sharding (context parallelism): rank r of R holds tokens
// [r·T/R, (r+1)·T/R) of every sequence in every layer, so the stored layer inputs and
// boundary states per rank fall to about 1/R and the context grows with the ranks.
//
// Every rank holds the whole model (replicated parameters and optimiser state) and is
// given the same full batch (tokens are cheap; activations are what is split). Per layer:
//   forward   the last halo input rows go to the next rank (the convolution window); each
//             rank runs its tokens once from the state it knows (zero, or the initial one
//             on rank 0) to get its affine map h -> (Π a) h + h_end; an exclusive scan
//             over the ranks with the (non-commutative) composition of these maps gives
//             each rank the exact state before its first token; then the usual chunked
//             forward from that state
//   backward  the same for the adjoint, from the last rank down (a reverse exclusive
//             scan of (Π a, carry)); then the usual chunked backward; the halo rows'
//             gradients go back to the previous rank
// and at the end the parameter gradients are all-reduced. The gradients are those of one
// process to rounding (the sums run in another order).
//
// Cost: each layer's forward over the rank's tokens runs twice (once for the carry
// summary) and the backward's recompute and readout VJP twice (once for the adjoint carry
// summary): about 1.5–2× the single-process work per token, split over R ranks, plus
// 2 scans of S values and 2 halo exchanges of (W-1)·P values per layer.
#pragma once

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

#include "../nn/model.hpp"
#include "../nn/train.hpp"
#include "communicator.hpp"
#include "data_parallel.hpp"

namespace ssmx::dist {

// Rank `rank`'s tokens [t0, t1) of a sequence of seq_len tokens: contiguous, lengths
// differing by at most one, the longer ones first.
inline std::pair<index_t, index_t> sequence_block(index_t seq_len, int rank, int size) {
  SSMX_REQUIRE(size > 0 && rank >= 0 && rank < size, ValueError, "sequence_block: rank ", rank, " of ", size);
  return detail::even_part(seq_len, rank, size);
}

// The nn::SequenceLink of a sequence-sharded rank: token range, halo exchanges and carry
// scans over `comm`.
template <class T>
class SequenceShardLink final : public nn::SequenceLink<T> {
 public:
  explicit SequenceShardLink(Communicator& comm) : comm_(comm) {}
  bool splits_tokens() const override { return true; }
  std::pair<index_t, index_t> tokens(index_t seq_len) const override {
    return sequence_block(seq_len, comm_.rank(), comm_.size());
  }
  bool first() const override { return comm_.rank() == 0; }
  bool last() const override { return comm_.rank() == comm_.size() - 1; }
  void exchange_halo(index_t k, TensorView<const T> tail, TensorView<T> rows) override {
    (void)k;
    comm_.sendrecv(tail, last() ? Communicator::no_rank : comm_.rank() + 1, rows,
                   first() ? Communicator::no_rank : comm_.rank() - 1, tag_halo);
  }
  void forward_carry(index_t k, TensorView<T> ab) override {
    (void)k;
    comm_.exscan_affine(ab);
  }
  void backward_carry(index_t k, TensorView<T> ab) override {
    (void)k;
    comm_.reverse_exscan_affine(ab);
  }
  void exchange_halo_grad(index_t k, TensorView<const T> grad, TensorView<T> rows) override {
    (void)k;
    Tensor<T> from_next = zeros<T>(rows.dims(), Tag::Workspace);
    comm_.sendrecv(grad, first() ? Communicator::no_rank : comm_.rank() - 1, from_next.view(),
                   last() ? Communicator::no_rank : comm_.rank() + 1, tag_halo_grad);
    if (!last()) accumulate(rows, from_next);
  }

 private:
  static constexpr int tag_halo = 101, tag_halo_grad = 102;
  Communicator& comm_;
};

namespace detail {

template <class Model>
void check_sequence_sharding(const Model& model, const Communicator& comm, const nn::Batch& batch, const char* who) {
  constexpr index_t halo = nn::layer_halo<typename Model::layer_type>::value;
  SSMX_REQUIRE(model.holds_all(), ValueError, who, ": sequence sharding needs the whole model on every rank; this one holds layers [",
               model.layer_begin(), ", ", model.layer_end(), ")");
  const index_t shortest = batch.seq_len / comm.size(), need = std::max<index_t>(1, halo);
  SSMX_REQUIRE(shortest >= need, ValueError, who, ": ", batch.seq_len, " tokens over ", comm.size(),
               " ranks leave ", shortest, " on the shortest, fewer than ", need,
               " (a rank needs at least one token and the layer's convolution halo of ", halo,
               "): use fewer ranks or longer sequences");
}

// LayerStates after a sequence-sharded pass: the final states live on the last rank, the
// initial-state gradients on the first; every rank gets them.
template <class T>
void share_states(Communicator& comm, nn::LayerStates<T>& states) {
  for (auto* v : {&states.final_states, &states.final_halo})
    for (auto& t : *v)
      if (!t.empty()) comm.broadcast(t.view(), comm.size() - 1);
  for (auto* v : {&states.initial_grad, &states.initial_halo_grad})
    for (auto& t : *v)
      if (!t.empty()) comm.broadcast(t.view(), 0);
}

}  // namespace detail

// Forward and backward of the whole batch, sequence-sharded over `comm`: every rank passes
// the same batch and gets the summed loss totals and, in its (replicated) parameters, the
// gradients of the summed loss over all tokens. `states` as in Model::forward_backward:
// its inputs are read on the ranks holding the sequence's ends, its outputs are the same
// on every rank. `replicas`: the ranks holding the same tokens in other data-parallel
// groups (a split of the world), over which totals and gradients are summed as well.
template <class Model>
nn::StepResult sequence_parallel_forward_backward(Model& model, Communicator& comm, const nn::Batch& batch,
                                                  const Adjoint& strategy = {},
                                                  nn::LayerStates<typename Model::T>* states = nullptr,
                                                  Communicator* replicas = nullptr) {
  using T = typename Model::T;
  constexpr const char* who = "sequence_parallel_forward_backward";
  detail::check_sequence_sharding(model, comm, batch, who);
  SequenceShardLink<T> link(comm);
  const nn::StepResult r =
      detail::run_agreed(model, comm, replicas, who, [&] { return model.forward_backward(batch, strategy, states, &link); });
  const auto params = model.parameters();
  allreduce_gradients(comm, params);
  if (replicas) allreduce_gradients(*replicas, params);
  if (states) detail::share_states(comm, *states);
  return r;
}

// One optimisation step on a sequence-sharded batch: the gradients above, then the
// mean-loss scaling, clipping and optimiser step, identical on every rank. If anything
// fails on any rank, every rank throws and nothing changes.
template <class Model, class Optimizer>
nn::TrainStepResult sequence_parallel_train_step(Model& model, Optimizer& opt, Communicator& comm,
                                                 const nn::Batch& batch, const Adjoint& strategy = {},
                                                 const nn::StepOptions& so = {},
                                                 nn::LayerStates<typename Model::T>* states = nullptr,
                                                 Communicator* replicas = nullptr) {
  model.zero_grad();
  nn::TrainStepResult r;
  static_cast<nn::StepResult&>(r) = sequence_parallel_forward_backward(model, comm, batch, strategy, states, replicas);
  detail::check_step_totals(r, "sequence_parallel_train_step");
  r.grad_norm = nn::mean_loss_update(model.parameters(), opt, r.tokens, so);
  return r;
}

// Loss and accuracy of the batch, sequence-sharded (no gradients; stored per rank: two
// layers' inputs over its tokens). The totals are the same on every rank.
template <class Model>
nn::StepResult sequence_parallel_evaluate(Model& model, Communicator& comm, const nn::Batch& batch,
                                          nn::LayerStates<typename Model::T>* states = nullptr) {
  using T = typename Model::T;
  constexpr const char* who = "sequence_parallel_evaluate";
  detail::check_sequence_sharding(model, comm, batch, who);
  SequenceShardLink<T> link(comm);
  const nn::StepResult r = detail::run_agreed(model, comm, nullptr, who, [&] { return model.forward(batch, link, states); });
  if (states)
    for (auto* v : {&states->final_states, &states->final_halo})
      for (auto& t : *v)
        if (!t.empty()) comm.broadcast(t.view(), comm.size() - 1);
  return r;
}

}  // namespace ssmx::dist
