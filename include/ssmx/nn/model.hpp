// ssmx — a language model over scan layers, trained with a selectable gradient strategy.
//
//   embedding -> K residual blocks y_k = y_{k-1} + Layer_k(RMSNorm(y_{k-1}))
//             -> final RMSNorm -> LM head (tied or untied) -> softmax cross-entropy
//
// The loss is summed over the target tokens (targets of -1 are ignored); gradients are
// those of the sum. Sequences of a batch are processed one after another, so memory is
// that of one sequence. Gradients accumulate into each Parameter's grad; call zero_grad()
// between steps.
//
// Memory (DESIGN §1.4), for one sequence of T tokens, width P, state S per token:
//   Backprop      every intermediate of every layer: K full tapes
//   Checkpointed  K·T·P layer inputs + one layer's full tape over T tokens
//   Adjoint       K·T·P layer inputs + K·(T/chunk)·S boundary states + one chunk's tape
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../adjoint/strategy.hpp"
#include "diagonal_ssm.hpp"
#include "mamba.hpp"
#include "mamba2.hpp"
#include "pipeline.hpp"
#include "embedding.hpp"
#include "linear.hpp"
#include "scan_layer.hpp"
#include "stored_stream.hpp"

namespace ssmx::nn {

// A batch of token sequences, row-major [batch, seq_len]. targets[b][t] is the token to
// predict after inputs[b][0..t], or -1 for no loss at that position.
// starts (optional, [batch, seq_len]) marks with 1 the first token of each packed
// document: every layer's recurrent state and convolution window reset there, so no
// information crosses documents.
struct Batch {
  const token_t* inputs = nullptr;
  const token_t* targets = nullptr;
  index_t batch = 0;
  index_t seq_len = 0;
  const std::uint8_t* starts = nullptr;
};

struct StepResult {
  double loss = 0;      // summed over counted tokens
  index_t tokens = 0;   // tokens with a target
  index_t correct = 0;  // argmax predictions equal to the target
  double mean_loss() const { return tokens ? loss / double(tokens) : 0.0; }
  double accuracy() const { return tokens ? double(correct) / double(tokens) : 0.0; }
};

// Recurrent state per layer across calls, so that a caller can split a long sequence into
// consecutive calls and get exactly the result of one call. A layer's state is its scan
// state h ([batch, S]) and, for a layer with a halo (a convolution window), the last
// `halo` rows of its input stream ([batch, halo, d_model]). Every vector holds K tensors or
// is empty (zero states in, no gradient from later tokens).
//   in:   initial, initial_halo               the state before the first token
//         final_grad, final_halo_grad          dL/d(final state) from the tokens after the
//                                              call (the next call's initial_*_grad)
//   out:  final_states, final_halo             the state after the last token
//         initial_grad, initial_halo_grad      dL/d(initial state) (forward_backward)
// A document start (Batch::starts) at token 0 cuts the initial state off.
// The tensors live in the model's memory space S.
template <class T, Space S = Space::Host>
struct LayerStates {
  std::vector<Tensor<T, S>> initial;
  std::vector<Tensor<T, S>> initial_halo;
  std::vector<Tensor<T, S>> final_grad;
  std::vector<Tensor<T, S>> final_halo_grad;
  std::vector<Tensor<T, S>> final_states;
  std::vector<Tensor<T, S>> final_halo;
  std::vector<Tensor<T, S>> initial_grad;
  std::vector<Tensor<T, S>> initial_halo_grad;
};

// What generation carries from one token to the next for B sequences: every layer's state
// and the last `halo` rows of its input (the convolution window), [B, S] and
// [B, halo, d_model] per layer (the layouts of LayerStates), and per sequence the tokens since
// its document start (capped at the halo; the window is cut at a start). Its size does not
// grow with the tokens generated. Model::decode_state makes one, Model::prefill and
// Model::step advance it.
template <class T, Space S = Space::Host>
struct DecodeState {
  index_t batch = 0;
  std::vector<Tensor<T, S>> h;      // K × [B, S]
  std::vector<Tensor<T, S>> tail;   // K × [B, halo, d_model] (empty without a halo)
  std::vector<index_t> since;       // [B]
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& t : h) n += t.bytes();
    for (const auto& t : tail) n += t.bytes();
    return n;
  }
};

// How one process's part of a distributed forward/backward pass meets the other processes'
// parts (ssmx::dist implements it over MPI; see dist/layer_parallel.hpp and
// dist/sequence_parallel.hpp). A model holding layers [b, e) (Config::layer_begin/end)
// receives layer b's input and sends layer e-1's output, and in the backward pass receives
// dL/d(output) and sends dL/d(input): layer sharding. A link that splits tokens hands this
// process tokens [t0, t1) of every sequence: sequence sharding, where each layer's scan
// carry and convolution halo cross to the neighbouring processes. The default methods do
// nothing: one process, all tokens.
template <class T, Space S = Space::Host>
class SequenceLink {
 public:
  virtual ~SequenceLink() = default;

  // ---- sequence sharding ----
  virtual bool splits_tokens() const { return false; }
  // This process's tokens [t0, t1) of a sequence of seq_len tokens.
  virtual std::pair<index_t, index_t> tokens(index_t seq_len) const { return {0, seq_len}; }
  // Whether this process holds the sequence's first token (reads LayerStates' initial
  // states) and its last one (reads final_grad and final_halo_grad).
  virtual bool first() const { return true; }
  virtual bool last() const { return true; }
  // Layer k's input: send `tail` (this process's last halo rows) to the next process and
  // receive the previous process's into `rows` (layer k's rows before t0), [halo, P].
  virtual void exchange_halo(index_t k, TensorView<const T, S> tail, TensorView<T, S> rows) { (void)k, (void)tail, (void)rows; }
  // Layer k's scan carry. `ab` ([2, S]) holds this process's tokens as the affine map
  // h -> (Π a) h + b of the state before them; replace it with the composition of the
  // maps of the processes before (forward) or, for the adjoint, after (backward).
  virtual void forward_carry(index_t k, TensorView<T, S> ab) { (void)k, (void)ab; }
  virtual void backward_carry(index_t k, TensorView<T, S> ab) { (void)k, (void)ab; }
  // dL/d(layer k's rows before t0), [halo, P], goes to the previous process; the next
  // process's is added into `rows` (dL/d of this process's last halo input rows).
  virtual void exchange_halo_grad(index_t k, TensorView<const T, S> grad, TensorView<T, S> rows) {
    (void)k, (void)grad, (void)rows;
  }

  // ---- layer sharding ----
  virtual void receive_input(TensorView<T, S> y) { (void)y; }        // y_{b-1}, [n, P]
  virtual void send_output(TensorView<const T, S> y) { (void)y; }    // y_{e-1}, [n, P]
  virtual void receive_grad(TensorView<T, S> g) { (void)g; }         // dL/dy_{e-1}, [n, P]
  virtual void send_grad(TensorView<const T, S> g) { (void)g; }      // dL/dy_{b-1}, [n, P]
};

// What a Model is built with, whatever its layers and memory space.
struct ModelConfig {
  index_t vocab = 256;
  bool tie_embeddings = true;
  std::uint64_t seed = 0;
  // Layer sharding: this process holds layers [layer_begin, layer_end) (-1: K) and only
  // their parameters; the embedding when layer_begin == 0 (or tied and layer_end == K),
  // the final norm and the head when layer_end == K. Initial values are those of the
  // whole model with the same seed.
  index_t layer_begin = 0;
  index_t layer_end = -1;
  // Store the layer inputs kept for the backward pass (K·T·P values, the adjoint's
  // dominant memory) in bfloat16: half the bytes; arithmetic stays in T. The stream is
  // rounded where it is stored, and every strategy computes with the rounded values.
  bool bf16_inputs = false;
  // Run the scan layers' fused scan (nn/fused.hpp) where their maps allow it, under the
  // Adjoint, TruncatedAdjoint and PaperAdjoint strategies and in evaluate/logits. false:
  // the materialised path everywhere (the reference the fused path is tested against).
  // Backprop and Checkpointed always keep their full tapes.
  bool fused = true;
  // On the fused path, run the structured chunked scan (nn/structured.hpp) for layers
  // whose maps have its shape (DiagonalSSM, GatedSSM, Mamba2). false: the fused scan for
  // them too.
  bool structured = true;
  // On the host with more than one OpenMP thread, run a step's layers as a pipeline over
  // the stretches (nn/pipeline.hpp): the threads meet once per stretch instead of once per
  // operation. Costs one stretch's workspace and one set of per-shard gradient buffers per
  // extra thread, and the peak then varies by up to a stretch's buffers with the threads'
  // timing. false: layer after layer, the threads inside each operation (the least memory,
  // the same peak every step). Gradients are bit-identical either way.
  bool pipeline = true;
};

// Mem: the memory space everything lives in (parameters, the stored streams, the tapes);
// `Layer` may be declared for any space and is moved to Mem (Layer::on<Mem>), so one model
// description compiles for the CPU and for the GPU: Model<Mamba<float, 768>, 24, Space::Cuda>.
// Token batches stay on the host in both cases.
template <class Layer_, index_t K, Space Mem = layer_space<Layer_>::value>
class Model {
  static_assert(K >= 1, "Model: the number of layers K must be at least 1");
  using Layer = layer_on_t<Layer_, Mem>;

 public:
  using T = typename Layer::value_type;
  using layer_type = Layer;
  static constexpr Space space = Mem;
  static constexpr index_t num_layers = K;
  static constexpr index_t d_model = Layer::d_model;

  using Config = ModelConfig;

  explicit Model(const Config& cfg) : cfg_(cfg), norm_f_("norm_f.weight", d_model) {
    SSMX_REQUIRE(cfg.vocab > 0, ValueError, "Model: vocab must be positive, got ", cfg.vocab);
    kb_ = cfg.layer_begin;
    ke_ = cfg.layer_end < 0 ? K : cfg.layer_end;
    SSMX_REQUIRE(kb_ >= 0 && kb_ < ke_ && ke_ <= K, ValueError, "Model: layers [", cfg.layer_begin, ", ",
                 cfg.layer_end, ") is not a non-empty range of the model's ", K, " layers");
    cfg_.layer_end = ke_;
    std::mt19937_64 rng(cfg.seed);
    // The matrix the head multiplies by (the embedding when tied, lm_head otherwise) ~
    // N(0, 0.02^2), GPT-2's and Mamba's initializer_range: the final norm gives the stream
    // unit RMS, so the logits start with std 0.02·sqrt(P), the prediction near uniform and
    // the first loss near ln(vocab) (tests/unit/test_model.cpp checks it for the trainer's
    // presets). With a head of its own the embedding ~ N(0, 1/P): rows of unit norm.
    // Parts this process does not hold still draw their numbers, so every part gets the
    // values of the whole model.
    std::normal_distribution<double> nd(0.0, 1.0);
    constexpr double head_std = 0.02;
    auto draw = [&](Parameter<T, Mem>* p, index_t count, double std) {
      if (p)
        set_values(*p, [&](index_t) { return std * nd(rng); });
      else
        for (index_t i = 0; i < count; ++i) (void)nd(rng);
    };
    if (holds_embedding()) embedding_.emplace("embedding.weight", cfg.vocab, d_model);
    draw(embedding_ ? &embedding_->weight : nullptr, cfg.vocab * d_model,
         cfg.tie_embeddings ? head_std : 1.0 / std::sqrt(double(d_model)));
    if (!cfg.tie_embeddings) {
      if (holds_head()) head_.emplace("lm_head.weight", Dims{d_model, cfg.vocab});
      draw(head_ ? &*head_ : nullptr, d_model * cfg.vocab, head_std);
    }
    for (index_t k = 0; k < K; ++k) {
      auto blk = std::make_unique<Block<Layer>>("layers." + std::to_string(k) + ".");
      blk->mixer.init(rng);
      blocks_.push_back(holds_layer(k) ? std::move(blk) : nullptr);
    }
    zero_grad();
  }

  index_t vocab() const { return cfg_.vocab; }
  bool tied_embeddings() const { return cfg_.tie_embeddings; }  // the LM head reads the embedding matrix
  // The part this process holds (everything unless Config::layer_begin/layer_end say so).
  index_t layer_begin() const { return kb_; }
  index_t layer_end() const { return ke_; }
  bool holds_all() const { return kb_ == 0 && ke_ == K; }
  bool holds_layer(index_t k) const { return k >= kb_ && k < ke_; }
  bool holds_embedding() const { return kb_ == 0 || (cfg_.tie_embeddings && ke_ == K); }
  bool holds_head() const { return ke_ == K; }  // the final norm and the head (or the tied embedding)
  Block<Layer>& block(index_t k) {
    SSMX_REQUIRE(holds_layer(k), ValueError, "Model::block(", k, "): this model holds layers [", kb_, ", ", ke_, ")");
    return *blocks_[std::size_t(k)];
  }
  Embedding<T, Mem>& embedding() {
    SSMX_REQUIRE(embedding_.has_value(), ValueError, "Model::embedding(): this model holds layers [", kb_, ", ", ke_,
                 ") of ", K, " and not the embedding");
    return *embedding_;
  }

  // All parameters held, in a fixed order: embedding, blocks, final norm, head.
  ParameterList<T, Mem> parameters() {
    ParameterList<T, Mem> p;
    if (embedding_) p.push_back(&embedding_->weight);
    for (auto& b : blocks_)
      if (b)
        for (auto* q : b->parameters()) p.push_back(q);
    if (holds_head()) p.push_back(&norm_f_.weight);
    if (head_) p.push_back(&*head_);
    return p;
  }
  void zero_grad() { ssmx::zero_grad(parameters()); }

  // Forward and backward over a batch; gradients of the summed loss are added to grads.
  // With a `link` (dist/), runs this process's part of a distributed pass: the result
  // counts this process's loss terms only, and the caller checks the summed loss.
  template <class Strategy = Adjoint>
  StepResult forward_backward(const Batch& batch, const Strategy& strategy = {}, LayerStates<T, Mem>* states = nullptr,
                              SequenceLink<T, Mem>* link = nullptr) {
    check_batch(batch);
    SSMX_REQUIRE(link || holds_all(), ValueError, "forward_backward: this model holds layers [", kb_, ", ", ke_,
                 ") of ", K, "; run it through ssmx::dist::layer_parallel_train_step");
    prepare_states(batch, states);
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      StepResult r = sequence(batch, b, strategy, states, link, true);
      total.loss += r.loss;
      total.tokens += r.tokens;
      total.correct += r.correct;
    }
    if (!link)
      SSMX_REQUIRE(std::isfinite(total.loss), ValueError, "loss is not finite (", total.loss,
                   "): the parameters were left unchanged; lower the learning rate or check the data");
    return total;
  }

  // This process's part of a distributed forward pass (no gradients): loss and accuracy of
  // the tokens it scores. Memory: two layers' inputs over the process's tokens.
  StepResult forward(const Batch& batch, SequenceLink<T, Mem>& link, LayerStates<T, Mem>* states = nullptr) {
    check_batch(batch);
    prepare_states(batch, states);
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      StepResult r = sequence(batch, b, Adjoint{}, states, &link, false);
      total.loss += r.loss;
      total.tokens += r.tokens;
      total.correct += r.correct;
    }
    return total;
  }

  // Loss and accuracy without gradients, streaming chunk by chunk through all layers:
  // memory O(K·S + chunk), independent of the sequence length. With `states`, starts from
  // their initial states and returns the final ones (no gradients).
  StepResult evaluate(const Batch& batch, index_t chunk = 1024, LayerStates<T, Mem>* states = nullptr) {
    return stream(batch, chunk, states, nullptr);
  }

  // The logits of every position, [batch, seq_len, vocab], streamed like evaluate() (the
  // targets are not read and may be null).
  Tensor<T, Mem> logits(const Batch& batch, index_t chunk = 1024, LayerStates<T, Mem>* states = nullptr) {
    std::vector<token_t> none(std::size_t(batch.batch * batch.seq_len), token_t(-1));
    Batch b = batch;
    b.targets = none.data();
    Tensor<T, Mem> out(Dims{batch.batch, batch.seq_len, cfg_.vocab}, Tag::Activations);
    stream(b, chunk, states, &out);
    return out;
  }

  // ---- generation: one token at a time, constant memory per token ----

  // Zero states for `batch` sequences (the state before a sequence's first token).
  DecodeState<T, Mem> decode_state(index_t batch) const {
    SSMX_REQUIRE(batch > 0, ValueError, "decode_state: the batch size is ", batch, ", expected at least 1");
    SSMX_REQUIRE(holds_all(), ValueError, "decode_state: this model holds layers [", kb_, ", ", ke_, ") of ", K,
                 "; generation needs the whole model");
    DecodeState<T, Mem> ds;
    ds.batch = batch;
    const index_t S = state_numel(Layer::state_dims());
    for (index_t k = 0; k < K; ++k) {
      ds.h.push_back(zeros<T, Mem>(Dims{batch, S}, Tag::Activations));
      ds.tail.push_back(halo > 0 ? zeros<T, Mem>(Dims{batch, halo, d_model}, Tag::Activations) : Tensor<T, Mem>());
    }
    ds.since.assign(std::size_t(batch), halo);
    return ds;
  }

  // The logits of the next token of every sequence, [B, vocab], from one token each
  // (tokens[b] for sequence b); advances ds by one token. starts (optional, [B]): 1 where the
  // token begins a new document (its state and window start afresh, as Batch::starts).
  // Equal to the logits of the parallel forward over the same tokens, to rounding.
  Tensor<T, Mem> step(const token_t* tokens, DecodeState<T, Mem>& ds, const std::uint8_t* starts = nullptr) {
    check_decode_state(ds, "step");
    const index_t B = ds.batch, P = d_model;
    for (index_t b = 0; b < B; ++b)
      SSMX_REQUIRE(tokens[b] >= 0 && index_t(tokens[b]) < cfg_.vocab, ValueError, "step: tokens[", b, "] = ", tokens[b],
                   " is outside the vocabulary [0, ", cfg_.vocab, ")");
    bool any_start = false, cut = false;  // a state cut, a window cut
    for (index_t b = 0; b < B; ++b) {
      const bool s = starts && starts[b];
      if (s) ds.since[std::size_t(b)] = 0;
      any_start = any_start || s;
      cut = cut || ds.since[std::size_t(b)] < halo;
    }
    Tensor<T, Mem> y(Dims{B, P}, Tag::Activations);
    embedding_->forward(tokens, B, y.view());
    Tensor<T, Mem> y_ext(Dims{B * (halo + 1), P}, Tag::Activations);
    for (index_t k = 0; k < K; ++k) {
      // Per sequence: its window rows, then its token.
      for (index_t b = 0; b < B; ++b) {
        const index_t r = b * (halo + 1);
        if constexpr (halo > 0) copy<T>(y_ext.view().slice(r, r + halo), row_of(ds.tail[std::size_t(k)], b, Dims{halo, P}));
        copy<T>(y_ext.view().slice(r + halo, r + halo + 1), CV(y.view()).slice(b, b + 1));
      }
      Tensor<T, Mem> y_out(Dims{B, P}, Tag::Activations);
      detail::step_stretch(block(k), CV(y_ext.view()), ds.h[std::size_t(k)].view(), any_start ? starts : nullptr,
                           cut ? ds.since.data() : nullptr, y_out.view());
      if constexpr (halo > 0)  // the window moves on by one token
        for (index_t b = 0; b < B; ++b) {
          const index_t r = b * (halo + 1);
          copy<T>(row_of(ds.tail[std::size_t(k)], b, Dims{halo, P}), CV(y_ext.view()).slice(r + 1, r + halo + 1));
        }
      y = std::move(y_out);
    }
    for (auto& s : ds.since) s = std::min(s + 1, halo);
    Tensor<T, Mem> out(Dims{B, cfg_.vocab}, Tag::Activations);
    assign(out.view(), matmul(rms_norm(CV(y.view()), norm_f_.weight.value, norm_f_.eps), head_view()));
    return out;
  }

  // Runs sequence b of ds over a prompt of `len` tokens with the parallel forward (chunks of
  // `chunk`, the fused scans), continuing from the state ds holds for it; returns the logits
  // after the prompt's last token, [1, vocab]. starts (optional, [len]) as Batch::starts.
  Tensor<T, Mem> prefill(const token_t* prompt, index_t len, DecodeState<T, Mem>& ds, index_t b = 0,
                         index_t chunk = 1024, const std::uint8_t* starts = nullptr) {
    check_decode_state(ds, "prefill");
    SSMX_REQUIRE(b >= 0 && b < ds.batch, ValueError, "prefill: sequence ", b, " of a decode state for ", ds.batch,
                 " sequences");
    SSMX_REQUIRE(len > 0, ValueError, "prefill: the prompt is empty");
    if (len == 1) {  // one token: a step
      DecodeState<T, Mem> one = slice_state(ds, b);
      Tensor<T, Mem> lg = step(prompt, one, starts);
      put_state(ds, b, one);
      return lg;
    }
    const index_t S = state_numel(Layer::state_dims()), P = d_model;
    LayerStates<T, Mem> ls;
    for (index_t k = 0; k < K; ++k) {
      ls.initial.push_back(Tensor<T, Mem>(Dims{1, S}, Tag::Activations));
      copy<T>(ls.initial.back().view(), CV(ds.h[std::size_t(k)].view()).slice(b, b + 1));
      if constexpr (halo > 0) {
        ls.initial_halo.push_back(Tensor<T, Mem>(Dims{1, halo, P}, Tag::Activations));
        copy<T>(ls.initial_halo.back().view().reshape(Dims{halo, P}), row_of(ds.tail[std::size_t(k)], b, Dims{halo, P}));
      }
    }
    std::vector<std::uint8_t> st;
    const index_t since0 = ds.since[std::size_t(b)];
    if (starts || since0 < halo) {
      st.assign(std::size_t(len), 0);
      if (starts) std::copy(starts, starts + len, st.begin());
    }
    Tensor<T, Mem> lg;
    if (since0 < halo && !(starts && starts[0])) {
      // Continue a document begun in ds within the last halo tokens: step until the window
      // no longer reaches its start, then run the rest in parallel.
      const index_t m = std::min(len, halo - since0);
      DecodeState<T, Mem> one = slice_state(ds, b);
      for (index_t t = 0; t < m; ++t) lg = step(prompt + t, one, starts ? starts + t : nullptr);
      put_state(ds, b, one);
      if (m == len) return lg;
      return prefill(prompt + m, len - m, ds, b, chunk, starts ? starts + m : nullptr);
    }
    // Tokens [0, len - 1) without logits (memory: one chunk, not [len, vocab]), then the
    // last token as a step, whose logits are the ones returned.
    const std::vector<token_t> none(std::size_t(len - 1), token_t(-1));
    (void)evaluate(Batch{prompt, none.data(), 1, len - 1, st.empty() ? nullptr : st.data()}, chunk, &ls);
    for (index_t k = 0; k < K; ++k) {
      copy<T>(ds.h[std::size_t(k)].view().slice(b, b + 1), CV(ls.final_states[std::size_t(k)].view()));
      if constexpr (halo > 0)
        copy<T>(row_of(ds.tail[std::size_t(k)], b, Dims{halo, P}), CV(ls.final_halo[std::size_t(k)].view()).reshape(Dims{halo, P}));
    }
    index_t run = ds.since[std::size_t(b)];
    for (index_t t = 0; t + 1 < len; ++t) run = std::min((starts && starts[t]) ? 1 : run + 1, halo);
    ds.since[std::size_t(b)] = run;
    return prefill(prompt + len - 1, 1, ds, b, chunk, starts ? starts + len - 1 : nullptr);
  }

  // The epsilon of every RMSNorm (the blocks' and the final one), e.g. a checkpoint's
  // layer_norm_epsilon.
  void set_norm_eps(double eps) {
    SSMX_REQUIRE(eps > 0 && std::isfinite(eps), ValueError, "set_norm_eps: eps must be finite and > 0, got ", eps);
    for (auto& b : blocks_)
      if (b) b->norm.eps = eps;
    norm_f_.eps = eps;
  }

 private:
  using CV = TensorView<const T, Mem>;

  // Forward only, chunk by chunk through all layers; loss and accuracy, and the logits
  // when `logits_out` ([batch, seq_len, vocab]) is given.
  StepResult stream(const Batch& batch, index_t chunk, LayerStates<T, Mem>* states, Tensor<T, Mem>* logits_out) {
    check_batch(batch);
    SSMX_REQUIRE(holds_all(), ValueError, "evaluate/logits: this model holds layers [", kb_, ", ", ke_, ") of ", K,
                 "; use ssmx::dist::layer_parallel_evaluate");
    SSMX_REQUIRE(chunk > 0, ValueError, "evaluate: chunk must be positive, got ", chunk);
    prepare_states(batch, states);
    const index_t S = state_numel(Layer::state_dims()), T_ = batch.seq_len;
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      std::vector<index_t> since;
      const Resets resets = sequence_resets(batch, b, since);
      std::vector<Tensor<T, Mem>> state, tail;  // per layer: h, and the last halo rows of its input
      for (index_t k = 0; k < K; ++k) {
        state.push_back(zeros<T, Mem>(Dims{1, S}, Tag::Activations));
        tail.push_back(zeros<T, Mem>(Dims{halo, d_model}, Tag::Activations));
        if (states) load_initial(*states, k, b, state.back().view(), tail.back().view());
      }
      for (index_t c0 = 0; c0 < T_; c0 += chunk) {
        const index_t c1 = std::min(T_, c0 + chunk), n = c1 - c0;
        Tensor<T, Mem> y(Dims{halo + n, d_model}, Tag::Activations);  // layer input, its halo rows first
        embedding_->forward(batch.inputs + b * T_ + c0, n, y.view().slice(halo, halo + n));
        for (index_t k = 0; k < K; ++k) {
          copy<T>(y.view().slice(0, halo), CV(tail[std::size_t(k)].view()));
          Stretch<Layer> st;
          Tensor<T, Mem> next_state(Dims{1, S}, Tag::Activations);
          Tensor<T, Mem> y_out(Dims{(k + 1 < K ? halo : 0) + n, d_model}, Tag::Activations);
          forward_stretch(block(k), CV(y.view()), CV(state[std::size_t(k)].view()), st, resets.offset(c0), scan_path(),
                          {next_state.view(), y_out.view().slice(y_out.extent(0) - n, y_out.extent(0)), {}});
          copy<T>(tail[std::size_t(k)].view(), CV(y.view()).slice(n, n + halo));
          y = std::move(y_out);
          state[std::size_t(k)] = std::move(next_state);
        }
        if (logits_out) {  // no targets to score: the logits only
          assign(logits_out->view().reshape(Dims{batch.batch * T_, cfg_.vocab}).slice(b * T_ + c0, b * T_ + c1),
                 matmul(rms_norm(CV(y.view()), norm_f_.weight.value, norm_f_.eps), head_view()));
          continue;
        }
        const token_t* tg = batch.targets + b * T_ + c0;
        if (std::none_of(tg, tg + n, [](token_t x) { return x >= 0; })) continue;  // nothing to score
        StepResult r = head_loss(CV(y.view()), tg, nullptr);
        total.loss += r.loss;
        total.tokens += r.tokens;
        total.correct += r.correct;
      }
      if (states)
        for (index_t k = 0; k < K; ++k)
          store_final(*states, k, b, CV(state[std::size_t(k)].view()), CV(tail[std::size_t(k)].view()));
    }
    return total;
  }


  void check_decode_state(const DecodeState<T, Mem>& ds, const char* what) const {
    SSMX_REQUIRE(holds_all(), ValueError, what, ": this model holds layers [", kb_, ", ", ke_, ") of ", K,
                 "; generation needs the whole model");
    const index_t S = state_numel(Layer::state_dims());
    SSMX_REQUIRE(ds.batch > 0 && index_t(ds.h.size()) == K && index_t(ds.tail.size()) == K &&
                     index_t(ds.since.size()) == ds.batch,
                 ValueError, what, ": the decode state is not one of this model's (make it with decode_state)");
    for (index_t k = 0; k < K; ++k) {
      check_dims(ds.h[std::size_t(k)].dims(), Dims{ds.batch, S}, "decode state");
      if (halo > 0) check_dims(ds.tail[std::size_t(k)].dims(), Dims{ds.batch, halo, d_model}, "decode state window");
    }
  }
  // Sequence b of a decode state as a state of its own, and back.
  DecodeState<T, Mem> slice_state(const DecodeState<T, Mem>& ds, index_t b) const {
    DecodeState<T, Mem> one = decode_state(1);
    for (index_t k = 0; k < K; ++k) {
      copy<T>(one.h[std::size_t(k)].view(), CV(ds.h[std::size_t(k)].view()).slice(b, b + 1));
      if (halo > 0) copy<T>(one.tail[std::size_t(k)].view(), CV(ds.tail[std::size_t(k)].view()).slice(b, b + 1));
    }
    one.since[0] = ds.since[std::size_t(b)];
    return one;
  }
  void put_state(DecodeState<T, Mem>& ds, index_t b, const DecodeState<T, Mem>& one) const {
    for (index_t k = 0; k < K; ++k) {
      copy<T>(ds.h[std::size_t(k)].view().slice(b, b + 1), CV(one.h[std::size_t(k)].view()));
      if (halo > 0) copy<T>(ds.tail[std::size_t(k)].view().slice(b, b + 1), CV(one.tail[std::size_t(k)].view()));
    }
    ds.since[std::size_t(b)] = one.since[0];
  }

  void check_batch(const Batch& batch) const {
    SSMX_REQUIRE(batch.inputs && batch.targets, ValueError, "batch: inputs and targets must not be null");
    SSMX_REQUIRE(batch.batch > 0, ValueError, "batch: the batch size is ", batch.batch, ", expected at least 1");
    SSMX_REQUIRE(batch.seq_len > 0, ValueError, "batch: the sequence length is ", batch.seq_len,
                 " (an empty sequence), expected at least 1");
    for (index_t b = 0; b < batch.batch; ++b)
      for (index_t t = 0; t < batch.seq_len; ++t) {
        const token_t x = batch.inputs[b * batch.seq_len + t], y = batch.targets[b * batch.seq_len + t];
        SSMX_REQUIRE(x >= 0 && index_t(x) < cfg_.vocab, ValueError, "inputs[", b, "][", t, "] = ", x,
                     " is outside the vocabulary [0, ", cfg_.vocab, ")");
        SSMX_REQUIRE(y == -1 || (y >= 0 && index_t(y) < cfg_.vocab), ValueError, "targets[", b, "][", t, "] = ", y,
                     " is outside the vocabulary [0, ", cfg_.vocab, ") and is not -1 (ignore)");
      }
  }

  static constexpr index_t halo = layer_halo<Layer>::value;

  void prepare_states(const Batch& batch, LayerStates<T, Mem>* states) const {
    if (!states) return;
    const index_t S = state_numel(Layer::state_dims()), B = batch.batch;
    auto check = [&](const std::vector<Tensor<T, Mem>>& v, const Dims& d, const char* what) {
      SSMX_REQUIRE(v.empty() || index_t(v.size()) == K, ShapeError, "LayerStates: ", v.size(), " ", what,
                   " tensors for ", K, " layers");
      for (index_t k = kb_; k < ke_ && !v.empty(); ++k) check_dims(v[std::size_t(k)].dims(), d, what);
    };
    check(states->initial, Dims{B, S}, "initial state");
    check(states->final_grad, Dims{B, S}, "final state gradient");
    SSMX_REQUIRE(halo > 0 || (states->initial_halo.empty() && states->final_halo_grad.empty()), ValueError,
                 "LayerStates: initial_halo/final_halo_grad given for a layer without a halo");
    check(states->initial_halo, Dims{B, halo, d_model}, "initial halo");
    check(states->final_halo_grad, Dims{B, halo, d_model}, "final halo gradient");
    states->final_states.clear();
    states->final_halo.clear();
    states->initial_grad.clear();
    states->initial_halo_grad.clear();
    // Layers this process does not hold get empty tensors.
    for (index_t k = 0; k < K; ++k) {
      const bool held = holds_layer(k);
      states->final_states.push_back(held ? zeros<T, Mem>(Dims{B, S}, Tag::Activations) : Tensor<T, Mem>());
      states->initial_grad.push_back(held ? zeros<T, Mem>(Dims{B, S}, Tag::Gradients) : Tensor<T, Mem>());
      if (halo > 0) {
        states->final_halo.push_back(held ? zeros<T, Mem>(Dims{B, halo, d_model}, Tag::Activations) : Tensor<T, Mem>());
        states->initial_halo_grad.push_back(held ? zeros<T, Mem>(Dims{B, halo, d_model}, Tag::Gradients) : Tensor<T, Mem>());
      }
    }
  }
  // Layer k's initial state and halo rows for sequence b (left as they are when not given).
  // h: [1, S]; halo_rows: [halo, d_model].
  static void load_initial(const LayerStates<T, Mem>& st, index_t k, index_t b, TensorView<T, Mem> h,
                           TensorView<T, Mem> halo_rows) {
    if (!st.initial.empty()) copy<T>(h, row_of(st.initial[std::size_t(k)], b, h.dims()));
    if (!st.initial_halo.empty()) copy<T>(halo_rows, row_of(st.initial_halo[std::size_t(k)], b, halo_rows.dims()));
  }
  static void store_final(LayerStates<T, Mem>& st, index_t k, index_t b, CV h, CV halo_rows) {
    copy<T>(row_of(st.final_states[std::size_t(k)], b, h.dims()), h);
    if (halo > 0) copy<T>(row_of(st.final_halo[std::size_t(k)], b, halo_rows.dims()), halo_rows);
  }
  // Sequence b's part of a per-sequence state tensor ([batch, ...]), viewed with extents d.
  static TensorView<T, Mem> row_of(Tensor<T, Mem>& t, index_t b, const Dims& d) {
    return TensorView<T, Mem>(t.data() + b * d.numel(), d);
  }
  static CV row_of(const Tensor<T, Mem>& t, index_t b, const Dims& d) { return CV(t.data() + b * d.numel(), d); }
  // Sequence b's document starts, with `since` (tokens since the last start, capped at the
  // halo) filled for the layers' windows.
  static Resets sequence_resets(const Batch& batch, index_t b, std::vector<index_t>& since) {
    if (!batch.starts) return {};
    const std::uint8_t* starts = batch.starts + b * batch.seq_len;
    since.resize(std::size_t(batch.seq_len));
    index_t run = halo;
    for (index_t t = 0; t < batch.seq_len; ++t) {
      run = starts[t] ? 0 : std::min(run + 1, halo);
      since[std::size_t(t)] = run;
    }
    return Resets{starts, since.data()};
  }

  // The LM head and loss over one stretch of final-layer outputs y ([n, P]). When G is
  // given, writes dL/dy into it and adds the head's parameter gradients.
  StepResult head_loss(CV y, const token_t* targets, TensorView<T, Mem>* G) {
    const index_t n = y.extent(0), V = cfg_.vocab;
    StepResult r;
    for (index_t t = 0; t < n; ++t) r.tokens += targets[t] >= 0 ? 1 : 0;
    const Tensor<T, Mem> onehot = one_hot<T, Mem>(targets, n, V);
    auto le = matmul(rms_norm(y, norm_f_.weight.value, norm_f_.eps), head_view());
    Tape<decltype(le)> ltape(le);
    CV logits = ltape.value();
    r.correct = count_correct(logits, targets);
    auto loss_e = -sum(log_softmax(logits) * leaf(onehot));
    Tape<decltype(loss_e)> tape(loss_e);
    T loss = 0;
    ssmx::detail::copy_bytes(&loss, Space::Host, tape.value().data(), Mem, sizeof(T));
    r.loss = double(loss);
    if (G) {
      Tensor<T, Mem> dlogits = zeros<T, Mem>(Dims{n, V}, Tag::Workspace);
      Tensor<T, Mem> one(Dims{}, Tag::Workspace);
      fill<T>(one.view(), T(1));
      GradTargets<T, Mem> tg{wrt(logits, dlogits)};
      backward(loss_e, tape, CV(one.view()), tg);
      fill<T>(*G, T(0));
      GradTargets<T, Mem> htg{wrt(y, *G), wrt(norm_f_.weight.value, norm_f_.weight.grad),
                                      wrt(head_view(), head_grad_view())};
      backward(le, ltape, CV(dlogits.view()), htg);
    }
    return r;
  }

  ScanPath scan_path() const {
    return !cfg_.fused ? ScanPath::materialised : cfg_.structured ? ScanPath::structured : ScanPath::fused;
  }

  // The head as a [P, vocab] view: W itself, or (tied) Eᵀ read in place through strides.
  CV head_view() const {
    if (head_) return head_->value.view();
    return CV(embedding_->weight.value.data(), Dims{d_model, cfg_.vocab}, {1, d_model, 0, 0});
  }
  TensorView<T, Mem> head_grad_view() {
    if (head_) return head_->grad.view();
    return TensorView<T, Mem>(embedding_->weight.grad.data(), Dims{d_model, cfg_.vocab}, {1, d_model, 0, 0});
  }

  // One sequence: forward storing what the strategy stores, then backward (unless
  // with_backward is false). With a link: this process's layers and tokens only.
  template <class Strategy>
  StepResult sequence(const Batch& batch, index_t b, const Strategy& strategy, LayerStates<T, Mem>* states,
                      SequenceLink<T, Mem>* link, bool with_backward);

  Config cfg_;
  index_t kb_ = 0, ke_ = K;  // the layers held
  std::optional<Embedding<T, Mem>> embedding_;
  std::vector<std::unique_ptr<Block<Layer>>> blocks_;
  RMSNorm<T, Mem> norm_f_;
  std::optional<Parameter<T, Mem>> head_;
};

template <class Layer_, index_t K, Space Mem>
template <class Strategy>
StepResult Model<Layer_, K, Mem>::sequence(const Batch& batch, index_t b, const Strategy& strategy,
                                         LayerStates<T, Mem>* states, SequenceLink<T, Mem>* link, bool with_backward) {
  constexpr bool backprop = std::is_same_v<Strategy, Backprop>;
  constexpr bool paper = std::is_same_v<Strategy, PaperAdjoint>;
  constexpr bool truncated = std::is_same_v<Strategy, TruncatedAdjoint>;
  static_assert(backprop || paper || truncated || std::is_same_v<Strategy, Adjoint> ||
                    std::is_same_v<Strategy, Checkpointed>,
                "forward_backward: the strategy must be Backprop, Checkpointed, Adjoint, TruncatedAdjoint or PaperAdjoint");
  const Dims sd = Layer::state_dims();
  const auto [t0, t1] = link ? link->tokens(batch.seq_len) : std::pair<index_t, index_t>{0, batch.seq_len};
  const bool split = link && link->splits_tokens();
  SSMX_REQUIRE((!split || std::is_same_v<Strategy, Adjoint>), ValueError,
               "sequence sharding: the strategy must be Adjoint (exact, chunked)");
  SSMX_REQUIRE(t0 >= 0 && t1 <= batch.seq_len && t1 - t0 >= (split ? std::max<index_t>(1, halo) : 1), ValueError,
               "forward_backward: this process's tokens [", t0, ", ", t1, ") of ", batch.seq_len, " must hold at least ",
               split ? std::max<index_t>(1, halo) : 1, " token(s) (the layer's convolution halo is ", halo, ")");
  // Whether this process holds the sequence's first and last token (LayerStates' ends).
  const bool first = !split || link->first(), final_tok = !split || link->last();
  const index_t n_tok = t1 - t0, S = state_numel(sd), P = d_model, HP = halo * d_model;
  const index_t kb = kb_, ke = ke_;
  const token_t* inputs = batch.inputs + b * batch.seq_len + t0;
  const token_t* targets = batch.targets + b * batch.seq_len + t0;
  std::vector<index_t> since;
  const Resets resets = sequence_resets(batch, b, since).offset(t0);

  // Chunk length of the stored boundary states and of the backward pass.
  index_t chunk = n_tok, shard = n_tok;
  if constexpr (std::is_same_v<Strategy, Adjoint>) {
    SSMX_REQUIRE(strategy.chunk > 0 && strategy.shard > 0, ValueError, "Adjoint: chunk (", strategy.chunk,
                 ") and shard (", strategy.shard, ") must be positive");
    chunk = std::min(strategy.chunk, n_tok);
    shard = strategy.shard;
  } else if constexpr (truncated) {
    SSMX_REQUIRE(strategy.window > 0 && strategy.shard > 0, ValueError, "TruncatedAdjoint: window (", strategy.window,
                 ") and shard (", strategy.shard, ") must be positive");
    chunk = std::min(strategy.window, n_tok);
    shard = strategy.shard;
  } else if constexpr (paper) {
    SSMX_REQUIRE(strategy.window >= 0, ValueError, "PaperAdjoint: window must be >= 0, got ", strategy.window);
  }
  const index_t nchunks = (n_tok + chunk - 1) / chunk;
  // The fused scan for the adjoint strategies; Backprop and Checkpointed keep full tapes.
  const ScanPath path =
      backprop || std::is_same_v<Strategy, Checkpointed> ? ScanPath::materialised : scan_path();

  // Layers run as a pipeline over the stretches (nn/pipeline.hpp) on the host when more
  // than one thread is available and nothing crosses processes; otherwise in order.
  const index_t n_layers = ke - kb, n_stages = n_layers + (ke == K ? 1 : 0);  // forward: the head too
  auto pipeline_threads = [&](index_t stages) {
    return Mem == Space::Host && !link && cfg_.pipeline ? detail::pipeline_threads(stages, nchunks) : 1;
  };

  // ---- forward: store each layer's input (after its halo rows) and its chunk-boundary states ----
  // Y[k]: input of layer k, [halo + n, P]; rows [0, halo) come before t0.
  std::vector<StoredStream<T, Mem>> Y(static_cast<std::size_t>(K + 1));
  auto new_input = [&](index_t k) {
    Y[std::size_t(k)] = StoredStream<T, Mem>(halo + n_tok, P, cfg_.bf16_inputs, halo);  // the layers write the rest
    if (states && first && !states->initial_halo.empty() && holds_layer(k))
      Y[std::size_t(k)].write(0, CV(states->initial_halo[std::size_t(k)].data() + b * HP, Dims{halo, P}));
  };
  new_input(kb);
  Y[std::size_t(kb)].write(halo, halo + n_tok, [&](TensorView<T, Mem> v) {
    if (kb == 0)
      embedding_->forward(inputs, n_tok, v);
    else
      link->receive_input(v);
  });
  std::vector<Tensor<T, Mem>> bnd(static_cast<std::size_t>(K));        // bnd[k]: [nchunks, S], the state before each chunk
  std::vector<Tensor<T, Mem>> decay_prod(static_cast<std::size_t>(K));  // sequence sharding: Π a over this process's tokens
  // dL/dy_k, carried down; in the forward pass the top layer's outputs, which the head reads.
  Tensor<T, Mem> G(Dims{n_tok, d_model}, Tag::Gradients);
  std::vector<Stretch<Layer>> kept(backprop ? std::size_t(K) : 0);
  std::vector<std::vector<ShardTapes<Layer>>> kept_tapes(backprop ? std::size_t(K) : 0);
  // The forward pipeline's stages: the layers held, then (with the top layer) the head,
  // which reads the top layer's outputs from G stretch by stretch and writes dL/dy_K there.
  StepResult r;
  auto forward_begin = [&](index_t i) {
    if (i == n_layers) return;  // the head
    const index_t k = kb + i;
    StoredStream<T, Mem>& Yk = Y[std::size_t(k)];
    Tensor<T, Mem>& bk = bnd[std::size_t(k)];
    bk = zeros<T, Mem>(Dims{nchunks, S}, Tag::Activations);
    if (states && first && !states->initial.empty())
      copy<T>(bk.view().slice(0, 1), row_of(states->initial[std::size_t(k)], b, Dims{1, S}));
    if (split) {
      if constexpr (halo > 0) {
        Tensor<T, Mem> buf;
        const CV tail = Yk.read(n_tok, n_tok + halo, buf);
        Yk.write(0, halo, [&](TensorView<T, Mem> rows) { link->exchange_halo(k, tail, rows); });
      }
      // This process's tokens as the affine map h -> (Π a) h + h_end of the state before
      // them (h_end from the state known here: the initial one, or zero). One forward over
      // the chunks finds it; the composition over the processes before gives the state.
      Tensor<T, Mem> ab(Dims{2, S}, Tag::Workspace);
      const TensorView<T, Mem> prod = ab.view().slice(0, 1);
      fill<T>(prod, T(1));
      Tensor<T, Mem> h = eval(leaf(CV(bk.view()).slice(0, 1)), Tag::Workspace);
      for (index_t c = 0; c < nchunks; ++c) {
        const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
        Stretch<Layer> st;
        Tensor<T, Mem> h_last(Dims{1, S}, Tag::Workspace), buf;
        // The chunk's last state and Π a over its tokens, in token order, into `prod`.
        forward_stretch(block(k), Yk.read(c0, halo + c1, buf), CV(h.view()), st, resets.offset(c0), path,
                        {h_last.view(), {}, prod});
        h = std::move(h_last);
      }
      copy<T>(ab.view().slice(1, 2), CV(h.view()));
      decay_prod[std::size_t(k)] = eval(leaf(CV(prod)), Tag::Activations);
      link->forward_carry(k, ab.view());
      if (!first) copy<T>(bk.view().slice(0, 1), CV(ab.view()).slice(1, 2));
    }
    if (k + 1 < K) new_input(k + 1);
  };
  auto forward_task = [&](index_t i, index_t c) {
    const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
    if (i == n_layers) {  // the head
      const Tensor<T, Mem> y_top = eval(leaf(CV(G.view()).slice(c0, c1)), Tag::Activations);
      TensorView<T, Mem> g = G.view().slice(c0, c1);
      StepResult hr = head_loss(CV(y_top.view()), targets + c0, with_backward ? &g : nullptr);
      r.loss += hr.loss;
      r.tokens += hr.tokens;
      r.correct += hr.correct;
      return;
    }
    const index_t k = kb + i;
    StoredStream<T, Mem>& Yk = Y[std::size_t(k)];
    Tensor<T, Mem>& bk = bnd[std::size_t(k)];
    Stretch<Layer> st;
    Tensor<T, Mem> h_last(Dims{1, S}, Tag::Activations);
    auto run = [&](TensorView<T, Mem> y_out) {  // the chunk's layer output and last state
      forward_stretch(block(k), Yk.read(c0, halo + c1, st.y_hold), CV(bk.view()).slice(c, c + 1), st,
                      resets.offset(c0), backprop ? ScanPath::materialised : path, {h_last.view(), y_out, {}});
    };
    if (k == K - 1)
      run(G.view().slice(c0, c1));
    else
      Y[std::size_t(k + 1)].write(halo + c0, halo + c1, run);
    if (c + 1 < nchunks) {
      copy<T>(bk.view().slice(c + 1, c + 2), CV(h_last.view()));
    } else if (states) {
      Tensor<T, Mem> buf;
      store_final(*states, k, b, CV(h_last.view()), Yk.read(n_tok, n_tok + halo, buf));
    }
    if constexpr (backprop) {  // the autograd tape: keep every intermediate
      kept_tapes[std::size_t(k)].emplace_back(block(k), st, 0, st.n());
      kept[std::size_t(k)] = std::move(st);
    }
  };
  auto forward_end = [&](index_t i) {
    if (i < n_layers && !with_backward) Y[std::size_t(kb + i)].clear();  // forward only: nothing is stored
  };
  detail::run_pipeline(n_stages, nchunks, pipeline_threads(n_stages), forward_begin, forward_task, forward_end);
  if (ke < K) {
    Tensor<T, Mem> buf;
    link->send_output(Y[std::size_t(ke)].read(halo, halo + n_tok, buf));
    Y[std::size_t(ke)].clear();
  }
  if (!with_backward) return r;

  // ---- backward: layers top-down, chunks in reverse ----
  if (ke < K) {
    fill<T>(G.view(), T(0));
    link->receive_grad(G.view());
  }
  Tensor<T, Mem> G_paper;  // PaperAdjoint: every layer takes dl/dy_K; input cotangents collect here
  if constexpr (paper) G_paper = G.clone(Tag::Gradients);
  TensorView<T, Mem> G_in = paper ? G_paper.view() : G.view();  // where dL/dy_{k-1} accumulates
  // What a layer carries from one stretch to the one before it.
  struct Carried {
    Tensor<T, Mem> carry, q_next;  // the adjoint carry; TruncatedAdjoint's forward accumulation
    // dL/d(input rows [q, q + halo)) from the windows of later chunks, held back until the
    // chunk owning those rows has read its own cotangent from G.
    Tensor<T, Mem> pending;
    index_t q = 0;
  };
  std::vector<Carried> carried(static_cast<std::size_t>(n_layers));
  const int threads = pipeline_threads(n_layers);
  std::vector<ShardGrads<T, Mem>> sgs(static_cast<std::size_t>(threads));  // one per thread, reused stretch to stretch
  auto thread_sg = [&]() -> ShardGrads<T, Mem>& {
    return sgs[threads > 1 ? std::size_t(detail::pipeline_thread()) : 0];
  };
  auto backward_begin = [&](index_t i) {
    const index_t k = ke - 1 - i;
    StoredStream<T, Mem>& Yk = Y[std::size_t(k)];
    Tensor<T, Mem>& bk = bnd[std::size_t(k)];
    Carried& cr = carried[std::size_t(i)];
    ShardGrads<T, Mem>& sg = thread_sg();
    if (states && final_tok && !states->final_grad.empty()) {
      cr.carry = Tensor<T, Mem>(Dims{1, S}, Tag::Workspace);
      copy<T>(cr.carry.view(), row_of(states->final_grad[std::size_t(k)], b, Dims{1, S}));
    }
    if (split) {
      // The adjoint carry this process passes down is (Π a) carry_in + c_0, with c_0 the
      // one it passes for the carry known here (final_grad, or zero): a reverse pass of
      // the adjoint alone over the chunks finds c_0, the composition over the processes
      // after gives carry_in.
      Tensor<T, Mem> c_run =
          cr.carry.empty() ? zeros<T, Mem>(Dims{1, S}, Tag::Workspace) : cr.carry.clone(Tag::Workspace);
      for (index_t c = nchunks - 1; c >= 0; --c) {
        const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
        Stretch<Layer> st;
        forward_stretch(block(k), Yk.read(c0, halo + c1, st.y_hold), CV(bk.view()).slice(c, c + 1), st,
                        resets.offset(c0), path);
        StretchBackward<T, Mem> opt;
        opt.shard = shard;
        opt.adjoint_only = true;
        opt.carry_in = c_run.view();
        Tensor<T, Mem> c_out(Dims{1, S}, Tag::Workspace);
        opt.carry_out = c_out.view();
        backward_stretch(block(k), st, CV(G.view()).slice(c0, c1), opt, sg);
        c_run = std::move(c_out);
      }
      Tensor<T, Mem> ab(Dims{2, S}, Tag::Workspace);
      copy<T>(ab.view().slice(0, 1), CV(decay_prod[std::size_t(k)].view()));
      copy<T>(ab.view().slice(1, 2), CV(c_run.view()));
      link->backward_carry(k, ab.view());
      if (!final_tok) cr.carry = eval(leaf(CV(ab.view()).slice(1, 2)), Tag::Workspace);
    }
    cr.pending = zeros<T, Mem>(Dims{halo, P}, Tag::Workspace);
    cr.q = n_tok - halo;
    if (states && final_tok && !states->final_halo_grad.empty())
      copy<T>(cr.pending.view(), row_of(states->final_halo_grad[std::size_t(k)], b, Dims{halo, P}));
  };
  auto backward_task = [&](index_t i, index_t j) {
    const index_t k = ke - 1 - i, c = nchunks - 1 - j, c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
    Carried& cr = carried[std::size_t(i)];
    Stretch<Layer> recomputed;
    if constexpr (!backprop)
      forward_stretch(block(k), Y[std::size_t(k)].read(c0, halo + c1, recomputed.y_hold),
                      CV(bnd[std::size_t(k)].view()).slice(c, c + 1), recomputed, resets.offset(c0), path);
    const Stretch<Layer>& st = backprop ? kept[std::size_t(k)] : recomputed;
    StretchBackward<T, Mem> opt;
    opt.method = paper ? DeltaMethod::paper : truncated ? DeltaMethod::truncated : DeltaMethod::exact;
    opt.shard = shard;
    if constexpr (paper) opt.window = strategy.window;
    if constexpr (truncated) opt.window = strategy.window;
    if (!cr.carry.empty()) opt.carry_in = cr.carry.view();
    Tensor<T, Mem> carry_out(Dims{1, S}, Tag::Workspace), q_cur;
    opt.carry_out = carry_out.view();
    if constexpr (truncated) {
      opt.q_next = &cr.q_next;
      opt.q_out = c > 0 ? &q_cur : nullptr;
    }
    opt.input_grad = G_in.slice(c0, c1);
    Tensor<T, Mem> halo_grad = zeros<T, Mem>(Dims{halo, P}, Tag::Workspace);
    opt.halo_grad = halo_grad.view();
    backward_stretch(block(k), st, CV(G.view()).slice(c0, c1), opt, thread_sg(),
                     backprop ? &kept_tapes[std::size_t(k)] : nullptr);
    cr.carry = std::move(carry_out);
    if constexpr (truncated) cr.q_next = std::move(q_cur);
    if constexpr (halo > 0) {
      Tensor<T, Mem> next = std::move(halo_grad);  // rows [c0 - halo, c0)
      for (index_t h = 0; h < halo; ++h) {
        const index_t row = cr.q + h;
        const CV src = CV(cr.pending.view()).slice(h, h + 1);
        if (row >= c0 && row < c1)
          accumulate(G_in.slice(row, row + 1), leaf(src));
        else if (row < c0)
          accumulate(next.view().slice(row - (c0 - halo), row - (c0 - halo) + 1), leaf(src));
      }
      cr.pending = std::move(next);
      cr.q = c0 - halo;
    }
  };
  auto backward_end = [&](index_t i) {
    const index_t k = ke - 1 - i;
    Carried& cr = carried[std::size_t(i)];
    if (states && first) {
      copy<T>(row_of(states->initial_grad[std::size_t(k)], b, Dims{1, S}), CV(cr.carry.view()));
      if (halo > 0) copy<T>(row_of(states->initial_halo_grad[std::size_t(k)], b, Dims{halo, P}), CV(cr.pending.view()));
    }
    // The rows before t0 belong to the previous process; this process's last rows get the
    // next process's part (G_in now holds dL/dy_{k-1} on every row but those terms).
    if constexpr (halo > 0)
      if (split) link->exchange_halo_grad(k, CV(cr.pending.view()), G_in.slice(n_tok - halo, n_tok));
    // Layer k is done: its stored input, tapes and carries are no longer needed.
    if constexpr (backprop) {
      kept_tapes[std::size_t(k)].clear();
      kept[std::size_t(k)] = Stretch<Layer>();
    }
    if (k > 0) Y[std::size_t(k)].clear();
    cr = Carried();
  };
  detail::run_pipeline(n_layers, nchunks, threads, backward_begin, backward_task, backward_end);
  if (kb == 0)
    embedding_->backward(inputs, n_tok, CV(G_in));
  else
    link->send_grad(CV(G_in));
  return r;
}

}  // namespace ssmx::nn
