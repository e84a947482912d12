// Train a user-defined selective SSM (examples/custom_layer.hpp) with the exact adjoint
// backward: the layer is three expressions, everything else comes from ssmx.
#include <cstdio>
#include <random>

#include "custom_layer.hpp"

int main() {
  using namespace ssmx;
  using LM = nn::Model<GatedSSM<float, 32, 8>, 2>;
  data::RecallTask task;
  task.query_every = 32;
  const index_t context = 512, steps = 60;
  LM model({task.vocab(), true, 7});
  AdamW<float> opt(3e-3, 0.9, 0.99, 1e-8, 0.0);
  std::mt19937_64 rng(1);
  std::vector<nn::token_t> x(static_cast<std::size_t>(context)), y(x.size());
  for (index_t step = 1; step <= steps; ++step) {
    task.sample(rng, context, x.data(), y.data());
    auto r = nn::train_step(model, opt, nn::Batch{x.data(), y.data(), 1, context}, Adjoint{128, 32});
    if (step % 10 == 0) std::printf("step %3ld  loss %.4f  grad_norm %.3f\n", long(step), r.mean_loss(), r.grad_norm);
  }
  return 0;
}
