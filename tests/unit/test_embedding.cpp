// Tests of nn::Embedding (gather forward, deterministic scatter-add backward) and
// nn::count_correct, in the test space, compared on the host with plain loops.
#include "support/test_support.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace test_embedding {

using namespace ssmx;
using nn::token_t;
using ssmx::test::contains;
using ssmx::test::message_of;

constexpr Space S = ssmx::test::space;

// dst (in the test space) = src (host), same shape.
template <class T>
void upload(Tensor<T, S>& dst, const Tensor<T>& src) {
  copy<T>(dst.view(), src.view());
}

// n ids drawn from [0, vocab) (many repeats when n > vocab).
inline std::vector<token_t> random_ids(index_t n, index_t vocab, std::uint64_t seed) {
  ssmx::test::Rng rng(seed);
  std::vector<token_t> ids(static_cast<std::size_t>(n));
  for (auto& t : ids) t = token_t(rng.integer(0, vocab - 1));
  return ids;
}

// The host loop the model used: the first index of the largest logit.
template <class T>
index_t first_argmax(const T* row, index_t V) {
  index_t best = 0;
  for (index_t v = 1; v < V; ++v)
    if (row[v] > row[best]) best = v;
  return best;
}

template <class T>
index_t reference_count(const Tensor<T>& logits, const std::vector<token_t>& targets) {
  const index_t V = logits.extent(1);
  index_t correct = 0;
  for (std::size_t t = 0; t < targets.size(); ++t)
    if (targets[t] >= 0 && first_argmax(logits.data() + index_t(t) * V, V) == index_t(targets[t])) ++correct;
  return correct;
}

// count_correct on a copy of host logits in the test space.
template <class T>
index_t count_in_space(const Tensor<T>& logits, const std::vector<token_t>& targets) {
  const Tensor<T, S> d = ssmx::test::to_space(logits);
  return nn::count_correct(d.view(), targets.data());
}

// weight.grad after backward from a given starting gradient, as host bytes.
template <class T>
std::vector<T> backward_grad(const Tensor<T>& grad0, const std::vector<token_t>& ids, TensorView<const T, S> g) {
  nn::Embedding<T, S> emb("emb", grad0.extent(0), grad0.extent(1));
  upload(emb.weight.grad, grad0);
  emb.backward(ids.data(), index_t(ids.size()), g);
  return to_vector(emb.weight.grad);
}

}  // namespace test_embedding

TEST_CASE("embedding: group_by_token lists positions by token in increasing order") {
  using namespace test_embedding;
  const std::vector<token_t> ids{3, 1, 3, 0, 1, 3};
  const nn::TokenGroups g = nn::group_by_token(ids.data(), index_t(ids.size()), 5);
  CHECK(g.groups() == 3);
  CHECK(g.token == std::vector<index_t>{0, 1, 3});
  CHECK(g.offset == std::vector<index_t>{0, 1, 3, 6});
  CHECK(g.position == std::vector<index_t>{3, 1, 4, 0, 2, 5});
  const nn::TokenGroups none = nn::group_by_token(ids.data(), 0, 5);
  CHECK(none.groups() == 0);
  CHECK(none.offset == std::vector<index_t>{0});
  CHECK(none.position.empty());
}

TEST_CASE("embedding: forward gathers the rows of the tokens") {
  using namespace test_embedding;
  const index_t vocab = 7, d = 45;  // d spans two column tiles of 32 threads on the GPU
  const auto table = ssmx::test::uniform<double>(Dims{vocab, d}, 11);
  nn::Embedding<double, S> emb("embedding.weight", vocab, d);
  CHECK(emb.vocab() == vocab);
  CHECK(emb.d_model() == d);
  CHECK(emb.weight.name == "embedding.weight");
  upload(emb.weight.value, table);
  CHECK(to_vector(emb.weight.grad) == std::vector<double>(std::size_t(vocab * d), 0.0));

  const std::vector<token_t> ids{6, 0, 3, 3, 1, 6, 2, 5, 4, 0};
  const index_t n = index_t(ids.size());
  Tensor<double, S> out(Dims{n, d});
  emb.forward(ids.data(), n, out.view());
  const auto h = ssmx::test::to_host(out);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) REQUIRE(h(t, j) == table(index_t(ids[std::size_t(t)]), j));

  emb.forward(ids.data(), 0, out.view().slice(0, 0));  // no tokens: nothing to do
}

TEST_CASE("embedding: forward writes strided output rows and leaves the rest") {
  using namespace test_embedding;
  const index_t vocab = 5, d = 300, pad = 7, n = 9;  // d: two tiles of 256 threads on the GPU
  const auto table = ssmx::test::normal<float>(Dims{vocab, d}, 12);
  nn::Embedding<float, S> emb("e", vocab, d);
  upload(emb.weight.value, table);
  const float sentinel = -1234.5f;
  Tensor<float> init(Dims{n, d + pad});
  fill<float>(init, sentinel);
  Tensor<float, S> wide = ssmx::test::to_space(init);
  const std::vector<token_t> ids = random_ids(n, vocab, 13);
  const TensorView<float, S> rows = wide.view().slice(1, 3, 3 + d);  // row stride d + pad
  CHECK(rows.stride(0) == d + pad);
  emb.forward(ids.data(), n, rows);
  const auto h = ssmx::test::to_host(wide);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d + pad; ++j) {
      const float want = (j >= 3 && j < 3 + d) ? table(index_t(ids[std::size_t(t)]), j - 3) : sentinel;
      REQUIRE(h(t, j) == want);
    }
}

TEST_CASE("embedding: backward sums repeated tokens like the host loop bit for bit") {
  using namespace test_embedding;
  const index_t vocab = 6, d = 37, n = 200;  // ~33 repeats per token; d not a multiple of 32
  const auto grad0 = ssmx::test::uniform<float>(Dims{vocab, d}, 21);
  const auto g_host = ssmx::test::normal<float>(Dims{n, d}, 22);
  std::vector<token_t> ids = random_ids(n, vocab - 1, 23);  // token vocab-1 never occurs
  ids[7] = 0;
  const Tensor<float, S> g = ssmx::test::to_space(g_host);

  const std::vector<float> got = backward_grad<float>(grad0, ids, g.view());

  // Float, in token order: what the host loop computes; the device must agree exactly.
  std::vector<float> loop(grad0.data(), grad0.data() + grad0.numel());
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) loop[std::size_t(ids[std::size_t(t)] * d + j)] += g_host(t, j);
  CHECK(ssmx::test::bytes_of(got.data(), vocab * d) == ssmx::test::bytes_of(loop.data(), vocab * d));

  // Double precision: the sums are right.
  std::vector<double> ref(grad0.data(), grad0.data() + grad0.numel());
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) ref[std::size_t(ids[std::size_t(t)] * d + j)] += double(g_host(t, j));
  CHECK(ssmx::test::max_rel_err(got, ref, 1.0) < 1e-5);  // absolute below 1: the sums cancel
  for (index_t j = 0; j < d; ++j) CHECK(got[std::size_t((vocab - 1) * d + j)] == grad0(vocab - 1, j));  // untouched

  // Run to run: bit-identical.
  const std::vector<float> again = backward_grad<float>(grad0, ids, g.view());
  CHECK(ssmx::test::bytes_of(again.data(), vocab * d) == ssmx::test::bytes_of(got.data(), vocab * d));
}

TEST_CASE("embedding: backward reads strided gradient rows and is deterministic at scale") {
  using namespace test_embedding;
  const index_t vocab = 50, d = 300, n = 2000, pad = 5;
  const Tensor<double> grad0 = zeros<double>(Dims{vocab, d});
  const auto wide_host = ssmx::test::normal<double>(Dims{n, d + pad}, 31);
  const std::vector<token_t> ids = random_ids(n, vocab, 32);
  const Tensor<double, S> wide = ssmx::test::to_space(wide_host);
  const TensorView<const double, S> g = wide.view().slice(1, pad, pad + d);

  const std::vector<double> got = backward_grad<double>(grad0, ids, g);
  std::vector<double> loop(std::size_t(vocab * d), 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) loop[std::size_t(ids[std::size_t(t)] * d + j)] += wide_host(t, pad + j);
  CHECK(ssmx::test::bytes_of(got.data(), vocab * d) == ssmx::test::bytes_of(loop.data(), vocab * d));
  const std::vector<double> again = backward_grad<double>(grad0, ids, g);
  CHECK(ssmx::test::bytes_of(again.data(), vocab * d) == ssmx::test::bytes_of(got.data(), vocab * d));
}

TEST_CASE("embedding: token ids outside the vocabulary are named by index") {
  using namespace test_embedding;
  nn::Embedding<float, S> emb("e", 5, 4);
  Tensor<float, S> out(Dims{3, 4});
  const Tensor<float, S> g = zeros<float, S>(Dims{3, 4});
  const std::vector<token_t> high{1, 2, 9}, negative{-1, 0, 0}, ok{0, 4, 2};

  std::string m = message_of<ValueError>([&] { emb.forward(high.data(), 3, out.view()); });
  CHECK(contains(m, "tokens[2] = 9 is outside the vocabulary [0, 5)"));
  m = message_of<ValueError>([&] { emb.forward(negative.data(), 3, out.view()); });
  CHECK(contains(m, "tokens[0] = -1 is outside the vocabulary [0, 5)"));
  m = message_of<ValueError>([&] { emb.backward(high.data(), 3, g.view()); });
  CHECK(contains(m, "tokens[2] = 9"));
  CHECK(to_vector(emb.weight.grad) == std::vector<float>(20, 0.0f));  // nothing was added

  m = message_of<ShapeError>([&] { emb.forward(ok.data(), 2, out.view()); });
  CHECK(contains(m, "embedding output"));
  m = message_of<ShapeError>([&] { emb.backward(ok.data(), 2, g.view()); });
  CHECK(contains(m, "embedding gradient"));
}

TEST_CASE("embedding: column-strided rows work on the host and are refused on the GPU") {
  using namespace test_embedding;
  const index_t vocab = 4, d = 3, n = 2;
  const auto table = ssmx::test::uniform<float>(Dims{vocab, d}, 41);
  nn::Embedding<float, S> emb("e", vocab, d);
  upload(emb.weight.value, table);
  Tensor<float, S> buf = zeros<float, S>(Dims{n, 2 * d});
  const TensorView<float, S> every_other(buf.data(), Dims{n, d}, {2 * d, 2, 0, 0});
  const std::vector<token_t> ids{3, 1};
#if !SSMX_TEST_CUDA
  emb.forward(ids.data(), n, every_other);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) {
      CHECK(buf(t, 2 * j) == table(index_t(ids[std::size_t(t)]), j));
      CHECK(buf(t, 2 * j + 1) == 0.0f);
    }
  emb.backward(ids.data(), n, every_other);
  for (index_t j = 0; j < d; ++j) CHECK(emb.weight.grad(3, j) == table(3, j));
  const std::vector<token_t> targets{token_t(first_argmax(&table(3, 0), d)), -1};
  CHECK(nn::count_correct(every_other, targets.data()) == 1);
#else
  const std::vector<token_t> targets{0, -1};
  CHECK(contains(message_of<ShapeError>([&] { emb.forward(ids.data(), n, every_other); }), "unit column stride"));
  CHECK(contains(message_of<ShapeError>([&] { emb.backward(ids.data(), n, every_other); }), "unit column stride"));
  CHECK(contains(message_of<ShapeError>([&] { (void)nn::count_correct(every_other, targets.data()); }),
                 "unit column stride"));
#endif
}

TEST_CASE("embedding: count_correct takes the first maximum and skips ignored rows") {
  using namespace test_embedding;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  // Row by row: logits, target, and whether the target is the first arg-max.
  const std::vector<std::vector<float>> rows{
      {1, 3, 3, 0},              // tie: the first maximum, 1
      {1, 3, 3, 0},              // ... so 2 is wrong
      {5, 5, 5, 5},              // all equal: 0
      {0, 1, 2, 9},              // clear maximum at the end
      {0, 1, 2, 9},              // ignored (-1), though 3 would be right
      {-inf, -inf, -inf, -inf},  // nothing beats the first: 0
      {-0.0f, 0.0f, -1, -2},     // -0 == +0: the first, 0
      {nan, 5, 1, 2},            // NaN first: nothing is greater, 0
      {1, nan, 3, 2},            // NaN elsewhere never wins: 2
      {2, nan, 1, nan},          // 0
      {nan, nan, nan, nan},      // 0
      {1, inf, inf, 2},          // 1
  };
  const std::vector<token_t> targets{1, 2, 0, 3, -1, 0, 0, 0, 2, 0, 0, 1};
  const index_t want = 10;  // every row but the second and the ignored one
  const index_t n = index_t(rows.size()), V = 4;
  Tensor<float> logits(Dims{n, V});
  for (index_t t = 0; t < n; ++t)
    for (index_t v = 0; v < V; ++v) logits(t, v) = rows[std::size_t(t)][std::size_t(v)];
  CHECK(reference_count(logits, targets) == want);
  CHECK(count_in_space(logits, targets) == want);

  // Each row alone, so a wrong row is named.
  for (index_t t = 0; t < n; ++t) {
    Tensor<float> one(Dims{1, V});
    std::copy_n(&logits(t, 0), V, one.data());
    const std::vector<token_t> target{targets[std::size_t(t)]};
    CAPTURE(t);
    CHECK(count_in_space(one, target) == reference_count(one, target));
  }

  // All targets ignored; no rows.
  CHECK(count_in_space(logits, std::vector<token_t>(std::size_t(n), -1)) == 0);
  const Tensor<float, S> empty = zeros<float, S>(Dims{0, V});
  CHECK(nn::count_correct(empty, targets.data()) == 0);
}

TEST_CASE("embedding: count_correct with a single class") {
  using namespace test_embedding;
  const index_t n = 5;
  const auto logits = ssmx::test::normal<float>(Dims{n, 1}, 51);
  const std::vector<token_t> targets{0, -1, 0, 0, -1};
  CHECK(count_in_space(logits, targets) == 3);
  CHECK(reference_count(logits, targets) == 3);
}

TEST_CASE("embedding: count_correct checks targets and accepts every view") {
  using namespace test_embedding;
  const index_t n = 3, V = 4;
  const auto h = ssmx::test::uniform<float>(Dims{n, V}, 61);
  Tensor<float, S> logits = ssmx::test::to_space(h);
  const std::vector<token_t> bad{0, 4, 1}, worse{0, -2, 1};
  CHECK(contains(message_of<ValueError>([&] { (void)nn::count_correct(logits, bad.data()); }),
                 "targets[1] = 4 is outside the vocabulary [0, 4)"));
  CHECK(contains(message_of<ValueError>([&] { (void)nn::count_correct(logits, worse.data()); }), "targets[1] = -2"));

  std::vector<token_t> right(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) right[std::size_t(t)] = token_t(first_argmax(&h(t, 0), V));
  const TensorView<float, S> mut = logits.view();
  const TensorView<const float, S> cview = logits.view();
  CHECK(nn::count_correct(mut, right.data()) == n);
  CHECK(nn::count_correct(cview, right.data()) == n);
  CHECK(nn::count_correct(logits, right.data()) == n);
  CHECK(nn::count_correct<float, S>(cview.slice(1, 3), right.data() + 1) == 2);
  const Tensor<float> h_flat = zeros<float>(Dims{n, 0});
  const std::vector<token_t> none(std::size_t(n), -1);
  CHECK(count_in_space(h_flat, none) == 0);
}

TEST_CASE("embedding: count_correct on large random logits agrees with the host loop") {
  using namespace test_embedding;
  struct Case {
    index_t n, V, pad;
    bool ties;  // small integers: many equal maxima per row
  };
  // Many passes per thread (V = 50000); more rows than the GPU grid (n = 600000, V = 3);
  // a row stride larger than V.
  const Case cases[] = {{40, 50000, 0, true}, {40, 50000, 0, false}, {1000, 777, 13, true}, {600000, 3, 0, true}};
  for (const Case& c : cases) {
    CAPTURE(c.n);
    CAPTURE(c.V);
    ssmx::test::Rng rng(71 + std::uint64_t(c.V));
    Tensor<float> wide(Dims{c.n, c.V + c.pad});
    for (index_t i = 0; i < wide.numel(); ++i) wide[i] = c.ties ? float(rng.integer(0, 20)) : float(rng.normal());
    Tensor<float> logits(Dims{c.n, c.V});
    copy<float>(logits.view(), TensorView<const float>(wide.view().slice(1, 0, c.V)));
    // Half the targets right, a quarter random, a quarter ignored.
    std::vector<token_t> targets(std::size_t(c.n));
    for (index_t t = 0; t < c.n; ++t) {
      const auto kind = rng.integer(0, 3);
      targets[std::size_t(t)] = kind < 2    ? token_t(first_argmax(&logits(t, 0), c.V))
                                : kind == 2 ? token_t(rng.integer(0, c.V - 1))
                                            : token_t(-1);
    }
    const index_t want = reference_count(logits, targets);
    CHECK(want > c.n / 3);
    const Tensor<float, S> d_wide = ssmx::test::to_space(wide);
    CHECK(nn::count_correct(TensorView<const float, S>(d_wide.view().slice(1, 0, c.V)), targets.data()) == want);
  }
}

TEST_CASE("embedding: one_hot marks each target and leaves ignored rows zero") {
  using namespace test_embedding;
  const std::vector<token_t> targets = {2, -1, 0, 4, 4, -1, 1};
  const index_t n = index_t(targets.size()), V = 5;
  const auto oh = test::to_host(nn::one_hot<double, test::space>(targets.data(), n, V));
  REQUIRE(oh.dims() == Dims{n, V});
  for (index_t t = 0; t < n; ++t)
    for (index_t v = 0; v < V; ++v) CHECK(oh(t, v) == (targets[std::size_t(t)] == token_t(v) ? 1.0 : 0.0));
  const std::vector<token_t> bad = {1, 5};
  CHECK(contains(message_of<ValueError>([&] { (void)nn::one_hot<float, test::space>(bad.data(), 2, V); }),
                 "targets[1] = 5 is outside the vocabulary [0, 5)"));
}
