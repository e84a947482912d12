// ssmx — an embedded long-range task: key-value recall across a long context.
//
// A sequence starts with `pairs` bindings  [KEY k_i VAL v_i]  (k_i distinct), followed by
// filler tokens. Every `query_every` tokens, and at the end, a query  [QUERY k_i]  asks
// for one of the bound values: the target at the key's position is v_i, and no other
// position has a target. Answering needs the bindings from the start of the sequence, so
// the distance between evidence and answer reaches the whole context length. Chance
// accuracy is 1 / values.
//
// Token ids: values [0, values), keys [values, values + keys), filler next, then
// KEY, VAL, QUERY.
#pragma once

#include <cstdint>
#include <algorithm>
#include <random>
#include <vector>

#include "../core/error.hpp"
#include "../nn/embedding.hpp"

namespace ssmx::data {

struct RecallTask {
  index_t values = 16;
  index_t keys = 16;
  index_t filler = 16;
  index_t pairs = 1;
  index_t query_every = 256;
  // Queries start at this fraction of the sequence (after the bindings): with 0.5 every
  // answer is at least half the sequence away from its binding.
  double query_from = 0.0;

  index_t key_token() const { return values + keys + filler; }
  index_t val_token() const { return key_token() + 1; }
  index_t query_token() const { return key_token() + 2; }
  index_t vocab() const { return key_token() + 3; }
  double chance() const { return 1.0 / double(values); }

  void validate(index_t seq_len) const {
    SSMX_REQUIRE(values > 0 && keys > 0 && filler > 0, ValueError, "RecallTask: values, keys and filler must be positive");
    SSMX_REQUIRE(pairs >= 1 && pairs <= keys, ValueError, "RecallTask: pairs = ", pairs, " must be in [1, keys = ", keys, "]");
    SSMX_REQUIRE(query_every >= 2, ValueError, "RecallTask: query_every = ", query_every, " must be at least 2");
    SSMX_REQUIRE(query_from >= 0.0 && query_from < 1.0, ValueError, "RecallTask: query_from = ", query_from,
                 " must be in [0, 1)");
    SSMX_REQUIRE(seq_len >= 4 * pairs + 2, ValueError, "RecallTask: sequence length ", seq_len,
                 " is too short for ", pairs, " bindings and a query (need at least ", 4 * pairs + 2, ")");
  }

  // Fills one sequence of inputs and targets (-1 where there is nothing to predict). If
  // `distance` is given, it receives at each answer position the number of tokens since the
  // queried value was bound (0 elsewhere).
  template <class Rng>
  void sample(Rng& rng, index_t seq_len, nn::token_t* inputs, nn::token_t* targets, index_t* distance = nullptr) const {
    validate(seq_len);
    std::vector<index_t> key_ids(static_cast<std::size_t>(keys));
    for (index_t i = 0; i < keys; ++i) key_ids[std::size_t(i)] = i;
    std::shuffle(key_ids.begin(), key_ids.end(), rng);
    std::vector<index_t> vals(static_cast<std::size_t>(pairs));
    std::uniform_int_distribution<index_t> pick_val(0, values - 1), pick_fill(0, filler - 1), pick_pair(0, pairs - 1);
    for (auto& v : vals) v = pick_val(rng);
    index_t t = 0;
    auto put = [&](index_t tok, index_t target) {
      inputs[t] = nn::token_t(tok);
      targets[t] = nn::token_t(target);
      if (distance) distance[t] = 0;
      ++t;
    };
    const index_t first_query = std::max<index_t>(4 * pairs, index_t(query_from * double(seq_len)));
    for (index_t i = 0; i < pairs; ++i) {
      put(key_token(), -1);
      put(values + key_ids[std::size_t(i)], -1);
      put(val_token(), -1);
      put(vals[std::size_t(i)], -1);
    }
    while (t < seq_len) {
      const bool query_now = (t + 2 == seq_len) || (t >= first_query && (t + 2) % query_every == 0 && t + 2 <= seq_len);
      if (query_now) {
        const index_t i = pick_pair(rng);
        put(query_token(), -1);
        put(values + key_ids[std::size_t(i)], vals[std::size_t(i)]);
        if (distance) distance[t - 1] = t - 1 - (4 * i + 3);
      } else {
        put(values + keys + pick_fill(rng), -1);
      }
    }
  }
};

}  // namespace ssmx::data
