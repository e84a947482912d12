// Tests of the Mamba layer, the convolution halo, carried states and packed documents
// (host backend).
#include "../support/test_support.hpp"
#include "../support/model_checks.hpp"

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
using test::flat_grads;
using test::grads_of;
using test::max_abs_diff;
using test::perturb;
using test::rel_diff;
using test::Tokens;
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
  test::check_parameter_gradients(m, d.batch(2, len), Backprop{});
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
  MambaModel<double> m({vocab, true, 12});
  perturb(m, 13);
  test::check_split_equals_whole(m);
}

TEST_CASE("mamba: initial-state gradients match central differences") {
  MambaModel<double> m({vocab, true, 17});
  perturb(m, 18);
  test::check_initial_state_gradients(m);
}


TEST_CASE("mamba: packed documents give the gradients of each document alone") {
  MambaModel<double> m({vocab, true, 21});
  perturb(m, 22);
  test::check_packing_equals_separate(m);
}

TEST_CASE("model: packed documents give the gradients of each document alone (DiagonalSSM)") {
  DiagModel<double> m({vocab, false, 23});
  perturb(m, 24);
  test::check_packing_equals_separate(m);
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
