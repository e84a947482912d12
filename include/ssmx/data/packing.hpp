// ssmx — packs variable-length documents into fixed-size training batches [rows, chunk_len].
//
// ChunkFlow style (arXiv 2503.02356): each row is an independent stream that takes whole
// documents, in the epoch's order, whenever it has finished its last one, and writes them
// chunk_len tokens per batch. A document longer than what is left of the row continues in
// the same row of the next batch, so memory is set by chunk_len, not by the longest document.
//
//   data::Packer packer(documents, {/*rows*/ 8, /*chunk_len*/ 2048, /*seed*/ 1});
//   data::PackedBatch b = packer.next();
//   // Row r: if b.continues[r] == 0, start from a zero recurrent state, else carry row r's
//   // final state from the previous batch; reset to zero wherever b.starts[r * chunk_len + t].
//   nn::Batch batch{b.inputs.data(), b.targets.data(), b.rows, b.chunk_len};
//   std::string saved = packer.state();   // store with the checkpoint
//   packer.restore(saved);                // later: the same batches again, bit for bit
//
// Per batch, row-major [rows, chunk_len]:
//   inputs   doc[i] at the i-th position of a document of length L
//   targets  doc[i + 1], and -1 (no loss) at i = L - 1: nothing is predicted across documents
//   starts   1 at the first position of every document (the model resets its state there)
//            and at the first padding position; 0 elsewhere
// and per row:
//   continues  1 when the row's first token continues the document the same row ended its
//              previous batch with (then starts is 0 there); 0 otherwise (starts is 1 there)
// Padding is input 0, target -1. It fills a row only when the epoch has no document left to
// give; the epoch's last batch is marked, and the next batch begins a new epoch with every
// row fresh (continues = 0). Every non-empty document appears exactly once per epoch; empty
// ones are skipped.
//
// Order: with shuffle, epoch e permutes the documents by a Fisher-Yates shuffle driven by
// std::mt19937_64 seeded with splitmix64(splitmix64(seed) + e). Both are fully specified
// (std::shuffle and uniform_int_distribution are not), so the batches are the same with any
// standard library. Rows take documents in row order within a batch: row 0 fills its chunk
// first, then row 1, and so on.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../core/error.hpp"

namespace ssmx::data {

using token_t = std::int32_t;  // the same type as nn::token_t

struct PackerOptions {
  index_t rows = 0;        // streams per batch
  index_t chunk_len = 0;   // tokens per row per batch
  std::uint64_t seed = 0;  // document order
  bool shuffle = true;     // false: the given document order in every epoch
};

struct PackedBatch {
  index_t rows = 0;
  index_t chunk_len = 0;
  std::vector<token_t> inputs;          // [rows, chunk_len]
  std::vector<token_t> targets;         // [rows, chunk_len]; -1 = no loss
  std::vector<std::uint8_t> starts;     // [rows, chunk_len]; 1 = a new segment: reset the state
  std::vector<std::uint8_t> continues;  // [rows]; 1 = carry the row's state from its previous batch
  index_t epoch = 0;
  bool last_of_epoch = false;  // this batch emitted the epoch's last tokens
};

namespace detail {

// splitmix64 (Steele, Lea, Flood 2014): spreads nearby seeds over the generator's state.
inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [0, n), n > 0, by rejection: the same numbers with every standard library.
template <class Engine>
std::uint64_t uniform_below(Engine& rng, std::uint64_t n) {
  const std::uint64_t rem = (~std::uint64_t(0) % n + 1) % n;  // 2^64 mod n
  std::uint64_t r;
  do r = rng();
  while (r > ~std::uint64_t(0) - rem);  // keeps 2^64 - rem draws, a multiple of n
  return r % n;
}

}  // namespace detail

class Packer {
 public:
  // Documents as separate vectors (copied into one flat buffer).
  Packer(const std::vector<std::vector<token_t>>& documents, PackerOptions options) : opt_(options) {
    SSMX_REQUIRE(!documents.empty(), ValueError, "Packer: no documents (the document list is empty)");
    offsets_.push_back(0);
    for (const auto& d : documents) {
      if (d.empty()) continue;
      tokens_.insert(tokens_.end(), d.begin(), d.end());
      offsets_.push_back(index_t(tokens_.size()));
    }
    init(index_t(documents.size()));
  }

  // Documents as one flat token buffer and offsets (document d is [offsets[d], offsets[d+1]),
  // as document_offsets() in token_file.hpp returns): no copy of the tokens.
  Packer(std::vector<token_t> tokens, const std::vector<index_t>& offsets, PackerOptions options)
      : opt_(options), tokens_(std::move(tokens)) {
    SSMX_REQUIRE(offsets.size() >= 2, ValueError, "Packer: no documents (offsets has ", offsets.size(),
                 " entries; D documents need D + 1)");
    SSMX_REQUIRE(offsets.front() == 0 && offsets.back() == index_t(tokens_.size()), ValueError,
                 "Packer: offsets must run from 0 to the token count ", tokens_.size(), ", found ", offsets.front(),
                 " to ", offsets.back());
    offsets_.push_back(0);
    for (std::size_t d = 1; d < offsets.size(); ++d) {
      SSMX_REQUIRE(offsets[d] >= offsets[d - 1], ValueError, "Packer: offsets[", d, "] = ", offsets[d],
                   " is below offsets[", d - 1, "] = ", offsets[d - 1]);
      if (offsets[d] > offsets[d - 1]) offsets_.push_back(offsets[d]);  // drops empty documents
    }
    init(index_t(offsets.size() - 1));
  }

  const PackerOptions& options() const { return opt_; }
  index_t num_documents() const { return index_t(offsets_.size()) - 1; }  // non-empty ones
  index_t num_tokens() const { return index_t(tokens_.size()); }
  index_t epoch() const { return epoch_; }  // of the next batch

  PackedBatch next() {
    PackedBatch b;
    next(b);
    return b;
  }

  // The next batch into `b`, reusing its buffers.
  void next(PackedBatch& b) {
    const index_t R = opt_.rows, C = opt_.chunk_len;
    b.rows = R;
    b.chunk_len = C;
    b.epoch = epoch_;
    b.inputs.assign(std::size_t(R * C), 0);
    b.targets.assign(std::size_t(R * C), -1);
    b.starts.assign(std::size_t(R * C), 0);
    b.continues.assign(std::size_t(R), 0);
    for (index_t r = 0; r < R; ++r) {
      Row& row = rows_[std::size_t(r)];
      token_t* in = b.inputs.data() + r * C;
      token_t* tg = b.targets.data() + r * C;
      std::uint8_t* st = b.starts.data() + r * C;
      b.continues[std::size_t(r)] = row.doc >= 0 && row.offset > 0;
      for (index_t t = 0; t < C;) {
        if (row.doc < 0) {
          if (next_ == num_documents()) {  // nothing left this epoch: pad the rest
            st[t] = 1;
            break;
          }
          row.doc = order_[std::size_t(next_++)];
          row.offset = 0;
        }
        const token_t* doc = tokens_.data() + offsets_[std::size_t(row.doc)];
        const index_t len = doc_len(row.doc);
        const index_t take = std::min(len - row.offset, C - t);
        if (row.offset == 0) st[t] = 1;
        for (index_t i = 0; i < take; ++i) {
          const index_t p = row.offset + i;
          in[t + i] = doc[p];
          tg[t + i] = p + 1 < len ? doc[p + 1] : -1;
        }
        t += take;
        row.offset += take;
        if (row.offset == len) row = Row{};
      }
    }
    b.last_of_epoch = next_ == num_documents() && all_rows_idle();
    if (b.last_of_epoch) start_epoch(epoch_ + 1);
  }

  // Everything next() depends on, as one line of text; restore() checks that it belongs to
  // a packer with the same options and documents.
  std::string state() const {
    std::ostringstream os;
    os << "ssmx-packer-v1 rows=" << opt_.rows << " chunk_len=" << opt_.chunk_len << " seed=" << opt_.seed
       << " shuffle=" << int(opt_.shuffle) << " documents=" << num_documents() << " tokens=" << num_tokens()
       << " fingerprint=" << fingerprint_ << " epoch=" << epoch_ << " next=" << next_ << " rows_at=";
    for (std::size_t r = 0; r < rows_.size(); ++r) os << (r ? "," : "") << rows_[r].doc << ":" << rows_[r].offset;
    return os.str();
  }

  // Continues from a state() of a packer over the same documents with the same options.
  // Throws ValueError naming the field that does not fit; the packer is unchanged then.
  void restore(const std::string& state) {
    std::istringstream is(state);
    std::string word;
    SSMX_REQUIRE(is >> word && word == "ssmx-packer-v1", ValueError, "Packer::restore: the state does not start with ",
                 "'ssmx-packer-v1' (found '", word, "')");
    const auto field = [&](const char* key) {
      std::string kv;
      is >> kv;
      const std::string prefix = std::string(key) + "=";
      SSMX_REQUIRE(kv.compare(0, prefix.size(), prefix) == 0, ValueError, "Packer::restore: expected field '", key,
                   "', found '", kv, "'");
      return kv.substr(prefix.size());
    };
    const auto number = [&](const char* key) {
      const std::string v = field(key);
      std::istringstream vs(v);
      long long x = 0;
      SSMX_REQUIRE(vs >> x && vs.eof(), ValueError, "Packer::restore: field '", key, "' = '", v, "' is not an integer");
      return index_t(x);
    };
    const auto expect = [&](const char* key, const std::string& found, const std::string& mine) {
      SSMX_REQUIRE(found == mine, ValueError, "Packer::restore: field '", key, "' = ", found,
                   " does not match this packer's ", mine);
    };
    expect("rows", field("rows"), std::to_string(opt_.rows));
    expect("chunk_len", field("chunk_len"), std::to_string(opt_.chunk_len));
    expect("seed", field("seed"), std::to_string(opt_.seed));
    expect("shuffle", field("shuffle"), std::to_string(int(opt_.shuffle)));
    expect("documents", field("documents"), std::to_string(num_documents()));
    expect("tokens", field("tokens"), std::to_string(num_tokens()));
    expect("fingerprint", field("fingerprint"), std::to_string(fingerprint_));
    const index_t epoch = number("epoch");
    const index_t next = number("next");
    SSMX_REQUIRE(epoch >= 0, ValueError, "Packer::restore: field 'epoch' = ", epoch, " is negative");
    SSMX_REQUIRE(next >= 0 && next <= num_documents(), ValueError, "Packer::restore: field 'next' = ", next,
                 " is outside [0, ", num_documents(), "]");
    std::vector<Row> rows(rows_.size());
    std::istringstream rs(field("rows_at"));
    for (std::size_t r = 0; r < rows.size(); ++r) {
      char colon = 0, comma = ',';
      long long doc = 0, offset = 0;
      SSMX_REQUIRE((r == 0 || (rs >> comma)) && comma == ',' && rs >> doc >> colon >> offset && colon == ':',
                   ValueError, "Packer::restore: field 'rows_at' is malformed at row ", r);
      rows[r] = Row{index_t(doc), index_t(offset)};
      const bool idle = doc == -1 && offset == 0;
      SSMX_REQUIRE(idle || (doc >= 0 && doc < num_documents() && offset >= 0 && offset < doc_len(index_t(doc))),
                   ValueError, "Packer::restore: field 'rows_at' row ", r, " = ", doc, ":", offset,
                   " is not a position inside one of the ", num_documents(), " documents");
    }
    char extra = 0;
    SSMX_REQUIRE(!(rs >> extra) && !(is >> word), ValueError, "Packer::restore: the state has trailing data");
    start_epoch(epoch);
    next_ = next;
    rows_ = std::move(rows);
  }

 private:
  struct Row {
    index_t doc = -1;    // the document being written, -1 when the row needs a new one
    index_t offset = 0;  // its next token
  };

  index_t doc_len(index_t d) const { return offsets_[std::size_t(d + 1)] - offsets_[std::size_t(d)]; }
  bool all_rows_idle() const {
    for (const Row& r : rows_)
      if (r.doc >= 0) return false;
    return true;
  }

  void init(index_t given) {
    SSMX_REQUIRE(opt_.rows > 0, ValueError, "Packer: rows = ", opt_.rows, " must be positive");
    SSMX_REQUIRE(opt_.chunk_len > 0, ValueError, "Packer: chunk_len = ", opt_.chunk_len, " must be positive");
    SSMX_REQUIRE(num_documents() > 0, ValueError, "Packer: all ", given, " documents are empty: nothing to pack");
    // Negative ids would read as "no target" (-1) or index outside any embedding.
    std::uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a over lengths and tokens: ties a state to its data
    for (index_t d = 0; d < num_documents(); ++d) {
      h = (h ^ std::uint64_t(doc_len(d))) * 0x100000001B3ull;
      for (index_t i = offsets_[std::size_t(d)]; i < offsets_[std::size_t(d + 1)]; ++i) {
        const token_t t = tokens_[std::size_t(i)];
        SSMX_REQUIRE(t >= 0, ValueError, "Packer: document ", d, " (counting non-empty ones) token [",
                     i - offsets_[std::size_t(d)], "] = ", t, " is negative");
        h = (h ^ std::uint64_t(std::uint32_t(t))) * 0x100000001B3ull;
      }
    }
    fingerprint_ = h;
    rows_.assign(std::size_t(opt_.rows), Row{});
    start_epoch(0);
  }

  // The order of epoch e; rows are left as they are (all idle at an epoch boundary).
  void start_epoch(index_t e) {
    epoch_ = e;
    next_ = 0;
    const index_t D = num_documents();
    order_.resize(std::size_t(D));
    for (index_t i = 0; i < D; ++i) order_[std::size_t(i)] = i;
    if (!opt_.shuffle) return;
    std::mt19937_64 rng(detail::splitmix64(detail::splitmix64(opt_.seed) + std::uint64_t(e)));
    for (index_t i = D - 1; i > 0; --i) {  // Fisher-Yates: order_[i] from the first i + 1
      const auto j = index_t(detail::uniform_below(rng, std::uint64_t(i + 1)));
      std::swap(order_[std::size_t(i)], order_[std::size_t(j)]);
    }
  }

  PackerOptions opt_;
  std::vector<token_t> tokens_;  // all documents, back to back
  std::vector<index_t> offsets_;  // document d is tokens_[offsets_[d], offsets_[d + 1]); none empty
  std::uint64_t fingerprint_ = 0;
  std::vector<index_t> order_;  // the documents of this epoch, in the order rows take them
  index_t epoch_ = 0;
  index_t next_ = 0;  // the next entry of order_ to hand out
  std::vector<Row> rows_;
};

}  // namespace ssmx::data
