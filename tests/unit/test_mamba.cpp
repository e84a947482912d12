// Tests of the Mamba layer, the convolution halo, carried states and packed documents
// (host backend).
#include "../support/test_support.hpp"

#if !SSMX_TEST_CUDA
#include <ssmx/nn/mamba.hpp>
#include <ssmx/nn/model.hpp>

namespace test_mamba {
using namespace ssmx;
using nn::token_t;

// d_model 6, state 3, E = 12, conv width 4 (halo 3), Δ rank 2.
template <class T>
using TinyMamba = nn::Mamba<T, 6, 3, 2, 4, 2>;
template <class T, index_t K = 2>
using MambaModel = nn::Model<TinyMamba<T>, K>;
template <class T, index_t K = 2>
using DiagModel = nn::Model<nn::DiagonalSSM<T, 6, 3>, K>;

constexpr index_t vocab = 11;

struct Tokens {
  std::vector<token_t> x, y;
  std::vector<std::uint8_t> starts;
  Tokens(index_t batch, index_t len, std::uint64_t seed) : x(std::size_t(batch * len)), y(x.size()), starts(x.size()) {
    test::Rng rng(seed);
    for (auto& t : x) t = token_t(rng.integer(0, vocab - 1));
    for (auto& t : y) t = token_t(rng.integer(0, vocab - 1));
  }
  nn::Batch batch(index_t b, index_t len, bool with_starts = false) const {
    return nn::Batch{x.data(), y.data(), b, len, with_starts ? starts.data() : nullptr};
  }
};

// A model with every parameter moved off its initial value (so no entry sits at a special point).
template <class M>
void perturb(M& m, std::uint64_t seed, double scale = 0.05) {
  test::Rng rng(seed);
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
}  // namespace test_mamba

using namespace test_mamba;

TEST_CASE("mamba: parameter names and shapes follow the public checkpoints") {
  TinyMamba<float> m("layers.0.mixer.");
  std::vector<std::string> names;
  index_t total = 0;
  for (auto* p : m.parameters()) {
    names.push_back(p->name);
    total += p->numel();
  }
  const std::vector<std::string> expected{"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                          "dt_proj.weight", "dt_proj.bias",  "A_log",       "D",
                                          "out_proj.weight"};
  REQUIRE(names.size() == expected.size());
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(names[i] == "layers.0.mixer." + expected[i]);
  CHECK(m.in_proj.value.dims() == Dims{24, 6});
  CHECK(m.conv_weight.value.dims() == Dims{12, 1, 4});
  CHECK(m.x_proj.value.dims() == Dims{2 + 2 * 3, 12});
  CHECK(m.dt_proj_weight.value.dims() == Dims{12, 2});
  CHECK(m.A_log.value.dims() == Dims{12, 3});
  CHECK(m.out_proj.value.dims() == Dims{6, 12});
  CHECK(total == TinyMamba<float>::parameter_count());
}

TEST_CASE("mamba: model gradients match central differences in double") {
  // The whole language model (2 Mamba blocks, tied head, summed cross-entropy): every
  // parameter tensor, sampled, against central differences of the loss.
  MambaModel<double> m({vocab, true, 3});
  perturb(m, 4);
  const index_t len = 9;
  Tokens d(2, len, 5);
  d.y[3] = -1;
  const nn::Batch batch = d.batch(2, len);
  m.zero_grad();
  m.forward_backward(batch, Backprop{});
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

TEST_CASE("mamba: Adjoint equals Backprop with chunks shorter than the convolution window") {
  MambaModel<double, 3> m({vocab, false, 8});
  perturb(m, 9);
  const index_t len = 23;
  Tokens d(2, len, 10);
  const nn::Batch batch = d.batch(2, len);
  double lb = 0, la = 0;
  const auto gb = grads_of(m, batch, Backprop{}, &lb);
  for (index_t chunk : {1, 2, 3, 5, 7, 23, 64})
    for (index_t shard : {1, 3, 64}) {
      CAPTURE(chunk);
      CAPTURE(shard);
      const auto ga = grads_of(m, batch, Adjoint{chunk, shard}, &la);
      CHECK(la == doctest::Approx(lb).epsilon(1e-13));
      CHECK(rel_diff(ga, gb) < 1e-12);
    }
  // Checkpointed and a truncation window that covers the sequence are the same gradient.
  CHECK(rel_diff(grads_of(m, batch, Checkpointed{}), gb) < 1e-12);
  CHECK(rel_diff(grads_of(m, batch, TruncatedAdjoint{len, 4}), gb) < 1e-12);
  // evaluate() streams chunk by chunk through the halo: the same loss.
  for (index_t chunk : {1, 2, 5, 100}) CHECK(m.evaluate(batch, chunk).loss == doctest::Approx(lb).epsilon(1e-13));
}

TEST_CASE("mamba: a sequence split into two calls gives the one-call loss and gradients") {
  // Call 1 covers tokens [0, s), call 2 [s, T). The carried state is the scan state and the
  // last halo rows of every layer's input. Exact gradients across the split: run call 2
  // first from call 1's final states (from a forward-only pass), then call 1 with call 2's
  // initial-state gradients as its final-state gradients.
  MambaModel<double> m({vocab, true, 12});
  perturb(m, 13);
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

TEST_CASE("mamba: initial-state gradients match central differences") {
  MambaModel<double> m({vocab, true, 17});
  perturb(m, 18);
  const index_t len = 6;
  Tokens d(2, len, 19);
  const nn::Batch batch = d.batch(2, len);
  nn::LayerStates<double> st;
  test::Rng rng(20);
  for (index_t k = 0; k < 2; ++k) {
    Tensor<double> h(Dims{2, 12 * 3}), y(Dims{2, 3, 6});
    test::fill_normal<double>(h.view(), rng, 0, 0.5);
    test::fill_normal<double>(y.view(), rng, 0, 0.5);
    st.initial.push_back(std::move(h));
    st.initial_halo.push_back(std::move(y));
  }
  m.zero_grad();
  m.forward_backward(batch, Adjoint{4, 2}, &st);
  std::vector<Tensor<double>*> inputs;
  std::vector<const Tensor<double>*> grads;
  for (index_t k = 0; k < 2; ++k) {
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

namespace test_mamba {
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
}  // namespace test_mamba

TEST_CASE("mamba: packed documents give the gradients of each document alone") {
  MambaModel<double> m({vocab, true, 21});
  perturb(m, 22);
  check_packing_equals_separate(m);
}

TEST_CASE("model: packed documents give the gradients of each document alone (DiagonalSSM)") {
  DiagModel<double> m({vocab, false, 23});
  perturb(m, 24);
  check_packing_equals_separate(m);
}

TEST_CASE("mamba: float model trains on a copy task") {
  // Not a benchmark: a short run whose loss must fall well below its start.
  MambaModel<float> m({vocab, true, 25});
  const index_t len = 32;
  Tokens d(2, len, 26);
  for (index_t b = 0; b < 2; ++b)
    for (index_t t = 0; t < len; ++t)
      d.y[std::size_t(b * len + t)] = t >= 4 ? d.x[std::size_t(b * len + t - 4)] : token_t(-1);  // recall 4 back
  AdamW<float> opt(1e-2, 0.9, 0.999, 1e-8, 0.0);
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    const auto r = nn::train_step(m, opt, d.batch(2, len), Adjoint{8, 4});
    if (step == 0) first = r.mean_loss();
    last = r.mean_loss();
  }
  CHECK(last < 0.5 * first);
}
#endif
