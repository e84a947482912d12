// ssmx — gradient checking against central finite differences in double precision.
#pragma once

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tape.hpp"

namespace ssmx {

struct GradcheckOptions {
  double eps = 1e-6;        // finite-difference step
  double rtol = 1e-6;       // relative tolerance
  double atol = 1e-9;       // absolute tolerance
  index_t max_checks = -1;  // elements checked per input (-1: all; else an evenly spread sample)
  std::uint64_t seed = 7;   // for the random cotangent
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_err = 0, max_rel_err = 0;
  index_t checked = 0;
  std::string worst;  // "input 1 element 17: analytic a vs numeric n"
  explicit operator bool() const { return ok; }
};

namespace detail {
inline void gradcheck_compare(GradcheckResult& r, const GradcheckOptions& o, std::size_t input, index_t k,
                              double analytic, double numeric) {
  double err = std::abs(analytic - numeric);
  double scale = std::max(std::abs(analytic), std::abs(numeric));
  double rel = scale > 0 ? err / scale : 0.0;
  ++r.checked;
  bool bad = !(err <= o.atol + o.rtol * scale);
  if (bad || err > r.max_abs_err) {
    if (bad && r.ok) r.ok = false;
    if (bad || r.ok)
      r.worst = detail::str("input ", input, " element ", k, ": analytic ", analytic, " vs numeric ", numeric);
  }
  r.max_abs_err = std::max(r.max_abs_err, err);
  r.max_rel_err = std::max(r.max_rel_err, rel);
}
inline index_t gradcheck_stride(index_t n, index_t max_checks) {
  return (max_checks <= 0 || n <= max_checks) ? 1 : (n + max_checks - 1) / max_checks;
}
}  // namespace detail

// Checks scalar-loss gradients: `loss()` recomputes the loss from the current values of
// `params`; `grads[i]` holds the analytic dloss/dparams[i].
inline GradcheckResult check_gradients(const std::function<double()>& loss, const std::vector<Tensor<double>*>& params,
                                       const std::vector<const Tensor<double>*>& grads, GradcheckOptions o = {}) {
  SSMX_REQUIRE(params.size() == grads.size(), ValueError, "check_gradients: ", params.size(), " parameters but ",
               grads.size(), " gradients");
  GradcheckResult r;
  for (std::size_t i = 0; i < params.size(); ++i) {
    Tensor<double>& p = *params[i];
    check_dims(grads[i]->dims(), p.dims(), "gradient");
    index_t step = detail::gradcheck_stride(p.numel(), o.max_checks);
    for (index_t k = 0; k < p.numel(); k += step) {
      double saved = p[k];
      p[k] = saved + o.eps;
      double lp = loss();
      p[k] = saved - o.eps;
      double lm = loss();
      p[k] = saved;
      detail::gradcheck_compare(r, o, i, k, (*grads[i])[k], (lp - lm) / (2 * o.eps));
    }
  }
  return r;
}

// Checks the reverse-mode VJP of an expression. `build()` returns the expression, whose
// leaves view `inputs` (so perturbing an input in place changes its value). A random
// cotangent g turns it into the scalar L = Σ g ⊙ build().
template <class Build>
GradcheckResult gradcheck(Build&& build, const std::vector<Tensor<double>*>& inputs, GradcheckOptions o = {}) {
  auto e = build();
  using E = decltype(e);
  static_assert(std::is_same_v<typename E::value_type, double>, "gradcheck runs in double precision");
  Tensor<double> g(e.dims(), Tag::Workspace);
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (index_t k = 0; k < g.numel(); ++k) g[k] = nd(rng);

  std::vector<Tensor<double>> grads;
  GradTargets<double, Space::Host> targets;
  grads.reserve(inputs.size());
  for (auto* x : inputs) {
    grads.push_back(zeros<double>(x->dims(), Tag::Workspace));
    targets.push_back(wrt(*x, grads.back()));
  }
  {
    Tape<E, Space::Host> tape(e);
    backward(e, tape, TensorView<const double>(g.view()), targets);
  }
  auto loss = [&]() {
    auto y = eval(build(), Tag::Workspace);
    double acc = 0;
    for (index_t k = 0; k < y.numel(); ++k) acc += g[k] * y[k];
    return acc;
  };
  std::vector<const Tensor<double>*> gp;
  for (auto& t : grads) gp.push_back(&t);
  return check_gradients(loss, inputs, gp, o);
}

}  // namespace ssmx
