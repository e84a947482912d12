// ssmx — gradient strategies, selected by a policy type; the model code is the same.
//
//   Backprop          stores every intermediate of every layer for every token (an
//                     autograd tape over the whole sequence): the reference and the
//                     memory baseline.
//   Checkpointed      stores each layer's input; in the backward pass re-runs one layer
//                     over the whole sequence with its full tape (per-layer activation
//                     checkpointing): the standard alternative.
//   Adjoint           (default) exact. Stores each layer's input stream and the scan state
//                     at chunk boundaries; walks layers top-down carrying dL/dy_k and,
//                     inside a layer, chunks in reverse: recompute the chunk from its
//                     boundary state, reverse-scan the adjoint state, then the chunk's
//                     per-token VJPs in shards.
//   TruncatedAdjoint  the paper's window T̄: each loss term reaches back only T̄ states
//                     (i > t − T̄). O(T); T̄ >= T gives exactly Adjoint.
//   PaperAdjoint      the paper's Prop. 3 / Algorithms 3–4 literally: every layer takes
//                     dl/dy_K as its output cotangent and the adjoint is the double sum
//                     over t and i in (t − T̄, t]. Exact for ONE layer only: for K >= 2 it
//                     drops every path through the layers above (kept to reproduce the
//                     paper, never as a default).
#pragma once

#include "../config.hpp"

namespace ssmx {

struct Backprop {
  static constexpr const char* name = "backprop";
};
struct Checkpointed {
  static constexpr const char* name = "checkpointed";
};
struct Adjoint {
  static constexpr const char* name = "adjoint";
  index_t chunk = 256;  // tokens recomputed at a time in the backward pass
  index_t shard = 64;   // tokens per VJP shard (fixed: results do not depend on threads)
};
struct TruncatedAdjoint {
  static constexpr const char* name = "truncated_adjoint";
  index_t window = 1024;  // T̄; also the chunk length of the backward pass
  index_t shard = 64;
};
struct PaperAdjoint {
  static constexpr const char* name = "paper_adjoint";
  index_t window = 0;  // T̄; 0 means no truncation (the O(T²) double sum)
};

}  // namespace ssmx
