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

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../adjoint/strategy.hpp"
#include "diagonal_ssm.hpp"
#include "mamba.hpp"
#include "embedding.hpp"
#include "linear.hpp"
#include "scan_layer.hpp"

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
template <class T>
struct LayerStates {
  std::vector<Tensor<T>> initial;
  std::vector<Tensor<T>> initial_halo;
  std::vector<Tensor<T>> final_grad;
  std::vector<Tensor<T>> final_halo_grad;
  std::vector<Tensor<T>> final_states;
  std::vector<Tensor<T>> final_halo;
  std::vector<Tensor<T>> initial_grad;
  std::vector<Tensor<T>> initial_halo_grad;
};

template <class Layer, index_t K>
class Model {
  static_assert(K >= 1, "Model: the number of layers K must be at least 1");

 public:
  using T = typename Layer::value_type;
  using layer_type = Layer;
  static constexpr index_t num_layers = K;
  static constexpr index_t d_model = Layer::d_model;

  struct Config {
    index_t vocab = 256;
    bool tie_embeddings = true;
    std::uint64_t seed = 0;
  };

  explicit Model(const Config& cfg) : cfg_(cfg), embedding_("embedding.weight", cfg.vocab, d_model), norm_f_("norm_f.weight", d_model) {
    SSMX_REQUIRE(cfg.vocab > 0, ValueError, "Model: vocab must be positive, got ", cfg.vocab);
    for (index_t k = 0; k < K; ++k)
      blocks_.push_back(std::make_unique<Block<Layer>>("layers." + std::to_string(k) + "."));
    if (!cfg.tie_embeddings) head_.emplace("lm_head.weight", Dims{d_model, cfg.vocab});
    std::mt19937_64 rng(cfg.seed);
    // Embeddings ~ N(0, 1/P): the tied head then starts with logits of unit scale.
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(d_model)));
    for (index_t i = 0; i < embedding_.weight.numel(); ++i) embedding_.weight.value[i] = T(nd(rng));
    if (head_) {
      std::normal_distribution<double> hd(0.0, 1.0 / std::sqrt(double(d_model)));
      for (index_t i = 0; i < head_->numel(); ++i) head_->value[i] = T(hd(rng));
    }
    for (auto& b : blocks_) b->mixer.init(rng);
    zero_grad();
  }

  index_t vocab() const { return cfg_.vocab; }
  bool tied_embeddings() const { return !head_; }  // the LM head reads the embedding matrix
  Block<Layer>& block(index_t k) { return *blocks_[std::size_t(k)]; }
  Embedding<T>& embedding() { return embedding_; }

  // All parameters in a fixed order: embedding, blocks, final norm, head.
  ParameterList<T> parameters() {
    ParameterList<T> p{&embedding_.weight};
    for (auto& b : blocks_)
      for (auto* q : b->parameters()) p.push_back(q);
    p.push_back(&norm_f_.weight);
    if (head_) p.push_back(&*head_);
    return p;
  }
  void zero_grad() { ssmx::zero_grad(parameters()); }

  // Forward and backward over a batch; gradients of the summed loss are added to grads.
  template <class Strategy = Adjoint>
  StepResult forward_backward(const Batch& batch, const Strategy& strategy = {}, LayerStates<T>* states = nullptr) {
    check_batch(batch);
    prepare_states(batch, states);
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      StepResult r = sequence(batch, b, strategy, states);
      total.loss += r.loss;
      total.tokens += r.tokens;
      total.correct += r.correct;
    }
    SSMX_REQUIRE(std::isfinite(total.loss), ValueError, "loss is not finite (", total.loss,
                 "): the parameters were left unchanged; lower the learning rate or check the data");
    return total;
  }

  // Loss and accuracy without gradients, streaming chunk by chunk through all layers:
  // memory O(K·S + chunk), independent of the sequence length. With `states`, starts from
  // their initial states and returns the final ones (no gradients).
  StepResult evaluate(const Batch& batch, index_t chunk = 1024, LayerStates<T>* states = nullptr) {
    return stream(batch, chunk, states, nullptr);
  }

  // The logits of every position, [batch, seq_len, vocab], streamed like evaluate() (the
  // targets are not read and may be null).
  Tensor<T> logits(const Batch& batch, index_t chunk = 1024, LayerStates<T>* states = nullptr) {
    std::vector<token_t> none(std::size_t(batch.batch * batch.seq_len), token_t(-1));
    Batch b = batch;
    b.targets = none.data();
    Tensor<T> out(Dims{batch.batch, batch.seq_len, cfg_.vocab}, Tag::Activations);
    stream(b, chunk, states, &out);
    return out;
  }

  // The epsilon of every RMSNorm (the blocks' and the final one), e.g. a checkpoint's
  // layer_norm_epsilon.
  void set_norm_eps(double eps) {
    SSMX_REQUIRE(eps > 0 && std::isfinite(eps), ValueError, "set_norm_eps: eps must be finite and > 0, got ", eps);
    for (auto& b : blocks_) b->norm.eps = eps;
    norm_f_.eps = eps;
  }

 private:
  using CV = TensorView<const T>;

  // Forward only, chunk by chunk through all layers; loss and accuracy, and the logits
  // when `logits_out` ([batch, seq_len, vocab]) is given.
  StepResult stream(const Batch& batch, index_t chunk, LayerStates<T>* states, Tensor<T>* logits_out) {
    check_batch(batch);
    SSMX_REQUIRE(chunk > 0, ValueError, "evaluate: chunk must be positive, got ", chunk);
    prepare_states(batch, states);
    const index_t S = state_numel(Layer::state_dims()), T_ = batch.seq_len;
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      std::vector<index_t> since;
      const Resets resets = sequence_resets(batch, b, since);
      std::vector<Tensor<T>> state, tail;  // per layer: h, and the last halo rows of its input
      for (index_t k = 0; k < K; ++k) {
        state.push_back(zeros<T>(Dims{1, S}, Tag::Activations));
        tail.push_back(zeros<T>(Dims{halo, d_model}, Tag::Activations));
        if (states) load_initial(*states, k, b, state.back().data(), tail.back().data());
      }
      for (index_t c0 = 0; c0 < T_; c0 += chunk) {
        const index_t c1 = std::min(T_, c0 + chunk), n = c1 - c0;
        Tensor<T> y(Dims{halo + n, d_model}, Tag::Activations);  // layer input, its halo rows first
        embedding_.forward(batch.inputs + b * T_ + c0, n, y.view().slice(halo, halo + n));
        for (index_t k = 0; k < K; ++k) {
          std::copy(tail[std::size_t(k)].data(), tail[std::size_t(k)].data() + halo * d_model, y.data());
          Stretch<Layer> st;
          Tensor<T> next_state(Dims{1, S}, Tag::Activations);
          compute_stretch(block(k), CV(y.view()), CV(state[std::size_t(k)].view()), st, next_state.view(),
                          resets.offset(c0));
          std::copy(y.data() + n * d_model, y.data() + (n + halo) * d_model, tail[std::size_t(k)].data());
          Tensor<T> y_out(Dims{(k + 1 < K ? halo : 0) + n, d_model}, Tag::Activations);
          write_output(block(k), st, y_out.view().slice(y_out.extent(0) - n, y_out.extent(0)));
          y = std::move(y_out);
          state[std::size_t(k)] = std::move(next_state);
        }
        if (logits_out) {  // no targets to score: the logits only
          Tensor<T> l = eval(matmul(rms_norm(CV(y.view()), norm_f_.weight.value, norm_f_.eps), head_view()));
          std::copy_n(l.data(), n * cfg_.vocab, logits_out->data() + (b * T_ + c0) * cfg_.vocab);
          continue;
        }
        StepResult r = head_loss(CV(y.view()), batch.targets + b * T_ + c0, nullptr);
        total.loss += r.loss;
        total.tokens += r.tokens;
        total.correct += r.correct;
      }
      if (states)
        for (index_t k = 0; k < K; ++k)
          store_final(*states, k, b, state[std::size_t(k)].data(), tail[std::size_t(k)].data());
    }
    return total;
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

  void prepare_states(const Batch& batch, LayerStates<T>* states) const {
    if (!states) return;
    const index_t S = state_numel(Layer::state_dims()), B = batch.batch;
    auto check = [&](const std::vector<Tensor<T>>& v, const Dims& d, const char* what) {
      SSMX_REQUIRE(v.empty() || index_t(v.size()) == K, ShapeError, "LayerStates: ", v.size(), " ", what,
                   " tensors for ", K, " layers");
      for (const auto& t : v) check_dims(t.dims(), d, what);
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
    for (index_t k = 0; k < K; ++k) {
      states->final_states.push_back(zeros<T>(Dims{B, S}, Tag::Activations));
      states->initial_grad.push_back(zeros<T>(Dims{B, S}, Tag::Gradients));
      if (halo > 0) {
        states->final_halo.push_back(zeros<T>(Dims{B, halo, d_model}, Tag::Activations));
        states->initial_halo_grad.push_back(zeros<T>(Dims{B, halo, d_model}, Tag::Gradients));
      }
    }
  }
  // Layer k's initial state and halo rows for sequence b (left as they are when not given).
  static void load_initial(const LayerStates<T>& st, index_t k, index_t b, T* h, T* halo_rows) {
    const index_t S = state_numel(Layer::state_dims()), HP = halo * d_model;
    if (!st.initial.empty()) std::copy_n(st.initial[std::size_t(k)].data() + b * S, S, h);
    if (!st.initial_halo.empty()) std::copy_n(st.initial_halo[std::size_t(k)].data() + b * HP, HP, halo_rows);
  }
  static void store_final(LayerStates<T>& st, index_t k, index_t b, const T* h, const T* halo_rows) {
    const index_t S = state_numel(Layer::state_dims()), HP = halo * d_model;
    std::copy_n(h, S, st.final_states[std::size_t(k)].data() + b * S);
    if (halo > 0) std::copy_n(halo_rows, HP, st.final_halo[std::size_t(k)].data() + b * HP);
  }
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
  StepResult head_loss(CV y, const token_t* targets, TensorView<T>* G) {
    const index_t n = y.extent(0), V = cfg_.vocab;
    Tensor<T> onehot = zeros<T>(Dims{n, V}, Tag::Workspace);
    StepResult r;
    for (index_t t = 0; t < n; ++t)
      if (targets[t] >= 0) {
        onehot(t, index_t(targets[t])) = T(1);
        ++r.tokens;
      }
    auto le = matmul(rms_norm(y, norm_f_.weight.value, norm_f_.eps), head_view());
    Tape<decltype(le)> ltape(le);
    CV logits = ltape.value();
    for (index_t t = 0; t < n; ++t)
      if (targets[t] >= 0) {
        index_t best = 0;
        for (index_t v = 1; v < V; ++v)
          if (logits(t, v) > logits(t, best)) best = v;
        r.correct += best == index_t(targets[t]) ? 1 : 0;
      }
    auto loss_e = -sum(log_softmax(logits) * leaf(onehot));
    Tape<decltype(loss_e)> tape(loss_e);
    r.loss = double(tape.value().data()[0]);
    if (G) {
      Tensor<T> dlogits = zeros<T>(Dims{n, V}, Tag::Workspace);
      Tensor<T> one(Dims{}, Tag::Workspace);
      one.data()[0] = T(1);
      GradTargets<T, Space::Host> tg{wrt(logits, dlogits)};
      backward(loss_e, tape, CV(one.view()), tg);
      fill<T>(*G, T(0));
      GradTargets<T, Space::Host> htg{wrt(y, *G), wrt(norm_f_.weight.value, norm_f_.weight.grad),
                                      wrt(head_view(), head_grad_view())};
      backward(le, ltape, CV(dlogits.view()), htg);
    }
    return r;
  }

  // The head as a [P, vocab] view: W itself, or (tied) Eᵀ read in place through strides.
  CV head_view() const {
    if (head_) return head_->value.view();
    return CV(embedding_.weight.value.data(), Dims{d_model, cfg_.vocab}, {1, d_model, 0, 0});
  }
  TensorView<T> head_grad_view() {
    if (head_) return head_->grad.view();
    return TensorView<T>(embedding_.weight.grad.data(), Dims{d_model, cfg_.vocab}, {1, d_model, 0, 0});
  }

  // One sequence: forward storing what the strategy stores, then backward.
  template <class Strategy>
  StepResult sequence(const Batch& batch, index_t b, const Strategy& strategy, LayerStates<T>* states);

  Config cfg_;
  Embedding<T> embedding_;
  std::vector<std::unique_ptr<Block<Layer>>> blocks_;
  RMSNorm<T> norm_f_;
  std::optional<Parameter<T>> head_;
};

template <class Layer, index_t K>
template <class Strategy>
StepResult Model<Layer, K>::sequence(const Batch& batch, index_t b, const Strategy& strategy, LayerStates<T>* states) {
  constexpr bool backprop = std::is_same_v<Strategy, Backprop>;
  constexpr bool paper = std::is_same_v<Strategy, PaperAdjoint>;
  constexpr bool truncated = std::is_same_v<Strategy, TruncatedAdjoint>;
  static_assert(backprop || paper || truncated || std::is_same_v<Strategy, Adjoint> ||
                    std::is_same_v<Strategy, Checkpointed>,
                "forward_backward: the strategy must be Backprop, Checkpointed, Adjoint, TruncatedAdjoint or PaperAdjoint");
  const Dims sd = Layer::state_dims();
  const index_t n_tok = batch.seq_len, S = state_numel(sd), P = d_model, HP = halo * d_model;
  const token_t* inputs = batch.inputs + b * n_tok;
  const token_t* targets = batch.targets + b * n_tok;
  std::vector<index_t> since;
  const Resets resets = sequence_resets(batch, b, since);

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

  // ---- forward: store each layer's input (after its halo rows) and its chunk-boundary states ----
  std::vector<Tensor<T>> Y;  // Y[k]: input of layer k, [halo + T, P]; rows [0, halo) come before token 0
  auto new_input = [&](index_t k) {
    Y.push_back(zeros<T>(Dims{halo + n_tok, P}, Tag::Activations));
    if (states && !states->initial_halo.empty())
      std::copy_n(states->initial_halo[std::size_t(k)].data() + b * HP, HP, Y.back().data());
  };
  new_input(0);
  embedding_.forward(inputs, n_tok, Y[0].view().slice(halo, halo + n_tok));
  std::vector<Tensor<T>> bnd;  // bnd[k]: [nchunks, S], the state before each chunk
  Tensor<T> G(Dims{n_tok, d_model}, Tag::Gradients);  // dL/dy_k, carried down
  std::vector<Stretch<Layer>> kept(backprop ? std::size_t(K) : 0);
  std::vector<std::vector<ShardTapes<Layer>>> kept_tapes(backprop ? std::size_t(K) : 0);
  StepResult r;
  for (index_t k = 0; k < K; ++k) {
    const bool last = k == K - 1;
    bnd.push_back(zeros<T>(Dims{nchunks, S}, Tag::Activations));
    if (states && !states->initial.empty()) std::copy_n(states->initial[std::size_t(k)].data() + b * S, S, bnd.back().data());
    if (!last) new_input(k + 1);
    for (index_t c = 0; c < nchunks; ++c) {
      const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
      Stretch<Layer> st;
      Tensor<T> h_last(Dims{1, S}, Tag::Activations);
      CV y_ext = CV(Y[std::size_t(k)].view()).slice(c0, halo + c1);
      compute_stretch(block(k), y_ext, CV(bnd[std::size_t(k)].view()).slice(c, c + 1), st, h_last.view(),
                      resets.offset(c0));
      if (c + 1 < nchunks)
        std::copy_n(h_last.data(), S, bnd[std::size_t(k)].data() + (c + 1) * S);
      else if (states)
        store_final(*states, k, b, h_last.data(), Y[std::size_t(k)].data() + n_tok * P);
      if (last) {
        Tensor<T> y_out(Dims{c1 - c0, d_model}, Tag::Activations);
        write_output(block(k), st, y_out.view());
        TensorView<T> g = G.view().slice(c0, c1);
        StepResult hr = head_loss(CV(y_out.view()), targets + c0, &g);
        r.loss += hr.loss;
        r.tokens += hr.tokens;
        r.correct += hr.correct;
      } else {
        write_output(block(k), st, Y[std::size_t(k + 1)].view().slice(halo + c0, halo + c1));
      }
      if constexpr (backprop) {  // the autograd tape: keep every intermediate
        kept_tapes[std::size_t(k)].emplace_back(block(k), st, 0, st.n());
        kept[std::size_t(k)] = std::move(st);
      }
    }
  }

  // ---- backward: layers top-down, chunks in reverse ----
  Tensor<T> G_paper;  // PaperAdjoint: every layer takes dl/dy_K; input cotangents collect here
  if constexpr (paper) G_paper = G.clone(Tag::Gradients);
  TensorView<T> G_in = paper ? G_paper.view() : G.view();  // where dL/dy_{k-1} accumulates
  ShardGrads<T> sg;
  for (index_t k = K - 1; k >= 0; --k) {
    Tensor<T> carry, q_next;
    if (states && !states->final_grad.empty()) {
      carry = Tensor<T>(Dims{1, S}, Tag::Workspace);
      std::copy_n(states->final_grad[std::size_t(k)].data() + b * S, S, carry.data());
    }
    // dL/d(input rows [q, q + halo)) from the windows of later chunks, held back until the
    // chunk owning those rows has read its own cotangent from G.
    Tensor<T> pending = zeros<T>(Dims{halo, P}, Tag::Workspace);
    index_t q = n_tok - halo;
    if (states && !states->final_halo_grad.empty())
      std::copy_n(states->final_halo_grad[std::size_t(k)].data() + b * HP, HP, pending.data());
    for (index_t c = nchunks - 1; c >= 0; --c) {
      const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
      CV y_ext = CV(Y[std::size_t(k)].view()).slice(c0, halo + c1);
      Stretch<Layer> recomputed;
      if constexpr (!backprop)
        compute_stretch(block(k), y_ext, CV(bnd[std::size_t(k)].view()).slice(c, c + 1), recomputed, {},
                        resets.offset(c0));
      const Stretch<Layer>& st = backprop ? kept[std::size_t(k)] : recomputed;
      StretchBackward<T> opt;
      opt.method = paper ? DeltaMethod::paper : truncated ? DeltaMethod::truncated : DeltaMethod::exact;
      opt.shard = shard;
      if constexpr (paper) opt.window = strategy.window;
      if constexpr (truncated) opt.window = strategy.window;
      if (!carry.empty()) opt.carry_in = carry.view();
      Tensor<T> carry_out(Dims{1, S}, Tag::Workspace), q_cur;
      opt.carry_out = carry_out.view();
      if constexpr (truncated) {
        opt.q_next = &q_next;
        opt.q_out = c > 0 ? &q_cur : nullptr;
      }
      opt.input_grad = G_in.slice(c0, c1);
      Tensor<T> halo_grad = zeros<T>(Dims{halo, P}, Tag::Workspace);
      opt.halo_grad = halo_grad.view();
      backward_stretch(block(k), st, CV(G.view()).slice(c0, c1), opt, sg,
                       backprop ? &kept_tapes[std::size_t(k)] : nullptr);
      carry = std::move(carry_out);
      if constexpr (truncated) q_next = std::move(q_cur);
      if constexpr (halo > 0) {
        Tensor<T> next = std::move(halo_grad);  // rows [c0 - halo, c0)
        for (index_t i = 0; i < halo; ++i) {
          const index_t row = q + i;
          const T* src = pending.data() + i * P;
          if (row >= c0 && row < c1)
            for (index_t p = 0; p < P; ++p) G_in(row, p) += src[p];
          else if (row < c0)
            for (index_t p = 0; p < P; ++p) next.data()[(row - (c0 - halo)) * P + p] += src[p];
        }
        pending = std::move(next);
        q = c0 - halo;
      }
    }
    if (states) {
      std::copy_n(carry.data(), S, states->initial_grad[std::size_t(k)].data() + b * S);
      if (halo > 0) std::copy_n(pending.data(), HP, states->initial_halo_grad[std::size_t(k)].data() + b * HP);
    }
    // Layer k is done: its stored input and tapes are no longer needed.
    if constexpr (backprop) {
      kept_tapes[std::size_t(k)].clear();
      kept[std::size_t(k)] = Stretch<Layer>();
    }
    if (k > 0) Y[std::size_t(k)] = Tensor<T>();
  }
  embedding_.backward(inputs, n_tok, CV(G_in));
  return r;
}

}  // namespace ssmx::nn
