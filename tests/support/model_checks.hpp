// ssmx tests — helpers for whole-model tests of the Mamba-family layers (host backend):
// random tokens, perturbed parameters, flattened gradients and their distances, and the
// PyTorch-made checkpoint fixtures under tests/data. Include after test_support.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <ssmx/nn/model.hpp>

#include "test_support.hpp"

#ifndef SSMX_TEST_DATA_DIR
#define SSMX_TEST_DATA_DIR "tests/data"
#endif

namespace ssmx::test {

// Random token ids and targets in [0, vocab), and per-token document-start flags (all 0).
struct Tokens {
  std::vector<nn::token_t> x, y;
  std::vector<std::uint8_t> starts;
  Tokens(index_t batch, index_t len, std::uint64_t seed, index_t vocab = 11)
      : x(std::size_t(batch * len)), y(x.size()), starts(x.size()) {
    Rng rng(seed);
    for (auto& t : x) t = nn::token_t(rng.integer(0, vocab - 1));
    for (auto& t : y) t = nn::token_t(rng.integer(0, vocab - 1));
  }
  nn::Batch batch(index_t b, index_t len, bool with_starts = false) const {
    return nn::Batch{x.data(), y.data(), b, len, with_starts ? starts.data() : nullptr};
  }
};

// A model with every parameter moved off its initial value (so no entry sits at a special point).
template <class M>
void perturb(M& m, std::uint64_t seed, double scale = 0.05) {
  Rng rng(seed);
  for (auto* p : m.parameters())
    for (index_t i = 0; i < p->numel(); ++i) p->value[i] += typename M::T(rng.normal(0, scale));
}

template <class M>
std::vector<double> flat_grads(M& m) {
  std::vector<double> g;
  for (auto* p : m.parameters())
    for (index_t i = 0; i < p->numel(); ++i) g.push_back(double(p->grad[i]));
  return g;
}

template <class M, class Strategy>
std::vector<double> grads_of(M& m, const nn::Batch& b, const Strategy& s, double* loss = nullptr,
                             nn::LayerStates<typename M::T>* states = nullptr) {
  m.zero_grad();
  const auto r = m.forward_backward(b, s, states);
  if (loss) *loss = r.loss;
  return flat_grads(m);
}

// The gradient `strategy` gives every parameter tensor of `m` (sampled, 12 entries each)
// against central differences of evaluate()'s loss, in double; more than 100 entries checked.
template <class M, class Strategy>
void check_parameter_gradients(M& m, const nn::Batch& batch, const Strategy& strategy) {
  m.zero_grad();
  m.forward_backward(batch, strategy);
  std::vector<Tensor<double>*> params;
  std::vector<const Tensor<double>*> grads;
  for (auto* p : m.parameters()) {
    params.push_back(&p->value);
    grads.push_back(&p->grad);
  }
  GradcheckOptions o;
  o.max_checks = 12;
  o.rtol = 1e-5;
  o.atol = 1e-8;
  const auto r = check_gradients([&] { return m.evaluate(batch, 4).loss; }, params, grads, o);
  INFO(r.worst);
  CHECK(r.ok);
  CHECK(r.checked > 100);
}

// ‖a - b‖ / ‖b‖.
inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

inline double max_abs_diff(const Tensor<double>& a, const Tensor<double>& b) {
  REQUIRE(a.dims() == b.dims());
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// max |a - b| over max |b|, per tensor.
template <class T>
double scaled_err(const Tensor<T>& a, const Tensor<double>& b) {
  REQUIRE(a.dims() == b.dims());
  double err = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}

// A [a, b] tensor as its [b, a] transpose.
template <class T>
Tensor<T> transposed(const Tensor<T>& t) {
  Tensor<T> out(Dims{t.dims()[1], t.dims()[0]});
  for (index_t i = 0; i < t.dims()[0]; ++i)
    for (index_t j = 0; j < t.dims()[1]; ++j) out(j, i) = t(i, j);
  return out;
}

// A checkpoint fixture's directory (tests/data/<name>).
inline std::string fixture(const std::string& name) { return std::string(SSMX_TEST_DATA_DIR) + "/" + name; }

// Our parameter name -> the name in a Mamba-family checkpoint (and in its reference's grad.<name>).
inline std::string name_in_file(const std::string& ours, bool state_spaces = false) {
  if (ours == "embedding.weight") return state_spaces ? "backbone.embedding.weight" : "backbone.embeddings.weight";
  if (ours == "lm_head.weight") return ours;
  return "backbone." + ours;
}

// Documents packed into one row with start flags give the loss and gradients of running
// each document alone: nothing (state, convolution window) leaks across a boundary.
template <class M>
void check_packing_equals_separate(M& m) {
  const std::vector<index_t> lengths{5, 1, 9, 2, 7};
  index_t total = 0;
  for (index_t l : lengths) total += l;
  Tokens d(1, total, 31);
  std::fill(d.starts.begin(), d.starts.end(), std::uint8_t(0));
  std::vector<double> g_sum;
  double l_sum = 0;
  index_t off = 0;
  for (index_t l : lengths) {
    d.starts[std::size_t(off)] = 1;
    d.y[std::size_t(off + l - 1)] = -1;  // no prediction across a boundary
    double loss = 0;
    const auto g = grads_of(m, nn::Batch{d.x.data() + off, d.y.data() + off, 1, l}, Adjoint{3, 2}, &loss);
    if (g_sum.empty()) g_sum.assign(g.size(), 0.0);
    for (std::size_t i = 0; i < g.size(); ++i) g_sum[i] += g[i];
    l_sum += loss;
    off += l;
  }
  for (index_t chunk : {2, 4, 100}) {
    CAPTURE(chunk);
    double loss = 0;
    const auto g = grads_of(m, d.batch(1, total, true), Adjoint{chunk, 3}, &loss);
    CHECK(loss == doctest::Approx(l_sum).epsilon(1e-13));
    CHECK(rel_diff(g, g_sum) < 1e-12);
    CHECK(m.evaluate(d.batch(1, total, true), chunk).loss == doctest::Approx(l_sum).epsilon(1e-13));
  }
  CHECK(rel_diff(grads_of(m, d.batch(1, total, true), Backprop{}), g_sum) < 1e-12);
  // Without the flags the documents do see each other: the test can tell the difference.
  CHECK(rel_diff(grads_of(m, d.batch(1, total, false), Adjoint{4, 3}), g_sum) > 1e-6);
  // A start at token 0 cuts a carried-in state off: its gradient is zero.
  nn::LayerStates<double> st;
  for (index_t k = 0; k < M::num_layers; ++k) {
    Tensor<double> h(Dims{1, nn::state_numel(M::layer_type::state_dims())});
    fill<double>(h.view(), 0.3);
    st.initial.push_back(std::move(h));
  }
  double loss = 0;
  const auto g = grads_of(m, d.batch(1, total, true), Adjoint{4, 3}, &loss, &st);
  CHECK(rel_diff(g, g_sum) < 1e-12);
  for (const auto& t : st.initial_grad)
    for (index_t i = 0; i < t.numel(); ++i) CHECK(t[i] == 0.0);
}

// A sequence split into two calls gives the one-call loss and gradients (a model in double
// with a feature halo, e.g. Mamba, Mamba2).
template <class M>
void check_split_equals_whole(M& m) {
  // Call 1 covers tokens [0, s), call 2 [s, T). The carried state is the scan state and the
  // last halo rows of every layer's input. Exact gradients across the split: run call 2
  // first from call 1's final states (from a forward-only pass), then call 1 with call 2's
  // initial-state gradients as its final-state gradients.
  const index_t len = 20;
  Tokens d(1, len, 14);
  double l_all = 0;
  const auto g_all = grads_of(m, d.batch(1, len), Adjoint{4, 2}, &l_all);

  for (index_t split : {1, 2, 7, 13}) {
    CAPTURE(split);
    const nn::Batch first{d.x.data(), d.y.data(), 1, split};
    const nn::Batch second{d.x.data() + split, d.y.data() + split, 1, len - split};
    nn::LayerStates<double> s1;
    m.evaluate(first, 3, &s1);
    nn::LayerStates<double> s2;
    for (auto& t : s1.final_states) s2.initial.push_back(t.clone());
    for (auto& t : s1.final_halo) s2.initial_halo.push_back(t.clone());
    double l2 = 0, l1 = 0;
    auto g2 = grads_of(m, second, Adjoint{5, 3}, &l2, &s2);
    nn::LayerStates<double> s1b;
    for (auto& t : s2.initial_grad) s1b.final_grad.push_back(t.clone());
    for (auto& t : s2.initial_halo_grad) s1b.final_halo_grad.push_back(t.clone());
    auto g1 = grads_of(m, first, Adjoint{3, 2}, &l1, &s1b);
    for (std::size_t i = 0; i < g1.size(); ++i) g1[i] += g2[i];
    CHECK(l1 + l2 == doctest::Approx(l_all).epsilon(1e-13));
    CHECK(rel_diff(g1, g_all) < 1e-12);
    // The forward_backward pass reports the same final state as the forward-only pass.
    for (std::size_t k = 0; k < s1.final_states.size(); ++k) {
      CHECK(max_abs_diff(s1b.final_states[k], s1.final_states[k]) < 1e-13);
      CHECK(max_abs_diff(s1b.final_halo[k], s1.final_halo[k]) < 1e-13);
    }
  }
}


// Initial-state gradients (scan states and halo rows) match central differences.
template <class M>
void check_initial_state_gradients(M& m) {
  const index_t len = 6;
  Tokens d(2, len, 19);
  const nn::Batch batch = d.batch(2, len);
  nn::LayerStates<double> st;
  test::Rng rng(20);
  constexpr index_t K = M::num_layers, halo = nn::layer_halo<typename M::layer_type>::value;
  for (index_t k = 0; k < K; ++k) {
    Tensor<double> h(Dims{2, nn::state_numel(M::layer_type::state_dims())}), y(Dims{2, halo, M::d_model});
    test::fill_normal<double>(h.view(), rng, 0, 0.5);
    test::fill_normal<double>(y.view(), rng, 0, 0.5);
    st.initial.push_back(std::move(h));
    st.initial_halo.push_back(std::move(y));
  }
  m.zero_grad();
  m.forward_backward(batch, Adjoint{4, 2}, &st);
  std::vector<Tensor<double>*> inputs;
  std::vector<const Tensor<double>*> grads;
  for (index_t k = 0; k < K; ++k) {
    inputs.push_back(&st.initial[std::size_t(k)]);
    inputs.push_back(&st.initial_halo[std::size_t(k)]);
    grads.push_back(&st.initial_grad[std::size_t(k)]);
    grads.push_back(&st.initial_halo_grad[std::size_t(k)]);
  }
  GradcheckOptions o;
  o.rtol = 1e-5;
  o.atol = 1e-8;
  const auto r = check_gradients(
      [&] {
        nn::LayerStates<double> probe;
        for (auto& t : st.initial) probe.initial.push_back(t.clone());
        for (auto& t : st.initial_halo) probe.initial_halo.push_back(t.clone());
        return m.evaluate(batch, 4, &probe).loss;
      },
      inputs, grads, o);
  INFO(r.worst);
  CHECK(r.ok);
}


}  // namespace ssmx::test
