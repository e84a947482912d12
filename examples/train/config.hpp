// The trainer's configuration: every flag is one field of Config, described once in
// fields() (flag name, help, how it behaves on --resume), so that the command line, the
// checkpoint's saved copy and the comparison on resume cannot drift apart.
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <ssmx/core/error.hpp>

namespace train {

// A usage error: exit status 2 instead of 1.
struct UsageError : ssmx::ValueError {
  using ssmx::ValueError::ValueError;
};

// The bound of a numeric flag. The command line checks it, with the type, before CLI11
// converts the text, so that a message names the constraint ("must be a positive integer,
// got 0") instead of CLI11's range (0 to all 309 digits of DBL_MAX).
struct Limit {
  enum Kind { any, positive, nonnegative, range } kind = any;
  double lo = 0, hi = 0;
};
inline Limit positive_limit() { return {Limit::positive}; }
inline Limit nonnegative_limit() { return {Limit::nonnegative}; }
inline Limit range_limit(double lo, double hi) { return {Limit::range, lo, hi}; }

inline std::string format_bound(double v) {
  std::string s = std::to_string(v);
  s.erase(s.find_last_not_of('0') + 1);
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

// What --help shows and the check itself, for an integer or a floating-point flag.
inline CLI::Validator limit_validator(Limit l, bool integer) {
  const std::string kind = integer ? "integer" : "number";
  std::string desc = integer ? "INTEGER" : "NUMBER";
  if (l.kind == Limit::positive) desc += " > 0";
  if (l.kind == Limit::nonnegative) desc += " >= 0";
  if (l.kind == Limit::range) desc += " in [" + format_bound(l.lo) + ", " + format_bound(l.hi) + "]";
  return CLI::Validator(
      [l, integer, kind](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        const std::string a = integer ? "an integer" : "a number";
        if (s.empty() || end != s.c_str() + s.size() || s.find_first_of(" \t") != std::string::npos)
          return "must be " + a + ", got '" + s + "'";
        if (!std::isfinite(v)) return "must be a finite " + kind + ", got " + s;
        if (integer && (v != std::floor(v) || s.find_first_of(".eE") != std::string::npos))
          return "must be an integer, got " + s;
        if (l.kind == Limit::positive && !(v > 0)) return "must be a positive " + kind + ", got " + s;
        if (l.kind == Limit::nonnegative && !(v >= 0)) return "must be " + a + " >= 0, got " + s;
        if (l.kind == Limit::range && !(v >= l.lo && v <= l.hi))
          return "must be " + a + " in [" + format_bound(l.lo) + ", " + format_bound(l.hi) + "], got " + s;
        return "";
      },
      desc);
}

inline std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : sep) + i;
  return s;
}

// What a field does when a run is resumed.
enum class OnResume {
  must_match,  // fixes the numbers of the run: the saved value is used; a different flag is an error
  may_change,  // the saved value is used unless the flag is given (e.g. --steps, --eval-every)
  not_saved,   // belongs to one invocation (--out, --until, --minutes, ...)
};

struct Field {
  const char* name;  // the flag without "--", and the key in config.json
  std::variant<std::string*, std::int64_t*, double*> value;
  OnResume on_resume;
  std::string help;
  std::variant<Limit, CLI::Validator> check = Limit{};  // on the command line only: numbers, or a set of names
  // The value a checkpoint saved before this flag existed stands for (null: none; such a
  // checkpoint cannot be resumed).
  nlohmann::json if_absent = nullptr;
};

struct Config {
  // model and gradient strategy
  std::string model = "diagonal-small";
  std::string strategy = "adjoint";
  std::int64_t chunk = 256, window = 1024, shard = 64;
  std::string storage = "float";  // of the stored layer inputs
  // distribution over the ranks of an MPI job (dist.hpp); ranks is not a flag: the job's size
  std::string dist = "none";
  std::int64_t ranks = 1;
  // data
  std::string data = "recall";
  std::int64_t context = 2048, batch = 2, vocab = 0, eot = 50256;
  double val_fraction = 0.05;
  std::int64_t recall_values = 16, recall_keys = 16, recall_filler = 16, pairs = 1, query_every = 32;
  std::int64_t curriculum_start = 0, curriculum_first = 0, curriculum_steps = 30;
  // optimisation
  std::string optimizer = "adamw", schedule = "cosine";
  double lr = 1e-2, min_lr_ratio = 0.1, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.99, momentum = 0.9, clip = 1.0;
  std::int64_t steps = 300, warmup = 20, seed = 1;
  // evaluation, logging, checkpoints
  std::int64_t eval_every = 100, eval_sequences = 16, eval_tokens = 65536;
  std::string eval_data;  // empty: none
  std::int64_t eval_window = 4096;
  std::int64_t sample_every = 0, sample_tokens = 64;
  std::int64_t log_every = 1, print_every = 10, checkpoint_every = 100;
  // this invocation only
  std::string out, checkpoint_dir, device = "auto";
  std::int64_t until = 0, threads = 0;
  double minutes = 0.0;
  // not a flag: the names --model accepts (the presets the program registered, trainer.hpp)
  std::vector<std::string> model_names{"diagonal-small", "diagonal-base", "mamba-tiny", "mamba-130m",
                                        "mamba2-tiny",    "mamba2-130m"};

  std::vector<Field> fields() {
    const Limit positive = positive_limit(), nonneg = nonnegative_limit();
    const auto mm = OnResume::must_match, mc = OnResume::may_change, ns = OnResume::not_saved;
    return {
        {"model", &model, mm, "model preset: " + join(model_names, " | "), CLI::IsMember(model_names)},
        {"strategy", &strategy, mm, "gradient strategy: adjoint | truncated | checkpointed | backprop",
         CLI::IsMember({"adjoint", "truncated", "checkpointed", "backprop"})},
        {"chunk", &chunk, mm, "tokens recomputed at a time by the adjoint backward (and evaluation chunk)", positive},
        {"window", &window, mm, "T-bar of --strategy truncated: how far back each loss term reaches", positive},
        {"shard", &shard, mm, "tokens per VJP shard (adjoint, truncated)", positive},
        {"storage", &storage, mm,
         "stored layer inputs: float | bf16 (half the bytes of the adjoint's largest term; arithmetic stays float)",
         CLI::IsMember({"float", "bf16"}), "float"},
        {"dist", &dist, mm,
         "split each step over the ranks of `mpirun -np R`: none | data (batch rows) | layer (blocks of layers) | "
         "sequence (tokens of every row; --strategy adjoint); a rank waits at most SSMX_DIST_TIMEOUT seconds "
         "(default 300) for the others, then the job ends with an error",
         CLI::IsMember({"none", "data", "layer", "sequence"}), "none"},
        {"data", &data, mm, "recall | tokens:PATH (llm.c token file) | text:PATH (bytes of any file, vocab 256)"},
        {"context", &context, mm, "tokens per row per step", positive},
        {"batch", &batch, mm, "rows per step", positive},
        {"vocab", &vocab, mm, "vocabulary of tokens:PATH data (0: largest token + 1)", nonneg},
        {"eot", &eot, mm, "document separator of tokens:PATH data (begins each document)", nonneg},
        {"val-fraction", &val_fraction, mm, "held-out tail of tokens/text data for evaluation", range_limit(0.0, 0.5)},
        {"recall-values", &recall_values, mm, "recall: number of values (chance = 1/values)", positive},
        {"recall-keys", &recall_keys, mm, "recall: number of keys", positive},
        {"recall-filler", &recall_filler, mm, "recall: number of filler tokens", positive},
        {"pairs", &pairs, mm, "recall: key-value bindings per sequence", positive},
        {"query-every", &query_every, mm, "recall: tokens between queries", range_limit(2, 1 << 30)},
        {"curriculum-start", &curriculum_start, mm,
         "recall: first training context, doubled every --curriculum-steps up to --context (0: off)", nonneg},
        {"curriculum-first", &curriculum_first, mm,
         "recall: steps at --curriculum-start before the first doubling (0: --curriculum-steps)", nonneg},
        {"curriculum-steps", &curriculum_steps, mm, "recall: steps per curriculum stage", positive},
        {"optimizer", &optimizer, mm, "adamw | sgd", CLI::IsMember({"adamw", "sgd"})},
        {"lr", &lr, mm, "peak learning rate", positive},
        {"schedule", &schedule, mm, "cosine (warmup, then down to --min-lr-ratio * lr) | constant (after warmup)",
         CLI::IsMember({"cosine", "constant"})},
        {"min-lr-ratio", &min_lr_ratio, mm, "cosine: final learning rate as a fraction of --lr", range_limit(0.0, 1.0)},
        {"warmup", &warmup, mm, "linear warmup steps: step s <= N runs at lr * s / N (0: none)", nonneg},
        {"weight-decay", &weight_decay, mm, "AdamW decoupled / SGD L2 weight decay", nonneg},
        {"beta1", &beta1, mm, "AdamW beta1", range_limit(0.0, 0.999999)},
        {"beta2", &beta2, mm, "AdamW beta2", range_limit(0.0, 0.999999)},
        {"momentum", &momentum, mm, "SGD momentum", range_limit(0.0, 0.999999)},
        {"clip", &clip, mm, "clip the global gradient norm to this (0: no clipping)", nonneg},
        {"seed", &seed, mm, "seed of the initialisation and the data order", nonneg},
        {"steps", &steps, mc, "optimisation steps of the whole run (the schedule spans them)", positive},
        {"eval-every", &eval_every, mc, "evaluate on held-out data every N steps (0: only at the end)", nonneg},
        {"eval-sequences", &eval_sequences, mc, "recall: fresh sequences per evaluation", positive},
        {"eval-tokens", &eval_tokens, mc, "tokens/text: at most this many held-out tokens per evaluation", positive},
        {"eval-data", &eval_data, mc,
         "text:PATH | tokens:PATH: loss, perplexity and bits per byte over the whole file as one sequence (its "
         "documents not split), at the end and at every evaluation when it holds at most --eval-tokens tokens "
         "(empty: none)",
         Limit{}, ""},
        {"eval-window", &eval_window, mc,
         "tokens per window of --eval-data, the state carried from one to the next (the result does not depend "
         "on it, to rounding; memory does)",
         positive, 4096},
        {"sample-every", &sample_every, mc,
         "every N steps and at the end, sample --sample-tokens tokens (temperature 1, seeded by --seed) after the "
         "first 32 tokens of the held-out data (of the training data when none is held out; recall: of the first "
         "held-out sequence), print it and append it to samples.jsonl (0: off)",
         nonneg, 0},
        {"sample-tokens", &sample_tokens, mc, "tokens per sample of --sample-every", positive, 64},
        {"log-every", &log_every, mc, "write a metrics line every N steps", positive},
        {"print-every", &print_every, mc, "print a progress line every N steps when stdout is not a terminal",
         positive},
        {"checkpoint-every", &checkpoint_every, mc, "save a checkpoint every N steps (0: only at the end)", nonneg},
        {"out", &out, ns, "output directory (default runs/<model>-<data>-<time>)"},
        {"checkpoint-dir", &checkpoint_dir, ns, "checkpoint directory (default <out>/checkpoints)"},
        {"until", &until, ns, "stop this invocation after step N, with a checkpoint (0: run to --steps)", nonneg},
        {"minutes", &minutes, ns, "time budget of this invocation in minutes (0: none)", nonneg},
        {"device", &device, ns, "auto | cpu | cuda", CLI::IsMember({"auto", "cpu", "cuda"})},
        {"threads", &threads, ns, "CPU threads (0: OpenMP's default, e.g. OMP_NUM_THREADS)", nonneg},
    };
  }

  // The fields saved with a checkpoint, as JSON (numbers keep every bit: nlohmann prints
  // doubles with 17 significant digits), and the number of ranks.
  nlohmann::json to_json() {
    nlohmann::json j = nlohmann::json::object();
    for (const Field& f : fields())
      if (f.on_resume != OnResume::not_saved) std::visit([&](auto* p) { j[f.name] = *p; }, f.value);
    j["ranks"] = ranks;
    return j;
  }
};

// The model family of a preset, for --data defaults and messages.
inline bool is_recall(const Config& c) { return c.data == "recall"; }

}  // namespace train
