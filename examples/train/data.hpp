// The trainer's data sources, behind one interface:
//
//   recall        the embedded key-value recall task (ssmx/data/recall.hpp). Step s's batch
//                 is drawn from an RNG seeded by (seed, s): a resumed run needs no RNG state.
//                 Evaluation: a fixed set of sequences from a separate stream.
//   tokens:PATH   an llm.c token file, split into documents at --eot (which begins each one).
//   text:PATH     the bytes of any file (vocab 256), cut into --batch equal streams, so that
//                 every row reads one long stream with its state carried from step to step.
//   --eval-data   (EvalFile) bytes or a token file evaluated whole, as one sequence.
//
// For tokens and text the last --val-fraction of the tokens is held out; the rest is packed
// into [batch, context] steps by data::Packer, whose cursor (state()) is saved with each
// checkpoint. Rows that continue a document carry their recurrent state from the previous
// step (carry_over); the others start from zero.
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <ssmx/data/packing.hpp>
#include <ssmx/data/recall.hpp>
#include <ssmx/data/token_file.hpp>
#include <ssmx/nn/model.hpp>

#include "config.hpp"

namespace train {

using ssmx::index_t;
using token_t = ssmx::nn::token_t;

// One step's batch, owning its buffers.
struct StepData {
  index_t rows = 0, len = 0;
  std::vector<token_t> inputs, targets;
  std::vector<std::uint8_t> starts;     // empty: no document boundaries (recall)
  std::vector<std::uint8_t> continues;  // per row; empty: no row continues (recall)
  ssmx::nn::Batch batch() const { return batch(0, rows); }
  // Rows [r0, r1) alone (--dist data: a rank's share).
  ssmx::nn::Batch batch(index_t r0, index_t r1) const {
    return {inputs.data() + r0 * len, targets.data() + r0 * len, r1 - r0, len,
            starts.empty() ? nullptr : starts.data() + r0 * len};
  }
};

// The state before a call is the state after the previous one, except in rows that begin
// afresh (continues[r] == 0), which start from zero. Truncated BPTT: no gradient flows back
// into the previous step. The states' row r is row first_row + r of the batch (a rank's share
// under --dist data); empty tensors are layers this process does not hold (--dist layer).
template <class T>
void carry_over(ssmx::nn::LayerStates<T>& st, const std::vector<std::uint8_t>& continues, index_t first_row = 0) {
  st.initial = std::move(st.final_states);
  st.initial_halo = std::move(st.final_halo);
  st.final_states.clear();
  st.final_halo.clear();
  for (auto* v : {&st.initial, &st.initial_halo})
    for (auto& t : *v) {
      if (t.numel() == 0) continue;
      const index_t rows = t.dims()[0], per_row = t.numel() / rows;
      for (index_t r = 0; r < rows; ++r) {
        const index_t row = first_row + r;
        if (row >= index_t(continues.size()) || !continues[std::size_t(row)])
          std::fill_n(t.data() + r * per_row, per_row, T(0));
      }
    }
}

// splitmix64: independent seeds for (seed, stream, step).
inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
inline std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t stream, std::uint64_t step = 0) {
  return mix(mix(mix(seed) ^ stream) + step);
}

// ---- whole-file evaluation --------------------------------------------------------------------

// --eval-data text:PATH (bytes, tokens 0..255) or tokens:PATH (an llm.c token file), read a
// range at a time. Opened and checked whole at the start (every token below the model's
// vocabulary, at least 2 tokens), so that the evaluation at the end cannot fail on the data.
class EvalFile {
 public:
  EvalFile(const std::string& spec, index_t vocab) : spec_(spec) {
    const auto colon = spec.find(':');
    const std::string kind = colon == std::string::npos ? "" : spec.substr(0, colon);
    path_ = colon == std::string::npos ? "" : spec.substr(colon + 1);
    SSMX_REQUIRE((kind == "tokens" || kind == "text") && !path_.empty(), ssmx::ValueError, "--eval-data '", spec,
                 "': expected tokens:PATH or text:PATH");
    bytes_ = kind == "text";
    if (bytes_) {
      bytes_file_.open(path_, "byte file");
      size_ = bytes_file_.size();
    } else {
      tokens_file_.open(path_);
      size_ = tokens_file_.size();
    }
    const std::string what = std::string(bytes_ ? "byte file '" : "token file '") + path_ + "' (--eval-data)";
    SSMX_REQUIRE(size_ >= 2, ssmx::ValueError, what, ": ", size_, " token(s) hold no prediction; need at least 2");
    constexpr index_t block = index_t(1) << 20;
    std::vector<token_t> buf(std::size_t(std::min(size_, block)));
    for (index_t begin = 0; begin < size_; begin += block) {
      const index_t m = std::min(block, size_ - begin);
      read(begin, m, buf.data());
      ssmx::data::check_tokens_below(buf.data(), m, vocab, what + " (the model's vocabulary)", begin);
    }
  }

  const std::string& spec() const { return spec_; }
  bool bytes() const { return bytes_; }
  index_t size() const { return size_; }

  // Tokens [begin, begin + n) into out.
  void read(index_t begin, index_t n, token_t* out) {
    if (!bytes_) return tokens_file_.read(begin, n, out);
    buf_.resize(std::size_t(n));
    std::string why;
    SSMX_REQUIRE(bytes_file_.read(begin, buf_.data(), n, why), ssmx::IOError, "byte file '", path_, "': ", why);
    for (index_t i = 0; i < n; ++i) out[i] = token_t(buf_[std::size_t(i)]);
  }

 private:
  std::string spec_, path_;
  bool bytes_ = false;
  index_t size_ = 0;
  ssmx::data::detail::ReadOnlyFile bytes_file_;
  ssmx::data::TokenFile tokens_file_;
  std::vector<unsigned char> buf_;
};

class Data {
 public:
  // Reads and checks the data of `c` (throws naming the file and what is wrong); sets
  // c.vocab when it was 0 (from the data).
  explicit Data(Config& c) : rows_(index_t(c.batch)), context_(index_t(c.context)), seed_(std::uint64_t(c.seed)) {
    if (c.data == "recall") {
      open_recall(c);
      return;
    }
    const auto colon = c.data.find(':');
    const std::string kind = colon == std::string::npos ? "" : c.data.substr(0, colon);
    const std::string path = colon == std::string::npos ? "" : c.data.substr(colon + 1);
    SSMX_REQUIRE((kind == "tokens" || kind == "text") && !path.empty(), ssmx::ValueError, "--data '", c.data,
                 "': expected recall, tokens:PATH or text:PATH");
    open_packed(c, kind, path);
  }

  // Opens --eval-data once the vocabulary is known (after the constructor).
  void open_eval_file(const Config& c) {
    if (!c.eval_data.empty()) eval_file_.emplace(c.eval_data, vocab_);
  }
  EvalFile* eval_file() { return eval_file_ ? &*eval_file_ : nullptr; }

  // The prompt of --sample-every: the first n tokens of the held-out data (of the training
  // data when none is held out; recall: of the first held-out sequence), fewer if it is shorter.
  std::vector<token_t> prompt(index_t n) const {
    const std::vector<token_t>& from = recall_ ? eval_inputs_ : head_;
    if (recall_) n = std::min(n, context_);
    return std::vector<token_t>(from.begin(), from.begin() + std::min<std::ptrdiff_t>(n, std::ptrdiff_t(from.size())));
  }

  index_t vocab() const { return vocab_; }
  const std::string& description() const { return description_; }
  // A doubt about the data that does not stop the run (printed after the description).
  const std::string& warning() const { return warning_; }
  double chance() const { return recall_ ? recall_->chance() : -1.0; }
  bool carries_state() const { return bool(train_); }  // packed data: rows continue across steps

  // The sequence length at `step` (the recall curriculum; otherwise the context): the start
  // length for curriculum_first steps (a long first stage lets the model find the recall
  // mechanism on short sequences), then doubling every curriculum_steps. A function of the
  // step alone, so a resumed run needs no curriculum state.
  index_t length_at(std::int64_t step) const {
    if (!recall_ || curriculum_start_ <= 0) return context_;
    index_t len = std::min(context_, std::max<index_t>(4 * recall_->pairs + 2, curriculum_start_));
    if (step < curriculum_first_) return len;
    for (std::int64_t s = 1 + (step - curriculum_first_) / curriculum_steps_; s > 0 && len < context_; --s)
      len = std::min(context_, 2 * len);
    return len;
  }

  // The batch of step `step` (0-based). Packed data must be asked step after step.
  void next(std::int64_t step, StepData& out) {
    if (recall_) {
      const index_t len = length_at(step);
      out.rows = rows_;
      out.len = len;
      out.inputs.resize(std::size_t(rows_ * len));
      out.targets.resize(out.inputs.size());
      out.starts.clear();
      out.continues.clear();
      std::mt19937_64 rng(stream_seed(seed_, 1, std::uint64_t(step)));
      for (index_t r = 0; r < rows_; ++r) recall_->sample(rng, len, out.inputs.data() + r * len, out.targets.data() + r * len);
      return;
    }
    train_->next(packed_);
    out.rows = packed_.rows;
    out.len = packed_.chunk_len;
    out.inputs.swap(packed_.inputs);
    out.targets.swap(packed_.targets);
    out.starts.swap(packed_.starts);
    out.continues.swap(packed_.continues);
  }

  // The data cursor to save with a checkpoint, and to restore from one.
  std::string cursor() const { return train_ ? train_->state() : std::string(); }
  void restore(const std::string& cursor) {
    if (train_) train_->restore(cursor);
  }

  // Loss and accuracy on the held-out data, the sum of eval(batch, states) over its batches
  // (states: the recurrent state carried from batch to batch of packed data, else null);
  // tokens == 0 when there is none. Only rows [n·part/parts, n·(part+1)/parts) of each batch
  // go to `eval` (--dist data: a rank's share; the caller sums over the ranks).
  template <class T, class Eval>
  ssmx::nn::StepResult evaluate(Eval&& eval, int part = 0, int parts = 1) {
    ssmx::nn::StepResult total;
    auto add = [&](const ssmx::nn::StepResult& r) {
      total.loss += r.loss;
      total.tokens += r.tokens;
      total.correct += r.correct;
    };
    auto share = [&](index_t n) { return std::pair<index_t, index_t>(n * part / parts, n * (part + 1) / parts); };
    if (recall_) {
      const auto [r0, r1] = share(index_t(eval_inputs_.size()) / context_);
      if (r1 > r0)
        add(eval(ssmx::nn::Batch{eval_inputs_.data() + r0 * context_, eval_targets_.data() + r0 * context_, r1 - r0,
                                 context_},
                 static_cast<ssmx::nn::LayerStates<T>*>(nullptr)));
      return total;
    }
    if (!val_) return total;
    val_->restore(val_start_);  // the same held-out batches every time
    ssmx::nn::LayerStates<T> st;
    ssmx::data::PackedBatch b;
    index_t seen = 0;
    do {
      val_->next(b);
      const auto [r0, r1] = share(b.rows);
      carry_over(st, b.continues, r0);
      const index_t len = b.chunk_len;
      if (r1 > r0)
        add(eval(ssmx::nn::Batch{b.inputs.data() + r0 * len, b.targets.data() + r0 * len, r1 - r0, len,
                                 b.starts.data() + r0 * len},
                 &st));
      seen += b.rows * b.chunk_len;
    } while (!b.last_of_epoch && seen < eval_budget_);
    return total;
  }

 private:
  void open_recall(Config& c) {
    recall_.emplace();
    auto& t = *recall_;
    t.values = index_t(c.recall_values);
    t.keys = index_t(c.recall_keys);
    t.filler = index_t(c.recall_filler);
    t.pairs = index_t(c.pairs);
    t.query_every = index_t(c.query_every);
    SSMX_REQUIRE(c.pairs <= c.recall_keys, ssmx::ValueError, "--pairs ", c.pairs, " must not exceed --recall-keys ",
                 c.recall_keys);
    SSMX_REQUIRE(c.context >= 4 * c.pairs + 2, ssmx::ValueError, "--context ", c.context, " is too short for --pairs ",
                 c.pairs, ": the bindings and one query need at least ", 4 * c.pairs + 2, " tokens");
    t.validate(context_);
    SSMX_REQUIRE(c.vocab == 0 || c.vocab == t.vocab(), ssmx::ValueError, "--vocab ", c.vocab,
                 " does not fit the recall task, whose vocabulary is ", t.vocab(), " (leave --vocab at 0)");
    vocab_ = t.vocab();
    c.vocab = vocab_;
    curriculum_start_ = index_t(c.curriculum_start);
    curriculum_steps_ = index_t(c.curriculum_steps);
    curriculum_first_ = index_t(c.curriculum_first > 0 ? c.curriculum_first : c.curriculum_steps);
    description_ = "key-value recall, " + std::to_string(t.pairs) + " binding(s), a query every " +
                   std::to_string(t.query_every) + " tokens, chance accuracy " + std::to_string(t.chance()).substr(0, 5);
    // A fixed held-out set at the full context, from its own stream.
    const index_t n = index_t(c.eval_sequences);
    eval_inputs_.resize(std::size_t(n * context_));
    eval_targets_.resize(eval_inputs_.size());
    std::mt19937_64 rng(stream_seed(seed_, 2));
    for (index_t s = 0; s < n; ++s)
      t.sample(rng, context_, eval_inputs_.data() + s * context_, eval_targets_.data() + s * context_);
  }

  void open_packed(Config& c, const std::string& kind, const std::string& path) {
    namespace data = ssmx::data;
    std::vector<token_t> tokens = kind == "text" ? data::read_byte_tokens(path) : data::read_token_file(path);
    const std::string what = (kind == "text" ? "byte file '" : "token file '") + path + "'";
    if (c.vocab == 0) {
      vocab_ = kind == "text" ? 256 : index_t(*std::max_element(tokens.begin(), tokens.end())) + 1;
    } else {
      vocab_ = index_t(c.vocab);
      data::check_tokens_below(tokens, vocab_, what + " (--vocab " + std::to_string(vocab_) + ")");
    }
    c.vocab = vocab_;

    const index_t n = index_t(tokens.size());
    const index_t n_val = index_t(double(n) * c.val_fraction);
    SSMX_REQUIRE(c.val_fraction == 0 || n_val > 0, ssmx::ValueError, what, ": --val-fraction ", c.val_fraction,
                 " of its ", n, " tokens holds out none; use a larger fraction or 0 (no evaluation)");
    SSMX_REQUIRE(n - n_val >= 2, ssmx::ValueError, what, ": ", n - n_val,
                 " training tokens after the held-out part; need at least 2");
    std::vector<token_t> val(tokens.end() - n_val, tokens.end());
    tokens.resize(std::size_t(n - n_val));
    const std::vector<token_t>& first = n_val > 0 ? val : tokens;
    head_.assign(first.begin(), first.begin() + std::min<std::ptrdiff_t>(max_prompt, std::ptrdiff_t(first.size())));

    // Documents: at --eot for token files; for text, --batch equal streams.
    auto documents = [&](const std::vector<token_t>& t) {
      if (kind == "tokens") return data::document_offsets(t, token_t(c.eot));
      std::vector<index_t> o;
      for (index_t r = 0; r <= rows_; ++r) o.push_back(index_t(t.size()) * r / rows_);
      return o;
    };
    const auto train_docs = documents(tokens);
    train_.emplace(std::move(tokens), train_docs, data::PackerOptions{rows_, context_, seed_, true});
    if (n_val > 0) {
      const auto val_docs = documents(val);
      val_.emplace(std::move(val), val_docs, data::PackerOptions{rows_, context_, seed_, false});
      val_start_ = val_->state();
      eval_budget_ = index_t(c.eval_tokens);
    }
    description_ = what + ": " + std::to_string(n - n_val) + " training tokens in " +
                   std::to_string(train_->num_documents()) + (kind == "text" ? " streams" : " documents") + ", " +
                   std::to_string(n_val) + " held out, vocab " + std::to_string(vocab_);
    if (kind == "tokens" && train_->num_documents() <= 1)
      warning_ = "warning: --eot " + std::to_string(c.eot) + " does not occur in the training tokens of " + path +
                 ": the whole file is one document (no state resets); pass --eot with the token that begins "
                 "each document";
  }

  index_t rows_, context_;
  std::uint64_t seed_;
  index_t vocab_ = 0;
  std::string description_, warning_;
  // recall
  std::optional<ssmx::data::RecallTask> recall_;
  index_t curriculum_start_ = 0, curriculum_steps_ = 1, curriculum_first_ = 1;
  std::vector<token_t> eval_inputs_, eval_targets_;
  // tokens, text
  std::optional<ssmx::data::Packer> train_, val_;
  std::string val_start_;
  index_t eval_budget_ = 0;
  ssmx::data::PackedBatch packed_;
  static constexpr std::ptrdiff_t max_prompt = 256;
  std::vector<token_t> head_;  // the first tokens of the held-out data, for prompt()
  std::optional<EvalFile> eval_file_;
};

}  // namespace train
