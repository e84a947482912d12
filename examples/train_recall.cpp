// The main job: train a DiagonalSSM language model with the exact adjoint backward on an
// embedded long-range task (key-value recall, ssmx/data/recall.hpp): every answer depends
// on a binding made at the start of the sequence, up to the whole context earlier.
//
//   train_recall                      (context 2048, 300 steps; --help for the flags)
//
// Prints one line per logged step and a final evaluation on fresh sequences against
// chance. Model shapes are compile-time (P = 64, N = 16, K = 2, float).
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <ssmx/ssmx.hpp>

using namespace ssmx;

namespace {
constexpr index_t P = 64, N = 16, K = 2;
using Layer = nn::DiagonalSSM<float, P, N>;
using LM = nn::Model<Layer, K>;

struct Options {
  index_t context = 2048, batch = 2, steps = 300, chunk = 256, log_every = 20, eval_sequences = 16;
  index_t pairs = 1, query_every = 32;
  index_t curriculum_start = 256, curriculum_steps = 30;  // context doubles from start every N steps
  double lr = 1e-2, clip = 1.0, minutes = 9.0;
  std::uint64_t seed = 1;
};

nn::StepResult evaluate(LM& model, const data::RecallTask& task, const Options& o, std::mt19937_64& rng) {
  std::vector<nn::token_t> x(std::size_t(o.context)), y(x.size());
  nn::StepResult total;
  for (index_t s = 0; s < o.eval_sequences; ++s) {
    task.sample(rng, o.context, x.data(), y.data());
    auto r = model.evaluate(nn::Batch{x.data(), y.data(), 1, o.context}, o.chunk);
    total.loss += r.loss;
    total.tokens += r.tokens;
    total.correct += r.correct;
  }
  return total;
}
}  // namespace

int main(int argc, char** argv) {
  Options o;
  data::RecallTask task;
  task.query_every = o.query_every;
  CLI::App app{"Train a DiagonalSSM with the adjoint method on long-range key-value recall"};
  app.add_option("--context", o.context, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--batch", o.batch, "sequences per step")->check(CLI::PositiveNumber);
  app.add_option("--steps", o.steps, "optimisation steps")->check(CLI::PositiveNumber);
  app.add_option("--minutes", o.minutes, "stop training after this many minutes")->check(CLI::PositiveNumber);
  app.add_option("--chunk", o.chunk, "adjoint chunk length")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.lr, "AdamW learning rate")->check(CLI::PositiveNumber);
  app.add_option("--clip", o.clip, "global gradient-norm clip");
  app.add_option("--pairs", task.pairs, "key-value bindings per sequence")->check(CLI::PositiveNumber);
  app.add_option("--query-every", task.query_every, "tokens between queries")->check(CLI::Range(2, 1 << 30));
  app.add_option("--eval-sequences", o.eval_sequences, "fresh sequences for the final evaluation");
  app.add_option("--curriculum-start", o.curriculum_start,
                 "first training context; doubles every --curriculum-steps up to --context (0: off)");
  app.add_option("--curriculum-steps", o.curriculum_steps, "steps per curriculum stage")->check(CLI::PositiveNumber);
  app.add_option("--log-every", o.log_every, "steps between progress lines")->check(CLI::PositiveNumber);
  app.add_option("--seed", o.seed, "random seed");
  CLI11_PARSE(app, argc, argv);

  try {
    task.validate(o.context);
    LM model({task.vocab(), true, o.seed});
    AdamW<float> opt(o.lr, 0.9, 0.99, 1e-8, 0.0);
    WarmupCosine schedule(std::min<index_t>(20, o.steps / 10 + 1), o.steps, o.lr, o.lr * 0.1);
    std::mt19937_64 rng(o.seed * 7919 + 1), eval_rng(o.seed * 104729 + 2);
    std::vector<nn::token_t> x(std::size_t(o.batch * o.context)), y(x.size());

    std::printf("ssmx %s: DiagonalSSM P=%ld N=%ld K=%ld, %ld parameters, context %ld, batch %ld, Adjoint chunk %ld\n",
                SSMX_VERSION_STRING, long(P), long(N), long(K), long(parameter_count(model.parameters())),
                long(o.context), long(o.batch), long(o.chunk));
    std::printf("task: key-value recall, %ld binding(s), a query every %ld tokens, chance accuracy %.3f\n",
                long(task.pairs), long(task.query_every), task.chance());
    const auto start = std::chrono::steady_clock::now();
    double window_loss = 0;
    index_t window_tokens = 0, window_correct = 0, step = 0, tokens_seen = 0;
    for (; step < o.steps; ++step) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (elapsed > o.minutes * 60) {
        std::printf("time limit of %.1f minutes reached after %ld steps\n", o.minutes, long(step));
        break;
      }
      // Curriculum: short contexts first, so that the long-memory channels are found early.
      index_t len = o.context;
      if (o.curriculum_start > 0) {
        len = std::min(o.context, std::max<index_t>(4 * task.pairs + 2, o.curriculum_start));
        for (index_t s = step / o.curriculum_steps; s > 0 && len < o.context; --s) len = std::min(o.context, 2 * len);
      }
      for (index_t b = 0; b < o.batch; ++b) task.sample(rng, len, x.data() + b * len, y.data() + b * len);
      opt.set_lr(schedule.lr(step));
      reset_peak(Space::Host);
      auto r = nn::train_step(model, opt, nn::Batch{x.data(), y.data(), o.batch, len}, Adjoint{o.chunk, 64},
                              nn::StepOptions{o.clip});
      tokens_seen += o.batch * len;
      window_loss += r.loss;
      window_tokens += r.tokens;
      window_correct += r.correct;
      if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("step %5ld  context %6ld  loss %.4f  acc %.3f  grad_norm %.3f  %.0f tokens/s  peak %.1f MiB  %.0fs\n",
                    long(step + 1), long(len), window_loss / double(window_tokens),
                    double(window_correct) / double(window_tokens), r.grad_norm, double(tokens_seen) / t,
                    double(memory_stats(Space::Host).peak) / (1 << 20), t);
        std::fflush(stdout);
        window_loss = 0;
        window_tokens = window_correct = 0;
      }
    }
    auto ev = evaluate(model, task, o, eval_rng);
    std::printf("eval on %ld fresh sequences: loss %.4f  accuracy %.3f  (chance %.3f)\n", long(o.eval_sequences),
                ev.mean_loss(), ev.accuracy(), task.chance());
  } catch (const ssmx::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
