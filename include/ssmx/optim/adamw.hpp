// ssmx — AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight
// Decay Regularization"), the update rule of torch.optim.AdamW (amsgrad off). At step t
// (t = 1 on a parameter's first update):
//
//     m = beta1 * m + (1 - beta1) * g                        (exp_avg, starts at 0)
//     v = beta2 * v + (1 - beta2) * g^2                      (exp_avg_sq, starts at 0)
//     p = p * (1 - lr * weight_decay)
//         - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// The decay multiplies p before the Adam step, as torch does; it is folded into the same
// single pass over p. Parameters and moments live in memory space S (the host or the
// GPU); three passes per parameter (m, v, p), the same expressions in every space (on a GPU
// the compiler may contract them into FMAs: results agree with the host's to rounding).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../expr/expr.hpp"
#include "../nn/parameter.hpp"
#include "clip.hpp"

namespace ssmx {

template <class T, Space S = Space::Host>
class AdamW {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ssmx::AdamW: T must be float or double");

 public:
  // torch.optim.AdamW's defaults.
  explicit AdamW(double lr = 1e-3, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
                 double weight_decay = 1e-2)
      : beta1_(beta1), beta2_(beta2), eps_(eps), weight_decay_(weight_decay) {
    set_lr(lr);
    SSMX_REQUIRE(beta1 >= 0.0 && beta1 < 1.0, ValueError, "AdamW: beta1 must be in [0, 1), got ", beta1);
    SSMX_REQUIRE(beta2 >= 0.0 && beta2 < 1.0, ValueError, "AdamW: beta2 must be in [0, 1), got ", beta2);
    SSMX_REQUIRE(eps > 0.0 && std::isfinite(eps), ValueError, "AdamW: eps must be finite and > 0, got ", eps);
    SSMX_REQUIRE(weight_decay >= 0.0 && std::isfinite(weight_decay), ValueError,
                 "AdamW: weight_decay must be finite and >= 0, got ", weight_decay);
  }

  double lr() const noexcept { return lr_; }
  void set_lr(double lr) {
    SSMX_REQUIRE(lr >= 0.0 && std::isfinite(lr), ValueError, "AdamW: learning rate must be finite and >= 0, got ",
                 lr);
    lr_ = lr;
  }
  double beta1() const noexcept { return beta1_; }
  double beta2() const noexcept { return beta2_; }
  double eps() const noexcept { return eps_; }
  double weight_decay() const noexcept { return weight_decay_; }

  // Number of successful step() calls (or the count given to load_state()).
  std::int64_t step_count() const noexcept { return step_count_; }

  // One update of every parameter in `params`. Validates everything first (list, shapes,
  // finite gradients, state shapes) and allocates missing state before the first write:
  // on an exception nothing (parameters, m, v, step counts) has changed.
  void step(const ParameterList<T, S>& params) {
    optim_detail::check_gradients(params, "AdamW::step");
    auto index = optim_detail::prepare_slots(
        slots_, params,
        [](const Slot& s, const Parameter<T, S>& p) {
          check_dims(s.exp_avg.dims(), p.value.dims(), (p.name + ".exp_avg").c_str());
          check_dims(s.exp_avg_sq.dims(), p.value.dims(), (p.name + ".exp_avg_sq").c_str());
        },
        [](const Parameter<T, S>& p) {
          return Slot{p.name, zeros<T, S>(p.value.dims(), Tag::OptimizerState),
                      zeros<T, S>(p.value.dims(), Tag::OptimizerState), 0};
        });

    const T b1 = T(beta1_), b2 = T(beta2_), one_minus_b1 = T(1.0 - beta1_), one_minus_b2 = T(1.0 - beta2_);
    const T decay = T(1.0 - lr_ * weight_decay_), eps = T(eps_);
    for (std::size_t k = 0; k < params.size(); ++k) {
      Parameter<T, S>& p = *params[k];
      Slot& s = slots_[index[k]];
      const std::int64_t t = s.steps + 1;
      // Bias corrections in double, as torch computes them (Python floats).
      const double bc1 = 1.0 - std::pow(beta1_, double(t));
      const T step_size = T(lr_ / bc1);
      const T bc2_sqrt = T(std::sqrt(1.0 - std::pow(beta2_, double(t))));

      s.exp_avg = b1 * s.exp_avg + one_minus_b1 * p.grad;
      s.exp_avg_sq = b2 * s.exp_avg_sq + one_minus_b2 * square(p.grad);
      p.value = p.value * decay - step_size * s.exp_avg / (sqrt(s.exp_avg_sq) / bc2_sqrt + eps);
      s.steps = t;
    }
    ++step_count_;
  }

  // The state for a checkpoint: "<name>.exp_avg" and "<name>.exp_avg_sq" per parameter,
  // in the order the parameters were first seen; views into this optimiser, in its memory
  // space S.
  std::vector<NamedTensor<T, S>> state() const {
    std::vector<NamedTensor<T, S>> out;
    out.reserve(2 * slots_.size());
    for (const auto& s : slots_) {
      out.push_back({s.name + ".exp_avg", s.exp_avg.view()});
      out.push_back({s.name + ".exp_avg_sq", s.exp_avg_sq.view()});
    }
    return out;
  }

  // Replaces the state with copies of `entries` (as state() returns them: both moments for
  // every parameter, same shapes, finite, exp_avg_sq >= 0), in S, and sets the step count of
  // every parameter to `step_count`. The entries may live in any space (a checkpoint's host
  // tensors, another optimiser's state()); those from another space must be contiguous.
  // Strong guarantee: on an exception the current state is kept.
  template <Space Sr = Space::Host>
  void load_state(const std::vector<NamedTensor<T, Sr>>& entries, std::int64_t step_count) {
    const char* who = "AdamW::load_state";
    SSMX_REQUIRE(step_count >= 0, ValueError, who, ": step count must be >= 0, got ", step_count);
    std::vector<Slot> slots;
    std::vector<std::pair<bool, bool>> have;  // (exp_avg, exp_avg_sq) seen, per slot
    for (const auto& e : entries) {
      std::string stem;
      bool is_sq = optim_detail::strip_suffix(e.name, ".exp_avg_sq", stem);
      SSMX_REQUIRE(is_sq || optim_detail::strip_suffix(e.name, ".exp_avg", stem), ValueError, who,
                   ": unknown state entry '", e.name, "' (expected '<parameter>.exp_avg' or '<parameter>.exp_avg_sq')");
      std::size_t j = 0;
      while (j < slots.size() && slots[j].name != stem) ++j;
      if (j == slots.size()) {
        slots.push_back(Slot{stem, Tensor<T, S>(), Tensor<T, S>(), step_count});
        have.emplace_back(false, false);
      }
      bool& seen = is_sq ? have[j].second : have[j].first;
      SSMX_REQUIRE(!seen, ValueError, who, ": entry '", e.name, "' appears twice");
      seen = true;
      (is_sq ? slots[j].exp_avg_sq : slots[j].exp_avg) = optim_detail::copy_state_entry<T, S>(e, who, is_sq);
    }
    for (std::size_t j = 0; j < slots.size(); ++j) {
      SSMX_REQUIRE(have[j].first && have[j].second, ValueError, who, ": parameter '", slots[j].name, "' lacks '",
                   slots[j].name, have[j].first ? ".exp_avg_sq" : ".exp_avg", "'");
      SSMX_REQUIRE(slots[j].exp_avg.dims() == slots[j].exp_avg_sq.dims(), ShapeError, who, ": '", slots[j].name,
                   ".exp_avg' has shape ", slots[j].exp_avg.dims().str(), " but '", slots[j].name,
                   ".exp_avg_sq' has shape ", slots[j].exp_avg_sq.dims().str());
    }
    slots_.swap(slots);
    step_count_ = step_count;
  }

 private:
  struct Slot {
    std::string name;  // the parameter's
    Tensor<T, S> exp_avg;
    Tensor<T, S> exp_avg_sq;
    std::int64_t steps = 0;  // updates of this parameter so far (its bias-correction t)
  };

  double lr_ = 0.0;
  double beta1_, beta2_, eps_, weight_decay_;
  std::vector<Slot> slots_;  // in the order the parameters were first seen
  std::int64_t step_count_ = 0;
};

}  // namespace ssmx
