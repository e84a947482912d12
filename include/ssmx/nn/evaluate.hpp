// ssmx — loss, perplexity and bits per byte over held-out data of any length, streamed in
// windows with every layer's state carried from one window to the next, so the result is
// that of one forward pass over the whole sequence (to rounding) at the memory of one window.
//
//   nn::HeldOut r = nn::evaluate_tokens(model, tokens.data(), index_t(tokens.size()));
//   r.perplexity();  r.bits_per_byte();   // bits per byte: for byte-level tokens
//
// The sequence predicts tokens[1..n) from the tokens before them: n - 1 predictions.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "model.hpp"

namespace ssmx::nn {

struct HeldOut {
  double loss = 0;     // summed negative log-likelihood, nats
  index_t tokens = 0;  // predictions scored
  index_t correct = 0; // argmax predictions equal to the next token
  double mean_loss() const { return tokens ? loss / double(tokens) : 0.0; }
  double perplexity() const { return std::exp(mean_loss()); }
  double bits_per_token() const { return mean_loss() / std::log(2.0); }
  // For a byte-level model (one token per byte); `bytes_per_token` otherwise.
  double bits_per_byte(double bytes_per_token = 1.0) const { return bits_per_token() / bytes_per_token; }
  double accuracy() const { return tokens ? double(correct) / double(tokens) : 0.0; }
};

// Over n tokens delivered by read(begin, count, out) (e.g. data::TokenFile::read), in
// windows of `window` predictions, each scored by eval(batch, states) -> StepResult with the
// states carried from the window before (Model::evaluate, or a distributed evaluation such
// as dist::layer_parallel_evaluate). Memory: one window of tokens, plus what eval holds.
template <class T, Space S, class Read, class Eval>
HeldOut evaluate_windows(index_t n, index_t vocab, Read&& read, index_t window, Eval&& eval) {
  SSMX_REQUIRE(n >= 2, ValueError, "evaluate: ", n, " token(s) hold no prediction (at least 2 are needed)");
  SSMX_REQUIRE(window > 0, ValueError, "evaluate: window (", window, ") must be positive");
  LayerStates<T, S> states;
  std::vector<token_t> buf(static_cast<std::size_t>(std::min(window, n - 1) + 1));
  HeldOut r;
  for (index_t i = 0; i + 1 < n; i += window) {
    const index_t w = std::min(window, n - 1 - i);
    read(i, w + 1, buf.data());
    for (index_t t = 0; t <= w; ++t)
      SSMX_REQUIRE(buf[std::size_t(t)] >= 0 && index_t(buf[std::size_t(t)]) < vocab, ValueError, "evaluate: token ",
                   i + t, " = ", buf[std::size_t(t)], " is outside the vocabulary [0, ", vocab, ")");
    const StepResult s = eval(Batch{buf.data(), buf.data() + 1, 1, w, nullptr}, &states);
    r.loss += s.loss;
    r.tokens += s.tokens;
    r.correct += s.correct;
    states.initial = std::move(states.final_states);
    states.initial_halo = std::move(states.final_halo);
  }
  return r;
}

// evaluate_windows with the model's streamed forward in chunks of `chunk`. Memory: one
// window of tokens and logits' worth of one chunk, plus the states.
template <class M, class Read>
HeldOut evaluate_stream(M& model, index_t n, Read&& read, index_t window = 4096, index_t chunk = 1024) {
  SSMX_REQUIRE(chunk > 0, ValueError, "evaluate: chunk (", chunk, ") must be positive");
  return evaluate_windows<typename M::T, M::space>(
      n, model.vocab(), read, window,
      [&](const Batch& b, LayerStates<typename M::T, M::space>* st) { return model.evaluate(b, chunk, st); });
}

template <class M>
HeldOut evaluate_tokens(M& model, const token_t* tokens, index_t n, index_t window = 4096, index_t chunk = 1024) {
  return evaluate_stream(
      model, n, [&](index_t begin, index_t count, token_t* out) { std::copy(tokens + begin, tokens + begin + count, out); },
      window, chunk);
}

}  // namespace ssmx::nn
