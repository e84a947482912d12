// Generation and whole-file evaluation for the trainer and for examples/generate.cpp:
//
//   Generator        a model that continues a prompt token by token, behind a virtual
//                    interface, so that one program can hold any preset's model, chosen
//                    by name at run time (ModelGenerator<LM> is the one implementation)
//   generate()       samples continuations of a prompt: prefill once, then one step per token
//   load_run_parameters   a model's parameters from a trainer checkpoint (and its
//                    --dist layer parts), ignoring the optimiser and the carried state
//
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ssmx/io/checkpoint.hpp>
#include <ssmx/io/json.hpp>
#include <ssmx/io/mamba.hpp>
#include <ssmx/io/mamba2.hpp>
#include <ssmx/io/safetensors.hpp>
#include <ssmx/nn/evaluate.hpp>
#include <ssmx/nn/model.hpp>
#include <ssmx/nn/sampling.hpp>

#include "data.hpp"

namespace train {

// ---- generators ---------------------------------------------------------------------------

class Generator {
 public:
  virtual ~Generator() = default;
  virtual index_t vocab() const = 0;
  // Begins `batch` sequences that all continue `prompt` (len >= 1) from the zero state: the
  // prompt runs once through the parallel forward (chunks of `chunk` tokens) and its state
  // is copied to every sequence. Returns the logits of the token after the prompt, [vocab].
  virtual std::vector<float> begin(const token_t* prompt, index_t len, index_t batch, index_t chunk) = 0;
  // Advances sequence b by tokens[b], for every b; returns the logits of each one's next
  // token, [batch, vocab], valid until the next call.
  virtual const float* step(const token_t* tokens) = 0;
};

// LM: nn::Model<Layer, K> with float parameters on the host, holding every layer.
template <class LM>
class ModelGenerator final : public Generator {
  static_assert(std::is_same_v<typename LM::T, float>, "ModelGenerator: the model's parameters must be float");

 public:
  explicit ModelGenerator(LM& model) : model_(&model) {}
  explicit ModelGenerator(std::unique_ptr<LM> model) : owned_(std::move(model)), model_(owned_.get()) {}

  LM& model() { return *model_; }
  index_t vocab() const override { return model_->vocab(); }

  std::vector<float> begin(const token_t* prompt, index_t len, index_t batch, index_t chunk) override {
    ds_ = model_->decode_state(batch);
    const ssmx::Tensor<float> lg = model_->prefill(prompt, len, ds_, 0, chunk);
    for (auto* v : {&ds_.h, &ds_.tail})  // row 0's state to every other row
      for (auto& t : *v) {
        if (t.numel() == 0) continue;
        const index_t per_row = t.numel() / batch;
        for (index_t b = 1; b < batch; ++b) std::copy_n(t.data(), per_row, t.data() + b * per_row);
      }
    std::fill(ds_.since.begin(), ds_.since.end(), ds_.since[0]);
    return std::vector<float>(lg.data(), lg.data() + lg.numel());
  }

  const float* step(const token_t* tokens) override {
    last_ = model_->step(tokens, ds_);
    return last_.data();
  }

 private:
  std::unique_ptr<LM> owned_;
  LM* model_;
  ssmx::nn::DecodeState<float> ds_;
  ssmx::Tensor<float> last_;
};

struct GenerateOptions {
  ssmx::nn::SamplingConfig sampling;
  std::uint64_t seed = 0;  // sequence b draws from the stream stream_seed(seed, b)
  index_t max_tokens = 64, batch = 1, chunk = 1024;
  std::optional<token_t> stop;  // ends a sequence; not part of its continuation
};

struct Generated {
  std::vector<std::vector<token_t>> tokens;  // per sequence, without the stop token
  index_t prompt_tokens = 0, sampled = 0;    // sampled: every token drawn, stop tokens included
  double prefill_seconds = 0, generate_seconds = 0;  // generate: from the first token drawn to the last
};

// Continues `prompt` in o.batch sequences; on_token(b, token) is called for every token of
// sequence b's continuation as soon as it is drawn.
template <class OnToken>
Generated generate(Generator& g, const std::vector<token_t>& prompt, const GenerateOptions& o, OnToken&& on_token) {
  using Clock = std::chrono::steady_clock;
  auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const index_t B = o.batch, V = g.vocab();
  std::vector<ssmx::nn::Sampler> samplers;
  for (index_t b = 0; b < B; ++b) samplers.emplace_back(o.sampling, stream_seed(o.seed, std::uint64_t(b)));
  Generated r;
  r.tokens.resize(std::size_t(B));
  r.prompt_tokens = index_t(prompt.size());
  auto t0 = Clock::now();
  const std::vector<float> first = g.begin(prompt.data(), index_t(prompt.size()), B, o.chunk);
  r.prefill_seconds = seconds_since(t0);
  t0 = Clock::now();
  std::vector<token_t> next(std::size_t(B), 0);
  std::vector<char> done(std::size_t(B), 0);
  const float* rows = nullptr;  // null: every sequence reads `first`
  for (index_t i = 0; i < o.max_tokens; ++i) {
    bool all_done = true;
    for (index_t b = 0; b < B; ++b) {
      if (done[std::size_t(b)]) continue;
      const token_t tok = samplers[std::size_t(b)](rows ? rows + b * V : first.data(), V);
      ++r.sampled;
      next[std::size_t(b)] = tok;
      if (o.stop && tok == *o.stop) {
        done[std::size_t(b)] = 1;
        continue;
      }
      r.tokens[std::size_t(b)].push_back(tok);
      on_token(b, tok);
      all_done = false;
    }
    if (all_done || i + 1 == o.max_tokens) break;
    rows = g.step(next.data());  // a finished sequence steps on its stop token; its logits are unused
  }
  r.generate_seconds = seconds_since(t0);
  return r;
}

// A JSON string of byte tokens as text: bytes that are not UTF-8 become U+FFFD (the ids
// keep them exactly).
inline std::string json_text(const std::vector<token_t>& bytes) {
  std::string s;
  for (token_t t : bytes) s += char(static_cast<unsigned char>(t));
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline std::string json_ids(const std::vector<token_t>& ids) { return nlohmann::json(ids).dump(); }

// ---- trainer checkpoints ----------------------------------------------------------------------

// The config a trainer checkpoint was saved with (its "__metadata__.extra.config").
inline nlohmann::json read_saved_config(const std::string& checkpoint) {
  const auto md = ssmx::io::SafetensorsFile::open(checkpoint).metadata();
  const auto it = md.find("extra.config");
  SSMX_REQUIRE(it != md.end(), ssmx::IOError, checkpoint,
               ": field \"__metadata__.extra.config\" is missing: not a checkpoint written by train");
  const nlohmann::json saved = ssmx::io::parse_json(it->second, checkpoint, "field \"__metadata__.extra.config\"");
  SSMX_REQUIRE(saved.is_object(), ssmx::IOError, checkpoint, ": field \"__metadata__.extra.config\" is not a JSON object");
  return saved;
}

// Loads `model`'s parameters from the files of one checkpoint (the file, or under --dist
// layer its rank-0 file and the other ranks' parts): each file's parameters that the model
// has; its carried state (param/carry.*) and optimiser state are skipped. Every parameter
// must come from some file. Shapes are checked (a checkpoint of another preset fails naming
// the tensor and both shapes).
template <class LM>
void load_run_parameters(LM& model, const std::vector<std::string>& files) {
  using T = typename LM::T;
  const ssmx::ParameterList<T> params = model.parameters();
  std::set<std::string> loaded;
  for (const std::string& path : files) {
    const ssmx::io::SafetensorsFile f = ssmx::io::SafetensorsFile::open(path);
    ssmx::ParameterList<T> list;
    std::vector<std::unique_ptr<ssmx::Parameter<T>>> skipped;  // the carried state, read and dropped
    for (const auto& t : f.tensors()) {
      if (t.name.rfind("param/", 0) != 0) continue;
      const std::string name = t.name.substr(6);
      auto it = std::find_if(params.begin(), params.end(), [&](auto* p) { return p->name == name; });
      if (it != params.end()) {
        list.push_back(*it);
        loaded.insert(name);
      } else if (name.rfind("carry.", 0) == 0 && t.shape.size() <= std::size_t(ssmx::max_rank)) {
        ssmx::Dims d;
        d.rank = int(t.shape.size());
        for (int i = 0; i < d.rank; ++i) d[i] = index_t(t.shape[std::size_t(i)]);
        skipped.push_back(std::make_unique<ssmx::Parameter<T>>(name, d));
        list.push_back(skipped.back().get());
      }  // anything else: load_checkpoint names it
    }
    ssmx::io::load_checkpoint(path, list);
  }
  for (auto* p : params)
    SSMX_REQUIRE(loaded.count(p->name), ssmx::IOError, files.front(), ": no tensor \"param/", p->name,
                 "\" for parameter \"", p->name, "\" (a checkpoint of another model?)");
}

}  // namespace train
