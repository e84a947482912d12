// The main job: train a DiagonalSSM language model with the exact adjoint backward on an
// embedded long-range task (key-value recall, ssmx/data/recall.hpp): every answer depends
// on a binding made at the start of the sequence, up to the whole context earlier (at the
// default context of 8192, three answers in four are more than 2,000 tokens away).
//
//   train_recall                      (context 8192, 400 steps; --help for the flags)
//
// Prints one line per logged step and a final evaluation on fresh sequences against
// chance, by distance between binding and answer. Model shapes are compile-time
// (P = 64, N = 16, K = 2, float). The same source, compiled by nvcc as train_recall_cuda
// (train_recall.cu), trains with every tensor on the GPU; examples/run_main.sh picks it when
// a GPU is visible.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <ssmx/ssmx.hpp>

#ifndef SSMX_RECALL_SPACE
#define SSMX_RECALL_SPACE ::ssmx::Space::Host
#endif

using namespace ssmx;

namespace {
constexpr index_t P = 64, N = 16, K = 2;
constexpr Space space = SSMX_RECALL_SPACE;  // where the model, its gradients and optimiser state live
using Layer = nn::DiagonalSSM<float, P, N>;
using LM = nn::Model<Layer, K, space>;

struct Options {
  index_t context = 8192, batch = 2, steps = 400, chunk = 256, log_every = 20, eval_sequences = 16;
  index_t query_every = 32;
  double query_from = 0.0;
  // The context doubles from curriculum_start after curriculum_steps steps, or earlier once
  // the last 10 steps of the stage reach curriculum_acc (0: off).
  index_t curriculum_start = 256, curriculum_steps = 200;
  double curriculum_acc = 0.9;
  index_t warmup = -1;  // -1: min(20, steps / 10 + 1)
  double lr = 3e-3, min_lr = 0.1, clip = 1.0, minutes = 7.5;
  bool untied = false;
  std::uint64_t seed = 1;
};

// Accuracy on fresh sequences, overall and by the distance between a binding and its query.
struct Evaluation {
  nn::StepResult total;
  std::vector<index_t> edges;  // bucket b holds distances in [edges[b], edges[b + 1])
  std::vector<nn::StepResult> by_distance;
};

Evaluation evaluate(LM& model, const data::RecallTask& task, const Options& o, std::mt19937_64& rng) {
  Evaluation ev;
  ev.edges = {0};
  for (index_t e = 256; e < o.context; e *= 4) ev.edges.push_back(e);
  ev.edges.push_back(o.context);
  ev.by_distance.resize(ev.edges.size() - 1);
  std::vector<nn::token_t> x(std::size_t(o.context)), y(x.size()), yb(x.size());
  std::vector<index_t> dist(x.size());
  for (index_t s = 0; s < o.eval_sequences; ++s) {
    task.sample(rng, o.context, x.data(), y.data(), dist.data());
    // The buckets partition the answers: one pass per bucket, summed for the total.
    for (std::size_t b = 0; b + 1 < ev.edges.size(); ++b) {
      bool any = false;
      for (std::size_t t = 0; t < y.size(); ++t) {
        const bool in = y[t] >= 0 && dist[t] >= ev.edges[b] && dist[t] < ev.edges[b + 1];
        yb[t] = in ? y[t] : -1;
        any = any || in;
      }
      if (!any) continue;
      auto r = model.evaluate(nn::Batch{x.data(), yb.data(), 1, o.context}, o.chunk);
      for (auto* acc : {&ev.total, &ev.by_distance[b]}) {
        acc->loss += r.loss;
        acc->tokens += r.tokens;
        acc->correct += r.correct;
      }
    }
  }
  return ev;
}
}  // namespace

int main(int argc, char** argv) {
  Options o;
  data::RecallTask task;
  task.query_every = o.query_every;
  task.query_from = o.query_from;
  CLI::App app{"Train a DiagonalSSM with the adjoint method on long-range key-value recall"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  // CLI::PositiveNumber's message prints its range (0 to DBL_MAX in full): name the constraint.
  const CLI::Validator positive(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || end != s.c_str() + s.size()) return "must be a number, got '" + s + "'";
        return v > 0 && v < HUGE_VAL ? "" : "must be a positive number, got " + s;
      },
      "NUMBER > 0");
  app.add_option("--context", o.context, "tokens per sequence")->check(positive);
  app.add_option("--batch", o.batch, "sequences per step")->check(positive);
  app.add_option("--steps", o.steps, "optimisation steps")->check(positive);
  app.add_option("--minutes", o.minutes, "stop training after this many minutes")->check(positive);
  app.add_option("--chunk", o.chunk, "adjoint chunk length")->check(positive);
  app.add_option("--lr", o.lr, "AdamW learning rate")->check(positive);
  app.add_option("--clip", o.clip, "global gradient-norm clip");
  app.add_option("--warmup", o.warmup, "linear warmup steps (-1: min(20, steps / 10 + 1))");
  app.add_option("--min-lr", o.min_lr, "final learning rate of the cosine schedule, as a fraction of --lr");
  app.add_flag("--untied", o.untied, "an LM head of its own instead of the tied embedding");
  app.add_option("--pairs", task.pairs, "key-value bindings per sequence")->check(positive);
  app.add_option("--query-every", task.query_every, "tokens between queries")->check(CLI::Range(2, 1 << 30));
  app.add_option("--query-from", task.query_from, "queries start at this fraction of the sequence")
      ->check(CLI::Range(0.0, 0.99));
  app.add_option("--values", task.values, "distinct values (chance accuracy is 1 / values)")->check(positive);
  app.add_option("--keys", task.keys, "distinct keys")->check(positive);
  app.add_option("--filler", task.filler, "distinct filler tokens")->check(positive);
  app.add_option("--eval-sequences", o.eval_sequences, "fresh sequences for the final evaluation");
  app.add_option("--curriculum-start", o.curriculum_start,
                 "first training context; doubles every --curriculum-steps up to --context (0: off)");
  app.add_option("--curriculum-steps", o.curriculum_steps, "steps per curriculum stage (at most)")
      ->check(positive);
  app.add_option("--curriculum-acc", o.curriculum_acc,
                 "end a curriculum stage early once the training accuracy of its last 10 steps reaches this (0: off)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--log-every", o.log_every, "steps between progress lines")->check(positive);
  app.add_option("--seed", o.seed, "random seed");
  CLI11_PARSE(app, argc, argv);

  try {
    task.validate(o.context);
    LM model({task.vocab(), !o.untied, o.seed});
    AdamW<float, space> opt(o.lr, 0.9, 0.99, 1e-8, 0.0);
    WarmupCosine schedule(o.warmup >= 0 ? std::min(o.warmup, o.steps) : std::min<index_t>(20, o.steps / 10 + 1),
                          o.steps, o.lr, o.lr * o.min_lr);
    std::mt19937_64 rng(o.seed * 7919 + 1), eval_rng(o.seed * 104729 + 2);
    std::vector<nn::token_t> x(std::size_t(o.batch * o.context)), y(x.size());

    std::printf("ssmx %s on %s: DiagonalSSM P=%ld N=%ld K=%ld, %ld parameters, context %ld, batch %ld, Adjoint chunk "
                "%ld\n",
                SSMX_VERSION_STRING, space == Space::Host ? "the CPU" : "the GPU", long(P), long(N), long(K),
                long(parameter_count(model.parameters())), long(o.context), long(o.batch), long(o.chunk));
    std::printf("task: key-value recall, %ld binding(s) of %ld keys to %ld values, %ld filler tokens, a query every %ld "
                "tokens from %.0f%% of the sequence on, chance accuracy %.3f\n",
                long(task.pairs), long(task.keys), long(task.values), long(task.filler), long(task.query_every),
                100 * task.query_from, task.chance());
    const auto start = std::chrono::steady_clock::now();
    double window_loss = 0;
    index_t window_tokens = 0, window_correct = 0, step = 0, tokens_seen = 0;
    index_t len = o.context, stage_steps = 0, recent_tokens = 0, recent_correct = 0;
    if (o.curriculum_start > 0) len = std::min(o.context, std::max<index_t>(4 * task.pairs + 2, o.curriculum_start));
    std::deque<std::pair<index_t, index_t>> recent;  // (tokens, correct) of the stage's last 10 steps
    for (; step < o.steps; ++step) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (elapsed > o.minutes * 60) {
        std::printf("time limit of %.1f minutes reached after %ld steps\n", o.minutes, long(step));
        break;
      }
      // Curriculum: short contexts first, so that the long-memory channels are found early.
      // The context doubles after --curriculum-steps steps, or as soon as the last 10 steps
      // of the stage reach --curriculum-acc.
      if (len < o.context) {
        const bool done = stage_steps >= o.curriculum_steps ||
                          (o.curriculum_acc > 0 && stage_steps >= 10 &&
                           double(recent_correct) >= o.curriculum_acc * double(recent_tokens));
        if (done) {
          len = std::min(o.context, 2 * len);
          stage_steps = 0;
          recent.clear();
        }
      }
      for (index_t b = 0; b < o.batch; ++b) task.sample(rng, len, x.data() + b * len, y.data() + b * len);
      opt.set_lr(schedule.lr(step));
      reset_peak(space);
      auto r = nn::train_step(model, opt, nn::Batch{x.data(), y.data(), o.batch, len}, Adjoint{o.chunk, 64},
                              nn::StepOptions{o.clip});
      tokens_seen += o.batch * len;
      ++stage_steps;
      recent.emplace_back(r.tokens, r.correct);
      if (recent.size() > 10) recent.pop_front();
      recent_tokens = recent_correct = 0;
      for (auto& [tk, c] : recent) recent_tokens += tk, recent_correct += c;
      window_loss += r.loss;
      window_tokens += r.tokens;
      window_correct += r.correct;
      if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("step %5ld  context %6ld  loss %.4f  acc %.3f  grad_norm %.3f  %.0f tokens/s  peak %.1f MiB  %.0fs\n",
                    long(step + 1), long(len), window_loss / double(window_tokens),
                    double(window_correct) / double(window_tokens), r.grad_norm, double(tokens_seen) / t,
                    double(memory_stats(space).peak) / (1 << 20), t);
        std::fflush(stdout);
        window_loss = 0;
        window_tokens = window_correct = 0;
      }
    }
    const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto ev = evaluate(model, task, o, eval_rng);
    const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (std::size_t b = 0; b < ev.by_distance.size(); ++b)
      if (ev.by_distance[b].tokens)
        std::printf("  answers %5ld-%5ld tokens after their binding: %6ld answers, accuracy %.3f\n", long(ev.edges[b]),
                    long(ev.edges[b + 1] - 1), long(ev.by_distance[b].tokens), ev.by_distance[b].accuracy());
    std::printf("eval on %ld fresh sequences of %ld tokens: loss %.4f  accuracy %.3f  (chance %.3f)  "
                "train %.0fs, total %.0fs\n",
                long(o.eval_sequences), long(o.context), ev.total.mean_loss(), ev.total.accuracy(), task.chance(),
                train_s, total_s);
  } catch (const ssmx::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
