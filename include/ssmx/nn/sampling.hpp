// ssmx — choosing the next token from a row of logits: greedy, or sampled with a
// temperature, top-k and top-p (nucleus) truncation, reproducible from a seed.
//
//   p_i ∝ exp(logit_i / temperature)          temperature 0: the argmax (greedy)
//   top-k: keep the k most probable tokens    (0: all)
//   top-p: keep the fewest most probable tokens whose probability sums to at least p
//          (1: all; always at least one token)
// Truncations apply in that order and the kept probabilities are renormalised. Ties are
// broken by the lower token id everywhere, so the support is exact and the same on every
// platform; the random numbers come from std::mt19937_64 (its output is fixed by the
// standard) turned into doubles by bit arithmetic, not by a library distribution.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/shape.hpp"
#include "embedding.hpp"

namespace ssmx::nn {

struct SamplingConfig {
  double temperature = 1.0;  // 0: greedy
  index_t top_k = 0;         // 0: no top-k truncation
  double top_p = 1.0;        // 1: no top-p truncation
};

inline void check_sampling(const SamplingConfig& c) {
  SSMX_REQUIRE(std::isfinite(c.temperature) && c.temperature >= 0, ValueError,
               "sampling: temperature must be finite and >= 0, got ", c.temperature);
  SSMX_REQUIRE(c.top_k >= 0, ValueError, "sampling: top_k must be >= 0 (0: off), got ", c.top_k);
  SSMX_REQUIRE(c.top_p > 0 && c.top_p <= 1, ValueError, "sampling: top_p must be in (0, 1], got ", c.top_p);
}

// The distribution a Sampler draws from: token ids with their probabilities, most probable
// first (ties: lower id first), after temperature, top-k and top-p. Temperature 0 gives the
// argmax with probability 1.
template <class T>
std::vector<std::pair<token_t, double>> sampling_distribution(const T* logits, index_t vocab,
                                                              const SamplingConfig& c) {
  check_sampling(c);
  SSMX_REQUIRE(vocab > 0, ValueError, "sampling: the vocabulary is empty");
  for (index_t i = 0; i < vocab; ++i)
    SSMX_REQUIRE(!std::isnan(double(logits[i])), ValueError, "sampling: logit ", i, " is NaN");
  std::vector<std::pair<token_t, double>> out;
  if (c.temperature == 0) {
    index_t best = 0;
    for (index_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    out.emplace_back(token_t(best), 1.0);
    return out;
  }
  std::vector<token_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), token_t(0));
  auto before = [&](token_t a, token_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const index_t keep_k = c.top_k > 0 ? std::min(c.top_k, vocab) : vocab;
  if (keep_k < vocab) {
    std::partial_sort(order.begin(), order.begin() + keep_k, order.end(), before);
    order.resize(static_cast<std::size_t>(keep_k));
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  // Softmax over the kept tokens, in double, from the largest logit down (no overflow).
  const double top = double(logits[order[0]]) / c.temperature;
  double z = 0;
  out.reserve(order.size());
  for (token_t i : order) {
    const double e = std::exp(double(logits[i]) / c.temperature - top);
    out.emplace_back(i, e);
    z += e;
  }
  for (auto& [i, p] : out) p /= z;
  if (c.top_p < 1) {
    double cum = 0;
    std::size_t n = 0;
    while (n < out.size()) {
      cum += out[n].second;
      ++n;
      if (cum >= c.top_p) break;
    }
    out.resize(n);
    for (auto& [i, p] : out) p /= cum;
  }
  return out;
}

class Sampler {
 public:
  explicit Sampler(const SamplingConfig& c = {}, std::uint64_t seed = 0) : cfg_(c), rng_(seed) { check_sampling(c); }

  const SamplingConfig& config() const { return cfg_; }

  // The next token from one row of `vocab` logits (host memory).
  template <class T>
  token_t operator()(const T* logits, index_t vocab) {
    const auto dist = sampling_distribution(logits, vocab, cfg_);
    if (dist.size() == 1) return dist[0].first;
    const double u = uniform();
    double cum = 0;
    for (const auto& [i, p] : dist) {
      cum += p;
      if (u < cum) return i;
    }
    return dist.back().first;  // u within rounding of 1
  }

 private:
  double uniform() { return double(rng_() >> 11) * 0x1.0p-53; }  // [0, 1), 53 random bits

  SamplingConfig cfg_;
  std::mt19937_64 rng_;
};

}  // namespace ssmx::nn
