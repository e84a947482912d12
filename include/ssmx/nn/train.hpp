// ssmx — one optimisation step, the minimal training loop used by the examples and the
// benchmarks (the full trainer with data, checkpoints and logs builds on it).
#pragma once

#include "../optim/optim.hpp"
#include "model.hpp"

namespace ssmx::nn {

struct StepOptions {
  double clip_norm = 1.0;  // clip the global gradient norm to this (<= 0: no clipping)
};

struct TrainStepResult : StepResult {
  double grad_norm = 0;  // of the mean-loss gradient, before clipping
};

// The update of a step whose summed-loss gradients over `tokens` target tokens are in
// each parameter's grad: scale them to the mean loss, clip the global norm, step the
// optimiser. Returns the norm before clipping. Clipping and the optimiser throw on a
// non-finite gradient before anything changes.
// Gradients of the summed loss over `tokens` target tokens become those of the mean loss.
template <class T, Space S>
void scale_to_mean_loss(const ParameterList<T, S>& params, index_t tokens) {
  const T scale = T(1.0 / double(tokens));
  for (auto* p : params) assign(p->grad.view(), leaf(p->grad) * scale);
}

template <class T, Space S, class Optimizer>
double mean_loss_update(const ParameterList<T, S>& params, Optimizer& opt, index_t tokens, const StepOptions& so) {
  scale_to_mean_loss(params, tokens);
  const double norm =
      so.clip_norm > 0 ? double(clip_grad_norm(params, T(so.clip_norm))) : double(global_grad_norm(params));
  opt.step(params);
  return norm;
}

// zero_grad, forward+backward with `strategy`, gradients of the mean loss over the batch's
// target tokens, clipping, one optimiser update. `states` carries recurrent state in and
// out as in Model::forward_backward (e.g. rows that continue a document from the previous
// batch). If any part throws (bad input, a non-finite loss or gradient) the parameters
// and the optimiser state are left as they were.
template <class Model, class Optimizer, class Strategy = Adjoint>
TrainStepResult train_step(Model& model, Optimizer& opt, const Batch& batch, const Strategy& strategy = {},
                           const StepOptions& so = {}, LayerStates<typename Model::T, Model::space>* states = nullptr) {
  model.zero_grad();
  TrainStepResult r;
  static_cast<StepResult&>(r) = model.forward_backward(batch, strategy, states);
  SSMX_REQUIRE(r.tokens > 0, ValueError, "train_step: the batch has no target tokens (all targets are -1)");
  r.grad_norm = mean_loss_update(model.parameters(), opt, r.tokens, so);
  return r;
}

}  // namespace ssmx::nn
