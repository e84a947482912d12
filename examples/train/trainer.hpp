// The ssmx trainer as a library: a program registers model presets (a layer type, a layer
// count and a name) and hands its command line to train::main, which does the rest: a
// gradient strategy, data (the embedded recall task, an llm.c token file, or the bytes of
// any file), AdamW or SGD with a schedule, evaluation, checkpoints, resume, metrics, a plot,
// a summary and MPI (--dist). examples/train.cpp is the `train` program (the built-in
// presets); examples/train_custom.cpp trains a user's own layer:
//
//   #include "train/trainer.hpp"   // with examples/ on the include path; CLI11 and ssmx::io
//   int main(int argc, char** argv) {
//     return train::main(argc, argv, train::Presets().add<MyLayer<float, 64, 16>, 2>("my-small"));
//   }
//
// The layer needs what nn::Model needs (README, "Writing a layer"), float parameters on the
// host, and nothing else: every flag below works for it (--model my-small).
//
// Usage of the built-in `train` program:
//
//   train                                              recall, diagonal-small, 300 steps
//   train --data text:README.md --model mamba-tiny --context 512 --steps 200
//   train --data tokens:fineweb_train_000001.bin --model mamba-130m --context 4096 --out runs/m
//   train --out runs/m --resume                        continue runs/m where it stopped
//   mpirun -np 4 train --dist layer --model mamba-130m ...   each step split over 4 ranks
//
// Output, under --out: metrics.jsonl (a line per logged step and per evaluation), config.json,
// checkpoints/ (step_XXXXXXXX.safetensors and `latest`), samples.jsonl (--sample-every: a
// line per sample), and at the end summary.json (with --eval-data, the loss over that file)
// and plot.png (gnuplot) or plot.svg. train/generate.hpp loads a run's model again. A fresh run never writes into a directory holding another
// run's files. SIGINT/SIGTERM/SIGUSR1: the current step finishes, a checkpoint is saved, exit 0.
//
// Failures leave a directory that can be resumed or reused. A directory holds a run once
// the run's first checkpoint exists: a run that fails before that removes what it created,
// and the files of one killed before that are replaced by the same command. A step that
// fails later (a non-finite loss or gradient, out of memory; one process) changes nothing,
// so the run saves that last good state, writes its summary and exits 1. --resume of a
// finished run, or with --until behind the run, says there is nothing to do and changes no
// file. On resume, metrics lines past the checkpoint's step (to be written again) are
// dropped first, atomically, so metrics.jsonl holds one line per step however often the run
// was killed.
//
// Resuming is exact: a run stopped at step s and resumed logs the same losses, bit for bit,
// as one that never stopped. A checkpoint holds the parameters, the optimiser state, the
// step, the data cursor (the packer's state; the recall task draws step s's batch from
// (seed, s)), the recurrent state carried across steps by packed rows, and the whole config,
// which --resume reuses; a flag given on resume that would change the run's numbers is an
// error naming the flag and both values.
//
// Several processes: `mpirun -np R train --dist data|layer|sequence ...` splits every step
// over R ranks (train/dist.hpp says what each holds). Rank 0 prints and writes the run's
// files. Checkpoints: under data and sequence every rank holds the same parameters and rank 0
// writes the one file (under data, after gathering each rank's rows of the carried state);
// under layer each rank r > 0 writes its own part, step_XXXXXXXX.rank-r-of-R.safetensors,
// and only when all of them are on disk (a barrier) does rank 0 write its part,
// step_XXXXXXXX.safetensors, and `latest`: a checkpoint whose rank-0 file exists is complete,
// and a job that dies while saving leaves the previous one current. Every rank reads its
// part on --resume, which needs the scheme and R the run was started with. --out must be on
// a file system that every rank sees.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <variant>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <ssmx/io/checkpoint.hpp>
#include <ssmx/io/json.hpp>
#include <ssmx/ssmx.hpp>

#include "config.hpp"
#include "data.hpp"
#include "dist.hpp"
#include "generation.hpp"
#include "metrics.hpp"
#include "plot.hpp"
#include "progress.hpp"
#include "signals.hpp"

namespace train {

namespace fs = std::filesystem;
namespace nn = ssmx::nn;
using Clock = std::chrono::steady_clock;
using T = float;

// ---- presets ----------------------------------------------------------------------------

// What the log says about a preset's layer (Presets::add takes a description instead).
template <class Layer>
struct LayerInfo {
  static std::string describe() {
    const ssmx::Dims d = Layer::state_dims();
    std::string dims;
    for (int i = 0; i < d.rank; ++i) dims += (i ? "x" : "") + std::to_string(d[i]);
    return "d_model=" + std::to_string(Layer::d_model) + ", state " + dims;
  }
};
template <class U, index_t P, index_t N>
struct LayerInfo<nn::DiagonalSSM<U, P, N>> {
  static std::string describe() { return "DiagonalSSM P=" + std::to_string(P) + " N=" + std::to_string(N); }
};
template <class U, index_t D, index_t N, index_t E, index_t W, index_t R>
struct LayerInfo<nn::Mamba<U, D, N, E, W, R>> {
  static std::string describe() {
    return "Mamba D=" + std::to_string(D) + " N=" + std::to_string(N) + " expand=" + std::to_string(E) +
           " conv=" + std::to_string(W);
  }
};

template <class U, index_t D, index_t N, index_t P, index_t G, index_t E, index_t W>
struct LayerInfo<nn::Mamba2<U, D, N, P, G, E, W>> {
  static std::string describe() {
    return "Mamba2 D=" + std::to_string(D) + " N=" + std::to_string(N) + " headdim=" + std::to_string(P) +
           " heads=" + std::to_string(E * D / P) + " groups=" + std::to_string(G) + " expand=" + std::to_string(E) +
           " conv=" + std::to_string(W);
  }
};

// ---- optimiser, schedule, strategy ---------------------------------------------------------

using Optimizer = std::variant<ssmx::AdamW<T>, ssmx::SGD<T>>;
using Strategy = std::variant<ssmx::Adjoint, ssmx::TruncatedAdjoint, ssmx::Checkpointed, ssmx::Backprop>;

inline Optimizer make_optimizer(const Config& c) {
  if (c.optimizer == "sgd") return ssmx::SGD<T>(c.lr, c.momentum, c.weight_decay);
  return ssmx::AdamW<T>(c.lr, c.beta1, c.beta2, 1e-8, c.weight_decay);
}

inline Strategy make_strategy(const Config& c) {
  if (c.strategy == "truncated") return ssmx::TruncatedAdjoint{index_t(c.window), index_t(c.shard)};
  if (c.strategy == "checkpointed") return ssmx::Checkpointed{};
  if (c.strategy == "backprop") return ssmx::Backprop{};
  return ssmx::Adjoint{index_t(c.chunk), index_t(c.shard)};
}

inline std::string describe_strategy(const Config& c) {
  const std::string storage = c.storage == "bf16" ? ", bf16 stored inputs" : "";
  if (c.strategy == "adjoint")
    return "adjoint (chunk " + std::to_string(c.chunk) + ", shard " + std::to_string(c.shard) + storage + ")";
  if (c.strategy == "truncated")
    return "truncated adjoint (window " + std::to_string(c.window) + ", shard " + std::to_string(c.shard) + storage + ")";
  return c.strategy + (storage.empty() ? "" : " (" + storage.substr(2) + ")");
}

// Warmup, then a half cosine down to min_lr_ratio * lr (cosine) or lr held (constant),
// evaluated at the 1-based step: step 1 runs at lr / warmup, the last step at the floor.
inline ssmx::WarmupCosine make_schedule(const Config& c) {
  const std::int64_t warmup = std::min(c.warmup, c.steps);
  return ssmx::WarmupCosine(warmup, c.steps, c.lr, c.schedule == "cosine" ? c.lr * c.min_lr_ratio : c.lr);
}

// One update (this rank's part of it), carrying `carry` when given. A batch without target
// tokens (padding only) updates nothing; every rank sees the whole batch, so all skip it.
template <class LM>
nn::TrainStepResult train_step(Group& group, LM& model, Optimizer& opt, const Strategy& strategy, const StepData& sd,
                               double clip, nn::LayerStates<T>* carry) {
  if (std::all_of(sd.targets.begin(), sd.targets.end(), [](nn::token_t y) { return y < 0; })) return {};
  return std::visit([&](auto& o, const auto& s) { return group.train_step(model, o, s, sd, {clip}, carry); }, opt,
                    strategy);
}

// ---- the run ------------------------------------------------------------------------------

struct Session {
  std::string out, checkpoint_dir;
  std::optional<std::string> resume_from;  // the checkpoint to continue from
  std::int64_t keep_checkpoints = 3;
  bool replaces_unsaved_start = false;  // --out holds the files of a start that never saved a checkpoint
  std::string program = "train";        // argv[0], for the command that continues a run
};

// The command that continues the run in `s` ("mpirun -np R train --out X --resume").
inline std::string resume_command(const Session& s, int ranks) {
  return (ranks > 1 ? "mpirun -np " + std::to_string(ranks) + " " : std::string()) + s.program + " --out " + s.out +
         " --resume";
}

struct Eval {
  std::int64_t step = -1;
  double loss = 0, accuracy = 0;
  bool valid() const { return step >= 0; }
};

inline nlohmann::ordered_json eval_json(const Eval& e, double chance) {
  nlohmann::ordered_json j{{"step", e.step}, {"loss", e.loss}, {"accuracy", e.accuracy}};
  if (chance >= 0) j["chance"] = chance;
  return j;
}

// --dist layer: rank r's part of the checkpoint whose rank-0 part is `main`
// (step_XXXXXXXX.safetensors): step_XXXXXXXX.rank-r-of-R.safetensors beside it.
inline std::string shard_path(const std::string& main, int rank, int ranks) {
  const std::string ext = ".safetensors";
  const std::string stem = main.size() > ext.size() ? main.substr(0, main.size() - ext.size()) : main;
  return stem + ".rank-" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ext;
}

// Removes all but the newest `keep` checkpoints up to `step` (0: keep all), with their
// --dist layer parts, and the parts of a step up to `step` whose checkpoint was never
// completed (a job that died while saving).
inline void prune_checkpoints(const std::string& dir, std::int64_t step, std::int64_t keep) {
  if (keep <= 0) return;
  std::vector<std::pair<std::int64_t, fs::path>> found, parts;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::size_t dot = name.find('.');
    if (name.rfind("step_", 0) != 0 || dot == std::string::npos) continue;
    const auto s = ssmx::io::parse_int64(name.substr(5, dot - 5));
    if (!s || *s > step) continue;
    if (name == ssmx::io::checkpoint_file_name(*s))
      found.emplace_back(*s, it->path());
    else if (name.compare(dot, 6, ".rank-") == 0)
      parts.emplace_back(*s, it->path());
  }
  std::sort(found.rbegin(), found.rend());
  std::vector<std::int64_t> kept;
  for (std::size_t i = 0; i < found.size(); ++i) {
    if (i < std::size_t(keep))
      kept.push_back(found[i].first);
    else
      fs::remove(found[i].second, ec);
  }
  for (const auto& [s, path] : parts)
    if (std::find(kept.begin(), kept.end(), s) == kept.end()) fs::remove(path, ec);
}

// Copies of `src` (empty tensors stay empty).
template <class U>
void copy_tensors(const std::vector<ssmx::Tensor<U>>& src, std::vector<ssmx::Tensor<U>>& dst) {
  dst.clear();
  for (const auto& t : src) dst.push_back(t.clone());
}

// A temporary file AtomicFile leaves behind when the process is killed while writing:
// "<name>.tmp.<pid>.<n>".
inline bool is_stale_temporary(const std::string& name) {
  const auto at = name.find(".tmp.");
  if (at == std::string::npos || at == 0) return false;
  const std::string rest = name.substr(at + 5);
  const auto dot = rest.find('.');
  return dot != std::string::npos && dot > 0 && dot + 1 < rest.size() &&
         std::all_of(rest.begin(), rest.end(), [](char c) { return c == '.' || (c >= '0' && c <= '9'); });
}

// Removes the temporaries of killed writes in `dir` (this run's files only: one run owns
// its directories, and no write is in flight when this is called).
inline void remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (is_stale_temporary(name) && it->is_regular_file(ec)) fs::remove(it->path(), ec);
  }
}

// The files a fresh run writes into --out, besides its checkpoints.
inline const char* const run_files[] = {"metrics.jsonl", "samples.jsonl", "summary.json", "config.json", "plot.svg",
                                         "plot.png"};

// Whether `out` holds the start of a run by this trainer that never saved a checkpoint (it
// failed or was killed first): its config.json is one the trainer wrote.
inline bool is_unsaved_start(const Session& s) {
  if (ssmx::io::latest_checkpoint(s.checkpoint_dir)) return false;
  const std::string config = s.out + "/config.json";
  try {
    const nlohmann::json c = ssmx::io::read_json(config, 1 << 20);
    return c.is_object() && c.contains("checkpoint_dir") && c.contains("model") && c.contains("strategy") &&
           c.contains("steps");
  } catch (const ssmx::Error&) {
    return false;  // absent, or not ours
  }
}

// Removes what such a start left: its run files and stale temporaries.
inline void remove_unsaved_start(const Session& s) {
  std::error_code ec;
  for (const char* name : run_files) fs::remove(fs::path(s.out) / name, ec);
  remove_stale_temporaries(s.out);
  remove_stale_temporaries(s.checkpoint_dir);
}

// What a fresh run created: removed again when the run ends (an exception) before its first
// checkpoint, so that the same command can simply be run again. keep() once one is saved.
class FreshRunFiles {
 public:
  FreshRunFiles() = default;
  FreshRunFiles(const FreshRunFiles&) = delete;
  FreshRunFiles& operator=(const FreshRunFiles&) = delete;
  ~FreshRunFiles() {  // best effort, never throws
    try {
      std::error_code ec;
      for (const auto& f : files_) fs::remove(f, ec);
      for (const auto& d : dirs_) {
        remove_stale_temporaries(d);
        if (fs::is_directory(d, ec) && fs::is_empty(d, ec)) fs::remove(d, ec);
      }
    } catch (...) {
    }
  }
  // Notes which of the directories do not exist yet (they will be created).
  void track_directories(const std::string& out, const std::string& checkpoint_dir) {
    std::error_code ec;
    for (const std::string& d : {checkpoint_dir, out})
      if (fs::symlink_status(d, ec).type() == fs::file_type::not_found) dirs_.push_back(d);
  }
  void track(const std::string& file) { files_.push_back(file); }
  void keep() {
    files_.clear();
    dirs_.clear();
  }

 private:
  std::vector<std::string> files_, dirs_;
};

template <class Layer, index_t K>
int run(Config& cfg, Data& data, const Session& session, Group& group, const std::string& layer_text) {
  static_assert(std::is_same<typename Layer::value_type, T>::value,
                "train::Presets::add<Layer, K>: the trainer trains float layers; use Layer<float, ...>");
  using LM = nn::Model<Layer, K, ssmx::Space::Host>;
  const bool root = group.root();  // prints and writes the run's files
  typename LM::Config model_config{data.vocab(), true, std::uint64_t(cfg.seed)};
  std::tie(model_config.layer_begin, model_config.layer_end) = group.layers(K, cfg.model);
  model_config.bf16_inputs = cfg.storage == "bf16";
  LM model(model_config);
  Optimizer opt = make_optimizer(cfg);
  const Strategy strategy = make_strategy(cfg);
  const auto schedule = make_schedule(cfg);
  // Over all ranks: under --dist layer each holds a part, and a tied embedding is held by the
  // first rank and by the last one (for the head): counted once.
  std::int64_t n_params = 0;
  for (auto* p : model.parameters())
    if (!(model.layer_begin() > 0 && model.holds_embedding() && p == &model.embedding().weight))
      n_params += p->value.numel();
  if (group.scheme() == Scheme::layer) {
    const auto all = group.gather({n_params});
    n_params = std::accumulate(all.begin(), all.end(), std::int64_t(0));
  }
  const std::string model_text = cfg.model + " (" + layer_text + ", K=" + std::to_string(K) +
                                 " layers, " + std::to_string(n_params) + " parameters)";

  // Recurrent state carried from step to step by rows that continue a document: `carry`
  // holds this rank's rows (--dist data) of the layers it holds (--dist layer). Checkpoints
  // keep it as extra tensors named carry.*, beside the parameters, each with all the rows.
  nn::LayerStates<T> carry;
  struct CarrySlot {
    index_t layer;
    bool halo;  // the layer's convolution window, else its scan state
    std::unique_ptr<ssmx::Parameter<T>> saved;
  };
  std::vector<CarrySlot> carry_slots;
  constexpr index_t halo = nn::layer_halo<Layer>::value;
  if (group.scheme() == Scheme::sequence) {  // the shortest sequences are the first ones (curriculum)
    const index_t len = data.length_at(0), shortest = len / group.size(), need = std::max<index_t>(1, halo);
    SSMX_REQUIRE(shortest >= need, UsageError, "--dist sequence: sequences of ", len, " tokens (--context",
                 is_recall(cfg) ? " or --curriculum-start" : "", ") over ", group.size(), " ranks leave ", shortest,
                 " tokens to a rank, fewer than ", need, " (a token, and the ", halo,
                 " earlier ones the convolution reads): use fewer ranks or longer sequences");
  }
  if (data.carries_state()) {
    const index_t S = nn::state_numel(Layer::state_dims());
    for (index_t k = 0; k < K; ++k) {
      if (!model.holds_layer(k)) continue;
      const std::string layer = "carry.layers." + std::to_string(k);
      carry_slots.push_back({k, false, std::make_unique<ssmx::Parameter<T>>(layer + ".state", ssmx::Dims{cfg.batch, S})});
      if (halo > 0)
        carry_slots.push_back(
            {k, true, std::make_unique<ssmx::Parameter<T>>(layer + ".halo", ssmx::Dims{cfg.batch, halo, LM::d_model})});
    }
  }
  auto checkpoint_list = [&] {  // parameters, then the carry slots
    ssmx::ParameterList<T> list = model.parameters();
    for (auto& c : carry_slots) list.push_back(c.saved.get());
    return list;
  };
  auto carried = [&](const CarrySlot& c) -> std::vector<ssmx::Tensor<T>>& {
    return c.halo ? carry.final_halo : carry.final_states;
  };
  index_t row_begin = 0, row_end = 0;  // this rank's rows of each batch
  std::tie(row_begin, row_end) = group.rows(index_t(cfg.batch));

  // tokens_seen: positions processed (padding included; tokens/s); targets_seen: the tokens
  // with a target, which the loss and the metrics lines count (summary.json's "tokens").
  std::int64_t step = 0, tokens_seen = 0, targets_seen = 0;
  double train_seconds = 0;  // over all invocations, steps only
  Eval best;
  if (session.resume_from) {
    const std::string path = group.scheme() == Scheme::layer && !root
                                 ? shard_path(*session.resume_from, group.rank(), group.size())
                                 : *session.resume_from;
    const auto info = std::visit(
        [&](auto& o) { return ssmx::io::load_checkpoint(path, checkpoint_list(), o); }, opt);
    step = info.step;
    auto field = [&](const char* key) -> const std::string& {
      auto it = info.extra.find(key);
      SSMX_REQUIRE(it != info.extra.end(), ssmx::IOError, path, ": field \"__metadata__.extra.", key, "\" is missing");
      return it->second;
    };
    auto number = [&](const char* key) {
      const auto v = ssmx::io::parse_double(field(key));
      SSMX_REQUIRE(v.has_value(), ssmx::IOError, path, ": field \"__metadata__.extra.", key, "\" is \"", field(key),
                   "\", expected a number");
      return *v;
    };
    try {
      data.restore(field("data_cursor"));
    } catch (const ssmx::ValueError& e) {
      throw ssmx::ValueError(ssmx::detail::str(path, ": the saved data cursor does not fit --data ", cfg.data,
                                               " (was the file changed?): ", e.what()));
    }
    tokens_seen = std::int64_t(number("tokens_seen"));
    targets_seen = info.extra.count("targets_seen") ? std::int64_t(number("targets_seen")) : 0;
    train_seconds = number("train_seconds");
    if (info.extra.count("best_eval_step"))
      best = Eval{std::int64_t(number("best_eval_step")), number("best_eval_loss"), number("best_eval_accuracy")};
    if (!carry_slots.empty()) {
      carry.final_states.resize(std::size_t(K));  // layers this rank does not hold stay empty
      if (halo > 0) carry.final_halo.resize(std::size_t(K));
    }
    for (const auto& c : carry_slots) {  // this rank's rows
      const ssmx::Tensor<T>& all = c.saved->value;
      const index_t per_row = all.numel() / all.dims()[0];
      ssmx::Dims d = all.dims();
      d[0] = row_end - row_begin;
      ssmx::Tensor<T> mine(d, ssmx::Tag::Activations);
      std::copy_n(all.data() + row_begin * per_row, mine.numel(), mine.data());
      carried(c)[std::size_t(c.layer)] = std::move(mine);
    }
  }
  // Every rank has checked its inputs and loaded its part before rank 0 writes anything.
  group.check_same("the step to start from", std::uint64_t(step));
  group.check_same_layout(model.parameters());

  const std::int64_t last = cfg.until > 0 ? std::min(cfg.until, cfg.steps) : cfg.steps;
  if (session.resume_from && step >= last) {  // a finished run, or --until behind it: no file changes
    if (root) {
      if (cfg.until > 0 && cfg.until < cfg.steps)
        std::printf("nothing to do: the run in %s is at step %ld, and --until %ld is not after it\n",
                    session.out.c_str(), long(step), long(cfg.until));
      else
        std::printf("nothing to do: the run in %s is at step %ld of %ld (pass a larger --steps to continue it)\n",
                    session.out.c_str(), long(step), long(cfg.steps));
      std::fflush(stdout);
    }
    group.barrier();
    return 0;
  }

  const std::string metrics_path = session.out + "/metrics.jsonl";
  MetricsFile metrics;
  std::size_t dropped = 0;
  // A fresh run that fails before its first checkpoint removes what it created; one that is
  // killed leaves a start that check_fresh recognises and replaces.
  FreshRunFiles created;
  if (root && session.resume_from) {
    remove_stale_temporaries(session.out);
    remove_stale_temporaries(session.checkpoint_dir);
    dropped = metrics.resume(metrics_path, step);
  } else if (root) {
    if (session.replaces_unsaved_start) {
      std::printf("note: %s holds the files of a run that stopped before its first checkpoint; starting afresh "
                  "over them\n", session.out.c_str());
      remove_unsaved_start(session);
    }
    created.track_directories(session.out, session.checkpoint_dir);
    std::error_code ec;
    fs::create_directories(session.out, ec);
    SSMX_REQUIRE(!ec, ssmx::IOError, session.out, ": cannot create the output directory: ", ec.message());
    nlohmann::ordered_json c = cfg.to_json();
    c["out"] = session.out;
    c["checkpoint_dir"] = session.checkpoint_dir;
    // config.json first: a directory holding it and no checkpoint is a start that can be replaced.
    created.track(session.out + "/config.json");
    ssmx::io::write_file_atomically(session.out + "/config.json", c.dump(2) + "\n");
    created.track(metrics_path);
    metrics.create(metrics_path);
  }
  // --sample-every: samples.jsonl, kept like metrics.jsonl: on resume, lines of steps after
  // the checkpoint are dropped first (the resumed run writes them again, the same), so a kill
  // at any moment neither loses nor repeats a line. A sample is written before the checkpoint
  // of its step, each line whole and flushed.
  const std::string samples_path = session.out + "/samples.jsonl";
  MetricsFile samples;
  bool samples_open = false;
  if (root) {
    std::error_code ec;
    const bool exists = fs::symlink_status(samples_path, ec).type() != fs::file_type::not_found;
    if (session.resume_from && (cfg.sample_every > 0 || exists)) {
      samples.resume(samples_path, step);
      samples_open = true;
    } else if (!session.resume_from && cfg.sample_every > 0) {
      created.track(samples_path);
      samples.create(samples_path);
      samples_open = true;
    }
  }
  std::string last_checkpoint;  // written in this invocation
  std::string failure;          // a step that failed after the last good state was saved
  if (root) {
    std::printf("ssmx %s train: model %s, vocab %ld\n", SSMX_VERSION_STRING, model_text.c_str(), long(data.vocab()));
    std::printf("data: %s\n", data.description().c_str());
    if (!data.warning().empty()) std::printf("%s\n", data.warning().c_str());
    std::printf("%s, context %ld, batch %ld, %s lr %g (%s, warmup %ld), %ld steps\n", describe_strategy(cfg).c_str(),
                long(cfg.context), long(cfg.batch), cfg.optimizer.c_str(), cfg.lr, cfg.schedule.c_str(),
                long(std::min(cfg.warmup, cfg.steps)), long(cfg.steps));
    const std::string split = group.describe(K, index_t(cfg.batch), index_t(cfg.context));
    if (!split.empty()) std::printf("%s\n", split.c_str());
    std::printf("output: %s  (checkpoints: %s)\n", session.out.c_str(), session.checkpoint_dir.c_str());
    if (session.resume_from)
      std::printf("resuming from %s at step %ld%s\n", session.resume_from->c_str(), long(step),
                  dropped ? (" (dropped " + std::to_string(dropped) + " metrics lines written after it)").c_str() : "");
    std::fflush(stdout);
  }

  Progress progress(cfg.print_every, /*bar=*/!group.distributed());
  std::int64_t last_saved = session.resume_from ? step : -1;
  // The data cursor at step cursor_base_step (the start, or the last save).
  std::string cursor_base = data.cursor();
  std::int64_t cursor_base_step = step;
  auto save = [&] {
    for (std::size_t i = 0; i < carry_slots.size(); ++i) {
      const CarrySlot& c = carry_slots[i];
      auto& v = carried(c);
      auto& dst = c.saved->value;
      if (v.empty())  // no step yet: the zero state
        std::fill_n(dst.data(), dst.numel(), T(0));
      else
        group.gather_rows(v[std::size_t(c.layer)], dst, int(i));
    }
    ssmx::io::Metadata extra{{"config", cfg.to_json().dump()},
                             {"data_cursor", data.cursor()},
                             {"tokens_seen", ssmx::io::exact_string(tokens_seen)},
                             {"targets_seen", ssmx::io::exact_string(targets_seen)},
                             {"train_seconds", ssmx::io::exact_string(train_seconds)}};
    if (best.valid()) {
      extra["best_eval_step"] = ssmx::io::exact_string(best.step);
      extra["best_eval_loss"] = ssmx::io::exact_string(best.loss);
      extra["best_eval_accuracy"] = ssmx::io::exact_string(best.accuracy);
    }
    auto write_main = [&] {
      last_checkpoint = std::visit(
          [&](auto& o) {
            return ssmx::io::save_checkpoint_to_dir(session.checkpoint_dir, checkpoint_list(), o, step, extra);
          },
          opt);
    };
    if (group.scheme() == Scheme::layer) {
      if (!root) {
        fs::create_directories(session.checkpoint_dir);
        const std::string main = (fs::path(session.checkpoint_dir) / ssmx::io::checkpoint_file_name(step)).string();
        std::visit(
            [&](auto& o) {
              ssmx::io::save_checkpoint(shard_path(main, group.rank(), group.size()), checkpoint_list(), o, step, extra);
            },
            opt);
      }
      group.barrier();  // every other rank's part is written and synced: now the part that completes it
      if (root) write_main();
    } else if (root) {
      write_main();
    }
    last_saved = step;
    created.keep();  // a run from here on
    cursor_base = extra["data_cursor"];
    cursor_base_step = step;
    if (root) prune_checkpoints(session.checkpoint_dir, step, session.keep_checkpoints);
  };
  // --eval-data: the whole file as one sequence (Group::evaluate_stream).
  EvalFile* eval_file = data.eval_file();
  std::int64_t eval_data_step = -1;
  nn::HeldOut eval_data;
  auto evaluate_file = [&] {
    if (!eval_file) return;
    eval_data = group.evaluate_stream(
        model, eval_file->size(), [&](index_t b, index_t n, token_t* out) { eval_file->read(b, n, out); },
        index_t(cfg.eval_window), index_t(cfg.chunk));
    eval_data_step = step;
    if (!root) return;
    JsonLine line;
    line.add("type", "eval_data").add("step", step).add("loss", eval_data.mean_loss());
    line.add("perplexity", eval_data.perplexity());
    if (eval_file->bytes()) line.add("bits_per_byte", eval_data.bits_per_byte());
    line.add("tokens", std::int64_t(eval_data.tokens));
    metrics.write(line);
    char buf[200], bpb[40] = "";
    if (eval_file->bytes()) std::snprintf(bpb, sizeof bpb, "  bits/byte %.4f", eval_data.bits_per_byte());
    std::snprintf(buf, sizeof buf, "eval data at step %ld: loss %.4f  perplexity %.3f%s  (%ld tokens)", long(step),
                  eval_data.mean_loss(), eval_data.perplexity(), bpb, long(eval_data.tokens));
    progress.message(buf);
  };
  // --sample-every: rank 0 continues a fixed prompt with a fixed seed (Data::prompt).
  const std::vector<token_t> sample_prompt = cfg.sample_every > 0 ? data.prompt(32) : std::vector<token_t>();
  const bool byte_level = cfg.data.rfind("text:", 0) == 0;
  std::int64_t sample_step = -1;
  auto sample = [&] {
    if (cfg.sample_every <= 0 || sample_prompt.empty()) return;
    sample_step = step;
    if (!root) return;
    ModelGenerator<LM> generator(model);
    GenerateOptions o;
    o.seed = stream_seed(std::uint64_t(cfg.seed), 3);
    o.max_tokens = index_t(cfg.sample_tokens);
    o.chunk = index_t(cfg.chunk);
    const Generated g = generate(generator, sample_prompt, o, [](index_t, token_t) {});
    const std::vector<token_t>& out = g.tokens[0];
    JsonLine line;
    line.add("step", step);
    if (byte_level) line.add_json("prompt", json_text(sample_prompt)).add_json("sample", json_text(out));
    line.add_json("prompt_ids", json_ids(sample_prompt)).add_json("sample_ids", json_ids(out));
    samples.write(line);
    progress.message("sample at step " + std::to_string(step) + ": " + (byte_level ? json_text(out) : json_ids(out)));
  };
  Eval last_eval;
  auto evaluate = [&] {
    if (eval_file && eval_file->size() <= cfg.eval_tokens) evaluate_file();  // cheap enough for every evaluation
    const auto r = group.evaluate(model, data, index_t(cfg.chunk));
    if (r.tokens == 0) return;
    last_eval = Eval{step, r.mean_loss(), r.accuracy()};
    if (!best.valid() || last_eval.loss < best.loss) best = last_eval;
    if (!root) return;
    JsonLine line;
    line.add("type", "eval").add("step", step).add("loss", last_eval.loss).add("accuracy", last_eval.accuracy);
    line.add("tokens", std::int64_t(r.tokens));
    if (data.chance() >= 0) line.add("chance", data.chance());
    metrics.write(line);
    char buf[160];
    std::snprintf(buf, sizeof buf, "eval at step %ld: loss %.4f  accuracy %.3f%s", long(step), last_eval.loss,
                  last_eval.accuracy,
                  data.chance() >= 0 ? ("  (chance " + std::to_string(data.chance()).substr(0, 5) + ")").c_str() : "");
    progress.message(buf);
  };

  const auto start = Clock::now();
  auto since_start = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  double run_seconds = 0;  // this invocation's steps
  std::int64_t run_tokens = 0, run_steps = 0;
  std::vector<std::int64_t> run_peaks(std::size_t(group.size()), 0);  // per rank
  std::string stop_reason = cfg.until > 0 && last < cfg.steps ? "until" : "completed";
  int signal_received = 0, signalled_rank = -1;
  StepData sd;
  // One process: a step that fails (a non-finite loss or gradient, out of memory) leaves the
  // parameters and the optimiser as they were; the run then saves that last good state. For
  // it, the data cursor is rewound (from the last saved cursor, replaying the batches since)
  // and the carried state is the copy taken before the failed step. (Under --dist the other
  // ranks need not have failed alike: the job ends instead.)
  const bool recoverable = !group.distributed();
  std::vector<ssmx::Tensor<T>> good_states, good_halo;
  {
    StopSignals signals;
    while (step < last) {
      data.next(step, sd);
      if (data.carries_state()) {
        if (recoverable) {
          copy_tensors(carry.final_states, good_states);
          copy_tensors(carry.final_halo, good_halo);
        }
        carry_over(carry, sd.continues, row_begin);
      }
      const double lr = schedule.lr(step + 1);  // step s = 1, 2, ...: warm-up starts at lr / warmup, not 0
      std::visit([&](auto& o) { o.set_lr(lr); }, opt);
      ssmx::reset_peak(ssmx::Space::Host);
      const auto t0 = Clock::now();
      nn::TrainStepResult r;
      try {
        r = train_step(group, model, opt, strategy, sd, cfg.clip, data.carries_state() ? &carry : nullptr);
      } catch (const ssmx::Error& e) {
        const std::string what = ssmx::detail::str("step ", step + 1, " failed: ", e.what());
        if (!recoverable || step == 0) throw ssmx::ValueError(what);
        if (last_saved == step)  // nothing newer than what is on disk
          throw ssmx::ValueError(ssmx::detail::str(what, "; the checkpoint of step ", step, " is the last good state"));
        if (data.carries_state()) {
          data.restore(cursor_base);
          StepData skipped;
          for (std::int64_t s = cursor_base_step; s < step; ++s) data.next(s, skipped);
          carry.final_states = std::move(good_states);
          carry.final_halo = std::move(good_halo);
        }
        failure = what;
        stop_reason = "failed";
        break;
      }
      run_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      train_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      ++step;
      ++run_steps;
      tokens_seen += sd.rows * sd.len;
      run_tokens += sd.rows * sd.len;
      targets_seen += std::count_if(sd.targets.begin(), sd.targets.end(), [](nn::token_t y) { return y >= 0; });

      // What every rank must decide alike, and each rank's peak memory: one collective.
      const bool over_budget = cfg.minutes > 0 && since_start() >= cfg.minutes * 60;
      const auto agreed = group.gather({StopSignals::requested(), over_budget ? 1 : 0,
                                        std::int64_t(ssmx::memory_stats(ssmx::Space::Host).peak)});
      std::int64_t peak = 0;
      bool budget_spent = false;
      for (int q = 0; q < group.size(); ++q) {
        const std::int64_t* a = agreed.data() + 3 * q;
        if (a[0] != 0 && signal_received == 0) signal_received = int(a[0]), signalled_rank = q;
        budget_spent = budget_spent || a[1] != 0;
        peak = std::max(peak, a[2]);
        run_peaks[std::size_t(q)] = std::max(run_peaks[std::size_t(q)], a[2]);
      }
      const double tps = double(run_tokens) / std::max(run_seconds, 1e-9);

      if (root && (step % cfg.log_every == 0 || step == last)) {
        JsonLine line;
        line.add("type", "train").add("step", step).add("loss", r.mean_loss()).add("accuracy", r.accuracy());
        line.add("tokens", std::int64_t(r.tokens)).add("context", std::int64_t(sd.len)).add("lr", lr);
        line.add("grad_norm", r.grad_norm).add("tokens_per_s", tps).add("peak_bytes", peak);
        line.add("train_seconds", train_seconds);
        metrics.write(line);
      }
      if (root) {
        ProgressInfo pi;
        pi.step = step;
        pi.total = last;
        pi.loss = r.mean_loss();
        pi.accuracy = r.accuracy();
        pi.tokens_per_s = tps;
        pi.peak_bytes = double(peak);
        pi.eta_seconds = since_start() / double(run_steps) * double(last - step);
        if (cfg.minutes > 0) pi.eta_seconds = std::min(pi.eta_seconds, cfg.minutes * 60 - since_start());
        progress.update(pi);
      }

      if (cfg.eval_every > 0 && step % cfg.eval_every == 0 && step < last) evaluate();
      if (cfg.sample_every > 0 && step % cfg.sample_every == 0 && step < last) sample();
      if (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 && step < last) save();
      if (signal_received != 0) {
        stop_reason = "interrupted";
        break;
      }
      if (budget_spent) {
        stop_reason = "time budget";
        break;
      }
    }
  }
  if (root) progress.finish();

  const bool interrupted = stop_reason == "interrupted", failed = stop_reason == "failed";
  if (!interrupted && !failed) {  // the final evaluation and sample
    if (last_eval.step != step) evaluate();
    if (eval_data_step != step) evaluate_file();
    if (sample_step != step) sample();
  }
  if (last_saved != step) save();
  if (failed)
    failure += ssmx::detail::str("; the last good state, step ", step, ", is saved in ", last_checkpoint,
                                 " (continue it with ", resume_command(session, group.size()), ")");
  const std::int64_t run_peak = *std::max_element(run_peaks.begin(), run_peaks.end());

  if (root) {
    // Summary and plot.
    const std::string title = cfg.model + " on " + cfg.data + ", " + describe_strategy(cfg);
    const std::string plot_path = write_plot(read_history(metrics_path), session.out, title);
    nlohmann::ordered_json s;
    s["model"] = cfg.model;
    s["parameters"] = n_params;
    s["data"] = cfg.data;
    s["strategy"] = cfg.strategy;
    s["dist"] = cfg.dist;
    s["ranks"] = group.size();
    s["stop_reason"] = stop_reason;
    s["steps"] = step;
    s["steps_planned"] = cfg.steps;
    s["steps_this_run"] = run_steps;
    s["tokens"] = targets_seen;  // as the metrics lines count them: tokens with a target
    s["positions"] = tokens_seen;  // processed, padding included; tokens_per_s counts these
    s["train_seconds"] = train_seconds;
    s["wall_seconds_this_run"] = since_start();
    s["tokens_per_s"] = run_seconds > 0 ? double(run_tokens) / run_seconds : 0.0;
    s["peak_bytes"] = run_peak;  // the tracked host allocator's peak over this run's steps (the largest rank's)
    if (group.distributed()) s["peak_bytes_per_rank"] = run_peaks;
    s["final_eval"] = last_eval.valid() ? eval_json(last_eval, data.chance()) : nlohmann::ordered_json();
    s["best_eval"] = best.valid() ? eval_json(best, data.chance()) : nlohmann::ordered_json();
    if (eval_file) {  // mean loss per prediction, nats; tokens: the predictions (the file's tokens - 1)
      nlohmann::ordered_json e{{"path", eval_file->spec()}};
      if (eval_data_step >= 0) {
        e["step"] = eval_data_step;
        e["tokens"] = eval_data.tokens;
        e["loss"] = eval_data.mean_loss();
        e["perplexity"] = eval_data.perplexity();
        e["bits_per_byte"] = eval_file->bytes() ? nlohmann::ordered_json(eval_data.bits_per_byte()) : nlohmann::ordered_json();
      }
      s["eval_data"] = e;
    }
    if (samples_open) s["samples"] = samples_path;
    s["checkpoint"] = last_checkpoint;
    s["metrics"] = metrics_path;
    s["plot"] = plot_path;
    ssmx::io::write_file_atomically(session.out + "/summary.json", s.dump(2) + "\n");

    std::printf("summary: %ld/%ld steps (%s), %s tokens with a target (%s processed) in %s (%s tokens/s this run), "
                "peak %.1f MiB%s\n",
                long(step), long(cfg.steps), stop_reason.c_str(), format_count(double(targets_seen)).c_str(),
                format_count(double(tokens_seen)).c_str(),
                format_duration(train_seconds).c_str(), format_count(s["tokens_per_s"].get<double>()).c_str(),
                double(run_peak) / double(1 << 20), group.distributed() ? " (the largest rank's)" : "");
    auto print_eval = [&](const char* what, const Eval& e) {
      if (!e.valid()) return;
      std::printf("%s eval at step %ld: loss %.4f  accuracy %.3f", what, long(e.step), e.loss, e.accuracy);
      if (data.chance() >= 0) std::printf("  (chance %.3f)", data.chance());
      std::printf("\n");
    };
    print_eval(interrupted ? "last " : "final", last_eval);
    print_eval("best ", best);
    if (eval_file && eval_data_step >= 0) {
      std::printf("eval data %s at step %ld: loss %.4f  perplexity %.3f", eval_file->spec().c_str(), long(eval_data_step),
                  eval_data.mean_loss(), eval_data.perplexity());
      if (eval_file->bytes()) std::printf("  bits/byte %.4f", eval_data.bits_per_byte());
      std::printf("  (%ld tokens)\n", long(eval_data.tokens));
    }
    std::printf("wrote %s/summary.json%s%s; checkpoint %s\n", session.out.c_str(), plot_path.empty() ? "" : ", ",
                plot_path.c_str(), last_checkpoint.c_str());
    if (interrupted)
      std::printf("stopped by signal %d at step %ld%s; continue with %s\n", signal_received, long(step),
                  group.distributed() ? (" (sent to rank " + std::to_string(signalled_rank) + ")").c_str() : "",
                  resume_command(session, group.size()).c_str());
    std::fflush(stdout);
  }
  // Every rank leaves together: a rank lost at the very end is noticed (SSMX_DIST_TIMEOUT)
  // instead of being waited for in MPI_Finalize.
  group.barrier();
  if (!failure.empty()) throw ssmx::ValueError(failure);
  return 0;
}

// The model of a trainer run, for generation: preset <Layer, K> with the vocabulary of the
// run's saved config, its parameters from the checkpoint's files (load_run_parameters).
template <class Layer, index_t K>
std::unique_ptr<Generator> open_run_model(const nlohmann::json& saved, const std::vector<std::string>& files) {
  using LM = nn::Model<Layer, K, ssmx::Space::Host>;
  const auto& v = saved.contains("vocab") ? saved["vocab"] : nlohmann::json();
  SSMX_REQUIRE(v.is_number_integer() && v.get<std::int64_t>() > 0, ssmx::IOError, files.front(),
               ": the saved config's field \"vocab\" is ", ssmx::io::detail::json_excerpt(v),
               ", expected an integer > 0");
  typename LM::Config c{index_t(v.get<std::int64_t>()), true, 0};  // the trainer ties the head
  auto model = std::make_unique<LM>(c);
  load_run_parameters(*model, files);
  return std::make_unique<ModelGenerator<LM>>(std::move(model));
}

// The shape of a Mamba layer type, for matching a Hugging Face / state-spaces config.
template <class Layer>
struct MambaShapeOf {
  static constexpr bool value = false;
};
template <index_t D, index_t N, index_t E, index_t W, index_t R>
struct MambaShapeOf<nn::Mamba<T, D, N, E, W, R>> {
  static constexpr bool value = true;
  static constexpr index_t d_model = D, d_state = N, expand = E, d_conv = W, dt_rank = R;
};

// A public Mamba checkpoint (io/mamba.hpp) in a model of <Layer, K>; the caller matched the
// shapes (check_mamba_config checks them again).
template <class Layer, index_t K>
std::unique_ptr<Generator> open_mamba_checkpoint(const std::string& dir, const ssmx::io::MambaConfig& c) {
  using LM = nn::Model<Layer, K, ssmx::Space::Host>;
  auto model = std::make_unique<LM>(typename LM::Config{c.vocab, c.tie_embeddings, 0});
  ssmx::io::load_mamba(*model, dir);
  return std::make_unique<ModelGenerator<LM>>(std::move(model));
}

// The shape of a Mamba-2 layer type, for matching a Hugging Face / state-spaces config.
template <class Layer>
struct Mamba2ShapeOf {
  static constexpr bool value = false;
};
template <index_t D, index_t N, index_t P, index_t G, index_t E, index_t W>
struct Mamba2ShapeOf<nn::Mamba2<T, D, N, P, G, E, W>> {
  static constexpr bool value = true;
  static constexpr index_t d_model = D, d_state = N, head_dim = P, n_groups = G, expand = E, d_conv = W;
};

// A public Mamba-2 checkpoint (io/mamba2.hpp) in a model of <Layer, K>, as above.
template <class Layer, index_t K>
std::unique_ptr<Generator> open_mamba2_checkpoint(const std::string& dir, const ssmx::io::Mamba2Config& c) {
  using LM = nn::Model<Layer, K, ssmx::Space::Host>;
  auto model = std::make_unique<LM>(typename LM::Config{c.vocab, c.tie_embeddings, 0});
  ssmx::io::load_mamba2(*model, dir);
  return std::make_unique<ModelGenerator<LM>>(std::move(model));
}

// The models a trainer program offers: --model NAME picks one. Each preset compiles the
// whole training loop for its layer type, so register only the ones the program needs.
// The same list serves generation (train/generate.hpp): a run's saved preset name finds its
// model, and every Mamba preset's shape (plus those of add_checkpoint_shape) can hold a
// public Mamba checkpoint.
class Presets {
 public:
  using Runner = int (*)(Config&, Data&, const Session&, Group&, const std::string&);
  using RunOpener = std::unique_ptr<Generator> (*)(const nlohmann::json& saved, const std::vector<std::string>& files);
  using CheckpointOpener = std::unique_ptr<Generator> (*)(const std::string& dir, const ssmx::io::MambaConfig&);
  struct Preset {
    std::string name, description;
    Runner run;
    RunOpener open;
    index_t layers;
  };
  // A Mamba model shape that public checkpoints load into; the fields as io::MambaConfig's.
  struct MambaShape {
    std::string name;
    index_t d_model, n_layer, d_state, expand, d_conv, dt_rank;
    CheckpointOpener open;
  };

  // A Mamba-2 model shape; the fields as io::Mamba2Config's.
  using Checkpoint2Opener = std::unique_ptr<Generator> (*)(const std::string& dir, const ssmx::io::Mamba2Config&);
  struct Mamba2Shape {
    std::string name;
    index_t d_model, n_layer, d_state, head_dim, n_groups, expand, d_conv;
    Checkpoint2Opener open;
  };

  // A Mamba or Mamba-2 shape for checkpoints only (no training preset), e.g. a test fixture's.
  template <class Layer, index_t K>
  Presets& add_checkpoint_shape(const std::string& name) {
    if constexpr (Mamba2ShapeOf<Layer>::value) {
      using S = Mamba2ShapeOf<Layer>;
      shapes2_.push_back({name, S::d_model, K, S::d_state, S::head_dim, S::n_groups, S::expand, S::d_conv,
                          &open_mamba2_checkpoint<Layer, K>});
    } else {
      using S = MambaShapeOf<Layer>;
      static_assert(S::value, "train::Presets::add_checkpoint_shape: Layer must be nn::Mamba<float, ...> or nn::Mamba2<float, ...>");
      shapes_.push_back({name, S::d_model, K, S::d_state, S::expand, S::d_conv, S::dt_rank, &open_mamba_checkpoint<Layer, K>});
    }
    return *this;
  }
  const std::vector<MambaShape>& mamba_shapes() const { return shapes_; }
  const std::vector<Mamba2Shape>& mamba2_shapes() const { return shapes2_; }

  // Layer: a layer type as nn::Model takes it, with float parameters on the host; K: the
  // number of layers. The description goes into the log (default: d_model and the state).
  template <class Layer, index_t K>
  Presets& add(const std::string& name, const std::string& description = "") {
    SSMX_REQUIRE(!name.empty() && name.find_first_of(" |") == std::string::npos, ssmx::ValueError,
                 "train::Presets::add: preset name '", name, "' is empty or holds a space or '|'");
    SSMX_REQUIRE(!find(name), ssmx::ValueError, "train::Presets::add: preset '", name, "' is registered twice");
    list_.push_back({name, description.empty() ? LayerInfo<Layer>::describe() : description, &run<Layer, K>,
                     &open_run_model<Layer, K>, K});
    if constexpr (MambaShapeOf<Layer>::value || Mamba2ShapeOf<Layer>::value) add_checkpoint_shape<Layer, K>(name);
    return *this;
  }
  const Preset* find(const std::string& name) const {
    for (const auto& p : list_)
      if (p.name == name) return &p;
    return nullptr;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& p : list_) n.push_back(p.name);
    return n;
  }
  bool empty() const { return list_.empty(); }

 private:
  std::vector<Preset> list_;
  std::vector<MambaShape> shapes_;
  std::vector<Mamba2Shape> shapes2_;
};

inline int dispatch(const Presets& presets, Config& cfg, Data& data, const Session& session, Group& group) {
  const Presets::Preset* p = presets.find(cfg.model);
  if (!p) throw UsageError("--model '" + cfg.model + "': not a preset");
  return p->run(cfg, data, session, group, p->description);
}

// ---- command line -------------------------------------------------------------------------

// On --resume: every saved field not given on the command line takes its saved value; a
// given one that fixes the run's numbers must equal it. Lines for the log go to `notes`
// (printed by rank 0 once the ranks are known).
inline void merge_saved_config(Config& cfg, const CLI::App& app, const nlohmann::json& saved, const std::string& path,
                        std::vector<std::string>& notes) {
  for (const Field& f : cfg.fields()) {
    if (f.on_resume == OnResume::not_saved) continue;
    SSMX_REQUIRE(saved.contains(f.name) || !f.if_absent.is_null(), ssmx::IOError, path,
                 ": the saved config lacks field \"", f.name, "\"");
    const nlohmann::json was = saved.contains(f.name) ? saved[f.name] : f.if_absent;
    const bool given = app.get_option(std::string("--") + f.name)->count() > 0;
    std::visit(
        [&](auto* p) {
          using V = std::decay_t<decltype(*p)>;
          const nlohmann::json now = *p;
          if (given && now != was && f.on_resume == OnResume::must_match)
            throw UsageError(ssmx::detail::str("--", f.name, " ", now.dump(), " differs from the value the run was started with, ",
                                               ssmx::io::detail::json_excerpt(was), " (saved in ", path, "); a resumed run keeps it: drop the flag, or start a new run with another --out"));
          if (given && now != was && std::string(f.name) == "steps")
            notes.push_back("note: --steps changes from " + ssmx::io::detail::json_excerpt(was) + " to " + now.dump() +
                            "; the learning-rate schedule now spans " + now.dump() + " steps");
          if (!given) {
            try {
              *p = was.get<V>();
            } catch (const nlohmann::json::exception&) {
              throw ssmx::IOError(ssmx::detail::str(path, ": the saved config's field \"", f.name, "\" is ",
                                                    ssmx::io::detail::json_excerpt(was),
                                                    ", not a ", std::is_same_v<V, std::string> ? "string" : "number"));
            }
          }
        },
        f.value);
  }
}

// The number of ranks a run was started with (its saved config; 1 before --dist existed).
inline std::int64_t saved_ranks(const nlohmann::json& saved, const std::string& path) {
  if (!saved.contains("ranks")) return 1;
  const auto& r = saved["ranks"];
  SSMX_REQUIRE(r.is_number_integer() && r.get<std::int64_t>() >= 1, ssmx::IOError, path,
               ": the saved config's field \"ranks\" is ", ssmx::io::detail::json_excerpt(r),
               ", expected an integer >= 1");
  return r.get<std::int64_t>();
}

inline std::string default_out(const Config& c, std::time_t now) {
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  const std::string kind = c.data.substr(0, c.data.find(':'));
  return "runs/" + c.model + "-" + kind + "-" + stamp;
}

// A fresh run must not write over another run's files. A directory counts as holding a run
// once the run's first checkpoint exists; the files of a start that never got that far (it
// failed or was killed first) are replaced. Returns whether they are.
// `flag path`: the path and every existing ancestor must be directories (or not exist yet),
// else a usage error naming the flag rather than a file system error later.
inline void check_directory_path(const char* flag, const std::string& path) {
  std::error_code ec;
  for (fs::path p = path; !p.empty(); p = p.parent_path()) {
    const auto st = fs::status(p, ec);
    if (st.type() == fs::file_type::not_found || fs::is_directory(st)) {
      if (st.type() != fs::file_type::not_found) return;  // an existing directory: its ancestors are too
    } else if (p == fs::path(path)) {
      throw UsageError(ssmx::detail::str(flag, " ", path, ": exists and is not a directory"));
    } else {
      throw UsageError(ssmx::detail::str(flag, " ", path, ": ", p.string(), " is not a directory"));
    }
    if (p == p.parent_path()) return;
  }
}

inline bool check_fresh(const Session& s) {
  check_directory_path("--out", s.out);
  check_directory_path("--checkpoint-dir", s.checkpoint_dir);
  std::error_code ec;
  SSMX_REQUIRE(fs::symlink_status(s.out, ec).type() == fs::file_type::not_found || fs::is_directory(s.out, ec),
               UsageError, "--out ", s.out, ": exists and is not a directory");
  SSMX_REQUIRE(fs::symlink_status(s.checkpoint_dir, ec).type() == fs::file_type::not_found ||
                   fs::is_directory(s.checkpoint_dir, ec),
               UsageError, "--checkpoint-dir ", s.checkpoint_dir, ": exists and is not a directory");
  const bool unsaved = is_unsaved_start(s);
  for (const char* name : run_files) {
    const fs::path p = fs::path(s.out) / name;
    SSMX_REQUIRE(unsaved || fs::symlink_status(p, ec).type() == fs::file_type::not_found, UsageError, s.out,
                 " already holds a run (", p.string(), " exists): pass --resume to continue it, or choose another --out");
  }
  if (fs::is_directory(s.checkpoint_dir, ec)) {
    const auto found = ssmx::io::latest_checkpoint(s.checkpoint_dir);
    SSMX_REQUIRE(!found, UsageError, s.checkpoint_dir, " already holds checkpoints (", *found,
                 "): pass --resume to continue that run, or choose another --checkpoint-dir");
  }
  return unsaved;
}

// What every rank must be given alike: every flag but --threads (a machine may have other cores).
inline nlohmann::json rank_flags(Config& cfg, const Session& s, bool resume) {
  nlohmann::json j = nlohmann::json::object();
  for (const Field& f : cfg.fields())
    if (std::string(f.name) != "threads") std::visit([&](auto* p) { j[f.name] = *p; }, f.value);
  j["keep-checkpoints"] = s.keep_checkpoints;
  j["resume"] = resume ? 1 : 0;
  return j;
}

// The trainer: parses the command line (every flag of Config, --keep-checkpoints and
// --resume; --model picks one of `presets`, by default the first), trains, and returns the
// exit status: 0 done or stopped by a signal, 1 the data or the run failed, 2 a usage error.
inline int main(int argc, char** argv, const Presets& presets) {
  if (presets.empty()) {
    std::fprintf(stderr, "train: error: the program registered no model preset (train::Presets().add<Layer, K>(name))\n");
    return 2;
  }
  Config cfg;
  cfg.model_names = presets.names();
  if (!presets.find(cfg.model)) cfg.model = cfg.model_names.front();
  Session session;
  if (argc > 0 && argv[0]) session.program = argv[0];
  // Under mpirun every rank gets the signal: only the first says that it will stop.
  if (launcher_rank() > 0) print_stop_message.store(false);
  bool resume = false;
  CLI::App app{"Train a state space model with the exact adjoint backward or another gradient strategy; see the "
               "comment at the top of examples/train/trainer.hpp"};
  app.get_formatter()->column_width(34);
  for (Field& f : cfg.fields()) {
    CLI::Option* o = std::visit(
        [&](auto* p) {
          using V = std::decay_t<decltype(*p)>;
          CLI::Option* opt = app.add_option(std::string("--") + f.name, *p, f.help);
          if constexpr (!std::is_same_v<V, std::string>)  // every number: its type and bound, by name
            opt->check(limit_validator(std::holds_alternative<Limit>(f.check) ? std::get<Limit>(f.check) : Limit{},
                                       std::is_integral_v<V>));
          return opt;
        },
        f.value);
    o->capture_default_str();
    if (const auto* v = std::get_if<CLI::Validator>(&f.check)) o->check(*v);
  }
  app.add_option("--keep-checkpoints", session.keep_checkpoints, "keep the newest N checkpoints (0: all)")
      ->capture_default_str()
      ->check(limit_validator(nonnegative_limit(), true));
  app.footer(
      "Exit status:\n"
      "  0  the run finished, was stopped by a signal (with a checkpoint), or had nothing to do\n"
      "  1  the data, a checkpoint or a step failed (a run with a checkpoint saves its last good state first)\n"
      "  2  a flag is wrong, alone or with the others (also a --resume whose flags differ from the run's),\n"
      "     or --out cannot hold the run");
  app.add_flag("--resume", resume, "continue the run in --out (or --checkpoint-dir) from its latest checkpoint");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints the message (or --help)
    return rc == 0 ? 0 : 2;       // a usage error, as the others
  }

  auto exit_code = [](const std::exception& e) { return dynamic_cast<const UsageError*>(&e) ? 2 : 1; };
  std::optional<Group> group;  // MPI, when --dist asks for it
  std::optional<Data> data;
  std::vector<std::string> notes;
  std::int64_t started_ranks = 1;
  try {
    if (cfg.device == "cuda")
      throw UsageError("--device cuda: this trainer is built for the host (its checkpoints, data packing and MPI "
                       "steps are host code); the model itself runs on the GPU as nn::Model<Layer, K, Space::Cuda>, "
                       "as the main job's train_recall_cuda does. Use --device cpu");

#if defined(_OPENMP)
    if (cfg.threads > 0) omp_set_num_threads(int(cfg.threads));
#endif

    if (resume) {
      SSMX_REQUIRE(!cfg.out.empty() || !cfg.checkpoint_dir.empty(), UsageError,
                   "--resume: pass --out DIR (or --checkpoint-dir DIR) of the run to continue");
      if (cfg.out.empty()) cfg.out = fs::path(cfg.checkpoint_dir).parent_path().string();
      if (cfg.checkpoint_dir.empty()) cfg.checkpoint_dir = cfg.out + "/checkpoints";
      check_directory_path("--out", cfg.out);
      check_directory_path("--checkpoint-dir", cfg.checkpoint_dir);
      Session probe;
      probe.out = cfg.out;
      probe.checkpoint_dir = cfg.checkpoint_dir;
      std::string restart;  // what to do instead, when the run never saved a checkpoint
      if (is_unsaved_start(probe))
        restart = "; the run in " + cfg.out +
                  " stopped before its first checkpoint: run the same command without --resume to start it afresh";
      SSMX_REQUIRE(fs::is_directory(cfg.checkpoint_dir), UsageError, "--resume: ", cfg.checkpoint_dir,
                   " does not exist or is not a directory: no checkpoint to resume from", restart);
      const auto latest = ssmx::io::latest_checkpoint(cfg.checkpoint_dir);
      SSMX_REQUIRE(latest.has_value(), UsageError, "--resume: ", cfg.checkpoint_dir,
                   " holds no checkpoint (step_*.safetensors)", restart);
      const nlohmann::json saved = read_saved_config(*latest);
      merge_saved_config(cfg, app, saved, *latest, notes);
      started_ranks = saved_ranks(saved, *latest);
      session.resume_from = *latest;
    }

    // MPI from here on (--dist, possibly from the saved config).
    const Scheme scheme = parse_scheme(cfg.dist);
    SSMX_REQUIRE(scheme != Scheme::none || launcher_job_size() <= 1, UsageError, "--dist none, but this is one of ",
                 launcher_job_size(), " processes started by mpirun: each would train the whole run by itself "
                 "into the same --out; pass --dist data, layer or sequence");
    group.emplace(scheme, &argc, &argv);
    cfg.ranks = group->size();
  } catch (const std::exception& e) {  // before MPI: each process by itself
    std::fprintf(stderr, "train: error: %s\n", e.what());
    return exit_code(e);
  }

  // Set-up: checks every rank makes for itself, then each agreement point of the ranks
  // (Group::agree_on_failure), which ends the job normally when any of them failed; after
  // set-up, a failure on one rank ends the job with MPI_Abort.
  try {
    const auto now = group->gather({group->root() ? std::int64_t(std::time(nullptr)) : 0});  // rank 0's clock
    int code = 0;
    std::string error;
    auto agree = [&](auto&& phase) {
      try {
        phase();
#if SSMX_TRAIN_MPI
      } catch (const ssmx::dist::DistTimeoutError&) {
        throw;  // a rank is gone: nobody would join the agreement
#endif
      } catch (const std::exception& e) {
        code = exit_code(e);
        error = e.what();
      }
      return group->agree_on_failure(code, error);
    };
    const int setup = agree([&] {
      if (group->root()) {
        if (cfg.device == "auto") std::printf("device: cpu (auto: this trainer is built for the host)\n");
#if !defined(_OPENMP)
        if (cfg.threads > 0) std::printf("note: --threads %ld ignored: this build has no OpenMP\n", long(cfg.threads));
#endif
        for (const auto& n : notes) std::printf("%s\n", n.c_str());
        std::fflush(stdout);
      }
      const Scheme scheme = group->scheme();
      SSMX_REQUIRE(!resume || started_ranks == cfg.ranks, UsageError, "--resume: the run was started with ", started_ranks,
                   started_ranks == 1 ? " rank" : " ranks", " (--dist ", cfg.dist, ", saved in ",
                   session.resume_from.value_or(""), "), but this job has ", cfg.ranks,
                   ": resume it with mpirun -np ", started_ranks, started_ranks == 1 && scheme == Scheme::none ? " (or without mpirun)" : "");
      SSMX_REQUIRE(scheme != Scheme::data || cfg.batch % cfg.ranks == 0, UsageError, "--dist data: --batch ", cfg.batch,
                   " rows do not split evenly over ", cfg.ranks, " ranks; use a multiple of ", cfg.ranks);
      SSMX_REQUIRE(scheme != Scheme::sequence || cfg.strategy == "adjoint", UsageError,
                   "--dist sequence works with --strategy adjoint only, not ", cfg.strategy);
      SSMX_REQUIRE(scheme != Scheme::layer || cfg.sample_every == 0, UsageError, "--sample-every ", cfg.sample_every,
                   ": generating needs the whole model in one process, and --dist layer splits it over the ranks; "
                   "sample from a checkpoint afterwards (generate --run ", cfg.out.empty() ? "DIR" : cfg.out, ")");
      const Presets::Preset* preset = presets.find(cfg.model);
      if (!preset) throw UsageError("--model '" + cfg.model + "': not a preset");
      (void)group->layers(preset->layers, cfg.model);  // enough layers for --dist layer

      if (cfg.out.empty()) cfg.out = default_out(cfg, std::time_t(now[0]));
      if (cfg.checkpoint_dir.empty()) cfg.checkpoint_dir = cfg.out + "/checkpoints";
      session.out = cfg.out;
      session.checkpoint_dir = cfg.checkpoint_dir;
      if (!resume) session.replaces_unsaved_start = check_fresh(session);
      SSMX_REQUIRE(cfg.curriculum_start <= cfg.context, UsageError, "--curriculum-start ", cfg.curriculum_start,
                   " exceeds --context ", cfg.context);
      data.emplace(cfg);  // reads and checks the data; fills cfg.vocab
      data->open_eval_file(cfg);
    });
    if (setup) return setup;
    if (const int flags = agree([&] { group->check_same_flags(rank_flags(cfg, session, resume)); })) return flags;
    return dispatch(presets, cfg, *data, session, *group);
  } catch (const std::exception& e) {
    const bool distributed = group->distributed();
    std::fprintf(stderr, "train: error: %s%s\n", distributed ? (group->who() + ": ").c_str() : "", e.what());
    if (distributed) group->abort(exit_code(e));  // the other ranks may wait in a collective
    return exit_code(e);
  }
}

}  // namespace train

