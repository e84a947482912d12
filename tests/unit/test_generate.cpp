// Generation and held-out evaluation: the recurrent step (Model::step, Model::prefill)
// against the parallel forward's logits at every position, for every kind of layer (no
// window, a convolution window, a user's layer), packed documents and prompts longer than a
// chunk; the sampler's support on hand-built distributions; constant memory per token; and
// streamed evaluation against one long forward.
#include "../support/test_support.hpp"

#include <ssmx/nn/evaluate.hpp>
#include <ssmx/nn/model.hpp>
#include <ssmx/nn/sampling.hpp>

#include "../../examples/custom_layer.hpp"

namespace test_generate {
using namespace ssmx;
using nn::token_t;
using test::space;

using GenDiagonal = nn::DiagonalSSM<double, 8, 4>;
using GenMamba = nn::Mamba<double, 8, 4, 2, 4, 2>;  // a window of 4 tokens: a halo of 3
using GenGated = GatedSSM<double, 8, 3>;              // examples/custom_layer.hpp
using GenMamba2 = nn::Mamba2<double, 8, 4, 4, 2, 2, 4>;  // 4 heads in 2 groups, a halo of 3
constexpr index_t gen_vocab = 13;
// Logits compare relative to their size, down to this one: a logit that happens to lie near
// zero (4.8e-7 in one Mamba2 case) holds only absolute rounding (1e-16), which 1e-10
// relative to it would not allow.
constexpr double gen_floor = 1e-6;

template <class Layer>
using GenLM = nn::Model<Layer, 2, space>;

template <class Layer>
GenLM<Layer> gen_model(bool tied = true) {
  nn::ModelConfig c;
  c.vocab = gen_vocab;
  c.seed = 23;
  c.tie_embeddings = tied;
  GenLM<Layer> m(c);
  // Larger than the initialisation so that every logit depends visibly on the state.
  test::Rng rng(4);
  for (auto* p : m.parameters()) {
    Tensor<double> v = test::to_host(p->value);
    for (index_t i = 0; i < v.numel(); ++i) v[i] += rng.normal(0, 0.05);
    const Tensor<double, space> d = test::to_space(v);
    copy<double>(p->value.view(), d.view());
  }
  return m;
}

struct GenTokens {
  index_t B, T;
  std::vector<token_t> x;
  std::vector<std::uint8_t> starts;
  GenTokens(index_t b, index_t t, std::uint64_t seed = 3) : B(b), T(t), x(std::size_t(b * t)), starts(x.size(), 0) {
    test::Rng rng(seed);
    for (auto& v : x) v = token_t(rng.integer(0, gen_vocab - 1));
  }
  token_t at(index_t b, index_t t) const { return x[std::size_t(b * T + t)]; }
};

// The parallel forward's logits, [B, T, vocab], on the host.
template <class M>
Tensor<double> gen_parallel_logits(M& m, const GenTokens& tk, bool packed, index_t chunk = 1024) {
  nn::Batch b{tk.x.data(), nullptr, tk.B, tk.T, packed ? tk.starts.data() : nullptr};
  std::vector<token_t> none(tk.x.size(), -1);
  b.targets = none.data();
  return test::to_host(m.logits(b, chunk));
}

// Step logits [B, vocab] against the parallel ones at position t.
double gen_step_error(const Tensor<double>& step, const Tensor<double>& par, index_t t, index_t T) {
  std::vector<double> a, b;
  for (index_t s = 0; s < step.extent(0); ++s)
    for (index_t v = 0; v < gen_vocab; ++v) {
      a.push_back(step(s, v));
      b.push_back(par[(s * T + t) * gen_vocab + v]);
    }
  return test::max_rel_err(a, b, gen_floor);
}

// Stepping every sequence from its first token, [B] tokens a step, against the parallel forward.
template <class M>
double gen_step_all(M& m, const GenTokens& tk, bool packed) {
  const Tensor<double> par = gen_parallel_logits(m, tk, packed);
  auto ds = m.decode_state(tk.B);
  double worst = 0;
  std::vector<token_t> col(std::size_t(tk.B));
  std::vector<std::uint8_t> st(std::size_t(tk.B));
  for (index_t t = 0; t < tk.T; ++t) {
    for (index_t b = 0; b < tk.B; ++b) {
      col[std::size_t(b)] = tk.at(b, t);
      st[std::size_t(b)] = tk.starts[std::size_t(b * tk.T + t)];
    }
    const Tensor<double> lg = test::to_host(m.step(col.data(), ds, packed ? st.data() : nullptr));
    worst = std::max(worst, gen_step_error(lg, par, t, tk.T));
  }
  return worst;
}
}  // namespace test_generate

using namespace test_generate;

TEST_CASE_TEMPLATE("generate: step logits equal the parallel forward at every position", Layer, GenDiagonal,
                   GenMamba, GenGated, GenMamba2) {
  for (bool tied : {true, false}) {
    CAPTURE(tied);
    auto m = gen_model<Layer>(tied);
    const GenTokens tk(3, 29);
    CHECK(gen_step_all(m, tk, false) <= 1e-10);
  }
}

TEST_CASE_TEMPLATE("generate: step cuts state and window at packed document starts", Layer, GenDiagonal, GenMamba,
                   GenGated, GenMamba2) {
  auto m = gen_model<Layer>();
  GenTokens tk(3, 31);
  // Starts at different places per sequence, two within one window's reach of each other.
  for (index_t t : {0, 5, 7, 20}) tk.starts[std::size_t(0 * tk.T + t)] = 1;
  for (index_t t : {0, 1, 2, 17}) tk.starts[std::size_t(1 * tk.T + t)] = 1;
  for (index_t t : {3, 29}) tk.starts[std::size_t(2 * tk.T + t)] = 1;
  CHECK(gen_step_all(m, tk, true) <= 1e-10);
  // The starts matter: without them the logits differ.
  const Tensor<double> packed = gen_parallel_logits(m, tk, true), plain = gen_parallel_logits(m, tk, false);
  CHECK(test::max_rel_err(to_vector(packed), to_vector(plain)) > 1e-3);
}

TEST_CASE_TEMPLATE("generate: prefill over several chunks then step equals the parallel forward", Layer, GenDiagonal,
                   GenMamba, GenGated, GenMamba2) {
  auto m = gen_model<Layer>();
  GenTokens tk(2, 40);
  tk.starts[std::size_t(0 * tk.T + 0)] = 1;
  tk.starts[std::size_t(0 * tk.T + 21)] = 1;  // a document starts one token before the second prefill
  tk.starts[std::size_t(1 * tk.T + 12)] = 1;
  const Tensor<double> par = gen_parallel_logits(m, tk, true);
  auto ds = m.decode_state(tk.B);
  // Sequence b: tokens [0, 22) in one prefill of chunks of 5, [22, 30) in a second one, the
  // rest stepped (sequence 1 with its rows prefilled in the opposite order of calls).
  for (index_t b : {1, 0}) {
    const token_t* x = tk.x.data() + b * tk.T;
    const std::uint8_t* s = tk.starts.data() + b * tk.T;
    const Tensor<double> l1 = test::to_host(m.prefill(x, 22, ds, b, 5, s));
    const Tensor<double> l2 = test::to_host(m.prefill(x + 22, 8, ds, b, 5, s + 22));
    std::vector<double> got, want;
    for (index_t v = 0; v < gen_vocab; ++v) {
      got.push_back(l1[v]);
      want.push_back(par[(b * tk.T + 21) * gen_vocab + v]);
    }
    CHECK(test::max_rel_err(got, want, gen_floor) <= 1e-10);
    got.clear(), want.clear();
    for (index_t v = 0; v < gen_vocab; ++v) {
      got.push_back(l2[v]);
      want.push_back(par[(b * tk.T + 29) * gen_vocab + v]);
    }
    CHECK(test::max_rel_err(got, want, gen_floor) <= 1e-10);
  }
  std::vector<token_t> col(2);
  std::vector<std::uint8_t> st(2);
  for (index_t t = 30; t < tk.T; ++t) {
    for (index_t b = 0; b < 2; ++b) {
      col[std::size_t(b)] = tk.at(b, t);
      st[std::size_t(b)] = tk.starts[std::size_t(b * tk.T + t)];
    }
    CHECK(gen_step_error(test::to_host(m.step(col.data(), ds, st.data())), par, t, tk.T) <= 1e-10);
  }
}

TEST_CASE("generate: bad tokens and foreign decode states are named") {
  auto m = gen_model<GenMamba>();
  auto ds = m.decode_state(2);
  const token_t bad[2] = {1, token_t(gen_vocab)};
  CHECK_THROWS_WITH_AS(m.step(bad, ds), doctest::Contains("tokens[1] = 13 is outside the vocabulary"), ValueError);
  nn::DecodeState<double, space> empty;
  const token_t ok[2] = {1, 2};
  CHECK_THROWS_WITH_AS(m.step(ok, empty), doctest::Contains("make it with decode_state"), ValueError);
  auto other = gen_model<GenDiagonal>().decode_state(2);  // another layer's state: [2, 32], not [2, 64]
  CHECK_THROWS_WITH_AS(m.step(ok, other), doctest::Contains("decode state"), ShapeError);
  CHECK_THROWS_WITH_AS(m.prefill(ok, 0, ds), doctest::Contains("the prompt is empty"), ValueError);
  CHECK_THROWS_WITH_AS(m.prefill(ok, 2, ds, 2), doctest::Contains("sequence 2 of a decode state for 2"), ValueError);
}

TEST_CASE("generate: memory per token is constant") {
  auto m = gen_model<GenMamba>();
  auto ds = m.decode_state(2);
  std::vector<token_t> tok{1, 2};
  auto run = [&](index_t n) {
    reset_peak(space);
    const std::size_t before = memory_stats(space).current;
    for (index_t i = 0; i < n; ++i) {
      const Tensor<double> lg = test::to_host(m.step(tok.data(), ds));
      tok[0] = token_t((tok[0] + 1) % gen_vocab);
      tok[1] = token_t(lg(1, 0) > lg(1, 1) ? 3 : 4);
    }
    return memory_stats(space).peak - before;
  };
  // The state: h ([B, E, N]) and the window (halo rows of d_model) of each of the 2 layers.
  CHECK(ds.bytes() == 2 * std::size_t(2 * (16 * 4 + 3 * 8)) * sizeof(double));
  const std::size_t p100 = run(100);
#if defined(__SANITIZE_ADDRESS__)
  const index_t many = 5000;  // the sanitizer build looks for memory errors; Release runs the full length
#else
  const index_t many = 100000;
#endif
  const std::size_t p_many = run(many);
  CHECK(p100 > 0);
  CHECK(p_many == p100);
}

TEST_CASE("generate: streamed evaluation equals one long forward") {
  auto m = gen_model<GenMamba>();
  const GenTokens tk(1, 300, 8);
  nn::Batch whole{tk.x.data(), tk.x.data() + 1, 1, tk.T - 1, nullptr};
  const nn::StepResult ref = m.evaluate(whole, 64);
  for (index_t window : {1, 7, 64, 299, 1000}) {
    CAPTURE(window);
    const nn::HeldOut r = nn::evaluate_tokens(m, tk.x.data(), tk.T, window, 16);
    CHECK(r.tokens == tk.T - 1);
    CHECK(r.correct == ref.correct);
    CHECK(std::abs(r.loss - ref.loss) <= 1e-12 * std::abs(ref.loss));
    CHECK(std::abs(r.perplexity() - std::exp(ref.loss / double(tk.T - 1))) <= 1e-10 * r.perplexity());
    CHECK(std::abs(r.bits_per_byte() * std::log(2.0) - r.mean_loss()) <= 1e-14 * r.mean_loss());
  }
  CHECK_THROWS_WITH_AS(nn::evaluate_tokens(m, tk.x.data(), 1), doctest::Contains("hold no prediction"), ValueError);
}

#if !SSMX_TEST_CUDA
TEST_CASE("generate: sampling keeps exactly the support it should") {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 at tokens 2, 0, 4, 1, 3 (logits = log p).
  const std::vector<double> p{0.3, 0.1, 0.4, 0.05, 0.15};
  std::vector<double> logits;
  for (double v : p) logits.push_back(std::log(v));
  auto support = [&](const nn::SamplingConfig& c) {
    std::vector<token_t> ids;
    for (const auto& e : nn::sampling_distribution(logits.data(), 5, c)) ids.push_back(e.first);
    return ids;
  };
  CHECK(support({1.0, 0, 1.0}) == std::vector<token_t>{2, 0, 4, 1, 3});
  CHECK(support({1.0, 2, 1.0}) == std::vector<token_t>{2, 0});
  CHECK(support({1.0, 0, 0.7}) == std::vector<token_t>{2, 0});        // 0.4 + 0.3 reaches 0.7
  CHECK(support({1.0, 0, 0.71}) == std::vector<token_t>{2, 0, 4});    // ... and 0.71 needs the third
  CHECK(support({1.0, 0, 0.01}) == std::vector<token_t>{2});          // at least one token
  CHECK(support({1.0, 4, 0.9}) == std::vector<token_t>{2, 0, 4, 1});  // top-k first, then top-p of the rest
  CHECK(support({0.0, 0, 1.0}) == std::vector<token_t>{2});           // temperature 0: the argmax
  const auto d = nn::sampling_distribution(logits.data(), 5, {1.0, 2, 1.0});
  CHECK(d[0].second == doctest::Approx(0.4 / 0.7).epsilon(1e-14));
  CHECK(d[1].second == doctest::Approx(0.3 / 0.7).epsilon(1e-14));
  // Temperature 2 flattens: p ∝ sqrt(p).
  const auto t2 = nn::sampling_distribution(logits.data(), 5, {2.0, 0, 1.0});
  double z = 0;
  for (double v : p) z += std::sqrt(v);
  CHECK(t2[0].second == doctest::Approx(std::sqrt(0.4) / z).epsilon(1e-14));
  // Ties go to the lower id.
  const std::vector<double> flat{1.0, 3.0, 3.0, 0.0};
  CHECK(nn::sampling_distribution(flat.data(), 4, {0.0, 0, 1.0})[0].first == 1);
  CHECK(nn::sampling_distribution(flat.data(), 4, {1.0, 1, 1.0})[0].first == 1);

  // Draws: reproducible from the seed, inside the support, frequencies near the probabilities.
  nn::Sampler a({1.0, 3, 1.0}, 42), b({1.0, 3, 1.0}, 42), c({1.0, 3, 1.0}, 43);
  std::vector<int> count(5, 0);
  bool same = true, differ = false;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const token_t x = a(logits.data(), 5), y = b(logits.data(), 5), z2 = c(logits.data(), 5);
    same = same && x == y;
    differ = differ || x != z2;
    ++count[std::size_t(x)];
  }
  CHECK(same);
  CHECK(differ);
  CHECK(count[1] == 0);
  CHECK(count[3] == 0);
  const double kept = 0.4 + 0.3 + 0.15;
  CHECK(std::abs(count[2] / double(n) - 0.4 / kept) < 0.02);
  CHECK(std::abs(count[0] / double(n) - 0.3 / kept) < 0.02);
  CHECK(std::abs(count[4] / double(n) - 0.15 / kept) < 0.02);
  nn::Sampler greedy({0.0, 0, 1.0}, 1);
  for (int i = 0; i < 10; ++i) CHECK(greedy(logits.data(), 5) == 2);

  CHECK_THROWS_WITH_AS(nn::Sampler({-1.0, 0, 1.0}), doctest::Contains("temperature must be finite and >= 0"), ValueError);
  CHECK_THROWS_WITH_AS(nn::Sampler({1.0, -2, 1.0}), doctest::Contains("top_k must be >= 0"), ValueError);
  CHECK_THROWS_WITH_AS(nn::Sampler({1.0, 0, 0.0}), doctest::Contains("top_p must be in (0, 1]"), ValueError);
  const std::vector<double> nan{0.0, std::nan("")};
  CHECK_THROWS_WITH_AS(greedy(nan.data(), 2), doctest::Contains("logit 1 is NaN"), ValueError);
}
#endif
