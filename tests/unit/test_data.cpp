// Tests of ssmx/data: llm.c token files, byte tokens, document splitting, and the packer
// of documents into [rows, chunk_len] batches. Host only (files and host vectors).
#include "support/test_support.hpp"

#if !SSMX_TEST_CUDA
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <ssmx/data/packing.hpp>
#include <ssmx/data/token_file.hpp>

namespace test_data {

using namespace ssmx;
using data::token_t;
using ssmx::test::contains;
using ssmx::test::message_of;
namespace fs = std::filesystem;

static_assert(std::is_same_v<data::token_t, nn::token_t>, "data and nn must agree on the token type");

using ssmx::test::TempDir;

using Bytes = std::vector<unsigned char>;

inline void put_le(Bytes& b, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
}

// A token file built field by field from llm.c's dev/data/data_common.py (write_datafile):
// 256 little-endian int32 {magic, version, count, 0, ...}, then `width`-byte tokens.
inline Bytes llmc_file(std::int32_t magic, std::int32_t version, std::int32_t count, const std::vector<std::uint32_t>& tokens,
                       int width) {
  Bytes b;
  put_le(b, std::uint32_t(magic), 4);
  put_le(b, std::uint32_t(version), 4);
  put_le(b, std::uint32_t(count), 4);
  for (int i = 3; i < 256; ++i) put_le(b, 0, 4);
  for (std::uint32_t t : tokens) put_le(b, t, width);
  return b;
}

inline void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  REQUIRE(out.good());
}
inline Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Document d: first token d + 1 (so documents are told apart by their first token), the
// rest >= 1 (so 0 marks padding), length lengths[d].
inline std::vector<std::vector<token_t>> make_documents(const std::vector<index_t>& lengths) {
  std::vector<std::vector<token_t>> docs;
  for (std::size_t d = 0; d < lengths.size(); ++d) {
    std::vector<token_t> doc;
    for (index_t i = 0; i < lengths[d]; ++i) doc.push_back(i == 0 ? token_t(d + 1) : token_t(1 + (d * 7 + std::size_t(i) * 13) % 997));
    docs.push_back(doc);
  }
  return docs;
}

// Walks batches as a model would, checking every packing invariant, and collects the
// documents it sees.
struct PackChecker {
  index_t rows, chunk_len;
  std::vector<std::vector<token_t>> open;  // per row: the document in progress
  std::vector<bool> in_doc;                // per row: a document is unfinished
  std::vector<token_t> expect;             // per row: the previous position's target
  std::vector<std::vector<token_t>> finished;  // this epoch's documents, in order of completion
  std::vector<token_t> start_order;            // first tokens, in order of starting
  bool padded = false;                         // padding seen this epoch
  index_t continued = 0;                       // rows with continues = 1
  index_t epoch = 0;

  PackChecker(index_t r, index_t c) : rows(r), chunk_len(c), open(std::size_t(r)), in_doc(std::size_t(r)), expect(std::size_t(r)) {}

  void feed(const data::PackedBatch& b) {
    REQUIRE(b.rows == rows);
    REQUIRE(b.chunk_len == chunk_len);
    REQUIRE(b.inputs.size() == std::size_t(rows * chunk_len));
    REQUIRE(b.targets.size() == b.inputs.size());
    REQUIRE(b.starts.size() == b.inputs.size());
    REQUIRE(b.continues.size() == std::size_t(rows));
    CHECK(b.epoch == epoch);
    for (index_t r = 0; r < rows; ++r) {
      const std::size_t R = std::size_t(r);
      CHECK(int(b.continues[R]) == int(in_doc[R]));  // set exactly when a document was split here
      continued += b.continues[R];
      for (index_t t = 0; t < chunk_len; ++t) {
        const std::size_t i = std::size_t(r * chunk_len + t);
        const token_t in = b.inputs[i], tg = b.targets[i];
        const int st = b.starts[i];
        if (in == 0) {  // padding: its own segment, to the end of the row
          CHECK_FALSE(in_doc[R]);
          CHECK(st == 1);
          padded = true;
          for (index_t u = t; u < chunk_len; ++u) {
            const std::size_t j = std::size_t(r * chunk_len + u);
            CHECK(b.inputs[j] == 0);
            CHECK(b.targets[j] == -1);
            CHECK(int(b.starts[j]) == (u == t ? 1 : 0));
          }
          break;
        }
        if (in_doc[R]) {
          CHECK(st == 0);  // no document starts inside another
          CHECK(in == expect[R]);  // the previous target, also across batches
        } else {
          CHECK(st == 1);  // a document starts exactly where starts says
          CHECK_FALSE(padded);  // no document after the epoch ran dry
          open[R].clear();
          start_order.push_back(in);
          in_doc[R] = true;
        }
        open[R].push_back(in);
        if (tg == -1) {  // the document's last token: nothing predicted across documents
          finished.push_back(open[R]);
          in_doc[R] = false;
        } else {
          expect[R] = tg;
        }
      }
    }
    if (b.last_of_epoch) {
      for (index_t r = 0; r < rows; ++r) CHECK_FALSE(in_doc[std::size_t(r)]);
    }
  }

  // At the end of an epoch: every non-empty document exactly once, its tokens in order.
  void end_epoch(const std::vector<std::vector<token_t>>& docs) {
    std::map<token_t, std::vector<token_t>> expected, seen;
    for (const auto& d : docs)
      if (!d.empty()) expected[d[0]] = d;
    for (const auto& d : finished) {
      CHECK(seen.count(d[0]) == 0);
      seen[d[0]] = d;
    }
    CHECK(seen == expected);
    finished.clear();
    padded = false;
    ++epoch;
  }
};

// Runs whole epochs through a checker; returns the batches.
inline std::vector<data::PackedBatch> run_epochs(data::Packer& p, PackChecker& c, const std::vector<std::vector<token_t>>& docs,
                                                 int epochs) {
  std::vector<data::PackedBatch> out;
  for (int e = 0; e < epochs;) {
    out.push_back(p.next());
    c.feed(out.back());
    if (out.back().last_of_epoch) {
      c.end_epoch(docs);
      ++e;
    }
    REQUIRE(out.size() < 100000);
  }
  return out;
}

inline bool same(const data::PackedBatch& a, const data::PackedBatch& b) {
  return a.rows == b.rows && a.chunk_len == b.chunk_len && a.inputs == b.inputs && a.targets == b.targets &&
         a.starts == b.starts && a.continues == b.continues && a.epoch == b.epoch && a.last_of_epoch == b.last_of_epoch;
}

}  // namespace test_data

// ---- token files --------------------------------------------------------------------------

TEST_CASE("data: token file round trip for uint16 and uint32") {
  using namespace test_data;
  TempDir dir;
  const std::vector<token_t> t16{0, 1, 50256, 65535, 12345, 7};
  const std::vector<token_t> t32{0, 65536, 128000, 2147483647, 5};
  for (int width : {2, 4}) {
    CAPTURE(width);
    const auto& tokens = width == 2 ? t16 : t32;
    const std::string path = dir.file("round_trip_" + std::to_string(width) + ".bin");
    data::write_token_file(path, tokens, width);
    const data::TokenFileInfo info = data::read_token_file_header(path);
    CHECK(info.path == path);
    CHECK(info.width == width);
    CHECK(info.count == index_t(tokens.size()));
    CHECK(fs::file_size(path) == 1024 + tokens.size() * std::size_t(width));
    CHECK(data::read_token_file(path) == tokens);

    data::TokenFile f(path);
    CHECK(f.size() == index_t(tokens.size()));
    std::vector<token_t> part(3);
    f.read(2, 3, part.data());
    CHECK(part == std::vector<token_t>(tokens.begin() + 2, tokens.begin() + 5));
    f.read(0, 0, part.data());  // an empty range is fine
  }
  CHECK(dir.names() == std::vector<std::string>{"round_trip_2.bin", "round_trip_4.bin"});  // no temporaries left
}

TEST_CASE("data: token files larger than the read and write blocks") {
  using namespace test_data;
  TempDir dir;
  // 1.1M tokens: several 64K-token I/O blocks and two 1M-token check blocks.
  std::vector<token_t> tokens(1100000);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = token_t((i * 2654435761u) % 50000);
  const std::string path = dir.file("large.bin");
  data::write_token_file(path, tokens, 2);
  data::TokenFile f(path);
  CHECK(f.read_all() == tokens);
  std::vector<token_t> part(70000);
  f.read(1000000, 70000, part.data());  // crosses a block boundary of the reader
  CHECK(part == std::vector<token_t>(tokens.begin() + 1000000, tokens.begin() + 1070000));
  data::check_tokens_below(f, 50000);
  tokens[1050001] = 50000;
  data::write_token_file(path, tokens, 4);
  data::TokenFile g(path);
  CHECK(g.width() == 4);
  const std::string m = message_of<ValueError>([&] { data::check_tokens_below(g, 50000); });
  CHECK(contains(m, "token [1050001] = 50000"));
}

TEST_CASE("data: token files agree byte for byte with the llm.c layout") {
  using namespace test_data;
  TempDir dir;
  // gpt-2: magic 20240520, version 1, uint16; llama-3: magic 20240801, version 7, uint32.
  const std::vector<std::uint32_t> g{50256, 15496, 995, 0, 65535};
  const std::vector<std::uint32_t> l{128000, 9906, 1917, 0, 2147483647u};
  const Bytes gpt2 = llmc_file(20240520, 1, 5, g, 2), llama3 = llmc_file(20240801, 7, 5, l, 4);
  CHECK(gpt2.size() == 1024 + 10);
  CHECK(llama3.size() == 1024 + 20);

  write_bytes(dir.file("gpt2.bin"), gpt2);
  write_bytes(dir.file("llama3.bin"), llama3);
  CHECK(data::read_token_file(dir.file("gpt2.bin")) == std::vector<token_t>(g.begin(), g.end()));
  CHECK(data::read_token_file(dir.file("llama3.bin")) == std::vector<token_t>{128000, 9906, 1917, 0, 2147483647});
  CHECK(data::read_token_file_header(dir.file("gpt2.bin")).width == 2);
  CHECK(data::read_token_file_header(dir.file("llama3.bin")).width == 4);

  data::write_token_file(dir.file("ours_gpt2.bin"), std::vector<token_t>(g.begin(), g.end()), 2);
  data::write_token_file(dir.file("ours_llama3.bin"), std::vector<token_t>{128000, 9906, 1917, 0, 2147483647}, 4);
  CHECK(read_bytes(dir.file("ours_gpt2.bin")) == gpt2);
  CHECK(read_bytes(dir.file("ours_llama3.bin")) == llama3);
}

TEST_CASE("data: token file errors name the file and the field") {
  using namespace test_data;
  TempDir dir;
  const std::vector<std::uint32_t> toks{1, 2, 3};
  const auto io_error = [](const std::string& path) {
    return message_of<IOError>([&] { (void)data::read_token_file(path); });
  };

  const std::string missing = dir.file("missing.bin");
  std::string m = io_error(missing);
  CHECK(contains(m, missing));
  CHECK(contains(m, "cannot open"));

  const std::string short_file = dir.file("short.bin");
  write_bytes(short_file, Bytes(100, 0));
  m = io_error(short_file);
  CHECK(contains(m, short_file));
  CHECK(contains(m, "header"));
  CHECK(contains(m, "100 bytes"));
  CHECK(contains(m, "1024"));

  const std::string bad_magic = dir.file("bad_magic.bin");
  write_bytes(bad_magic, llmc_file(12345, 1, 3, toks, 2));
  m = io_error(bad_magic);
  CHECK(contains(m, bad_magic));
  CHECK(contains(m, "magic = 12345"));
  CHECK(contains(m, "20240520"));
  CHECK(contains(m, "20240801"));

  const std::string eval_file = dir.file("hellaswag.bin");
  write_bytes(eval_file, llmc_file(20240522, 1, 3, toks, 2));
  CHECK(contains(io_error(eval_file), "eval file"));

  const std::string bad_version = dir.file("bad_version.bin");
  write_bytes(bad_version, llmc_file(20240520, 2, 3, toks, 2));
  m = io_error(bad_version);
  CHECK(contains(m, bad_version));
  CHECK(contains(m, "version = 2"));
  CHECK(contains(m, "expected 1"));
  write_bytes(bad_version, llmc_file(20240801, 1, 3, toks, 4));
  CHECK(contains(io_error(bad_version), "expected 7"));

  const std::string bad_count = dir.file("bad_count.bin");
  write_bytes(bad_count, llmc_file(20240520, 1, 4, toks, 2));  // claims 4 tokens, holds 3
  m = io_error(bad_count);
  CHECK(contains(m, bad_count));
  CHECK(contains(m, "count = 4"));
  CHECK(contains(m, "1032 bytes"));  // expected: 1024 + 4 * 2
  CHECK(contains(m, "1030 bytes"));  // actual
  write_bytes(bad_count, llmc_file(20240801, 1 + 6, 3, toks, 2));  // uint32 header, uint16 body
  CHECK(contains(io_error(bad_count), "1036 bytes"));

  const std::string empty = dir.file("empty.bin");
  write_bytes(empty, llmc_file(20240520, 1, 0, {}, 2));
  m = io_error(empty);
  CHECK(contains(m, empty));
  CHECK(contains(m, "count = 0"));
  CHECK(contains(m, "at least one token"));

  // A uint32 token that does not fit token_t.
  const std::string big = dir.file("big.bin");
  write_bytes(big, llmc_file(20240801, 7, 3, {1, 2147483648u, 3}, 4));
  m = message_of<ValueError>([&] { (void)data::read_token_file(big); });
  CHECK(contains(m, big));
  CHECK(contains(m, "token [1] = 2147483648"));

  m = io_error(dir.file(""));  // the directory itself
  CHECK(contains(m, "is a directory"));

  // A range outside the file.
  const std::string good = dir.file("good.bin");
  write_bytes(good, llmc_file(20240520, 1, 3, toks, 2));
  data::TokenFile f(good);
  std::vector<token_t> out(4);
  m = message_of<ValueError>([&] { f.read(1, 3, out.data()); });
  CHECK(contains(m, good));
  CHECK(contains(m, "[1, 4)"));
  CHECK(contains(m, "3 tokens"));
}

TEST_CASE("data: write_token_file validates and never leaves a partial file") {
  using namespace test_data;
  TempDir dir;
  const std::string path = dir.file("tokens.bin");
  data::write_token_file(path, std::vector<token_t>{1, 2, 3}, 2);
  const Bytes before = read_bytes(path);

  std::string m = message_of<ValueError>([&] { data::write_token_file(path, std::vector<token_t>{1, 65536, 3}, 2); });
  CHECK(contains(m, path));
  CHECK(contains(m, "token [1] = 65536"));
  CHECK(contains(m, "uint16"));
  m = message_of<ValueError>([&] { data::write_token_file(path, std::vector<token_t>{4, -1}, 4); });
  CHECK(contains(m, "token [1] = -1"));
  CHECK(contains(m, "uint32"));
  m = message_of<ValueError>([&] { data::write_token_file(path, std::vector<token_t>{1}, 3); });
  CHECK(contains(m, "width = 3"));
  m = message_of<ValueError>([&] { data::write_token_file(path, std::vector<token_t>{}, 2); });
  CHECK(contains(m, "count = 0"));
  CHECK(read_bytes(path) == before);  // the existing file is untouched

  // The target cannot be replaced (it is a directory): the rename fails, the temporary goes.
  const std::string blocked = dir.file("blocked");
  fs::create_directory(blocked);
  m = message_of<IOError>([&] { data::write_token_file(blocked, std::vector<token_t>{1, 2}, 2); });
  CHECK(contains(m, blocked));
  CHECK(contains(m, "rename"));
  CHECK(fs::is_directory(blocked));

  // The directory does not exist: nothing is created.
  const std::string nowhere = dir.file("no_such_dir/tokens.bin");
  m = message_of<IOError>([&] { data::write_token_file(nowhere, std::vector<token_t>{1}, 2); });
  CHECK(contains(m, nowhere));
  CHECK(contains(m, "open"));

  // Replacing a file with a valid one works.
  data::write_token_file(path, std::vector<token_t>{9, 8}, 4);
  CHECK(data::read_token_file(path) == std::vector<token_t>{9, 8});
  CHECK(dir.names() == std::vector<std::string>{"blocked", "tokens.bin"});  // no temporaries left
}

TEST_CASE("data: byte tokens") {
  using namespace test_data;
  TempDir dir;
  Bytes b;
  for (int i = 0; i < 256; ++i) b.push_back(static_cast<unsigned char>(i));
  b.push_back('h');
  b.push_back('i');
  write_bytes(dir.file("bytes.txt"), b);
  const std::vector<token_t> t = data::read_byte_tokens(dir.file("bytes.txt"));
  REQUIRE(t.size() == 258);
  for (int i = 0; i < 256; ++i) CHECK(t[std::size_t(i)] == i);
  CHECK(t[256] == 'h');
  CHECK(t[257] == 'i');
  data::check_tokens_below(t, 256);

  write_bytes(dir.file("empty.txt"), {});
  std::string m = message_of<IOError>([&] { (void)data::read_byte_tokens(dir.file("empty.txt")); });
  CHECK(contains(m, dir.file("empty.txt")));
  CHECK(contains(m, "empty"));
  m = message_of<IOError>([&] { (void)data::read_byte_tokens(dir.file("missing.txt")); });
  CHECK(contains(m, dir.file("missing.txt")));
  CHECK(contains(message_of<IOError>([&] { (void)data::read_byte_tokens(dir.file("")); }), "is a directory"));
}

TEST_CASE("data: split_documents puts the separator before each document as llm.c does") {
  using namespace test_data;
  const token_t eot = 50256;
  // A shard that begins mid-document (5), then EOT-led documents, one of them only the EOT.
  const std::vector<token_t> stream{5, eot, 1, 2, eot, 3, eot, eot, 4};
  const std::vector<std::vector<token_t>> docs = data::split_documents(stream, eot);
  CHECK(docs == std::vector<std::vector<token_t>>{{5}, {eot, 1, 2}, {eot, 3}, {eot}, {eot, 4}});
  CHECK(data::document_offsets(stream, eot) == std::vector<index_t>{0, 1, 4, 6, 7, 9});
  CHECK(data::split_documents({eot, 7, 8}, eot) == std::vector<std::vector<token_t>>{{eot, 7, 8}});
  CHECK(data::split_documents({7, 8}, eot) == std::vector<std::vector<token_t>>{{7, 8}});
  CHECK(data::split_documents({}, eot).empty());
  CHECK(data::document_offsets(std::vector<token_t>{}, eot) == std::vector<index_t>{0});
}

TEST_CASE("data: check_tokens_below names the source and the index and the value") {
  using namespace test_data;
  TempDir dir;
  data::check_tokens_below(std::vector<token_t>{0, 5, 9}, 10);
  std::string m = message_of<ValueError>([] { data::check_tokens_below(std::vector<token_t>{0, 5, 10}, 10, "train"); });
  CHECK(contains(m, "train"));
  CHECK(contains(m, "token [2] = 10"));
  CHECK(contains(m, "[0, 10)"));
  m = message_of<ValueError>([] { data::check_tokens_below(std::vector<token_t>{-2}, 10); });
  CHECK(contains(m, "token [0] = -2"));

  const std::string path = dir.file("vocab.bin");
  data::write_token_file(path, std::vector<token_t>{1, 2, 50256, 50257, 3}, 2);
  data::TokenFile f(path);
  data::check_tokens_below(f, 50258);
  m = message_of<ValueError>([&] { data::check_tokens_below(f, 50257); });
  CHECK(contains(m, path));
  CHECK(contains(m, "token [3] = 50257"));
}

// ---- packing --------------------------------------------------------------------------------

TEST_CASE("data: packing keeps documents whole and in order and marks starts and continues") {
  using namespace test_data;
  // Short, empty and long documents: the long ones span several batches of one row.
  std::vector<index_t> lengths{3, 0, 1, 17, 40, 5, 2, 0, 9, 16, 15, 33, 1, 1, 8, 70, 4};
  const auto docs = make_documents(lengths);
  for (index_t rows : {1, 3, 5}) {
    for (index_t chunk_len : {1, 7, 16}) {
      CAPTURE(rows);
      CAPTURE(chunk_len);
      data::Packer p(docs, {rows, chunk_len, 11});
      CHECK(p.num_documents() == 15);
      PackChecker c(rows, chunk_len);
      const auto batches = run_epochs(p, c, docs, 2);
      CHECK(c.continued > 0);  // documents longer than chunk_len were split
      CHECK(c.epoch == 2);
      CHECK(p.epoch() == 2);
    }
  }
}

TEST_CASE("data: packing pads only when an epoch runs out and pads as its own segment") {
  using namespace test_data;
  const auto docs = make_documents({3, 2});  // {1, 14, 27} and {2, 21}
  data::Packer p(docs, {3, 4, 0, /*shuffle*/ false});
  // Row 0 takes both documents and splits the second; rows 1 and 2 find nothing left.
  const data::PackedBatch b0 = p.next();
  CHECK(b0.inputs == std::vector<token_t>{1, 14, 27, 2, 0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(b0.targets == std::vector<token_t>{14, 27, -1, 21, -1, -1, -1, -1, -1, -1, -1, -1});
  CHECK(b0.starts == std::vector<std::uint8_t>{1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0});
  CHECK(b0.continues == std::vector<std::uint8_t>{0, 0, 0});
  CHECK_FALSE(b0.last_of_epoch);
  // Row 0 finishes the split document, then pads; the epoch ends with this batch.
  const data::PackedBatch b1 = p.next();
  CHECK(b1.inputs == std::vector<token_t>{21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(b1.targets == std::vector<token_t>(12, -1));
  CHECK(b1.starts == std::vector<std::uint8_t>{0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0});
  CHECK(b1.continues == std::vector<std::uint8_t>{1, 0, 0});
  CHECK(b1.epoch == 0);
  CHECK(b1.last_of_epoch);
  // A new epoch starts every row afresh.
  const data::PackedBatch b2 = p.next();
  CHECK(b2.epoch == 1);
  CHECK(b2.continues == std::vector<std::uint8_t>{0, 0, 0});
  CHECK(b2.inputs == b0.inputs);
}

TEST_CASE("data: packing is deterministic for a seed and reshuffles each epoch") {
  using namespace test_data;
  std::vector<index_t> lengths(40);
  for (std::size_t d = 0; d < lengths.size(); ++d) lengths[d] = index_t(1 + (d * 5) % 11);
  const auto docs = make_documents(lengths);
  data::Packer a(docs, {2, 8, 42}), b(docs, {2, 8, 42}), other(docs, {2, 8, 43});
  PackChecker ca(2, 8), cb(2, 8), co(2, 8);
  const auto ba = run_epochs(a, ca, docs, 3), bb = run_epochs(b, cb, docs, 3);
  (void)run_epochs(other, co, docs, 3);
  REQUIRE(ba.size() == bb.size());
  for (std::size_t i = 0; i < ba.size(); ++i) CHECK(same(ba[i], bb[i]));
  CHECK(ca.start_order == cb.start_order);
  CHECK(ca.start_order != co.start_order);

  // Each epoch is a different permutation of all 40 documents.
  REQUIRE(ca.start_order.size() == 120);
  const std::vector<token_t> e0(ca.start_order.begin(), ca.start_order.begin() + 40),
      e1(ca.start_order.begin() + 40, ca.start_order.begin() + 80), e2(ca.start_order.begin() + 80, ca.start_order.end());
  CHECK(e0 != e1);
  CHECK(e1 != e2);
  CHECK(e0 != e2);

  // Without shuffle every epoch takes the documents in the given order.
  data::Packer in_order(docs, {2, 8, 42, false});
  PackChecker ci(2, 8);
  (void)run_epochs(in_order, ci, docs, 2);
  std::vector<token_t> given;
  for (int e = 0; e < 2; ++e)
    for (const auto& d : docs) given.push_back(d[0]);
  CHECK(ci.start_order == given);
}

TEST_CASE("data: packing order is pinned for a seed") {
  using namespace test_data;
  // mt19937_64 and the Fisher-Yates draw are fully specified, so this order is the same
  // with every standard library (checked against an independent Python implementation of
  // MT19937-64, splitmix64 and the rejection draw); a change here changes the data order of
  // every training run.
  const auto docs = make_documents(std::vector<index_t>(10, 1));  // document d is {d + 1}
  data::Packer p(docs, {1, 10, 2024});
  const data::PackedBatch e0 = p.next(), e1 = p.next();
  CHECK(e0.inputs == std::vector<token_t>{6, 1, 8, 2, 7, 3, 5, 4, 10, 9});
  CHECK(e1.inputs == std::vector<token_t>{8, 2, 7, 10, 5, 3, 6, 9, 4, 1});
  CHECK(e0.last_of_epoch);
  CHECK(e1.epoch == 1);
}

TEST_CASE("data: packing resumes from state bit for bit") {
  using namespace test_data;
  std::vector<index_t> lengths{30, 2, 7, 0, 19, 3, 3, 50, 1, 12, 6, 25, 4, 9};
  const auto docs = make_documents(lengths);
  const data::PackerOptions opt{3, 8, 7};
  data::Packer reference(docs, opt);
  std::vector<data::PackedBatch> all;
  std::vector<std::string> states;
  for (int i = 0; i < 60; ++i) {  // several epochs
    states.push_back(reference.state());
    all.push_back(reference.next());
  }
  CHECK(all.back().epoch >= 2);
  for (std::size_t k : {std::size_t(0), std::size_t(1), std::size_t(5), std::size_t(13), std::size_t(37)}) {
    CAPTURE(k);
    data::Packer resumed(docs, opt);
    resumed.restore(states[k]);
    CHECK(resumed.state() == states[k]);
    for (std::size_t i = k; i < all.size(); ++i) REQUIRE(same(resumed.next(), all[i]));
  }
  // Restoring into a packer that has moved on rewinds it.
  reference.restore(states[3]);
  for (std::size_t i = 3; i < 10; ++i) REQUIRE(same(reference.next(), all[i]));

  // The same through the flat constructor and document_offsets.
  std::vector<token_t> flat;
  std::vector<index_t> offsets{0};
  for (const auto& d : docs) {
    flat.insert(flat.end(), d.begin(), d.end());
    offsets.push_back(index_t(flat.size()));
  }
  data::Packer from_flat(flat, offsets, opt);
  from_flat.restore(states[5]);
  for (std::size_t i = 5; i < 20; ++i) REQUIRE(same(from_flat.next(), all[i]));
}

TEST_CASE("data: packing rejects bad options and data and foreign states") {
  using namespace test_data;
  const auto docs = make_documents({4, 5, 6});
  std::string m = message_of<ValueError>([&] { data::Packer p(docs, {0, 8, 1}); });
  CHECK(contains(m, "rows = 0"));
  m = message_of<ValueError>([&] { data::Packer p(docs, {2, 0, 1}); });
  CHECK(contains(m, "chunk_len = 0"));
  m = message_of<ValueError>([&] { data::Packer p(std::vector<std::vector<token_t>>{}, {2, 8, 1}); });
  CHECK(contains(m, "no documents"));
  m = message_of<ValueError>([&] { data::Packer p(std::vector<std::vector<token_t>>{{}, {}}, {2, 8, 1}); });
  CHECK(contains(m, "all 2 documents are empty"));
  m = message_of<ValueError>([&] { data::Packer p(std::vector<std::vector<token_t>>{{1, 2}, {3, -1}}, {2, 8, 1}); });
  CHECK(contains(m, "document 1"));
  CHECK(contains(m, "token [1] = -1"));
  m = message_of<ValueError>([&] { data::Packer p(std::vector<token_t>{1, 2, 3}, {0, 2}, {2, 8, 1}); });
  CHECK(contains(m, "offsets"));
  m = message_of<ValueError>([&] { data::Packer p(std::vector<token_t>{1, 2, 3}, {0, 2, 1, 3}, {2, 8, 1}); });
  CHECK(contains(m, "offsets[2] = 1"));

  data::Packer p(docs, {2, 4, 1});
  (void)p.next();
  const std::string s = p.state();
  const data::PackedBatch expected = data::Packer(docs, {2, 4, 1}).next();
  m = message_of<ValueError>([&] { data::Packer(docs, {3, 4, 1}).restore(s); });
  CHECK(contains(m, "'rows' = 2"));
  m = message_of<ValueError>([&] { data::Packer(docs, {2, 4, 2}).restore(s); });
  CHECK(contains(m, "'seed'"));
  auto changed = docs;
  changed[1][2] += 1;  // same lengths, different tokens
  m = message_of<ValueError>([&] { data::Packer(changed, {2, 4, 1}).restore(s); });
  CHECK(contains(m, "'fingerprint'"));
  m = message_of<ValueError>([&] { p.restore("garbage"); });
  CHECK(contains(m, "ssmx-packer-v1"));
  std::string bad = s.substr(0, s.find("rows_at=")) + "rows_at=0:99,-1:0";
  m = message_of<ValueError>([&] { p.restore(bad); });
  CHECK(contains(m, "'rows_at' row 0 = 0:99"));
  bad = s.substr(0, s.find("rows_at=")) + "rows_at=-1:0";
  m = message_of<ValueError>([&] { p.restore(bad); });
  CHECK(contains(m, "'rows_at' is malformed at row 1"));
  CHECK(p.state() == s);  // failed restores change nothing
}

TEST_CASE("data: llm.c file to packed batches end to end") {
  using namespace test_data;
  TempDir dir;
  const token_t eot = 50256;
  const std::vector<token_t> stream{eot, 10, 11, 12, eot, 20, 21, eot, 30};
  data::write_token_file(dir.file("shard.bin"), stream, 2);
  data::TokenFile f(dir.file("shard.bin"));
  data::check_tokens_below(f, 50257);
  std::vector<token_t> tokens = f.read_all();
  const std::vector<index_t> offsets = data::document_offsets(tokens, eot);
  data::Packer p(std::move(tokens), offsets, {1, 9, 0, false});
  const data::PackedBatch b = p.next();
  CHECK(b.inputs == stream);
  CHECK(b.targets == std::vector<token_t>{10, 11, 12, -1, 20, 21, -1, 30, -1});
  CHECK(b.starts == std::vector<std::uint8_t>{1, 0, 0, 0, 1, 0, 0, 1, 0});
  CHECK(b.last_of_epoch);
}

#endif  // !SSMX_TEST_CUDA
