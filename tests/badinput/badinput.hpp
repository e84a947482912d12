// ssmx bad-input suite — shared helpers (tests/badinput/*.cpp, binary ssmx_badinput).
//
// Every case builds a malformed input in a fresh directory, runs the public API on it and
// checks, with expect_error():
//   - the exception is an ssmx::Error of exactly the expected type (nothing foreign escapes,
//     and the process neither crashes, hangs nor blocks: ctest gives each case 60 s);
//   - the message names the file and the field (the pieces the case lists), is printable
//     (no raw control bytes or malformed UTF-8 echoed from the input) and bounded;
//   - every file under the directory is unchanged (type, link target, bytes), and so is the
//     model (every parameter, bit for bit) when there is one.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include <doctest/doctest.h>
#include <ssmx/io/io.hpp>
#include <ssmx/ssmx.hpp>

#include "support/test_support.hpp"

namespace badinput {

using namespace ssmx;
namespace fs = std::filesystem;
using ssmx::test::TempDir;

// The fixture the config and sharding cases start from: V = 32, D = 16, K = 2, N = 4.
using TinyLM = nn::Model<nn::Mamba<float, 16, 4, 2, 4, 2>, 2>;

inline std::string fixture(const std::string& name) { return std::string(SSMX_TEST_DATA_DIR) + "/" + name; }

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Little-endian bytes, by hand.
inline std::string le(std::uint64_t u, int bytes) {
  std::string s;
  for (int i = 0; i < bytes; ++i) s.push_back(char((u >> (8 * i)) & 0xffu));
  return s;
}
inline std::string le_f32(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return le(u, 4);
}
// [u64 header length][header][data].
inline std::string safetensors(const std::string& header, const std::string& data) {
  return le(header.size(), 8) + header + data;
}
// A JSON value nested `depth` arrays deep: [[[...[1]...]]].
inline std::string nested(std::size_t depth) { return std::string(depth, '[') + "1" + std::string(depth, ']'); }

// Everything under a directory (links not followed): path -> "f <bytes>", "l <target>",
// "d", "p" (FIFO), ...
inline std::map<std::string, std::string> tree(const std::string& dir) {
  std::map<std::string, std::string> t;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string rel = it->path().string().substr(dir.size());  // not fs::relative: it follows links
    const auto st = it->symlink_status(ec);
    switch (st.type()) {
      case fs::file_type::regular: t[rel] = "f " + read_file(it->path().string()); break;
      case fs::file_type::symlink: t[rel] = "l " + fs::read_symlink(it->path(), ec).string(); break;
      case fs::file_type::directory: t[rel] = "d"; break;
      case fs::file_type::fifo: t[rel] = "p"; break;
      default: t[rel] = "other"; break;
    }
  }
  return t;
}

// The bytes of every parameter.
template <class List>
std::vector<std::vector<unsigned char>> values(const List& params) {
  std::vector<std::vector<unsigned char>> v;
  for (auto* p : params) v.push_back(ssmx::test::bytes_of(p->value.data(), p->value.numel()));
  return v;
}

// True if `s` is well-formed UTF-8 without control characters.
inline bool printable(const std::string& s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) return false;
    const std::size_t n = io::detail::utf8_sequence(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// What a case expects of the failure.
struct Expect {
  std::string file;                 // the message names this file (a path)
  std::vector<std::string> fields;  // and these pieces (the field, the value, ...)
};

// Runs `action`, which must throw exactly E, and checks the message and that nothing under
// `dir` (and nothing of `model`, when given) changed.
template <class E, class Model = TinyLM>
void expect_error(const std::string& dir, const Expect& want, const std::function<void()>& action,
                  Model* model = nullptr) {
  const auto files_before = tree(dir);
  std::vector<std::vector<unsigned char>> model_before;
  if (model) model_before = values(model->parameters());
  std::string msg;
  bool threw = false;
  try {
    action();
  } catch (const ssmx::Error& e) {
    threw = true;
    msg = e.what();
    INFO("message: ", msg);
    CHECK_MESSAGE(typeid(e) == typeid(E), "threw ", typeid(e).name(), ", expected ", typeid(E).name());
  } catch (const std::exception& e) {
    FAIL("a foreign exception escaped (", typeid(e).name(), "): ", e.what());
  }
  REQUIRE_MESSAGE(threw, "expected an exception");
  INFO("message: ", msg);
  CHECK(ssmx::test::contains(msg, want.file));
  for (const auto& f : want.fields) {
    INFO("piece: ", f);
    CHECK(ssmx::test::contains(msg, f));
  }
  CHECK(printable(msg));
  CHECK(msg.size() < 1500);
  CHECK(tree(dir) == files_before);
  if (model) CHECK(values(model->parameters()) == model_before);
}

// A copy of fixture `name` in `into`/`name`; returns its path.
inline std::string copy_fixture(const TempDir& into, const std::string& name) {
  const std::string dst = into.file(name);
  fs::copy(fixture(name), dst, fs::copy_options::recursive);
  return dst;
}

// Parameters to load into: "a" [2] and "b" [2, 2], from a file {"a", "b"} of F32.
struct SmallParams {
  std::vector<std::unique_ptr<Parameter<float>>> owned;
  ParameterList<float> list;
  SmallParams() {
    for (const auto& [name, d] : {std::pair<std::string, Dims>{"a", Dims{2}}, {"b", Dims{2, 2}}}) {
      owned.push_back(std::make_unique<Parameter<float>>(name, d));
      for (index_t i = 0; i < owned.back()->value.numel(); ++i) owned.back()->value[i] = 0.5f + float(i);
      list.push_back(owned.back().get());
    }
  }
  ParameterList<float> parameters() const { return list; }
};

// The header of a good {"a": F32 [2], "b": F32 [2, 2]} file and its 24 data bytes.
inline const std::string good_entries =
    R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]})";
inline std::string good_data() {
  std::string d;
  for (int i = 0; i < 6; ++i) d += le_f32(float(i) - 2.5f);
  return d;
}

}  // namespace badinput
