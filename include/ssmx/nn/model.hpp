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
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../adjoint/strategy.hpp"
#include "diagonal_ssm.hpp"
#include "embedding.hpp"
#include "linear.hpp"
#include "scan_layer.hpp"

namespace ssmx::nn {

// A batch of token sequences, row-major [batch, seq_len]. targets[b][t] is the token to
// predict after inputs[b][0..t], or -1 for no loss at that position.
struct Batch {
  const token_t* inputs = nullptr;
  const token_t* targets = nullptr;
  index_t batch = 0;
  index_t seq_len = 0;
};

struct StepResult {
  double loss = 0;      // summed over counted tokens
  index_t tokens = 0;   // tokens with a target
  index_t correct = 0;  // argmax predictions equal to the target
  double mean_loss() const { return tokens ? loss / double(tokens) : 0.0; }
  double accuracy() const { return tokens ? double(correct) / double(tokens) : 0.0; }
};

// Recurrent state per layer across calls: initial states in, final states and the
// gradient with respect to the initial states out. Each tensor is [batch, S].
template <class T>
struct LayerStates {
  std::vector<Tensor<T>> initial;       // K tensors, or empty for zero initial states
  std::vector<Tensor<T>> final_states;  // filled by the model
  std::vector<Tensor<T>> initial_grad;  // filled by forward_backward: dL/dh_init
};

template <class Layer, index_t K>
class Model {
  static_assert(K >= 1, "Model: the number of layers K must be at least 1");

 public:
  using T = typename Layer::value_type;
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
  // memory O(K·S + chunk), independent of the sequence length.
  StepResult evaluate(const Batch& batch, index_t chunk = 1024) {
    check_batch(batch);
    const Dims sd = Layer::state_dims();
    const index_t S = state_numel(sd), T_ = batch.seq_len;
    StepResult total;
    for (index_t b = 0; b < batch.batch; ++b) {
      std::vector<Tensor<T>> state;
      for (index_t k = 0; k < K; ++k) state.push_back(zeros<T>(Dims{1, S}, Tag::Activations));
      for (index_t c0 = 0; c0 < T_; c0 += chunk) {
        const index_t c1 = std::min(T_, c0 + chunk), n = c1 - c0;
        Tensor<T> y(Dims{n, d_model}, Tag::Activations);
        embedding_.forward(batch.inputs + b * T_ + c0, n, y.view());
        for (index_t k = 0; k < K; ++k) {
          Stretch<Layer> st;
          Tensor<T> next_state(Dims{1, S}, Tag::Activations);
          compute_stretch(block(k), TensorView<const T>(y.view()), TensorView<const T>(state[std::size_t(k)].view()), st,
                          next_state.view());
          Tensor<T> y_out(Dims{n, d_model}, Tag::Activations);
          write_output(block(k), st, y_out.view());
          y = std::move(y_out);
          state[std::size_t(k)] = std::move(next_state);
        }
        StepResult r = head_loss(TensorView<const T>(y.view()), batch.targets + b * T_ + c0, nullptr);
        total.loss += r.loss;
        total.tokens += r.tokens;
        total.correct += r.correct;
      }
    }
    return total;
  }

 private:
  using CV = TensorView<const T>;

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

  void prepare_states(const Batch& batch, LayerStates<T>* states) const {
    if (!states) return;
    const index_t S = state_numel(Layer::state_dims());
    SSMX_REQUIRE(states->initial.empty() || index_t(states->initial.size()) == K, ShapeError, "LayerStates: ",
                 states->initial.size(), " initial states for ", K, " layers");
    for (const auto& t : states->initial) check_dims(t.dims(), Dims{batch.batch, S}, "initial state");
    states->final_states.clear();
    states->initial_grad.clear();
    for (index_t k = 0; k < K; ++k) {
      states->final_states.push_back(zeros<T>(Dims{batch.batch, S}, Tag::Activations));
      states->initial_grad.push_back(zeros<T>(Dims{batch.batch, S}, Tag::Gradients));
    }
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
  const index_t n_tok = batch.seq_len, S = state_numel(sd);
  const token_t* inputs = batch.inputs + b * n_tok;
  const token_t* targets = batch.targets + b * n_tok;

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

  // ---- forward: store each layer's input and its chunk-boundary states ----
  std::vector<Tensor<T>> Y;  // Y[k]: input of layer k, [T, P]
  Y.emplace_back(Dims{n_tok, d_model}, Tag::Activations);
  embedding_.forward(inputs, n_tok, Y[0].view());
  std::vector<Tensor<T>> bnd;  // bnd[k]: [nchunks, S], the state before each chunk
  Tensor<T> G(Dims{n_tok, d_model}, Tag::Gradients);  // dL/dy_k, carried down
  std::vector<Stretch<Layer>> kept(backprop ? std::size_t(K) : 0);
  std::vector<std::vector<ShardTapes<Layer>>> kept_tapes(backprop ? std::size_t(K) : 0);
  StepResult r;
  for (index_t k = 0; k < K; ++k) {
    const bool last = k == K - 1;
    bnd.push_back(zeros<T>(Dims{nchunks, S}, Tag::Activations));
    if (states && !states->initial.empty())
      std::copy(states->initial[std::size_t(k)].data() + b * S, states->initial[std::size_t(k)].data() + (b + 1) * S,
                bnd.back().data());
    if (!last) Y.emplace_back(Dims{n_tok, d_model}, Tag::Activations);
    for (index_t c = 0; c < nchunks; ++c) {
      const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
      Stretch<Layer> st;
      Tensor<T> h_last(Dims{1, S}, Tag::Activations);
      CV y_in = CV(Y[std::size_t(k)].view()).slice(c0, c1);
      compute_stretch(block(k), y_in, CV(bnd[std::size_t(k)].view()).slice(c, c + 1), st, h_last.view());
      if (c + 1 < nchunks)
        std::copy(h_last.data(), h_last.data() + S, bnd[std::size_t(k)].data() + (c + 1) * S);
      else if (states)
        std::copy(h_last.data(), h_last.data() + S, states->final_states[std::size_t(k)].data() + b * S);
      if (last) {
        Tensor<T> y_out(Dims{c1 - c0, d_model}, Tag::Activations);
        write_output(block(k), st, y_out.view());
        TensorView<T> g = G.view().slice(c0, c1);
        StepResult hr = head_loss(CV(y_out.view()), targets + c0, &g);
        r.loss += hr.loss;
        r.tokens += hr.tokens;
        r.correct += hr.correct;
      } else {
        write_output(block(k), st, Y[std::size_t(k + 1)].view().slice(c0, c1));
      }
      if constexpr (backprop) {  // the autograd tape: keep every intermediate
        CV u = st.u.view();
        CV h3 = CV(st.h.view()).reshape(with_tokens(n_tok, sd));
        kept_tapes[std::size_t(k)].emplace_back(block(k), y_in, u, h3);
        kept[std::size_t(k)] = std::move(st);
      }
    }
  }

  // ---- backward: layers top-down, chunks in reverse ----
  Tensor<T> G_paper;  // PaperAdjoint: every layer takes dl/dy_K; input cotangents collect here
  if constexpr (paper) G_paper = G.clone(Tag::Gradients);
  ShardGrads<T> sg;
  for (index_t k = K - 1; k >= 0; --k) {
    Tensor<T> carry, q_next;
    for (index_t c = nchunks - 1; c >= 0; --c) {
      const index_t c0 = c * chunk, c1 = std::min(n_tok, c0 + chunk);
      CV y_in = CV(Y[std::size_t(k)].view()).slice(c0, c1);
      Stretch<Layer> recomputed;
      if constexpr (!backprop)
        compute_stretch(block(k), y_in, CV(bnd[std::size_t(k)].view()).slice(c, c + 1), recomputed);
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
      opt.input_grad = paper ? G_paper.view().slice(c0, c1) : G.view().slice(c0, c1);
      backward_stretch(block(k), st, CV(G.view()).slice(c0, c1), opt, sg,
                       backprop ? &kept_tapes[std::size_t(k)] : nullptr);
      carry = std::move(carry_out);
      if constexpr (truncated) q_next = std::move(q_cur);
    }
    if (states)
      std::copy(carry.data(), carry.data() + S, states->initial_grad[std::size_t(k)].data() + b * S);
    // Layer k is done: its stored input and tapes are no longer needed.
    if constexpr (backprop) {
      kept_tapes[std::size_t(k)].clear();
      kept[std::size_t(k)] = Stretch<Layer>();
    }
    if (k > 0) Y[std::size_t(k)] = Tensor<T>();
  }
  embedding_.backward(inputs, n_tok, paper ? CV(G_paper.view()) : CV(G.view()));
  return r;
}

}  // namespace ssmx::nn
