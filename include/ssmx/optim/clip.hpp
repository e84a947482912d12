// ssmx — gradient checks, global gradient norm and clipping by norm; also the pieces every
// optimiser shares (parameter-list validation, named state tensors). Parameters in any
// memory space.
//
// Host gradients: norms accumulate squares in double, parameter by parameter in the list's
// fixed order and element by element inside a parameter, on one thread: the same gradients
// give the same norm bit for bit, whatever the thread count.
// Other spaces (the GPU): each gradient is reduced where it lives by an expression
// (sum(square(g)), a deterministic device reduction in T), the per-gradient results come to
// the host in one copy and are added in double in the list's order: deterministic run to
// run, equal to the host's norm to rounding. The same path runs on host parameters through
// optim_detail::by_reduction (tests compare the two).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../expr/expr.hpp"
#include "../nn/parameter.hpp"

namespace ssmx {

// One tensor of an optimiser's state, named "<parameter name>.<slot>" (e.g.
// "layers.0.W_a.exp_avg"), as state() returns it and load_state() takes it. The view
// points into the optimiser (state(): in the optimiser's memory space) or into the
// caller's storage (load_state(), which copies); it is valid as long as that storage is.
template <class T, Space S = Space::Host>
struct NamedTensor {
  std::string name;
  TensorView<const T, S> value;
};

namespace optim_detail {

// The first non-finite gradient element of a parameter list, if any.
struct NonFinite {
  std::size_t param = 0;  // position in the list
  index_t index = -1;     // linear (row-major) index into the gradient; -1: none found
  double value = 0.0;
  bool found() const { return index >= 0; }
};

// The norm and the checks by expression reductions, for parameters in any space: the path
// of device gradients (host gradients take the loops below, whose order is fixed).
namespace by_reduction {

// reduce(leaf(g)), a rank-0 expression, for every gradient g of the list, evaluated in S
// into one slot of a small tensor whose values reach the host in one copy (one
// synchronisation on a GPU).
template <class T, Space S, class Reduce>
std::vector<T> per_gradient(const ParameterList<T, S>& params, Reduce&& reduce) {
  if (params.empty()) return {};
  Tensor<T, S> out(Dims{index_t(params.size())}, Tag::Workspace);
  for (std::size_t k = 0; k < params.size(); ++k)
    assign(out.view().slice(index_t(k), index_t(k) + 1), reduce(leaf(params[k]->grad)));
  return to_vector(out);
}

// sum(g * 0) is 0 when every element of g is finite and NaN otherwise (inf * 0 is NaN).
template <class T, Space S>
std::vector<T> finiteness_probes(const ParameterList<T, S>& params) {
  return per_gradient(params, [](const auto& g) { return ssmx::sum(g * T(0)); });
}

// max |g| of every gradient (MaxReduce skips NaN: meaningful for finite gradients only).
template <class T, Space S>
std::vector<T> max_abs(const ParameterList<T, S>& params) {
  return per_gradient(params, [](const auto& g) { return ssmx::max(ssmx::maximum(g, -g)); });
}

template <class T, Space S>
NonFinite first_non_finite(const ParameterList<T, S>& params) {
  const std::vector<T> probe = finiteness_probes(params);
  for (std::size_t k = 0; k < params.size(); ++k) {
    if (std::isfinite(probe[k])) continue;
    const std::vector<T> g = to_vector(params[k]->grad);  // the offender only, to name the element
    for (std::size_t i = 0; i < g.size(); ++i)
      if (!std::isfinite(g[i])) return NonFinite{k, index_t(i), double(g[i])};
  }
  return {};
}

// sum_k sum_i (g_ki * scale)^2 in double, added in list order. A gradient whose sum
// overflows T but whose elements are finite is summed again divided by its largest
// magnitude a (sum(square(g / a)) <= numel), times (a * scale)^2 in double; with a
// non-finite element its sum stays non-finite (inf, or NaN with a NaN element), as on the host.
template <class T, Space S>
double sum_of_squares(const ParameterList<T, S>& params, double scale = 1.0) {
  const std::vector<T> ss = per_gradient(params, [](const auto& g) { return ssmx::sum(ssmx::square(g)); });
  double acc = 0.0;
  for (std::size_t k = 0; k < params.size(); ++k) {
    if (std::isfinite(ss[k])) {
      acc += double(ss[k]) * scale * scale;
      continue;
    }
    const ParameterList<T, S> one{params[k]};
    if (!std::isfinite(finiteness_probes(one)[0])) {
      acc += double(ss[k]);
      continue;
    }
    const T a = max_abs(one)[0];  // > 0: the sum overflowed
    const T scaled = per_gradient(one, [a](const auto& g) { return ssmx::sum(ssmx::square(g / a)); })[0];
    const double r = double(a) * scale;
    acc += double(scaled) * r * r;
  }
  return acc;
}

// The global 2-norm in double; squares that overflow a double are handled as on the host
// (the norm again, scaled by 1 / max|g|).
template <class T, Space S>
double grad_norm(const ParameterList<T, S>& params) {
  const double ss = sum_of_squares(params);
  if (std::isfinite(ss)) return std::sqrt(ss);
  for (T probe : finiteness_probes(params))
    if (!std::isfinite(probe)) return ss;  // a NaN or inf element: the norm is not finite
  double amax = 0.0;
  for (T a : max_abs(params)) amax = std::fmax(amax, double(a));
  return amax * std::sqrt(sum_of_squares(params, 1.0 / amax));
}

}  // namespace by_reduction

template <class T, Space S>
NonFinite first_non_finite(const ParameterList<T, S>& params) {
  if constexpr (S != Space::Host) {
    return by_reduction::first_non_finite(params);
  } else {
    for (std::size_t k = 0; k < params.size(); ++k) {
      const Tensor<T>& g = params[k]->grad;
      const T* d = g.data();
      for (index_t i = 0; i < g.numel(); ++i)
        if (!std::isfinite(d[i])) return NonFinite{k, i, double(d[i])};
    }
    return {};
  }
}

template <class T, Space S>
[[noreturn]] void throw_non_finite(const ParameterList<T, S>& params, const NonFinite& bad, const char* who) {
  const auto& p = *params[bad.param];
  throw ValueError(detail::str(who, ": gradient of '", p.name, "' has non-finite value ", bad.value, " at index ",
                               bad.index, " (shape ", p.grad.dims().str(), ")"));
}

// Every entry non-null, names unique (state is keyed by name).
template <class T, Space S>
void check_list(const ParameterList<T, S>& params, const char* who) {
  std::unordered_set<std::string> seen;
  for (std::size_t k = 0; k < params.size(); ++k) {
    SSMX_REQUIRE(params[k] != nullptr, ValueError, who, ": parameter ", k, " of the list is null");
    SSMX_REQUIRE(seen.insert(params[k]->name).second, ValueError, who, ": parameter name '", params[k]->name,
                 "' appears twice in the list (optimiser state is keyed by name)");
  }
}

// What every optimiser checks before it touches anything: a well-formed list, each
// gradient shaped like its value, every gradient element finite.
template <class T, Space S>
void check_gradients(const ParameterList<T, S>& params, const char* who) {
  check_list(params, who);
  for (auto* p : params)
    SSMX_REQUIRE(p->grad.dims() == p->value.dims(), ShapeError, who, ": gradient of '", p->name, "' has shape ",
                 p->grad.dims().str(), ", expected the value's shape ", p->value.dims().str());
  NonFinite bad = first_non_finite(params);
  if (bad.found()) throw_non_finite(params, bad, who);
}

// Sum of squares of every gradient element, in double, in list order. Non-finite
// elements propagate (NaN or inf).
template <class T, Space S>
double sum_of_squares(const ParameterList<T, S>& params, double scale = 1.0) {
  if constexpr (S != Space::Host) {
    return by_reduction::sum_of_squares(params, scale);
  } else {
    double acc = 0.0;
    for (auto* p : params) {
      const T* d = p->grad.data();
      for (index_t i = 0; i < p->grad.numel(); ++i) {
        const double x = double(d[i]) * scale;
        acc += x * x;
      }
    }
    return acc;
  }
}

// The global 2-norm in double. Squares of large double gradients can overflow although
// every element is finite; then the norm is recomputed scaled by 1/max|g| (deterministic).
template <class T, Space S>
double grad_norm(const ParameterList<T, S>& params) {
  if constexpr (S != Space::Host) {
    return by_reduction::grad_norm(params);
  } else {
    const double ss = sum_of_squares(params);
    if (std::isfinite(ss)) return std::sqrt(ss);
    double amax = 0.0;
    for (auto* p : params) {
      const T* d = p->grad.data();
      for (index_t i = 0; i < p->grad.numel(); ++i) {
        const double a = std::fabs(double(d[i]));
        if (!(a <= amax)) amax = a;  // NaN sticks
      }
    }
    if (!std::isfinite(amax)) return ss;  // a NaN or inf element: the norm is not finite
    return amax * std::sqrt(sum_of_squares(params, 1.0 / amax));
  }
}

// Finds the state slot of every parameter, creating missing ones, with the strong
// guarantee: existing slots are checked by check(slot, param) (which throws) and new ones
// built by make(param) (which may throw) before `slots` changes; the commit only moves
// slots into reserved storage. Returns, for each parameter, the index of its slot.
// Slot: has a std::string `name` and a noexcept move constructor.
template <class Slot, class T, Space S, class Check, class Make>
std::vector<std::size_t> prepare_slots(std::vector<Slot>& slots, const ParameterList<T, S>& params, Check&& check,
                                       Make&& make) {
  static_assert(std::is_nothrow_move_constructible_v<Slot>, "optimiser state slots must move without throwing");
  std::vector<std::size_t> index(params.size());
  std::vector<Slot> fresh;
  for (std::size_t k = 0; k < params.size(); ++k) {
    const auto& p = *params[k];
    std::size_t j = slots.size();
    if (k < slots.size() && slots[k].name == p.name) {
      j = k;  // the usual case: the same list as last time
    } else {
      for (std::size_t i = 0; i < slots.size(); ++i)
        if (slots[i].name == p.name) {
          j = i;
          break;
        }
    }
    if (j < slots.size()) {
      check(slots[j], p);
      index[k] = j;
    } else {
      index[k] = slots.size() + fresh.size();
      fresh.push_back(make(p));
    }
  }
  slots.reserve(slots.size() + fresh.size());
  for (auto& s : fresh) slots.push_back(std::move(s));  // no reallocation: cannot throw
  return index;
}

// Splits "<parameter name><suffix>" into the parameter name; false if `name` lacks the suffix.
inline bool strip_suffix(const std::string& name, const std::string& suffix, std::string& stem) {
  if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
    return false;
  stem = name.substr(0, name.size() - suffix.size());
  return true;
}

// A tracked copy in space S of a state entry from space Sr; throws ValueError naming it
// when an element is not finite (or negative, if `nonnegative`). The values are checked on
// the host (an entry that is not there is copied there first; entries from other spaces
// must be contiguous).
template <class T, Space S = Space::Host, Space Sr = Space::Host>
Tensor<T, S> copy_state_entry(const NamedTensor<T, Sr>& e, const char* who, bool nonnegative = false) {
  constexpr bool host = S == Space::Host;
  Tensor<T> t(e.value.dims(), host ? Tag::OptimizerState : Tag::Workspace);
  copy<T>(t.view(), e.value);
  for (index_t i = 0; i < t.numel(); ++i) {
    SSMX_REQUIRE(std::isfinite(t[i]), ValueError, who, ": state entry '", e.name, "' has non-finite value ", t[i],
                 " at index ", i);
    SSMX_REQUIRE(!nonnegative || t[i] >= T(0), ValueError, who, ": state entry '", e.name, "' has negative value ",
                 t[i], " at index ", i, " (expected >= 0)");
  }
  if constexpr (host)
    return t;
  else
    return to_space<S>(t, Tag::OptimizerState);
}

}  // namespace optim_detail

// The 2-norm of all gradients of `params` taken together, sqrt(sum_p sum_i g_pi^2),
// accumulated in double in the list's order (deterministic; see the top of this file for
// device gradients). Does not throw on non-finite gradients: it returns NaN or inf then, so
// it can be logged.
template <class T, Space S>
T global_grad_norm(const ParameterList<T, S>& params) {
  optim_detail::check_list(params, "global_grad_norm");
  return T(optim_detail::grad_norm(params));
}

// Scales all gradients of `params` by max_norm / norm when norm > max_norm, where `norm` is
// their global norm computed by the caller (e.g. summed over the processes that hold the
// parameters between them). One pass over each gradient, in its own space.
template <class T, Space S>
void clip_to_norm(const ParameterList<T, S>& params, double norm, double max_norm) {
  if (!(norm > max_norm)) return;
  const T coef = T(max_norm / norm);
  for (auto* p : params) p->grad = p->grad * coef;
}

// Scales all gradients of `params` by max_norm / norm when their global norm exceeds
// max_norm, so that the clipped norm is max_norm (to rounding); returns the norm before
// clipping. Unlike torch.nn.utils.clip_grad_norm_, no 1e-6 is added to the norm: the
// scaling only happens when norm > max_norm >= 0, so the division is safe.
// A non-finite gradient throws ValueError naming the first such parameter, element index
// and value, and leaves every gradient unchanged. max_norm = +inf only measures.
template <class T, Space S>
T clip_grad_norm(const ParameterList<T, S>& params, double max_norm) {
  SSMX_REQUIRE(max_norm >= 0.0, ValueError, "clip_grad_norm: max_norm must be >= 0, got ", max_norm);
  optim_detail::check_list(params, "clip_grad_norm");
  const double norm = optim_detail::grad_norm(params);
  if (!std::isfinite(norm)) {
    optim_detail::NonFinite bad = optim_detail::first_non_finite(params);
    if (bad.found()) optim_detail::throw_non_finite(params, bad, "clip_grad_norm");
    throw ValueError(detail::str("clip_grad_norm: the global gradient norm is not finite (", norm, ")"));
  }
  clip_to_norm(params, norm, max_norm);
  return T(norm);
}

}  // namespace ssmx
