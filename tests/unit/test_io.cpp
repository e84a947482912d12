// Tests of ssmx/io: safetensors reading and writing (every float dtype, metadata, a file laid
// out by hand after the spec, malformed files), loading Hugging Face-style checkpoints by
// name, training checkpoints (bit-identical resume with AdamW and SGD, failed saves and
// loads that change nothing, the `latest` helper).
//
// Host-only, and only when nlohmann_json is available (ssmx/io needs it).
#include "../support/test_support.hpp"

#if !SSMX_TEST_CUDA && __has_include(<nlohmann/json.hpp>)

#include <unistd.h>  // geteuid

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <ssmx/io/io.hpp>

namespace test_io {

using namespace ssmx;
using ssmx::test::contains;
using ssmx::test::message_of;
namespace fs = std::filesystem;

using ssmx::test::bytes_of;
using ssmx::test::TempDir;

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}
inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Little-endian bytes, written out by hand rather than through ssmx.
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
inline std::string le_f64(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, 8);
  return le(u, 8);
}

// [u64 LE header length][header][data], as the spec lays it out.
inline std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return le(header.size(), 8) + header + data;
}

// Owns parameters and hands out the ParameterList the io functions take.
template <class T>
struct Params {
  std::vector<std::unique_ptr<Parameter<T>>> owned;
  ParameterList<T> list;

  Parameter<T>& add(const std::string& name, const Dims& d, std::uint64_t seed) {
    owned.push_back(std::make_unique<Parameter<T>>(name, d));
    Parameter<T>& p = *owned.back();
    ssmx::test::Rng rng(seed);
    ssmx::test::fill_uniform<T>(p.value.view(), rng);
    fill<T>(p.grad, T(0));
    list.push_back(&p);
    return p;
  }
  // Gradients drawn from `seed`, the same for the same seed.
  void set_grads(std::uint64_t seed) {
    ssmx::test::Rng rng(seed);
    for (auto* p : list) ssmx::test::fill_uniform<T>(p->grad.view(), rng);
  }
  std::vector<std::vector<unsigned char>> snapshot() const {
    std::vector<std::vector<unsigned char>> s;
    for (auto* p : list) s.push_back(bytes_of(p->value.data(), p->numel()));
    return s;
  }
};

// An optimiser's whole state (names and bits), for bit-identity checks.
template <class Opt>
std::map<std::string, std::vector<unsigned char>> state_of(const Opt& opt) {
  std::map<std::string, std::vector<unsigned char>> s;
  for (const auto& e : opt.state()) {
    Tensor<typename decltype(e.value)::value_type> t(e.value.dims());
    copy(t.view(), e.value);
    s[e.name] = bytes_of(t.data(), t.numel());
  }
  return s;
}

// The model the checkpoint tests save and load.
template <class T>
Params<T> small_model() {
  Params<T> m;
  m.add("layers.0.W", Dims{3, 4}, 1);
  m.add("layers.0.b", Dims{4}, 2);
  m.add("norm.weight", Dims{2, 2, 3}, 3);
  return m;
}

// Values that stress an exact round trip: signed zeros, subnormals, extremes, non-representable decimals.
template <class T>
std::vector<T> awkward_values() {
  using L = std::numeric_limits<T>;
  return {T(0),         -T(0),           T(1),
          T(-1),        T(0.1),          T(1) / T(3),
          L::min(),     L::denorm_min(), -L::denorm_min(),
          L::max(),     L::lowest(),     L::epsilon(),
          T(123456.789)};
}

}  // namespace test_io

// ---- safetensors ------------------------------------------------------------------------

TEST_CASE_TEMPLATE("io: safetensors float32 and float64 round trips are bit-exact", T, float, double) {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("exact.safetensors");
  const std::vector<T> awkward = awkward_values<T>();
  const auto a = from_vector<T>(Dims{index_t(awkward.size())}, awkward);
  const auto scalar = from_vector<T>(Dims{}, {T(-2.5)});
  const auto r4 = ssmx::test::normal<T>(Dims{2, 3, 1, 2}, 11);
  const auto empty = zeros<T>(Dims{0, 3});
  const auto wide = ssmx::test::uniform<T>(Dims{3, 5}, 12);
  const auto strided = wide.view().slice(1, 1, 4);  // columns 1..3: a non-contiguous view

  io::SafetensorsWriter w;
  w.add("awkward", a);
  w.add("scalar", scalar);
  w.add("rank4", r4);
  w.add("empty", empty);
  w.add("strided", strided);
  w.write(path);

  const auto f = io::SafetensorsFile::open(path);
  CHECK(f.tensors().size() == 5);
  CHECK(f.info("awkward").dtype == io::safetensors_dtype(dtype_v<T>));
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.info("empty").shape == std::vector<std::int64_t>{0, 3});
  const auto back = f.read<T>("awkward");
  CHECK(bytes_of(back.data(), back.numel()) == bytes_of(a.data(), a.numel()));
  CHECK(f.read<T>("scalar")[0] == T(-2.5));
  const auto r4_back = f.read<T>("rank4");
  CHECK(r4_back.dims() == r4.dims());
  CHECK(bytes_of(r4_back.data(), r4_back.numel()) == bytes_of(r4.data(), r4.numel()));
  CHECK(f.read<T>("empty").numel() == 0);
  const auto s = f.read<T>("strided");
  CHECK(s.dims() == Dims{3, 3});
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 3; ++j) CHECK(s(i, j) == wide(i, j + 1));

  // Into a strided destination: only the viewed elements change.
  auto dst = zeros<T>(Dims{3, 5});
  f.read<T>("strided", dst.view().slice(1, 2, 5));
  for (index_t i = 0; i < 3; ++i) {
    CHECK(dst(i, 0) == T(0));
    CHECK(dst(i, 1) == T(0));
    for (index_t j = 0; j < 3; ++j) CHECK(dst(i, j + 2) == wide(i, j + 1));
  }
}

TEST_CASE("io: safetensors float32 widens exactly and float64 narrows by rounding") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("convert.safetensors");
  const auto f32 = ssmx::test::normal<float>(Dims{64}, 5);
  const auto f64 = ssmx::test::normal<double>(Dims{64}, 6);
  io::SafetensorsWriter w;
  w.add("f32", f32);
  w.add("f64", f64);
  w.add("f64_as_f32", f64, DType::f32);
  w.write(path);
  const auto f = io::SafetensorsFile::open(path);
  CHECK(f.info("f64_as_f32").dtype == "F32");
  const auto wide = f.read<double>("f32");
  const auto narrow = f.read<float>("f64");
  const auto stored32 = f.read<double>("f64_as_f32");
  for (index_t i = 0; i < 64; ++i) {
    CHECK(wide[i] == double(f32[i]));
    CHECK(narrow[i] == float(f64[i]));
    CHECK(stored32[i] == double(float(f64[i])));
  }
}

// bf16 keeps 8 significant bits and f16 11: rounding to nearest is within 2^-9 and 2^-12
// relative for normal values; the tolerances below allow one more bit.
TEST_CASE_TEMPLATE("io: safetensors bf16 and f16 round trips are within their rounding", T, float, double) {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("half.safetensors");
  const auto x = ssmx::test::normal<T>(Dims{8, 16}, 21, 0.0, 10.0);
  io::SafetensorsWriter w;
  w.add("as_bf16", x, DType::bf16);
  w.add("as_f16", x, DType::f16);
  w.write(path);
  const auto f = io::SafetensorsFile::open(path);
  CHECK(f.info("as_bf16").dtype == "BF16");
  CHECK(f.info("as_f16").dtype == "F16");
  const auto b = f.read<T>("as_bf16");
  const auto h = f.read<T>("as_f16");
  CHECK(ssmx::test::max_rel_err(to_vector(b), to_vector(x), 1e-3) <= std::ldexp(1.0, -8));
  CHECK(ssmx::test::max_rel_err(to_vector(h), to_vector(x), 1e-3) <= std::ldexp(1.0, -11));
  // Exactly the core's rounding (through float).
  for (index_t i = 0; i < x.numel(); ++i) {
    CHECK(b[i] == T(float(bf16(float(x[i])))));
    CHECK(h[i] == T(float(half(float(x[i])))));
  }
}

TEST_CASE("io: safetensors metadata round trip") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("meta.safetensors");
  const std::map<std::string, std::string> md{
      {"format", "pt"}, {"empty", ""}, {"quote\"and\\backslash", "line\nbreak"}, {"unicode", "Zürich \xe2\x86\x92 λ"}};
  const auto one = from_vector<float>(Dims{1}, {1.0f});
  io::SafetensorsWriter w;
  for (const auto& [k, v] : md) w.set_metadata(k, v);
  w.add("x", one);
  w.write(path);
  const auto f = io::SafetensorsFile::open(path);
  CHECK(f.metadata() == md);

  io::SafetensorsWriter none;  // no metadata: no "__metadata__" entry at all
  none.add("x", one);
  none.write(path);
  CHECK(io::SafetensorsFile::open(path).metadata().empty());
  CHECK(!contains(read_bytes(path), "__metadata__"));
}

TEST_CASE("io: safetensors reads a file laid out by hand after the spec") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("by_hand.safetensors");
  // Out of order on purpose ("b" before "a" in the data), a gap-free buffer, no padding.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18,26]},)"
                             R"("b":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},)"
                             R"("c":{"dtype":"F16","shape":[3],"data_offsets":[4,10]},)"
                             R"("d":{"dtype":"I32","shape":[2],"data_offsets":[10,18]},)"
                             R"("e":{"dtype":"F64","shape":[],"data_offsets":[26,34]},)"
                             R"("__metadata__":{"k":"v"}})";
  const std::string data = le(0x3fc0, 2) + le(0xbf00, 2)                    // b: bf16 1.5, -0.5
                           + le(0x3c00, 2) + le(0xc000, 2) + le(0x7bff, 2)  // c: f16 1, -2, 65504
                           + le(7, 4) + le(0xfffffffd, 4)                   // d: int32 7, -3
                           + le_f32(1.0f) + le_f32(-2.25f)                  // a
                           + le_f64(0.1);                                   // e
  write_bytes(path, safetensors_bytes(header, data));

  const auto f = io::SafetensorsFile::open(path);
  REQUIRE(f.tensors().size() == 5);
  CHECK(f.tensors()[0].name == "b");  // listed in data order
  CHECK(f.metadata().at("k") == "v");
  CHECK(f.info("d").dtype == "I32");
  CHECK(!f.info("d").float_dtype().has_value());
  CHECK(f.read_int64("d") == std::vector<std::int64_t>{7, -3});
  CHECK(contains(message_of<ValueError>([&] { f.read_int64("a"); }), "tensor \"a\": dtype F32 is not an integer"));
  CHECK(to_vector(f.read<float>("a")) == std::vector<float>{1.0f, -2.25f});
  const auto b = f.read<float>("b");
  CHECK(b.dims() == Dims{1, 2});
  CHECK(to_vector(b) == std::vector<float>{1.5f, -0.5f});
  CHECK(to_vector(f.read<double>("c")) == std::vector<double>{1.0, -2.0, 65504.0});
  CHECK(f.read<double>("e")[0] == 0.1);
  const std::string msg = message_of<ValueError>([&] { f.read<float>("d"); });
  CHECK(contains(msg, path));
  CHECK(contains(msg, "tensor \"d\""));
  CHECK(contains(msg, "dtype I32 cannot be read as float32"));
}

TEST_CASE("io: safetensors writer output follows the spec byte for byte") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("layout.safetensors");
  const auto x = from_vector<float>(Dims{2}, {1.0f, -2.0f});
  const auto h = from_vector<float>(Dims{1, 1}, {1.0f});
  const auto d = from_vector<double>(Dims{1}, {0.1});
  io::SafetensorsWriter w;
  w.add("x", x);
  w.add("h", h, DType::f16);
  w.add("d", d);
  w.set_metadata("k", "v");
  w.write(path);

  const std::string bytes = read_bytes(path);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[std::size_t(i)]);
  CHECK(n % 8 == 0);  // padded as the reference implementation pads
  REQUIRE(bytes.size() >= 8 + n);
  const std::string header = bytes.substr(8, n);
  CHECK(header.front() == '{');
  const auto last = header.find_last_not_of(' ');
  CHECK(header.size() - last - 1 < 8);
  // Larger dtypes first (each tensor aligned to its element size), then by name.
  const auto expected = nlohmann::json::parse(R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
                                              R"("x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                                              R"("h":{"dtype":"F16","shape":[1,1],"data_offsets":[16,18]},)"
                                              R"("__metadata__":{"k":"v"}})");
  CHECK(nlohmann::json::parse(header) == expected);
  CHECK(bytes.substr(8 + n) == le_f64(0.1) + le_f32(1.0f) + le_f32(-2.0f) + le(0x3c00, 2));
}

TEST_CASE("io: safetensors reader names the file and the field of a malformed header") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const auto open_error = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    return message_of<IOError>([&] { io::SafetensorsFile::open(path); });
  };
  const std::string f32x2 = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

  SUBCASE("missing file") {
    const std::string missing = dir.file("absent.safetensors");
    const std::string msg = message_of<IOError>([&] { io::SafetensorsFile::open(missing); });
    CHECK(contains(msg, missing + ": cannot open"));
  }
  SUBCASE("shorter than the length field") {
    CHECK(contains(open_error("abc"), path + ": file is 3 bytes, too short"));
  }
  SUBCASE("header length past the end of the file") {
    const std::string msg = open_error(le(1000, 8) + f32x2);
    CHECK(contains(msg, path));
    CHECK(contains(msg, "header length 1000 is past the end of the file"));
  }
  SUBCASE("absurd header length") {
    CHECK(contains(open_error(le(std::uint64_t(1) << 40, 8) + "{}"), "exceeds the limit"));
  }
  SUBCASE("data_offsets past the end of the data") {
    const std::string h = R"({"x_proj.weight":{"dtype":"F32","shape":[10,10],"data_offsets":[0,400]}})";
    CHECK(contains(open_error(safetensors_bytes(h, std::string(320, '\0'))),
                   path + ": tensor \"x_proj.weight\": data_offsets [0, 400] past the end of the data (320 bytes)"));
  }
  SUBCASE("data_offsets that disagree with shape and dtype") {
    const std::string h = R"({"x":{"dtype":"F32","shape":[10],"data_offsets":[0,36]}})";
    const std::string msg = open_error(safetensors_bytes(h, std::string(40, '\0')));
    CHECK(contains(msg, path + ": tensor \"x\": data_offsets [0, 36] hold 36 bytes, but shape [10] of F32 needs 40"));
  }
  SUBCASE("data_offsets that end before they begin") {
    const std::string h = R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})";
    CHECK(contains(open_error(safetensors_bytes(h, std::string(8, '\0'))), "data_offsets [8, 4] end before"));
  }
  SUBCASE("overlapping tensors") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
    const std::string msg = open_error(safetensors_bytes(h, std::string(12, '\0')));
    CHECK(contains(msg, path + ": tensor \"b\": data_offsets [4, 12] overlap those of tensor \"a\" [0, 8]"));
  }
  SUBCASE("unknown dtype string") {
    const std::string h = R"({"x":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})";
    const std::string msg = open_error(safetensors_bytes(h, std::string(8, '\0')));
    CHECK(contains(msg, path + ": tensor \"x\": field \"dtype\" is \"F33\", expected one of"));
    CHECK(contains(msg, "BF16"));
  }
  SUBCASE("dtype of the wrong JSON type") {
    const std::string h = R"({"x":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})";
    CHECK(contains(open_error(safetensors_bytes(h, std::string(8, '\0'))),
                   "tensor \"x\": field \"dtype\" is 4, expected a string"));
  }
  SUBCASE("missing field") {
    const std::string h = R"({"x":{"dtype":"F32","data_offsets":[0,8]}})";
    CHECK(contains(open_error(safetensors_bytes(h, std::string(8, '\0'))),
                   path + ": tensor \"x\": field \"shape\" is missing"));
  }
  SUBCASE("negative or fractional extents") {
    const std::string neg = R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})";
    CHECK(contains(open_error(safetensors_bytes(neg, std::string(8, '\0'))),
                   "tensor \"x\": field \"shape\" is [-2], expected an array of non-negative integers"));
    const std::string frac = R"({"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})";
    CHECK(contains(open_error(safetensors_bytes(frac, std::string(8, '\0'))), "field \"shape\""));
  }
  SUBCASE("data_offsets of the wrong form") {
    const std::string h = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}})";
    CHECK(contains(open_error(safetensors_bytes(h, std::string(8, '\0'))),
                   "tensor \"x\": field \"data_offsets\" is [0], expected [begin, end]"));
  }
  SUBCASE("entry that is not an object") {
    CHECK(contains(open_error(safetensors_bytes(R"({"x":[1,2]})", "")), "tensor \"x\": the entry is a JSON array"));
  }
  SUBCASE("header that is not JSON") {
    const std::string msg = open_error(safetensors_bytes("{\"x\": nope}", ""));
    CHECK(contains(msg, path + ": the header is not valid JSON: error at byte 8 of the header"));
  }
  SUBCASE("header that is JSON but not an object") {
    CHECK(contains(open_error(safetensors_bytes("[1, 2]", "")),
                   path + ": the header begins with '[' (0x5b), expected '{' (a JSON object)"));
  }
  SUBCASE("metadata that is not all strings") {
    const std::string h = R"({"__metadata__":{"epoch":3}})";
    CHECK(contains(open_error(safetensors_bytes(h, "")),
                   path + ": field \"__metadata__\": key \"epoch\" has the number value 3, expected a string"));
  }
}

TEST_CASE("io: safetensors read checks the shape and rejects non-finite values") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("weights.safetensors");
  const std::string h = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                        R"("big":{"dtype":"F64","shape":[2],"data_offsets":[24,40]},)"
                        R"("wide":{"dtype":"F32","shape":[1,1,1,1,2],"data_offsets":[40,48]}})";
  const std::string data = le_f32(1) + le_f32(2) + le_f32(3) + le_f32(4) +
                           le_f32(std::numeric_limits<float>::quiet_NaN()) + le_f32(6) + le_f64(1.0) + le_f64(1e300) +
                           le_f32(1) + le_f32(2);
  write_bytes(path, safetensors_bytes(h, data));
  const auto f = io::SafetensorsFile::open(path);

  auto dst = from_vector<float>(Dims{3, 2}, {9, 9, 9, 9, 9, 9});
  std::string msg = message_of<ShapeError>([&] { f.read<float>("w", dst.view()); });
  CHECK(contains(msg, path + ": tensor \"w\" has shape [2, 3] in the file, but the destination has shape [3, 2]"));

  dst.reshape(Dims{2, 3});
  msg = message_of<ValueError>([&] { f.read<float>("w", dst.view()); });
  CHECK(contains(msg, path + ": tensor \"w\": non-finite value nan at index 4"));
  CHECK(to_vector(dst) == std::vector<float>(6, 9.0f));  // untouched

  // Finite as a double, infinite as a float.
  CHECK(f.read<double>("big")[1] == 1e300);
  msg = message_of<ValueError>([&] { f.read<float>("big"); });
  CHECK(contains(msg, path + ": tensor \"big\": non-finite value inf at index 1 (F64 read as float32"));

  msg = message_of<ValueError>([&] { f.read<float>("absent"); });
  CHECK(contains(msg, path + ": no tensor \"absent\""));

  CHECK(f.info("wide").shape.size() == 5);  // listed, though ssmx tensors stop at rank 4
  msg = message_of<ShapeError>([&] { f.read<float>("wide"); });
  CHECK(contains(msg, "tensor \"wide\" has shape [1, 1, 1, 1, 2] of rank 5"));
}

TEST_CASE("io: safetensors writer refuses values the reader would reject and keeps the old file") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("keep.safetensors");
  const auto x = from_vector<float>(Dims{2}, {1.0f, 2.0f});
  io::SafetensorsWriter good;
  good.add("x", x);
  good.write(path);
  const std::string before = read_bytes(path);

  const auto nan = from_vector<float>(Dims{3}, {0.0f, 1.0f, std::numeric_limits<float>::quiet_NaN()});
  io::SafetensorsWriter bad;
  bad.add("x", x);
  bad.add("y", nan);
  std::string msg = message_of<ValueError>([&] { bad.write(path); });
  CHECK(contains(msg, path + ": tensor \"y\": value nan at index 2 is not finite as F32"));

  const auto big = from_vector<double>(Dims{2}, {1.0, 70000.0});  // beyond f16's 65504
  io::SafetensorsWriter overflow;
  overflow.add("z", big, DType::f16);
  msg = message_of<ValueError>([&] { overflow.write(path); });
  CHECK(contains(msg, "tensor \"z\": value 70000 at index 1 is not finite as F16"));

  io::SafetensorsWriter names;
  names.add("x", nan);
  CHECK(contains(message_of<ValueError>([&] { names.add("x", nan); }), "tensor \"x\" added twice"));
  CHECK(contains(message_of<ValueError>([&] { names.add("__metadata__", nan); }), "reserved"));
  CHECK(contains(message_of<ValueError>([&] { names.add("", nan); }), "must not be empty"));

  CHECK(read_bytes(path) == before);
  CHECK(dir.names() == std::vector<std::string>{"keep.safetensors"});
}

TEST_CASE("io: atomic writes fail cleanly when the target cannot be replaced") {
  using namespace test_io;
  TempDir dir;
  const auto x = from_vector<float>(Dims{1}, {1.0f});
  io::SafetensorsWriter w;
  w.add("x", x);

  SUBCASE("the path is a directory") {
    const std::string target = dir.file("a_directory");
    fs::create_directory(target);
    const std::string msg = message_of<IOError>([&] { w.write(target); });
    CHECK(contains(msg, target + ": cannot rename the temporary file"));
    CHECK(fs::is_directory(target));
    CHECK(dir.names() == std::vector<std::string>{"a_directory"});  // the temporary file is gone
  }
  SUBCASE("the directory does not exist") {
    const std::string target = dir.file("no/such/dir/x.safetensors");
    CHECK(contains(message_of<IOError>([&] { w.write(target); }), target + ": cannot create the temporary file"));
  }
  SUBCASE("the directory is not writable") {
    if (::geteuid() == 0) {
      MESSAGE("skipped: running as root, which may write anywhere");
    } else {
      const std::string target = dir.file("x.safetensors");
      w.write(target);
      const std::string before = read_bytes(target);
      fs::permissions(dir.path(), fs::perms::owner_write, fs::perm_options::remove);
      CHECK(contains(message_of<IOError>([&] { w.write(target); }), target + ": cannot create the temporary file"));
      fs::permissions(dir.path(), fs::perms::owner_write, fs::perm_options::add);
      CHECK(read_bytes(target) == before);
    }
  }
}

// ---- Hugging Face-style checkpoints -------------------------------------------------------

TEST_CASE("io: load_parameters maps names and converts dtypes") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const auto w = ssmx::test::normal<float>(Dims{4, 3}, 31);
  const auto b = ssmx::test::normal<double>(Dims{3}, 32);
  const auto g = ssmx::test::normal<float>(Dims{3}, 33);
  io::SafetensorsWriter writer;
  writer.add("backbone.layers.0.W", w, DType::bf16);
  writer.add("backbone.layers.0.b", b);  // F64 into float parameters
  writer.add("backbone.norm_f.weight", g, DType::f16);
  writer.add("lm_head.weight", w);  // in the file, not in the model
  writer.write(path);

  Params<float> m;
  auto& pw = m.add("layers.0.W", Dims{4, 3}, 1);
  auto& pb = m.add("layers.0.b", Dims{3}, 2);
  auto& pg = m.add("norm.weight", Dims{3}, 3);
  const io::NameMap to_hf = [](const std::string& n) {
    return "backbone." + (n == "norm.weight" ? std::string("norm_f.weight") : n);
  };
  const auto f = io::SafetensorsFile::open(path);
  const auto unused = io::load_parameters(f, m.list, to_hf);
  CHECK(unused == std::vector<std::string>{"lm_head.weight"});
  for (index_t i = 0; i < w.numel(); ++i) CHECK(pw.value[i] == float(bf16(w[i])));
  for (index_t i = 0; i < b.numel(); ++i) CHECK(pb.value[i] == float(b[i]));
  for (index_t i = 0; i < g.numel(); ++i) CHECK(pg.value[i] == float(half(g[i])));

  // Without a map the names must match as they are.
  io::SafetensorsWriter same;
  same.add("layers.0.b", b);
  same.write(path);
  Params<double> d;
  auto& db = d.add("layers.0.b", Dims{3}, 4);
  CHECK(io::load_parameters(io::SafetensorsFile::open(path), d.list).empty());
  CHECK(to_vector(db.value) == to_vector(b));
}

TEST_CASE("io: load_parameters validates everything before it copies anything") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},)"
                        R"("ids":{"dtype":"I64","shape":[2],"data_offsets":[24,40]}})";
  const std::string data = le_f32(1) + le_f32(2) + le_f32(3) + le_f32(4) +
                           le_f32(std::numeric_limits<float>::infinity()) + le_f32(6) + le(1, 8) + le(2, 8);
  write_bytes(path, safetensors_bytes(h, data));
  const auto f = io::SafetensorsFile::open(path);

  Params<float> m;
  m.add("a", Dims{2}, 1);
  const auto before_a = m.snapshot();

  SUBCASE("missing tensors are all listed") {
    m.add("missing_one", Dims{2}, 2);
    m.add("missing_two", Dims{2}, 3);
    const auto before = m.snapshot();
    const std::string msg = message_of<ValueError>([&] { io::load_parameters(f, m.list); });
    CHECK(contains(msg, path + ": missing 2 tensors: \"missing_one\" (for parameter \"missing_one\"), "
                               "\"missing_two\" (for parameter \"missing_two\")"));
    CHECK(m.snapshot() == before);
  }
  SUBCASE("shape mismatch names the tensor and both shapes") {
    m.add("b", Dims{4}, 2);
    const auto before = m.snapshot();
    const std::string msg = message_of<ShapeError>([&] { io::load_parameters(f, m.list); });
    CHECK(contains(msg, path + ": tensor \"b\" has shape [2, 2], but parameter \"b\" has shape [4]"));
    CHECK(m.snapshot() == before);
  }
  SUBCASE("an integer tensor") {
    m.add("ids", Dims{2}, 2);
    const std::string msg = message_of<ValueError>([&] { io::load_parameters(f, m.list); });
    CHECK(contains(msg, path + ": tensor \"ids\" has dtype I64, expected a floating dtype"));
  }
  SUBCASE("a non-finite weight after a good one") {
    m.add("b", Dims{2, 2}, 2);
    const auto before = m.snapshot();
    const std::string msg = message_of<ValueError>([&] { io::load_parameters(f, m.list); });
    CHECK(contains(msg, path + ": tensor \"b\": non-finite value inf at index 2"));
    CHECK(m.snapshot() == before);  // "a" was readable, but is not half-loaded
  }
  CHECK(m.snapshot()[0] == before_a[0]);
}

TEST_CASE("io: read_json and json_field name the file and the field") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("config.json");
  write_bytes(path, R"({"d_model": 768, "n_layer": 24, "rms_norm_eps": 1e-05, "tie": true, "name": "mamba",
                        "neg": -3, "frac": 1.5})");
  const auto cfg = io::read_json(path);
  CHECK(io::json_field<int>(cfg, "d_model", path) == 768);
  CHECK(io::json_field<std::int64_t>(cfg, "neg", path) == -3);
  CHECK(io::json_field<double>(cfg, "rms_norm_eps", path) == 1e-05);
  CHECK(io::json_field<double>(cfg, "n_layer", path) == 24.0);
  CHECK(io::json_field<bool>(cfg, "tie", path));
  CHECK(io::json_field<std::string>(cfg, "name", path) == "mamba");
  CHECK(io::json_field<int>(cfg, "absent", path, 7) == 7);
  CHECK(contains(message_of<IOError>([&] { io::json_field<int>(cfg, "absent", path); }),
                 path + ": field \"absent\" is missing"));
  CHECK(contains(message_of<IOError>([&] { io::json_field<int>(cfg, "frac", path); }),
                 path + ": field \"frac\" is 1.5, expected an integer"));
  CHECK(contains(message_of<IOError>([&] { io::json_field<std::uint32_t>(cfg, "neg", path); }),
                 "field \"neg\" is -3, expected an integer in range"));
  CHECK(contains(message_of<IOError>([&] { io::json_field<std::string>(cfg, "tie", path, "x"); }),
                 "field \"tie\" is true, expected a string"));

  const std::string missing = dir.file("absent.json");
  CHECK(contains(message_of<IOError>([&] { io::read_json(missing); }), missing + ": cannot open"));
  write_bytes(path, "{\"a\": 1,\n \"b\": }");
  CHECK(contains(message_of<IOError>([&] { io::read_json(path); }), path + ": not valid JSON: error at byte 16"));
}

TEST_CASE("io: a sharded Hugging Face directory loads through its index") {
  using namespace test_io;
  TempDir dir;
  const auto a = ssmx::test::normal<float>(Dims{2, 2}, 41);
  const auto b = ssmx::test::normal<float>(Dims{3}, 42);
  io::SafetensorsWriter s1, s2;
  s1.add("a", a);
  s2.add("b", b);
  s1.write(dir.file("model-00001-of-00002.safetensors"));
  s2.write(dir.file("model-00002-of-00002.safetensors"));
  const std::string index = dir.file("model.safetensors.index.json");
  write_bytes(index, R"({"metadata": {"total_size": 28}, "weight_map": {)"
                     R"("a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");

  const auto shards = io::SafetensorsShards::open_dir(dir.path());
  CHECK(shards.path() == index);
  CHECK(shards.files().size() == 2);
  CHECK(shards.names() == std::vector<std::string>{"a", "b"});
  CHECK(shards.info("b").shape == std::vector<std::int64_t>{3});
  Params<float> m;
  auto& pa = m.add("a", Dims{2, 2}, 1);
  auto& pb = m.add("b", Dims{3}, 2);
  CHECK(io::load_parameters(shards, m.list).empty());
  CHECK(to_vector(pa.value) == to_vector(a));
  CHECK(to_vector(pb.value) == to_vector(b));

  write_bytes(index, R"({"weight_map": {"a": "model-00002-of-00002.safetensors"}})");
  CHECK(contains(message_of<IOError>([&] { io::SafetensorsShards::open_dir(dir.path()); }),
                 index + ": field \"weight_map\" puts tensor \"a\" in"));
  write_bytes(index, R"({"weight_map": {"a": "../elsewhere.safetensors"}})");
  CHECK(contains(message_of<IOError>([&] { io::SafetensorsShards::open_dir(dir.path()); }),
                 index + ": field \"weight_map\": tensor \"a\" maps to \"../elsewhere.safetensors\""));

  // Without an index, model.safetensors; without either, an error naming the directory.
  fs::remove(index);
  CHECK(contains(message_of<IOError>([&] { io::SafetensorsShards::open_dir(dir.path()); }),
                 dir.path() + ": neither model.safetensors.index.json nor model.safetensors found"));
  s1.write(dir.file("model.safetensors"));
  const auto single = io::SafetensorsShards::open_dir(dir.path());
  CHECK(single.names() == std::vector<std::string>{"a"});
}

// ---- training checkpoints -----------------------------------------------------------------

TEST_CASE("io: exact_string round-trips doubles bit for bit") {
  using namespace test_io;
  for (double v : awkward_values<double>()) {
    const auto back = io::parse_double(io::exact_string(v));
    REQUIRE(back.has_value());
    CHECK(bytes_of(&*back, 1) == bytes_of(&v, 1));
  }
  CHECK(!io::parse_double("").has_value());
  CHECK(!io::parse_double(" 1").has_value());
  CHECK(!io::parse_double("1x").has_value());
  CHECK(!io::parse_double("inf").has_value());
  CHECK(io::parse_int64("-42") == std::int64_t(-42));
  CHECK(!io::parse_int64("12 ").has_value());
  CHECK(!io::parse_int64("99999999999999999999").has_value());
}

TEST_CASE_TEMPLATE("io: an AdamW checkpoint resumes bit-identically", T, float, double) {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  auto m = small_model<T>();
  AdamW<T> opt(1e-2, 0.9, 0.99, 1e-8, 0.1);
  for (std::uint64_t s = 0; s < 3; ++s) {
    m.set_grads(100 + s);
    opt.step(m.list);
  }
  const io::Metadata extra{{"loss", io::exact_string(0.1 + 0.2)}, {"run", "ablation-7"}};
  io::save_checkpoint(path, m.list, opt, 3, extra);
  const auto saved_params = m.snapshot();
  const auto saved_state = state_of(opt);

  // The run that never stopped.
  for (std::uint64_t s = 3; s < 5; ++s) {
    m.set_grads(100 + s);
    opt.step(m.list);
  }
  const auto uninterrupted = m.snapshot();

  // Wander off, then resume.
  m.set_grads(999);
  opt.step(m.list);
  opt.set_lr(0.5);
  const auto info = io::load_checkpoint(path, m.list, opt);
  CHECK(info.step == 3);
  CHECK(info.extra == extra);
  CHECK(io::parse_double(info.extra.at("loss")) == 0.1 + 0.2);
  CHECK(m.snapshot() == saved_params);
  CHECK(state_of(opt) == saved_state);
  CHECK(opt.step_count() == 3);
  CHECK(opt.lr() == 1e-2);
  for (std::uint64_t s = 3; s < 5; ++s) {
    m.set_grads(100 + s);
    opt.step(m.list);
  }
  CHECK(m.snapshot() == uninterrupted);

  const auto f = io::SafetensorsFile::open(path);
  CHECK(f.has("param/layers.0.W"));
  CHECK(f.has("optim/layers.0.W.exp_avg"));
  CHECK(f.has("optim/norm.weight.exp_avg_sq"));
  CHECK(f.info("param/norm.weight").dtype == io::safetensors_dtype(dtype_v<T>));
  CHECK(f.metadata().at("optim.kind") == "AdamW");
  CHECK(f.metadata().at("step") == "3");
}

TEST_CASE("io: an SGD checkpoint restores the momentum buffers") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("sgd.safetensors");
  auto m = small_model<double>();
  SGD<double> opt(0.05, 0.9, 1e-3, true);
  for (std::uint64_t s = 0; s < 2; ++s) {
    m.set_grads(200 + s);
    opt.step(m.list);
  }
  io::save_checkpoint(path, m.list, opt, 2);
  const auto saved_params = m.snapshot();
  const auto saved_state = state_of(opt);
  m.set_grads(202);
  opt.step(m.list);
  const auto continued = m.snapshot();

  m.set_grads(999);
  opt.step(m.list);
  CHECK(io::load_checkpoint(path, m.list, opt).step == 2);
  CHECK(m.snapshot() == saved_params);
  CHECK(state_of(opt) == saved_state);
  m.set_grads(202);
  opt.step(m.list);
  CHECK(m.snapshot() == continued);
  CHECK(io::SafetensorsFile::open(path).has("optim/layers.0.b.momentum_buffer"));
}

TEST_CASE("io: a parameters-only load ignores the optimizer state") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  auto m = small_model<float>();
  AdamW<float> opt;
  m.set_grads(1);
  opt.step(m.list);
  io::save_checkpoint(path, m.list, opt, 1);
  const auto saved = m.snapshot();

  auto fresh = small_model<float>();
  CHECK(fresh.snapshot() != saved);
  CHECK(io::load_checkpoint(path, fresh.list).step == 1);
  CHECK(fresh.snapshot() == saved);

  // And a checkpoint without optimizer state.
  io::save_checkpoint(path, m.list, 7, {{"note", "eval"}});
  CHECK(io::SafetensorsFile::open(path).metadata().at("optim.kind") == "none");
  const auto info = io::load_checkpoint(path, fresh.list);
  CHECK(info.step == 7);
  CHECK(info.extra.at("note") == "eval");
}

TEST_CASE("io: a failing checkpoint save leaves the old file intact") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  auto m = small_model<float>();
  AdamW<float> opt;
  m.set_grads(1);
  opt.step(m.list);
  io::save_checkpoint(path, m.list, opt, 1);
  const std::string before = read_bytes(path);

  SUBCASE("a non-finite parameter") {
    m.list[1]->value[2] = std::numeric_limits<float>::quiet_NaN();
    const std::string msg = message_of<ValueError>([&] { io::save_checkpoint(path, m.list, opt, 2); });
    CHECK(contains(msg, path + ": tensor \"param/layers.0.b\": value nan at index 2"));
  }
  SUBCASE("the path is a directory") {
    const std::string target = dir.file("ckpt_dir");
    fs::create_directory(target);
    CHECK(contains(message_of<IOError>([&] { io::save_checkpoint(target, m.list, opt, 2); }), target));
    CHECK(fs::is_directory(target));
  }
  SUBCASE("optimizer state of a parameter that is not in the list") {
    ParameterList<float> fewer(m.list.begin(), m.list.begin() + 2);
    const std::string msg = message_of<ValueError>([&] { io::save_checkpoint(path, fewer, opt, 2); });
    CHECK(contains(msg, path + ": optimizer state \"norm.weight.exp_avg\" belongs to no parameter in the list"));
  }
  SUBCASE("a negative step") {
    CHECK(contains(message_of<ValueError>([&] { io::save_checkpoint(path, m.list, opt, -1); }),
                   path + ": step must be >= 0"));
  }
  CHECK(read_bytes(path) == before);
  const auto names = dir.names();
  for (const auto& n : names) CHECK(!contains(n, ".tmp."));
}

TEST_CASE("io: a failing checkpoint load changes neither the parameters nor the optimizer") {
  using namespace test_io;
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  {
    auto saved = small_model<float>();
    AdamW<float> opt;
    saved.set_grads(1);
    opt.step(saved.list);
    io::save_checkpoint(path, saved.list, opt, 1);
  }
  // The model being restored has state of its own, which a failed load must keep.
  auto m = small_model<float>();
  for (auto* p : m.list) fill<float>(p->value, 0.25f);
  AdamW<float> opt(3e-4);
  m.set_grads(2);
  opt.step(m.list);
  opt.step(m.list);
  const auto params_before = m.snapshot();
  const auto state_before = state_of(opt);
  const auto unchanged = [&] {
    CHECK(m.snapshot() == params_before);
    CHECK(state_of(opt) == state_before);
    CHECK(opt.step_count() == 2);
    CHECK(opt.lr() == 3e-4);
  };

  SUBCASE("a parameter of another shape") {
    auto other = small_model<float>();
    other.owned[0] = std::make_unique<Parameter<float>>("layers.0.W", Dims{4, 3});
    other.list[0] = other.owned[0].get();
    const std::string msg = message_of<ShapeError>([&] { io::load_checkpoint(path, other.list); });
    CHECK(contains(msg, path + ": tensor \"param/layers.0.W\" has shape [3, 4], but parameter \"layers.0.W\" has "
                               "shape [4, 3]"));
  }
  SUBCASE("a parameter the checkpoint lacks") {
    Parameter<float> extra("head.weight", Dims{2});
    fill<float>(extra.value, 1.0f);
    fill<float>(extra.grad, 0.0f);
    m.list.push_back(&extra);
    const std::string msg = message_of<ValueError>([&] { io::load_checkpoint(path, m.list, opt); });
    m.list.pop_back();
    CHECK(contains(msg, path + ": no tensor \"param/head.weight\" for parameter \"head.weight\""));
    CHECK(extra.value[0] == 1.0f);
  }
  SUBCASE("a tensor the model lacks") {
    ParameterList<float> fewer(m.list.begin(), m.list.begin() + 2);
    const std::string msg = message_of<ValueError>([&] { io::load_checkpoint(path, fewer); });
    CHECK(contains(msg, path + ": tensor \"param/norm.weight\" has no parameter \"norm.weight\" in the list"));
  }
  SUBCASE("another optimizer kind") {
    SGD<float> sgd(0.1, 0.9);
    const std::string msg = message_of<ValueError>([&] { io::load_checkpoint(path, m.list, sgd); });
    CHECK(contains(msg, path + ": the checkpoint holds optimizer state of kind \"AdamW\", but the optimizer is "
                               "\"SGD\""));
  }
  SUBCASE("another dtype") {
    auto d = small_model<double>();
    const auto d_before = d.snapshot();
    const std::string msg = message_of<ValueError>([&] { io::load_checkpoint(path, d.list); });
    CHECK(contains(msg, path + ": tensor \"param/layers.0.W\" has dtype F32, expected F64"));
    CHECK(d.snapshot() == d_before);
  }
  SUBCASE("not a checkpoint") {
    io::SafetensorsWriter w;
    w.add("layers.0.W", m.list[0]->value);
    w.write(path);
    CHECK(contains(message_of<IOError>([&] { io::load_checkpoint(path, m.list, opt); }),
                   path + ": field \"__metadata__.format\" is missing"));
  }
  // Written by hand: a well-formed checkpoint whose content the model or the optimiser refuses.
  const auto forged = [&](const std::string& step, const Tensor<float>& exp_avg_sq) {
    io::SafetensorsWriter w;
    for (auto* p : m.list) {
      w.add("param/" + p->name, p->value);
      w.add("optim/" + p->name + ".exp_avg", p->value);
      const TensorView<const float> v = p->name == "layers.0.b" ? exp_avg_sq.view() : std::as_const(p->value).view();
      w.add("optim/" + p->name + ".exp_avg_sq", v);
    }
    for (const auto& [k, v] : io::Metadata{{"format", "ssmx.checkpoint"},
                                           {"format_version", "1"},
                                           {"step", step},
                                           {"optim.kind", "AdamW"},
                                           {"optim.step_count", "5"},
                                           {"optim.lr", "0.001"}})
      w.set_metadata(k, v);
    w.write(path);
  };
  SUBCASE("a malformed step") {
    auto ok = from_vector<float>(Dims{4}, {1, 1, 1, 1});
    forged("3.5", ok);
    CHECK(contains(message_of<IOError>([&] { io::load_checkpoint(path, m.list, opt); }),
                   path + ": field \"__metadata__.step\" is \"3.5\", expected a decimal integer"));
  }
  SUBCASE("optimizer state the optimizer refuses, after the checks of the file passed") {
    auto negative = from_vector<float>(Dims{4}, {1, -1, 1, 1});
    forged("4", negative);
    const std::string msg = message_of<ValueError>([&] { io::load_checkpoint(path, m.list, opt); });
    CHECK(contains(msg, path + ": AdamW::load_state: state entry 'layers.0.b.exp_avg_sq' has negative value"));
  }
  SUBCASE("a missing file") {
    const std::string missing = dir.file("absent.safetensors");
    CHECK(contains(message_of<IOError>([&] { io::load_checkpoint(missing, m.list, opt); }), missing));
  }
  unchanged();
}

TEST_CASE("io: checkpoint directories and the latest file") {
  using namespace test_io;
  TempDir dir;
  const std::string ckpts = dir.file("run/checkpoints");
  CHECK(!io::latest_checkpoint(ckpts).has_value());  // no directory yet
  CHECK(io::checkpoint_file_name(1234) == "step_00001234.safetensors");

  auto m = small_model<float>();
  AdamW<float> opt;
  const std::string p5 = io::save_checkpoint_to_dir(ckpts, m.list, opt, 5);
  const std::string p12 = io::save_checkpoint_to_dir(ckpts, m.list, opt, 12);
  CHECK(p12 == ckpts + "/step_00000012.safetensors");
  CHECK(read_bytes(ckpts + "/latest") == "step_00000012.safetensors\n");
  CHECK(io::latest_checkpoint(ckpts) == p12);
  CHECK(io::load_checkpoint(*io::latest_checkpoint(ckpts), m.list, opt).step == 12);

  // `latest` wins over the file names: a crash after a newer file but before `latest`.
  write_bytes(ckpts + "/latest", "step_00000005.safetensors\n");
  CHECK(io::latest_checkpoint(ckpts) == p5);
  // Without `latest`, the highest step.
  fs::remove(ckpts + "/latest");
  write_bytes(ckpts + "/step_00000009.safetensors.tmp.1.0", "partial");
  CHECK(io::latest_checkpoint(ckpts) == p12);
  // A `latest` naming a missing file is an error, not a silent fallback.
  write_bytes(ckpts + "/latest", "step_00000099.safetensors\n");
  CHECK(contains(message_of<IOError>([&] { io::latest_checkpoint(ckpts); }),
                 ckpts + "/latest: names " + ckpts + "/step_00000099.safetensors, which does not exist"));
  write_bytes(ckpts + "/latest", "");
  CHECK(contains(message_of<IOError>([&] { io::latest_checkpoint(ckpts); }),
                 ckpts + "/latest: holds \"\", expected a checkpoint file name"));
}

#endif  // !SSMX_TEST_CUDA && __has_include(<nlohmann/json.hpp>)
