// Tests of the initial values: a fresh model predicts close to uniformly, so training
// starts at chance (loss ≈ ln(vocab)) for the trainer's presets (examples/train.cpp) and
// the README's model, tied or untied (host backend).
#include "../support/test_support.hpp"

#if !SSMX_TEST_CUDA
#include <cmath>
#include <string>

namespace test_init {
using namespace ssmx;

// The mean loss of a fresh model (vocab 256, seed 1) on random tokens, against ln(vocab).
template <class Layer, index_t K>
void check_starts_at_chance(const std::string& name) {
  const index_t vocab = 256, rows = 2, len = 48;
  test::Rng rng(7);
  std::vector<nn::token_t> x(std::size_t(rows * len)), y(x.size());
  for (auto& t : x) t = nn::token_t(rng.integer(0, vocab - 1));
  for (auto& t : y) t = nn::token_t(rng.integer(0, vocab - 1));
  for (bool tied : {true, false}) {
    nn::Model<Layer, K> model({vocab, tied, 1});
    const double loss = model.evaluate(nn::Batch{x.data(), y.data(), rows, len}, 16).mean_loss();
    const double ratio = loss / std::log(double(vocab));
    const std::string what = name + (tied ? " (tied head)" : " (untied head)");
    MESSAGE(what, ": first loss ", loss, " = ", ratio, " × ln(vocab)");
    INFO(what, ": first loss ", loss, " against ln(vocab) = ", std::log(double(vocab)));
    CHECK(ratio < 1.05);
    CHECK(ratio > 0.95);
  }
}
}  // namespace test_init

TEST_CASE("init: a fresh model starts within 5 percent of ln(vocab) for every trainer preset") {
  using test_init::check_starts_at_chance;
  namespace nn = ssmx::nn;
  check_starts_at_chance<nn::DiagonalSSM<float, 64, 16>, 2>("diagonal-small");
  check_starts_at_chance<nn::DiagonalSSM<float, 256, 16>, 8>("diagonal-base (and the README's model)");
  check_starts_at_chance<nn::Mamba<float, 64, 16, 2, 4>, 2>("mamba-tiny");
  check_starts_at_chance<nn::Mamba<float, 768, 16, 2, 4>, 24>("mamba-130m");
  check_starts_at_chance<nn::Mamba2<float, 64, 16, 16, 1, 2, 4>, 2>("mamba2-tiny");
  check_starts_at_chance<nn::Mamba2<float, 768, 128, 64, 1, 2, 4>, 24>("mamba2-130m");
}
#endif
