// Bad input: llm.c token files and the byte files of text:PATH data.
#include "badinput.hpp"

namespace badinput {

// An llm.c file: 256 int32 header (magic, version, count, zeros), then tokens of `width` bytes.
inline std::string llmc(std::int32_t magic, std::int32_t version, std::int32_t count,
                        const std::vector<std::uint32_t>& tokens, int width) {
  std::string b = le(std::uint32_t(magic), 4) + le(std::uint32_t(version), 4) + le(std::uint32_t(count), 4);
  b += std::string(1024 - 12, '\0');
  for (std::uint32_t t : tokens) b += le(t, width);
  return b;
}

template <class E = IOError>
void token_case(const std::string& bytes, const std::vector<std::string>& fields) {
  TempDir dir;
  const std::string path = dir.file("train.bin");
  write_file(path, bytes);
  expect_error<E>(dir.path(), {"token file '" + path + "'", fields}, [&] { (void)data::read_token_file(path); });
}

}  // namespace badinput

using namespace badinput;

TEST_CASE("badinput: token file control - a good file reads") {
  TempDir dir;
  write_file(dir.file("train.bin"), llmc(20240520, 1, 3, {7, 8, 9}, 2));
  CHECK(data::read_token_file(dir.file("train.bin")) == std::vector<data::token_t>{7, 8, 9});
}

TEST_CASE("badinput: token file that is a FIFO does not block") {
  TempDir dir;
  const std::string path = dir.file("train.bin");
  REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
  expect_error<IOError>(dir.path(), {"token file '" + path + "'", {"is a FIFO (named pipe), not a regular file"}},
                        [&] { data::TokenFile f(path); });
}

TEST_CASE("badinput: token file that is a symlink to /dev/zero") {
  TempDir dir;
  const std::string path = dir.file("train.bin");
  fs::create_symlink("/dev/zero", path);
  expect_error<IOError>(dir.path(), {"token file '" + path + "'", {"is a character device"}},
                        [&] { (void)data::read_token_file(path); });
}

TEST_CASE("badinput: token file that is a directory") {
  TempDir dir;
  const std::string path = dir.file("train.bin");
  fs::create_directory(path);
  expect_error<IOError>(dir.path(), {"token file '" + path + "'", {"is a directory"}},
                        [&] { (void)data::read_token_file_header(path); });
}

TEST_CASE("badinput: token file that is a dangling symlink") {
  TempDir dir;
  const std::string path = dir.file("train.bin");
  fs::create_symlink("shard_000.bin", path);
  expect_error<IOError>(dir.path(), {"token file '" + path + "'", {"is a dangling symbolic link"}},
                        [&] { (void)data::read_token_file(path); });
}

TEST_CASE("badinput: token file shorter than its header") {
  token_case(std::string(100, '\0'), {"header: the file has 100 bytes, shorter than the 1024-byte header"});
}

TEST_CASE("badinput: token file with a foreign magic") {
  token_case(llmc(0x46554747, 1, 3, {1, 2, 3}, 2), {"header[0] magic = 1179993927"});
}

TEST_CASE("badinput: token file that is an llm.c eval file") {
  token_case(llmc(20240522, 1, 3, {1, 2, 3}, 2), {"header[0] magic = 20240522", "eval file"});
}

TEST_CASE("badinput: token file with an unsupported version") {
  token_case(llmc(20240801, 1, 3, {1, 2, 3}, 4), {"header[1] version = 1", "expected 7"});
}

TEST_CASE("badinput: token file with a count of 0") {
  token_case(llmc(20240520, 1, 0, {}, 2), {"header[2] count = 0"});
}

TEST_CASE("badinput: token file with a negative count") {
  token_case(llmc(20240520, 1, std::int32_t(0x80000000u), {1}, 2), {"header[2] count = -2147483648"});
}

TEST_CASE("badinput: token file whose size disagrees with its count") {
  token_case(llmc(20240520, 1, 5, {1, 2, 3}, 2), {"header[2] count = 5", "needs a file of 1034 bytes", "1030 bytes"});
}

TEST_CASE("badinput: token file with a uint32 token beyond int32") {
  token_case<ValueError>(llmc(20240801, 7, 2, {1, 0x80000000u}, 4), {"token [1] = 2147483648 does not fit token_t"});
}

TEST_CASE("badinput: byte file that is a FIFO does not block") {
  TempDir dir;
  const std::string path = dir.file("corpus.txt");
  REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
  expect_error<IOError>(dir.path(), {"byte file '" + path + "'", {"is a FIFO (named pipe)"}},
                        [&] { (void)data::read_byte_tokens(path); });
}

TEST_CASE("badinput: byte file that is /dev/zero") {
  TempDir dir;
  const std::string path = dir.file("corpus.txt");
  fs::create_symlink("/dev/zero", path);
  expect_error<IOError>(dir.path(), {"byte file '" + path + "'", {"is a character device"}},
                        [&] { (void)data::read_byte_tokens(path); });
}

TEST_CASE("badinput: byte file that is empty") {
  TempDir dir;
  const std::string path = dir.file("corpus.txt");
  write_file(path, "");
  expect_error<IOError>(dir.path(), {"byte file '" + path + "'", {"the file is empty"}},
                        [&] { (void)data::read_byte_tokens(path); });
}
