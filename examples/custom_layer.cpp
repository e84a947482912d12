// Train a user-defined selective SSM (examples/custom_layer.hpp) with the exact adjoint
// backward on the key-value recall task, and tell whether it learns: the accuracy on fresh
// sequences against chance (1 / values). The layer is three expressions; everything else
// comes from ssmx. A layer that cannot carry the bound value across the context stays near
// chance; this one reaches 1.000 (chance 0.062) within 800 steps, a few seconds on one core.
#include <cstdio>
#include <random>
#include <vector>

#include "custom_layer.hpp"

int main() {
  using namespace ssmx;
  using LM = nn::Model<GatedSSM<float, 32, 8>, 2>;
  data::RecallTask task;  // one key-value binding at the start, then a query every 16 tokens
  task.query_every = 16;
  const index_t context = 128, steps = 800;
  task.validate(context);
  LM model({task.vocab(), true, 7});
  AdamW<float> opt(1e-2, 0.9, 0.99, 1e-8, 0.0);
  WarmupCosine schedule(20, steps, 1e-2, 1e-3);
  std::mt19937_64 rng(1);
  std::vector<nn::token_t> x(static_cast<std::size_t>(context)), y(x.size());
  index_t correct = 0, answers = 0;
  for (index_t step = 1; step <= steps; ++step) {
    task.sample(rng, context, x.data(), y.data());
    opt.set_lr(schedule.lr(step));
    auto r = nn::train_step(model, opt, nn::Batch{x.data(), y.data(), 1, context}, Adjoint{64, 32}, {1.0});
    correct += r.correct, answers += r.tokens;
    if (step % 100 == 0) {
      std::printf("step %3ld  loss %.4f  train accuracy %.3f (last 100 steps)  grad_norm %.3f\n", long(step),
                  r.mean_loss(), double(correct) / double(answers), r.grad_norm);
      correct = answers = 0;
    }
  }
  std::mt19937_64 eval_rng(12345);  // fresh sequences
  nn::StepResult e;
  for (int i = 0; i < 32; ++i) {
    task.sample(eval_rng, context, x.data(), y.data());
    const auto r = model.evaluate(nn::Batch{x.data(), y.data(), 1, context}, 64);
    e.loss += r.loss, e.tokens += r.tokens, e.correct += r.correct;
  }
  const bool learned = e.accuracy() >= 5 * task.chance();
  std::printf("eval on 32 fresh sequences: loss %.4f  accuracy %.3f  (chance %.3f): %s\n", e.mean_loss(), e.accuracy(),
              task.chance(), learned ? "the layer learns the task" : "the layer does NOT learn the task");
  return learned ? 0 : 1;
}
