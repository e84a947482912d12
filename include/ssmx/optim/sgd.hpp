// ssmx — stochastic gradient descent with optional momentum, Nesterov momentum and
// coupled (L2) weight decay; the update rule of torch.optim.SGD with dampening 0:
//
//     g = grad + weight_decay * p
//     buf = momentum * buf + g                  (buf starts at 0, so the first buf is g)
//     d = nesterov ? g + momentum * buf : buf   (d = g when momentum == 0)
//     p = p - lr * d
//
// Parameters and momentum buffers live in memory space S (the host or the GPU); each
// tensor is updated by one expression assignment (one pass over it, one kernel on a GPU),
// the same expressions in every space.
#pragma once

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../expr/expr.hpp"
#include "../nn/parameter.hpp"
#include "clip.hpp"

namespace ssmx {

template <class T, Space S = Space::Host>
class SGD {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ssmx::SGD: T must be float or double");

 public:
  explicit SGD(double lr, double momentum = 0.0, double weight_decay = 0.0, bool nesterov = false)
      : momentum_(momentum), weight_decay_(weight_decay), nesterov_(nesterov) {
    set_lr(lr);
    SSMX_REQUIRE(momentum >= 0.0 && momentum < 1.0, ValueError, "SGD: momentum must be in [0, 1), got ", momentum);
    SSMX_REQUIRE(weight_decay >= 0.0 && std::isfinite(weight_decay), ValueError,
                 "SGD: weight_decay must be finite and >= 0, got ", weight_decay);
    SSMX_REQUIRE(!nesterov || momentum > 0.0, ValueError, "SGD: nesterov momentum needs momentum > 0");
  }

  double lr() const noexcept { return lr_; }
  void set_lr(double lr) {
    SSMX_REQUIRE(lr >= 0.0 && std::isfinite(lr), ValueError, "SGD: learning rate must be finite and >= 0, got ", lr);
    lr_ = lr;
  }
  double momentum() const noexcept { return momentum_; }
  double weight_decay() const noexcept { return weight_decay_; }
  bool nesterov() const noexcept { return nesterov_; }

  // One update of every parameter in `params`. Validates everything first (list, shapes,
  // finite gradients, momentum buffers) and allocates missing buffers before the first
  // write: on an exception nothing (parameters, buffers) has changed.
  void step(const ParameterList<T, S>& params) {
    optim_detail::check_gradients(params, "SGD::step");
    const T lr = T(lr_), mu = T(momentum_), wd = T(weight_decay_);

    if (momentum_ == 0.0) {
      for (auto* p : params) {
        if (weight_decay_ != 0.0)
          p->value = p->value - lr * (p->grad + wd * p->value);
        else
          p->value = p->value - lr * p->grad;
      }
      return;
    }

    // Buffers: check the existing ones and allocate the missing ones before any write.
    auto index = optim_detail::prepare_slots(
        slots_, params,
        [](const Slot& s, const Parameter<T, S>& p) {
          check_dims(s.buffer.dims(), p.value.dims(), (p.name + ".momentum_buffer").c_str());
        },
        [](const Parameter<T, S>& p) {
          return Slot{p.name, zeros<T, S>(p.value.dims(), Tag::OptimizerState)};
        });

    for (std::size_t k = 0; k < params.size(); ++k) {
      Parameter<T, S>& p = *params[k];
      Tensor<T, S>& buf = slots_[index[k]].buffer;
      if (weight_decay_ != 0.0) {
        buf = mu * buf + (p.grad + wd * p.value);
        if (nesterov_)
          p.value = p.value - lr * ((p.grad + wd * p.value) + mu * buf);
        else
          p.value = p.value - lr * buf;
      } else {
        buf = mu * buf + p.grad;
        if (nesterov_)
          p.value = p.value - lr * (p.grad + mu * buf);
        else
          p.value = p.value - lr * buf;
      }
    }
  }

  // Momentum buffers as "<name>.momentum_buffer", in the order the parameters were first
  // seen; views into this optimiser, in its memory space S.
  std::vector<NamedTensor<T, S>> state() const {
    std::vector<NamedTensor<T, S>> out;
    for (const auto& s : slots_) out.push_back({s.name + ".momentum_buffer", s.buffer.view()});
    return out;
  }

  // Replaces the momentum buffers with copies of `entries` (names "<name>.momentum_buffer",
  // finite values), in S. The entries may live in any space (a checkpoint's host tensors,
  // another optimiser's state()); those from another space must be contiguous. Strong
  // guarantee: on an exception the current state is kept.
  template <Space Sr = Space::Host>
  void load_state(const std::vector<NamedTensor<T, Sr>>& entries) {
    std::vector<Slot> slots;
    for (const auto& e : entries) {
      std::string stem;
      SSMX_REQUIRE(optim_detail::strip_suffix(e.name, ".momentum_buffer", stem), ValueError,
                   "SGD::load_state: unknown state entry '", e.name, "' (expected '<parameter>.momentum_buffer')");
      for (const auto& s : slots)
        SSMX_REQUIRE(s.name != stem, ValueError, "SGD::load_state: entry '", e.name, "' appears twice");
      slots.push_back(Slot{std::move(stem), optim_detail::copy_state_entry<T, S>(e, "SGD::load_state")});
    }
    slots_.swap(slots);
  }

 private:
  double lr_ = 0.0;
  double momentum_;
  double weight_decay_;
  bool nesterov_;
  struct Slot {
    std::string name;  // the parameter's
    Tensor<T, S> buffer;
  };
  std::vector<Slot> slots_;  // in the order the parameters were first seen
};

}  // namespace ssmx
