// Bad input: single safetensors files (what the format forbids, hostile sizes and nesting,
// files that are not regular files).
#include "badinput.hpp"

namespace badinput {

// Writes `bytes` as dir/model.safetensors and expects loading it into SmallParams to fail.
inline void safetensors_case(const std::string& bytes, const std::vector<std::string>& fields) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_file(path, bytes);
  SmallParams p;
  expect_error<IOError>(
      dir.path(), {path, fields}, [&] { io::load_parameters(io::SafetensorsFile::open(path), p.list); }, &p);
}

}  // namespace badinput

using namespace badinput;

TEST_CASE("badinput: safetensors control - the good file loads") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_file(path, safetensors("{" + good_entries + "}", good_data()));
  SmallParams p;
  CHECK(io::load_parameters(io::SafetensorsFile::open(path), p.list).empty());
  CHECK(p.list[1]->value[3] == 2.5f);
}

TEST_CASE("badinput: safetensors duplicate tensor name") {
  safetensors_case(
      safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)" + good_entries + "}", good_data()),
      {"the header has the key \"a\" twice", "at the top level"});
}

TEST_CASE("badinput: safetensors duplicate key inside an entry") {
  safetensors_case(
      safetensors(
          R"({"a":{"dtype":"F32","dtype":"F64","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})",
          good_data()),
      {"key \"dtype\" twice", "in field \"a\""});
}

TEST_CASE("badinput: safetensors duplicate metadata key") {
  safetensors_case(safetensors(R"({"__metadata__":{"k":"1","k":"2"},)" + good_entries + "}", good_data()),
                   {"key \"k\" twice", "__metadata__"});
}

TEST_CASE("badinput: safetensors header padded with NUL bytes") {
  safetensors_case(safetensors("{" + good_entries + "}" + std::string(4, '\0'), good_data()),
                   {"padding", "byte 0x00", "only spaces (0x20)"});
}

TEST_CASE("badinput: safetensors header padded with a newline") {
  safetensors_case(safetensors("{" + good_entries + "}\n   ", good_data()), {"padding", "byte 0x0a"});
}

TEST_CASE("badinput: safetensors header with leading whitespace") {
  safetensors_case(safetensors(" {" + good_entries + "}", good_data()), {"the header begins with ' ' (0x20)"});
}

TEST_CASE("badinput: safetensors header of length 0") {
  safetensors_case(safetensors("", good_data()), {"the header begins with nothing"});
}

TEST_CASE("badinput: safetensors hole between tensors") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[12,28]}})",
                               good_data() + "pad!"),
                   {"tensor \"b\"", "hole in the data buffer: bytes [8, 12)"});
}

TEST_CASE("badinput: safetensors first tensor not at offset 0") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
                               R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[12,28]}})",
                               "four" + good_data()),
                   {"tensor \"a\"", "bytes [0, 4) belong to no tensor"});
}

TEST_CASE("badinput: safetensors trailing bytes after the last tensor") {
  safetensors_case(safetensors("{" + good_entries + "}", good_data() + "tail"),
                   {"the data buffer holds 28 bytes", "4 trailing bytes"});
}

TEST_CASE("badinput: safetensors overlapping tensors") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[4,20]}})",
                               good_data().substr(0, 20)),
                   {"tensor \"b\"", "overlap those of tensor \"a\""});
}

TEST_CASE("badinput: safetensors extent of 2^63 after a zero") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}})", ""),
                   {"tensor \"a\"", "field \"shape\": extent 1 is 9223372036854775808", "does not fit int64"});
}

TEST_CASE("badinput: safetensors extent of 2^64 - 1") {
  safetensors_case(safetensors(R"({"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})", ""),
                   {"tensor \"a\"", "extent 0 is 18446744073709551615"});
}

TEST_CASE("badinput: safetensors shape whose byte count overflows") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                               std::string(8, '\0')),
                   {"tensor \"a\"", "field \"shape\"", "overflows"});
}

TEST_CASE("badinput: safetensors number beyond a double in a shape") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,8]}})", good_data()),
                   {"not valid JSON", "in field \"a.shape[]\"", "number overflow"});
}

TEST_CASE("badinput: safetensors number beyond a double in the metadata") {
  safetensors_case(safetensors(R"({"__metadata__":{"lr":-1e400},)" + good_entries + "}", good_data()),
                   {"not valid JSON", "__metadata__.lr", "number overflow"});
}

TEST_CASE("badinput: safetensors deeply nested dtype") {
  safetensors_case(safetensors(R"({"a":{"dtype":)" + nested(100000) + R"(,"shape":[2],"data_offsets":[0,8]}})", ""),
                   {"the header nests deeper than 16 levels", "in field \"a.dtype"});
}

TEST_CASE("badinput: safetensors deeply nested shape") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":)" + nested(100000) + R"(,"data_offsets":[0,8]}})", ""),
                   {"nests deeper than 16 levels", "a.shape"});
}

TEST_CASE("badinput: safetensors deeply nested metadata value") {
  safetensors_case(safetensors(R"({"__metadata__":{"x":)" + nested(100000) + "}}", ""),
                   {"nests deeper", "__metadata__.x"});
}

TEST_CASE("badinput: safetensors deeply nested unknown entry field") {
  // Unknown fields are allowed, but not at any depth.
  std::string deep = "1";
  for (int i = 0; i < 20; ++i) deep = "{\"k\":" + deep + "}";
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":)" + deep + "}}",
                               good_data().substr(0, 8)),
                   {"nests deeper than 16 levels", "a.extra.k"});
}

TEST_CASE("badinput: safetensors invalid UTF-8 in the header is escaped in the message") {
  safetensors_case(safetensors("{\"a\xff\xfe\":{}}", ""), {"not valid JSON", "\\xff"});
}

TEST_CASE("badinput: safetensors control characters in a tensor name are escaped") {
  safetensors_case(safetensors(R"({"a\u001b[31m\n":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", good_data()),
                   {"tensor \"a\\x1b[31m\\n\"", "field \"dtype\" is \"F33\""});
}

TEST_CASE("badinput: safetensors a megabyte-long tensor name is cut in the message") {
  const std::string name(1 << 20, 'n');
  safetensors_case(safetensors("{\"" + name + R"(":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", good_data()),
                   {"tensor \"nnnn", "(1048576 bytes)"});
}

TEST_CASE("badinput: safetensors unknown dtype") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F8_E9M9","shape":[2],"data_offsets":[0,8]}})", good_data()),
                   {"tensor \"a\"", "field \"dtype\" is \"F8_E9M9\", expected one of"});
}

TEST_CASE("badinput: safetensors negative extent") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", good_data()),
                   {"tensor \"a\"", "field \"shape\" is [-2]"});
}

TEST_CASE("badinput: safetensors fractional data_offsets") {
  safetensors_case(safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", good_data()),
                   {"tensor \"a\"", "field \"data_offsets\" is [0,8.0]"});
}

TEST_CASE("badinput: safetensors data_offsets past the end of the file") {
  safetensors_case(safetensors("{" + good_entries + "}", good_data().substr(0, 20)),
                   {"tensor \"b\"", "past the end of the data (20 bytes)"});
}

TEST_CASE("badinput: safetensors header length past the end of the file") {
  safetensors_case(le(4096, 8) + "{" + good_entries + "}", {"header length 4096 is past the end of the file"});
}

TEST_CASE("badinput: safetensors header length beyond the limit") {
  safetensors_case(le(std::uint64_t(1) << 62, 8) + "{}", {"header length 4611686018427387904 exceeds the limit"});
}

TEST_CASE("badinput: safetensors header that is an array") {
  safetensors_case(safetensors("[1,2]", ""), {"the header begins with '['"});
}

TEST_CASE("badinput: safetensors metadata value that is not a string") {
  safetensors_case(safetensors(R"({"__metadata__":{"epoch":[3]},)" + good_entries + "}", good_data()),
                   {"field \"__metadata__\": key \"epoch\" has the array value [3], expected a string"});
}

TEST_CASE("badinput: safetensors entry that is not an object") {
  safetensors_case(safetensors(R"({"a":"F32",)" + good_entries.substr(good_entries.find("\"b\"")) + "}", good_data()),
                   {"tensor \"a\"", "the entry is a JSON string"});
}

TEST_CASE("badinput: safetensors file shorter than the length field") {
  safetensors_case("abc", {"file is 3 bytes, too short"});
}

TEST_CASE("badinput: safetensors non-finite weight leaves the parameters unchanged") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  std::string data = good_data();
  data.replace(16, 4, le_f32(std::numeric_limits<float>::infinity()));
  write_file(path, safetensors("{" + good_entries + "}", data));
  SmallParams p;
  expect_error<ValueError>(
      dir.path(), {path, {"tensor \"b\"", "non-finite value inf at index 2"}},
      [&] { io::load_parameters(io::SafetensorsFile::open(path), p.list); }, &p);
}

TEST_CASE("badinput: safetensors file that is a FIFO does not block") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
  SmallParams p;
  expect_error<IOError>(
      dir.path(), {path, {"is a FIFO (named pipe), not a regular file"}}, [&] { io::SafetensorsFile::open(path); }, &p);
}

TEST_CASE("badinput: safetensors path that is a directory") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  fs::create_directory(path);
  expect_error<IOError>(dir.path(), {path, {"is a directory, not a regular file"}},
                        [&] { io::SafetensorsFile::open(path); });
}

TEST_CASE("badinput: safetensors symlink to /dev/zero") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  fs::create_symlink("/dev/zero", path);
  expect_error<IOError>(dir.path(), {path, {"is a character device, not a regular file"}},
                        [&] { io::SafetensorsFile::open(path); });
}
