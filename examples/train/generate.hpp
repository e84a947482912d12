// The generator as a library: train::generate_main(argc, argv, presets) loads a model and
// continues a prompt. examples/generate.cpp is the `generate` program (the built-in presets
// of train/presets.hpp); a program training its own layer can offer it the same way.
//
//   generate --run runs/bytes --prompt "The trainer " --max-tokens 200
//   generate --hf tests/data/mamba_tiny --prompt-ids 1,2,3 --temperature 0 --ids
//
// The model: --run DIR, a training run's directory (train --out): its latest checkpoint,
// the preset and vocabulary of its saved config, found in `presets` by name (under --dist
// layer the checkpoint's parts are read too); or --hf DIR, a Hugging Face / state-spaces
// Mamba or Mamba-2 checkpoint, into the first of the presets' shapes of its kind that fits its config.json
// (the shapes are template arguments: another one fails naming the field and the values
// this program has).
//
// The prompt runs through the parallel forward (Model::prefill), then every token is one
// recurrent step (Model::step), in constant memory. The continuation goes to stdout, token
// by token as it is drawn, flushed each time: bytes for a byte-level model (vocab 256),
// else (or with --ids) token ids separated by spaces; a newline ends it. With --batch N > 1
// the N continuations (sequence b drawn from the seeded stream b) are printed when all are
// done, one after another: ids one line each, text each after a line `--- sample b of N ---`.
// The last line on stderr gives the tokens per second of generation (prefill timed apart)
// and the tracked host memory's peak.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "trainer.hpp"

namespace train {

// --run DIR: the checkpoint files of the run's latest checkpoint and its saved config.
inline std::unique_ptr<Generator> open_run(const Presets& presets, const std::string& dir, std::string& what) {
  std::error_code ec;
  SSMX_REQUIRE(fs::is_directory(dir, ec), UsageError, "--run ", dir, ": does not exist or is not a directory");
  std::string checkpoints = (fs::path(dir) / "checkpoints").string();
  if (!fs::is_directory(checkpoints, ec) && fs::is_regular_file(fs::path(dir) / "config.json", ec)) {
    try {  // a run given --checkpoint-dir elsewhere: its config.json says where
      const nlohmann::json c = ssmx::io::read_json((fs::path(dir) / "config.json").string(), 1 << 20);
      if (c.is_object() && c.contains("checkpoint_dir") && c["checkpoint_dir"].is_string())
        checkpoints = c["checkpoint_dir"].get<std::string>();
    } catch (const ssmx::Error&) {
    }
  }
  SSMX_REQUIRE(fs::is_directory(checkpoints, ec), UsageError, "--run ", dir, ": no checkpoint directory (", checkpoints,
               " does not exist): pass the --out directory of a training run that saved a checkpoint");
  const auto latest = ssmx::io::latest_checkpoint(checkpoints);
  SSMX_REQUIRE(latest.has_value(), UsageError, "--run ", dir, ": ", checkpoints,
               " holds no checkpoint (step_*.safetensors): the run saved none yet");
  const nlohmann::json saved = read_saved_config(*latest);
  SSMX_REQUIRE(saved.contains("model") && saved["model"].is_string(), ssmx::IOError, *latest,
               ": the saved config's field \"model\" is missing or not a string");
  const std::string name = saved["model"].get<std::string>();
  const Presets::Preset* p = presets.find(name);
  SSMX_REQUIRE(p != nullptr, ssmx::ValueError, *latest, ": the run trained model preset '", name,
               "', which this program does not have (it has ", join(presets.names(), ", "), ")");
  std::vector<std::string> files{*latest};
  const std::int64_t ranks = saved_ranks(saved, *latest);
  if (saved.value("dist", std::string("none")) == "layer" && ranks > 1)
    for (int r = 1; r < int(ranks); ++r) {
      files.push_back(shard_path(*latest, r, int(ranks)));
      SSMX_REQUIRE(fs::is_regular_file(files.back(), ec), ssmx::IOError, *latest, ": the run's checkpoint is split over ",
                   ranks, " ranks (--dist layer), and its part ", files.back(), " is missing");
    }
  what = "model " + name + " (" + p->description + ") from " + *latest;
  return p->open(saved, files);
}

namespace detail {
// One config field a model shape must match: our name for it, the config's value, and the
// shape's member.
template <class Shape>
struct ShapeField {
  const char* ours;
  index_t value;
  index_t Shape::*member;
};

// The first of `shapes` whose fields all equal the config's; else a ValueError naming the
// first field no remaining shape matches and the values the program has.
template <class Shape, class Cfg, std::size_t F>
const Shape& fit_shape(const std::vector<Shape>& shapes, const Cfg& c, const ShapeField<Shape> (&fields)[F],
                       const char* family, const std::string& dir) {
  std::vector<const Shape*> fit;
  for (const auto& s : shapes) fit.push_back(&s);
  SSMX_REQUIRE(!fit.empty(), ssmx::ValueError, "--hf ", dir, ": this program has no ", family, " model shape");
  bool first = true;
  for (const ShapeField<Shape>& f : fields) {
    std::vector<const Shape*> next;
    for (const Shape* s : fit)
      if (s->*f.member == f.value) next.push_back(s);
    if (next.empty()) {
      std::vector<std::string> have;
      for (const Shape* s : fit) have.push_back(std::to_string(s->*f.member) + " (" + s->name + ")");
      throw ssmx::ValueError(ssmx::detail::str(
          c.file, ": field \"", c.field(f.ours), "\" is ", f.value, ", but this program's ", family, " models",
          first ? "" : " that match the fields before it", " have ", c.field(f.ours), " ", join(have, ", "),
          "; model shapes are template arguments: register another with train::Presets::add_checkpoint_shape"));
    }
    fit = next;
    first = false;
  }
  return *fit[0];
}

// Whether dir/config.json describes a Mamba-2 model (Hugging Face model_type "mamba2", or
// state-spaces ssm_cfg.layer "Mamba2"); a file that cannot be read is left to the loaders.
inline bool is_mamba2_config(const std::string& dir) {
  try {
    const nlohmann::json j = ssmx::io::read_config_json(dir + "/config.json");
    if (!j.is_object()) return false;
    if (j.contains("model_type") && j["model_type"] == "mamba2") return true;
    return j.contains("ssm_cfg") && j["ssm_cfg"].is_object() && j["ssm_cfg"].contains("layer") &&
           j["ssm_cfg"]["layer"] == "Mamba2";
  } catch (const ssmx::Error&) {
    return false;
  }
}
}  // namespace detail

// --hf DIR: a public Mamba or Mamba-2 checkpoint, in the first of the presets' shapes of its
// kind that fits.
inline std::unique_ptr<Generator> open_hf(const Presets& presets, const std::string& dir, std::string& what) {
  std::error_code ec;
  SSMX_REQUIRE(fs::is_directory(dir, ec), UsageError, "--hf ", dir, ": does not exist or is not a directory");
  if (detail::is_mamba2_config(dir)) {
    const ssmx::io::Mamba2Config c = ssmx::io::read_mamba2_config(dir);
    using Shape = Presets::Mamba2Shape;
    const detail::ShapeField<Shape> fields[] = {
        {"d_model", c.d_model, &Shape::d_model},   {"n_layer", c.n_layer, &Shape::n_layer},
        {"d_state", c.d_state, &Shape::d_state},   {"head_dim", c.head_dim, &Shape::head_dim},
        {"n_groups", c.n_groups, &Shape::n_groups}, {"expand", c.expand, &Shape::expand},
        {"d_conv", c.d_conv, &Shape::d_conv}};
    const Shape& s = detail::fit_shape(presets.mamba2_shapes(), c, fields, "Mamba-2", dir);
    what = "Mamba-2 checkpoint " + dir + " (shape of " + s.name + ", vocab " + std::to_string(c.vocab) +
           (c.tie_embeddings ? ", tied head)" : ", untied head)");
    return s.open(dir, c);
  }
  const ssmx::io::MambaConfig c = ssmx::io::read_mamba_config(dir);
  using Shape = Presets::MambaShape;
  const detail::ShapeField<Shape> fields[] = {{"d_model", c.d_model, &Shape::d_model}, {"n_layer", c.n_layer, &Shape::n_layer},
                                              {"d_state", c.d_state, &Shape::d_state}, {"expand", c.expand, &Shape::expand},
                                              {"d_conv", c.d_conv, &Shape::d_conv},    {"dt_rank", c.dt_rank, &Shape::dt_rank}};
  const Shape& s = detail::fit_shape(presets.mamba_shapes(), c, fields, "Mamba", dir);
  what = "Mamba checkpoint " + dir + " (shape of " + s.name + ", vocab " + std::to_string(c.vocab) +
         (c.tie_embeddings ? ", tied head)" : ", untied head)");
  return s.open(dir, c);
}

// "1,2,3" -> ids; a usage error naming the flag and the entry that is not one.
inline std::vector<token_t> parse_ids(const std::string& text, const char* flag) {
  std::vector<token_t> ids;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t comma = std::min(text.find(',', begin), text.size());
    const std::string item = text.substr(begin, comma - begin);
    const auto v = ssmx::io::parse_int64(item);
    SSMX_REQUIRE(v && *v >= 0 && *v <= 2147483647, UsageError, flag, " ", text, ": entry ", ids.size() + 1, ", '", item,
                 "', is not a token id (an integer >= 0)");
    ids.push_back(token_t(*v));
    begin = comma + 1;
  }
  return ids;
}

inline std::string ordinal(std::size_t n) {
  const char* suffix = (n % 100 >= 11 && n % 100 <= 13) ? "th" : n % 10 == 1 ? "st" : n % 10 == 2 ? "nd" : n % 10 == 3 ? "rd" : "th";
  return std::to_string(n) + suffix;
}

// The generator: parses the command line, loads the model, continues the prompt, and returns
// the exit status: 0 generated, 1 a checkpoint failed to load or does not fit, 2 a flag is wrong.
inline int generate_main(int argc, char** argv, const Presets& presets) {
  std::string run_dir, hf_dir, prompt_text, prompt_ids;
  double temperature = 1.0, top_p = 1.0;
  std::int64_t top_k = 0, seed = 0, max_tokens = 128, stop = 0, batch = 1, chunk = 1024;
  bool ids = false;
  std::vector<std::string> shapes;
  for (const auto& s : presets.mamba_shapes())
    shapes.push_back(s.name + " (d_model " + std::to_string(s.d_model) + ", " + std::to_string(s.n_layer) + " layers)");
  for (const auto& s : presets.mamba2_shapes())
    shapes.push_back(s.name + " (Mamba-2, d_model " + std::to_string(s.d_model) + ", " + std::to_string(s.n_layer) +
                     " layers)");
  CLI::App app{"Continue a prompt with a trained model: a training run's latest checkpoint or a public Mamba "
               "checkpoint; see the comment at the top of examples/train/generate.hpp"};
  app.get_formatter()->column_width(30);
  const Limit nonneg = nonnegative_limit(), positive = positive_limit();
  app.add_option("--run", run_dir,
                 "a training run's directory (train --out DIR): its latest checkpoint, with the preset and vocabulary "
                 "the run used");
  app.add_option("--hf", hf_dir,
                 "a Hugging Face or state-spaces Mamba or Mamba-2 checkpoint directory (config.json, model.safetensors) of one "
                 "of these shapes: " + join(shapes, ", "));
  app.add_option("--prompt", prompt_text, "the prompt as text: its bytes are the tokens (byte-level models, vocab 256)");
  app.add_option("--prompt-ids", prompt_ids, "the prompt as token ids, e.g. 1,2,3");
  app.add_option("--temperature", temperature, "sampling temperature (0: greedy, the most probable token)")
      ->capture_default_str()
      ->check(limit_validator(nonneg, false));
  app.add_option("--top-k", top_k, "sample among the K most probable tokens (0: all)")
      ->capture_default_str()
      ->check(limit_validator(nonneg, true));
  app.add_option("--top-p", top_p, "sample among the fewest most probable tokens whose probability reaches P (1: all)")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            char* end = nullptr;
            const double v = std::strtod(s.c_str(), &end);
            if (s.empty() || end != s.c_str() + s.size() || !(v > 0 && v <= 1))
              return "must be a number in (0, 1], got " + s;
            return "";
          },
          "NUMBER in (0, 1]"));
  app.add_option("--seed", seed, "seed of the sampler (sequence b of --batch draws from stream b)")
      ->capture_default_str()
      ->check(limit_validator(nonneg, true));
  app.add_option("--max-tokens", max_tokens, "tokens to generate per sequence")
      ->capture_default_str()
      ->check(limit_validator(positive, true));
  app.add_option("--stop", stop, "end a sequence at this token id (not printed)")->check(limit_validator(nonneg, true));
  app.add_option("--batch", batch, "sequences sampled from the same prompt")
      ->capture_default_str()
      ->check(limit_validator(positive, true));
  app.add_option("--chunk", chunk, "tokens per chunk of the prompt's parallel forward")
      ->capture_default_str()
      ->check(limit_validator(positive, true));
  app.add_flag("--ids", ids, "print token ids instead of text (always for models whose vocabulary is not 256 bytes)");
  app.footer(
      "Exit status:\n"
      "  0  generated\n"
      "  1  the checkpoint could not be read, or does not fit this program's models\n"
      "  2  a flag is wrong, alone or with the others");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  auto given = [&](const char* flag) { return app.get_option(flag)->count() > 0; };
  try {
    SSMX_REQUIRE(given("--run") != given("--hf"), UsageError,
                 given("--run") ? "--run and --hf: pass one of them" : "no model: pass --run DIR (a training run) or --hf DIR (a Mamba checkpoint)");
    SSMX_REQUIRE(given("--prompt") != given("--prompt-ids"), UsageError,
                 given("--prompt") ? "--prompt and --prompt-ids: pass one of them"
                                   : "no prompt: pass --prompt TEXT or --prompt-ids 1,2,3");
    SSMX_REQUIRE(!given("--prompt") || !prompt_text.empty(), UsageError, "--prompt is empty: a prompt needs a token");
    std::vector<token_t> prompt = given("--prompt-ids") ? parse_ids(prompt_ids, "--prompt-ids") : std::vector<token_t>();

    std::string what;
    std::unique_ptr<Generator> g = given("--run") ? open_run(presets, run_dir, what) : open_hf(presets, hf_dir, what);
    const index_t V = g->vocab();
    const bool text = !ids && V == 256;
    if (given("--prompt")) {
      SSMX_REQUIRE(V == 256, UsageError, "--prompt: the model's vocabulary is ", V,
                   " tokens, not the 256 bytes of a byte-level model; give token ids with --prompt-ids");
      for (unsigned char ch : prompt_text) prompt.push_back(token_t(ch));
    }
    for (std::size_t i = 0; i < prompt.size(); ++i)
      SSMX_REQUIRE(index_t(prompt[i]) < V, UsageError, "--prompt-ids: the ", ordinal(i + 1), " id, ", prompt[i],
                   ", is outside the model's vocabulary [0, ", V, ")");
    SSMX_REQUIRE(!given("--stop") || stop < V, UsageError, "--stop ", stop, ": outside the model's vocabulary [0, ", V, ")");

    GenerateOptions o;
    o.sampling = {temperature, index_t(top_k), top_p};
    o.seed = std::uint64_t(seed);
    o.max_tokens = index_t(max_tokens);
    o.batch = index_t(batch);
    o.chunk = index_t(chunk);
    if (given("--stop")) o.stop = token_t(stop);
    std::fprintf(stderr, "generate: %s, vocab %ld; prompt of %zu tokens, %ld sequence(s) of up to %ld tokens\n",
                 what.c_str(), long(V), prompt.size(), long(batch), long(max_tokens));

    std::vector<std::size_t> printed(std::size_t(batch), 0);
    auto put = [&](token_t t, bool first_of_line) {
      if (text)
        std::fputc(int(t), stdout);
      else
        std::fprintf(stdout, first_of_line ? "%d" : " %d", int(t));
    };
    const Generated r = generate(*g, prompt, o, [&](index_t, token_t t) {
      if (batch > 1) return;  // printed when all are done
      put(t, printed[0]++ == 0);
      std::fflush(stdout);
    });
    if (batch == 1) {
      std::fputc('\n', stdout);
    } else {
      for (index_t b = 0; b < index_t(batch); ++b) {
        if (text) std::printf("--- sample %ld of %ld ---\n", long(b + 1), long(batch));
        const auto& seq = r.tokens[std::size_t(b)];
        for (std::size_t i = 0; i < seq.size(); ++i) put(seq[i], i == 0);
        std::fputc('\n', stdout);
      }
    }
    std::fflush(stdout);
    index_t emitted = 0;
    for (const auto& seq : r.tokens) emitted += index_t(seq.size());
    std::fprintf(stderr,
                 "generate: %ld tokens in %.3f s: %.1f tokens/s (prefill: %ld tokens in %.3f s); peak host memory "
                 "%.1f MiB\n",
                 long(emitted), r.generate_seconds, r.generate_seconds > 0 ? double(emitted) / r.generate_seconds : 0.0,
                 long(r.prompt_tokens), r.prefill_seconds,
                 double(ssmx::memory_stats(ssmx::Space::Host).peak) / double(1 << 20));
    return 0;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "generate: error: %s\n", e.what());
    return dynamic_cast<const UsageError*>(&e) ? 2 : 1;
  }
}

}  // namespace train
