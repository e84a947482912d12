// The whole model in the test binary's memory space: on the CPU build the host, on the
// CUDA build the GPU (every layer, strategy, scan, embedding, loss and optimiser step on the
// device). The strategies must agree on each space; in the CUDA build the host model is the
// oracle: the same model on both spaces must give the same loss and gradients (to rounding).
#include "../support/test_support.hpp"

#include <ssmx/nn/model.hpp>
#include <ssmx/nn/train.hpp>

#include "../../examples/custom_layer.hpp"  // a user-written layer moves to the GPU as well

namespace test_model_space {
using namespace ssmx;
using nn::token_t;
using test::space;

using Diagonal = nn::DiagonalSSM<double, 8, 4>;
using MambaSmall = nn::Mamba<double, 8, 4, 2, 4, 2>;  // a convolution window of 4: a halo of 3 rows
using Gated = GatedSSM<double, 8, 3>;                 // examples/custom_layer.hpp
constexpr index_t vocab = 11;

// Tokens, next-token targets with a few ignored positions, and packed-document starts.
struct Data {
  std::vector<token_t> x, y;
  std::vector<std::uint8_t> starts;
  nn::Batch batch;
  Data(index_t rows, index_t len, bool packed, std::uint64_t seed = 5)
      : x(std::size_t(rows * len)), y(x.size()), starts(x.size(), 0) {
    test::Rng rng(seed);
    for (auto& t : x) t = token_t(rng.integer(0, vocab - 1));
    for (std::size_t i = 0; i < y.size(); ++i) y[i] = i % 7 == 3 ? token_t(-1) : token_t(rng.integer(0, vocab - 1));
    for (index_t b = 0; b < rows; ++b) {
      starts[std::size_t(b * len)] = 1;
      if (len > 9) starts[std::size_t(b * len + 9 - b)] = 1;  // a document start inside the sequence
    }
    batch = nn::Batch{x.data(), y.data(), rows, len, packed ? starts.data() : nullptr};
  }
};

// Every parameter gradient (or value), on the host, in the model's order.
template <class M>
std::vector<double> flat(M& m, bool values = false) {
  std::vector<double> out;
  for (auto* p : m.parameters()) {
    const auto v = to_vector(values ? p->value : p->grad);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

template <class M, class Strategy>
std::vector<double> grads_of(M& m, const nn::Batch& b, const Strategy& s, double& loss,
                             nn::LayerStates<double, M::space>* states = nullptr) {
  m.zero_grad();
  loss = m.forward_backward(b, s, states).loss;
  return flat(m);
}

template <class Layer, Space S>
using LM = nn::Model<Layer, 2, S>;

nn::ModelConfig config(bool bf16 = false) {
  nn::ModelConfig c;
  c.vocab = vocab;
  c.seed = 17;
  c.tie_embeddings = true;
  c.bf16_inputs = bf16;
  return c;
}

// Random initial states for every layer, on the host, and a copy in space S.
template <Space S>
nn::LayerStates<double, S> states_in(const std::vector<Tensor<double>>& h, const std::vector<Tensor<double>>& halo) {
  nn::LayerStates<double, S> st;
  for (const auto& t : h) st.initial.push_back(to_space<S>(t));
  for (const auto& t : halo) st.initial_halo.push_back(to_space<S>(t));
  return st;
}
}  // namespace test_model_space

using namespace test_model_space;

TEST_CASE_TEMPLATE("model space: every strategy agrees on this backend", Layer, Diagonal, MambaSmall, Gated) {
  LM<Layer, space> m(config());
  const Data d(2, 23, true);
  double l_ref = 0, l = 0;
  const auto ref = grads_of(m, d.batch, Backprop{}, l_ref);
  CHECK(std::isfinite(l_ref));
  CHECK(test::max_rel_err(grads_of(m, d.batch, Checkpointed{}, l), ref) <= 1e-10);
  CHECK(std::abs(l - l_ref) <= 1e-12 * std::abs(l_ref));
  for (const auto& cs : {std::pair<index_t, index_t>{1, 1}, {2, 1}, {5, 2}, {7, 64}, {64, 64}}) {
    const index_t chunk = cs.first, shard = cs.second;
    CAPTURE(chunk);
    CAPTURE(shard);
    CHECK(test::max_rel_err(grads_of(m, d.batch, Adjoint{chunk, shard}, l), ref) <= 1e-10);
    CHECK(std::abs(l - l_ref) <= 1e-12 * std::abs(l_ref));
  }
  CHECK(test::max_rel_err(grads_of(m, d.batch, TruncatedAdjoint{64, 4}, l), ref) <= 1e-10);
  CHECK(test::max_rel_err(grads_of(m, d.batch, PaperAdjoint{0}, l), ref) > 1e-3);  // inexact for K = 2, as it must be
}

// The GPU model against the host model. On the CPU build both sides would be the same
// instantiation (a comparison that cannot fail), so these run in the CUDA build only.
#if SSMX_TEST_CUDA
TEST_CASE_TEMPLATE("model space: this backend matches the host model", Layer, Diagonal, MambaSmall, Gated) {
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    LM<Layer, Space::Host> host(config(bf16));
    LM<Layer, space> dev(config(bf16));
    REQUIRE(flat(dev, true) == flat(host, true));  // the same initial values in every space

    const Data d(2, 19, true);
    // Carried-in states for every layer (and the halo rows of a layer with a window).
    constexpr index_t halo = nn::LayerTypes<typename LM<Layer, space>::layer_type>::halo;
    const index_t state = nn::state_numel(Layer::state_dims());
    test::Rng rng(9);
    std::vector<Tensor<double>> h0, halo0;
    for (index_t k = 0; k < 2; ++k) {
      Tensor<double> t(Dims{2, state});
      for (index_t i = 0; i < t.numel(); ++i) t[i] = rng.normal(0, 0.5);
      h0.push_back(std::move(t));
      if constexpr (halo > 0) {
        Tensor<double> r(Dims{2, halo, Layer::d_model});
        for (index_t i = 0; i < r.numel(); ++i) r[i] = rng.normal(0, 1);
        halo0.push_back(std::move(r));
      }
    }
    auto hs = states_in<Space::Host>(h0, halo0);
    auto ds = states_in<space>(h0, halo0);

    auto compare = [&](auto strategy, double tol) {
      double lh = 0, ld = 0;
      const auto gh = grads_of(host, d.batch, strategy, lh, &hs);
      const auto gd = grads_of(dev, d.batch, strategy, ld, &ds);
      CHECK(std::abs(ld - lh) <= tol * std::abs(lh));
      CHECK(test::max_rel_err(gd, gh) <= tol);
      for (index_t k = 0; k < 2; ++k) {
        CHECK(test::max_rel_err(to_vector(ds.final_states[std::size_t(k)]), to_vector(hs.final_states[std::size_t(k)])) <= tol);
        CHECK(test::max_rel_err(to_vector(ds.initial_grad[std::size_t(k)]), to_vector(hs.initial_grad[std::size_t(k)])) <= tol);
        if constexpr (halo > 0)
          CHECK(test::max_rel_err(to_vector(ds.initial_halo_grad[std::size_t(k)]),
                                  to_vector(hs.initial_halo_grad[std::size_t(k)])) <= tol);
      }
    };
    const double tol = 1e-10;
    compare(Adjoint{5, 2}, tol);
    compare(Backprop{}, tol);
    compare(TruncatedAdjoint{6, 4}, tol);
    compare(PaperAdjoint{4}, tol);

    // Forward only: the streamed loss and the logits.
    const double eh = host.evaluate(d.batch, 7).loss, ed = dev.evaluate(d.batch, 7).loss;
    CHECK(std::abs(ed - eh) <= tol * std::abs(eh));
    CHECK(test::max_rel_err(to_vector(dev.logits(d.batch, 4)), to_vector(host.logits(d.batch, 4))) <= tol);
  }
}

TEST_CASE("model space: a train step with AdamW and clipping matches the host") {
  LM<MambaSmall, Space::Host> host(config());
  LM<MambaSmall, space> dev(config());
  AdamW<double, Space::Host> oh(1e-2);
  AdamW<double, space> od(1e-2);
  const Data d(2, 17, true);
  nn::StepOptions so;
  so.clip_norm = 0.5;  // active: the gradient norm of this model is larger
  for (int step = 0; step < 3; ++step) {
    CAPTURE(step);
    const auto rh = nn::train_step(host, oh, d.batch, Adjoint{4, 2}, so);
    const auto rd = nn::train_step(dev, od, d.batch, Adjoint{4, 2}, so);
    CHECK(rh.grad_norm > so.clip_norm);
    CHECK(std::abs(rd.loss - rh.loss) <= 1e-10 * std::abs(rh.loss));
    CHECK(std::abs(rd.grad_norm - rh.grad_norm) <= 1e-10 * rh.grad_norm);
    CHECK(rd.correct == rh.correct);
    CHECK(test::max_rel_err(flat(dev, true), flat(host, true)) <= 1e-10);
  }
}
#endif  // SSMX_TEST_CUDA

#if !SSMX_TEST_CUDA
TEST_CASE("scan layer: the paper's double sum by distance equals the host schedule bit for bit") {
  test::Rng rng(4);
  const index_t n = 29, W = 70;  // more than one block of 64 channels
  Tensor<double> a(Dims{1, n, W}), gh(Dims{1, n, W});
  for (index_t i = 0; i < a.numel(); ++i) {
    a[i] = rng.uniform(0.2, 1.0);
    gh[i] = rng.normal(0, 1);
  }
  for (index_t window : {index_t(0), index_t(1), index_t(3), n, n + 5}) {
    CAPTURE(window);
    Tensor<double> by_token(a.dims()), by_distance(a.dims());
    nn::detail::paper_delta_by_token<double>(a.view(), gh.view(), by_token.view(), window);
    nn::detail::paper_delta_by_distance<double, Space::Host>(a.view(), gh.view(), by_distance.view(), window);
    CHECK(to_vector(by_distance) == to_vector(by_token));
    // Brute force at one token: δ^0 = Σ_{t < w} (Π_{j=1..t} a^j) gh^t.
    const index_t w = window > 0 ? std::min(window, n) : n;
    double want = 0, prod = 1;
    for (index_t t = 0; t < w; ++t) {
      if (t > 0) prod *= a[t * W + 5];
      want += prod * gh[t * W + 5];
    }
    CHECK(by_token[5] == doctest::Approx(want).epsilon(1e-13));
  }
}
#endif
