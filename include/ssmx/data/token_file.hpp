// ssmx — flat binary token files in the llm.c format, and byte-level tokens.
//
// Layout, as karpathy/llm.c writes it (dev/data/data_common.py, write_datafile) and reads it
// (llmc/dataloader.h, dataloader_load_shard_):
//
//   header  256 int32 = 1024 bytes
//     [0]   magic     20240520 "gpt-2":   tokens are uint16, version [1] must be 1
//                     20240801 "llama-3": tokens are uint32, version [1] must be 7
//     [1]   version
//     [2]   count     number of tokens after the header (> 0; int32, so < 2^31)
//     [3..] zero
//   body    count tokens of 2 or 4 bytes;  file size == 1024 + count * width exactly.
//
// Every value is little-endian (numpy's native order on the machines llm.c targets); bytes
// are decoded explicitly, so a big-endian host reads the same tokens. Magic 20240522 is
// llm.c's multiple-choice eval file (HellaSwag/MMLU), a different format; it is rejected.
//
//   data::TokenFile f("fineweb_train_000001.bin");   // validates the header and the size
//   std::vector<data::token_t> part(4096);
//   f.read(1 << 20, 4096, part.data());              // tokens [2^20, 2^20 + 4096)
//   data::check_tokens_below(f, 50257);               // streams the file
//
// Tokens are token_t = int32 (nn::token_t): a uint32 file holding a token >= 2^31 is
// rejected when that token is read.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#if defined(_WIN32)
#include <io.h>        // _commit, _fileno
#include <process.h>   // _getpid
#include <sys/stat.h>  // stat: refuse directories before opening them
#else
#include <fcntl.h>   // open (directory fsync)
#include <unistd.h>  // fsync, getpid

#include "../io/file.hpp"  // regular files only, opened without blocking; pread
#endif

#include "../config.hpp"
#include "../core/error.hpp"

namespace ssmx::data {

using token_t = std::int32_t;  // the same type as nn::token_t

namespace token_file_format {
inline constexpr index_t header_ints = 256;
inline constexpr index_t header_bytes = header_ints * 4;
inline constexpr std::int32_t magic_u16 = 20240520;  // "gpt-2"
inline constexpr std::int32_t version_u16 = 1;
inline constexpr std::int32_t magic_u32 = 20240801;  // "llama-3"
inline constexpr std::int32_t version_u32 = 7;
inline constexpr std::int32_t magic_eval = 20240522;  // llm.c eval file: not a token file
inline constexpr index_t max_count = 2147483647;      // the count field is an int32
}  // namespace token_file_format

struct TokenFileInfo {
  std::string path;
  int width = 0;      // bytes per token: 2 (uint16) or 4 (uint32)
  index_t count = 0;  // tokens after the header
};

namespace detail {

inline std::string errno_text(int err) { return err ? std::strerror(err) : "unknown error"; }

inline std::uint32_t load_le32(const unsigned char* p) {
  return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}
inline void store_le32(unsigned char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

// A file opened for reading by offset. POSIX: only a regular file is opened, never in a
// way that blocks (a FIFO, a device or a directory in its place is refused first), and
// read with pread. IOError "<what> '<path>': ..." when it cannot be opened.
class ReadOnlyFile {
 public:
  void open(const std::string& path, const char* what) {
#if defined(_WIN32)
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0)  // a directory opens, then reports a bogus size
      SSMX_REQUIRE(!(st.st_mode & S_IFDIR), IOError, what, " '", path, "': is a directory, not a regular file");
    errno = 0;
    in_ = std::ifstream(path, std::ios::binary);
    SSMX_REQUIRE(in_.is_open(), IOError, what, " '", path, "': cannot open for reading: ", errno_text(errno));
    in_.seekg(0, std::ios::end);
    const std::streamoff end = in_.tellg();
    SSMX_REQUIRE(end >= 0 && in_.good(), IOError, what, " '", path, "': cannot determine the file size");
    size_ = index_t(end);
#else
    std::string why;
    std::uint64_t size = 0;
    fd_ = ::ssmx::io::detail::try_open_regular(path, size, why);
    SSMX_REQUIRE(fd_, IOError, what, " '", path, "': ", why);
    SSMX_REQUIRE(size <= std::uint64_t(INT64_MAX), IOError, what, " '", path, "': the file is too large");
    size_ = index_t(size);
#endif
  }
  bool is_open() const {
#if defined(_WIN32)
    return in_.is_open();
#else
    return bool(fd_);
#endif
  }
  index_t size() const { return size_; }
  // Reads bytes [offset, offset + n); false with `why` set when they cannot all be read.
  bool read(index_t offset, void* buf, index_t n, std::string& why) {
#if defined(_WIN32)
    in_.clear();
    in_.seekg(std::streamoff(offset), std::ios::beg);
    in_.read(static_cast<char*>(buf), std::streamsize(n));
    if (in_.gcount() == std::streamsize(n)) return true;
    why = "read failed (was the file truncated?)";
    return false;
#else
    return ::ssmx::io::detail::try_pread_all(fd_.get(), buf, std::uint64_t(n), std::uint64_t(offset), why);
#endif
  }

 private:
  index_t size_ = 0;
#if defined(_WIN32)
  std::ifstream in_;
#else
  ::ssmx::io::detail::FileDescriptor fd_;
#endif
};

inline const char* width_name(int width) { return width == 2 ? "uint16" : "uint32"; }

inline TokenFileInfo read_token_file_header(ReadOnlyFile& file, const std::string& path) {
  namespace fmt = token_file_format;
  const index_t size = file.size();
  SSMX_REQUIRE(size >= fmt::header_bytes, IOError, "token file '", path, "': header: the file has ", size,
               " bytes, shorter than the ", fmt::header_bytes, "-byte header (256 int32)");
  unsigned char raw[fmt::header_bytes];
  std::string why;
  SSMX_REQUIRE(file.read(0, raw, fmt::header_bytes, why), IOError, "token file '", path, "': header: ", why);
  const auto field = [&](int i) { return static_cast<std::int32_t>(load_le32(raw + 4 * i)); };

  const std::int32_t magic = field(0), version = field(1), count = field(2);
  TokenFileInfo info;
  info.path = path;
  if (magic == fmt::magic_u16) {
    info.width = 2;
    SSMX_REQUIRE(version == fmt::version_u16, IOError, "token file '", path, "': header[1] version = ", version,
                 " is not supported: expected ", fmt::version_u16, " for magic ", fmt::magic_u16, " (gpt-2, uint16 tokens)");
  } else if (magic == fmt::magic_u32) {
    info.width = 4;
    SSMX_REQUIRE(version == fmt::version_u32, IOError, "token file '", path, "': header[1] version = ", version,
                 " is not supported: expected ", fmt::version_u32, " for magic ", fmt::magic_u32,
                 " (llama-3, uint32 tokens)");
  } else {
    SSMX_REQUIRE(false, IOError, "token file '", path, "': header[0] magic = ", magic, ", expected ", fmt::magic_u16,
                 " (gpt-2, uint16 tokens) or ", fmt::magic_u32, " (llama-3, uint32 tokens)",
                 magic == fmt::magic_eval ? "; this is an llm.c eval file (HellaSwag/MMLU), not a token file" : "");
  }
  SSMX_REQUIRE(count > 0, IOError, "token file '", path, "': header[2] count = ", count,
               ": the file must hold at least one token");
  const index_t expected = fmt::header_bytes + index_t(count) * info.width;
  SSMX_REQUIRE(size == expected, IOError, "token file '", path, "': header[2] count = ", count, " ",
               width_name(info.width), " tokens needs a file of ", expected, " bytes, but it has ", size, " bytes");
  info.count = count;
  return info;
}

}  // namespace detail

// Reads and validates the header of an llm.c token file: magic, version, count > 0, and the
// file size against the count. Throws IOError naming the file and the field.
inline TokenFileInfo read_token_file_header(const std::string& path) {
  detail::ReadOnlyFile file;
  file.open(path, "token file");
  return detail::read_token_file_header(file, path);
}

// An open llm.c token file that reads any range of tokens, so a large file need not fit in
// memory. One TokenFile per thread.
class TokenFile {
 public:
  TokenFile() = default;
  explicit TokenFile(const std::string& path) { open(path); }

  void open(const std::string& path) {
    detail::ReadOnlyFile file;
    file.open(path, "token file");
    TokenFileInfo info = detail::read_token_file_header(file, path);
    file_ = std::move(file);
    info_ = std::move(info);
  }
  bool is_open() const { return file_.is_open(); }
  const TokenFileInfo& info() const { return info_; }
  const std::string& path() const { return info_.path; }
  int width() const { return info_.width; }
  index_t size() const { return info_.count; }

  // Reads tokens [begin, begin + n) into out[0, n).
  void read(index_t begin, index_t n, token_t* out) {
    SSMX_REQUIRE(is_open(), IOError, "TokenFile::read: no file is open");
    SSMX_REQUIRE(begin >= 0 && n >= 0 && begin <= size() - n, ValueError, "token file '", path(), "': range [", begin,
                 ", ", begin + n, ") is outside the file's ", size(), " tokens");
    const int w = width();
    constexpr index_t block = index_t(1) << 16;
    std::vector<unsigned char> buf(std::size_t(std::min(n, block) * w));
    std::string why;
    for (index_t done = 0; done < n;) {
      const index_t m = std::min(block, n - done);
      SSMX_REQUIRE(file_.read(token_file_format::header_bytes + (begin + done) * w, buf.data(), m * w, why), IOError,
                   "token file '", path(), "': reading tokens [", begin + done, ", ", begin + done + m, "): ", why);
      for (index_t i = 0; i < m; ++i) {
        const unsigned char* p = buf.data() + i * w;
        if (w == 2) {
          out[done + i] = token_t(std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8);
        } else {
          const std::uint32_t v = detail::load_le32(p);
          SSMX_REQUIRE(v <= 2147483647u, ValueError, "token file '", path(), "': token [", begin + done + i, "] = ", v,
                       " does not fit token_t (int32)");
          out[done + i] = token_t(v);
        }
      }
      done += m;
    }
  }
  std::vector<token_t> read_all() {
    std::vector<token_t> tokens(static_cast<std::size_t>(size()));
    read(0, size(), tokens.data());
    return tokens;
  }

 private:
  TokenFileInfo info_;
  detail::ReadOnlyFile file_;
};

// Every token of an llm.c token file.
inline std::vector<token_t> read_token_file(const std::string& path) { return TokenFile(path).read_all(); }

// Writes tokens as an llm.c token file with `width` 2 (uint16, gpt-2 magic) or 4 (uint32,
// llama-3 magic). Atomic: the data goes to path + ".tmp.<pid>.<n>", is fsynced, then renamed
// over `path`; on any failure the temporary file is removed and `path` is left as it was.
// (On Windows the rename fails when `path` exists, rather than replacing it.)
inline void write_token_file(const std::string& path, const token_t* tokens, index_t n, int width) {
  namespace fmt = token_file_format;
  SSMX_REQUIRE(width == 2 || width == 4, ValueError, "write_token_file '", path, "': width = ", width,
               " bytes per token, expected 2 (uint16) or 4 (uint32)");
  SSMX_REQUIRE(n > 0 && n <= fmt::max_count, ValueError, "write_token_file '", path, "': count = ", n,
               " tokens, expected 1 to ", fmt::max_count, " (the header's count is an int32; llm.c needs a token)");
  const std::int64_t limit = width == 2 ? 65535 : 2147483647;
  for (index_t i = 0; i < n; ++i)
    SSMX_REQUIRE(tokens[i] >= 0 && tokens[i] <= limit, ValueError, "write_token_file '", path, "': token [", i,
                 "] = ", tokens[i], " does not fit ", detail::width_name(width), " (range [0, ", limit, "])");

#if defined(_WIN32)
  const long pid = long(_getpid());
#else
  const long pid = long(getpid());
#endif
  static std::atomic<unsigned> counter{0};  // two threads writing one path get two temporaries
  const std::string tmp = path + ".tmp." + std::to_string(pid) + "." + std::to_string(counter++);

  // Removes the temporary file unless the rename happened.
  struct TempFile {
    const std::string& name;
    std::FILE* f = nullptr;
    bool committed = false;
    ~TempFile() {
      if (f) std::fclose(f);
      if (!committed) std::remove(name.c_str());
    }
  } temp{tmp};
  const auto fail = [&](const char* step, int err) {
    throw IOError(::ssmx::detail::str("write_token_file '", path, "': ", step, " of temporary file '", tmp,
                                      "' failed: ", detail::errno_text(err)));
  };

  errno = 0;
  temp.f = std::fopen(tmp.c_str(), "wb");
  if (!temp.f) fail("open", errno);

  unsigned char header[fmt::header_bytes] = {};
  detail::store_le32(header + 0, std::uint32_t(width == 2 ? fmt::magic_u16 : fmt::magic_u32));
  detail::store_le32(header + 4, std::uint32_t(width == 2 ? fmt::version_u16 : fmt::version_u32));
  detail::store_le32(header + 8, std::uint32_t(n));
  errno = 0;
  if (std::fwrite(header, 1, sizeof header, temp.f) != sizeof header) fail("write", errno);

  constexpr index_t block = index_t(1) << 16;
  std::vector<unsigned char> buf(std::size_t(std::min(n, block) * width));
  for (index_t done = 0; done < n;) {
    const index_t m = std::min(block, n - done);
    for (index_t i = 0; i < m; ++i) {
      const std::uint32_t v = std::uint32_t(tokens[done + i]);
      unsigned char* p = buf.data() + i * width;
      if (width == 2) {
        p[0] = static_cast<unsigned char>(v);
        p[1] = static_cast<unsigned char>(v >> 8);
      } else {
        detail::store_le32(p, v);
      }
    }
    errno = 0;
    if (std::fwrite(buf.data(), 1, std::size_t(m * width), temp.f) != std::size_t(m * width)) fail("write", errno);
    done += m;
  }

  errno = 0;
  if (std::fflush(temp.f) != 0) fail("flush", errno);
#if defined(_WIN32)
  if (_commit(_fileno(temp.f)) != 0) fail("fsync", errno);
#else
  if (fsync(fileno(temp.f)) != 0) fail("fsync", errno);
#endif
  std::FILE* f = temp.f;
  temp.f = nullptr;
  errno = 0;
  if (std::fclose(f) != 0) fail("close", errno);
  errno = 0;
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("rename onto the target", errno);
  temp.committed = true;

#if !defined(_WIN32)
  // Make the rename itself durable; best effort, the data is already safe under some name.
  const std::size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    (void)fsync(dfd);
    (void)::close(dfd);
  }
#endif
}
inline void write_token_file(const std::string& path, const std::vector<token_t>& tokens, int width) {
  write_token_file(path, tokens.data(), index_t(tokens.size()), width);
}

// Any file's bytes as tokens 0..255 (vocab 256), for byte-level language modelling.
inline std::vector<token_t> read_byte_tokens(const std::string& path) {
  detail::ReadOnlyFile file;
  file.open(path, "byte file");
  const index_t size = file.size();
  SSMX_REQUIRE(size > 0, IOError, "byte file '", path, "': the file is empty (0 bytes): no tokens");
  std::vector<unsigned char> bytes(static_cast<std::size_t>(size));
  std::string why;
  SSMX_REQUIRE(file.read(0, bytes.data(), size, why), IOError, "byte file '", path, "': ", why);
  return std::vector<token_t>(bytes.begin(), bytes.end());
}

// Document boundaries in a token stream where `separator` BEGINS each document, as llm.c's
// GPT-2 files do with <|endoftext|> = 50256: the stream  EOT a b EOT c  holds the documents
// [EOT a b] and [EOT c]. The separator stays the first token of its document, so a model
// learns to predict a document's first token from it. Tokens before the first separator
// (a shard cut mid-document) form a document of their own. Returns offsets o, o[0] = 0,
// o.back() = tokens.size(); document d is [o[d], o[d+1]), never empty.
inline std::vector<index_t> document_offsets(const token_t* tokens, index_t n, token_t separator) {
  std::vector<index_t> offsets{0};
  for (index_t i = 1; i < n; ++i)
    if (tokens[i] == separator) offsets.push_back(i);
  if (n > 0) offsets.push_back(n);
  return offsets;
}
inline std::vector<index_t> document_offsets(const std::vector<token_t>& tokens, token_t separator) {
  return document_offsets(tokens.data(), index_t(tokens.size()), separator);
}

// The documents themselves (copies); see document_offsets for the convention.
inline std::vector<std::vector<token_t>> split_documents(const std::vector<token_t>& tokens, token_t separator) {
  const std::vector<index_t> o = document_offsets(tokens, separator);
  std::vector<std::vector<token_t>> docs;
  docs.reserve(o.size() - 1);
  for (std::size_t d = 0; d + 1 < o.size(); ++d) docs.emplace_back(tokens.begin() + o[d], tokens.begin() + o[d + 1]);
  return docs;
}

// ValueError naming `what`, the index and the value of the first token outside [0, vocab).
inline void check_tokens_below(const token_t* tokens, index_t n, index_t vocab, const std::string& what,
                               index_t first_index = 0) {
  SSMX_REQUIRE(vocab > 0, ValueError, what, ": vocabulary size ", vocab, " must be positive");
  for (index_t i = 0; i < n; ++i)
    SSMX_REQUIRE(tokens[i] >= 0 && index_t(tokens[i]) < vocab, ValueError, what, ": token [", first_index + i,
                 "] = ", tokens[i], " is outside the vocabulary [0, ", vocab, ")");
}
inline void check_tokens_below(const std::vector<token_t>& tokens, index_t vocab, const std::string& what = "tokens") {
  check_tokens_below(tokens.data(), index_t(tokens.size()), vocab, what);
}
// Streams the whole file; the message names the file.
inline void check_tokens_below(TokenFile& file, index_t vocab) {
  constexpr index_t block = index_t(1) << 20;
  std::vector<token_t> buf(std::size_t(std::min(file.size(), block)));
  const std::string what = "token file '" + file.path() + "'";
  for (index_t begin = 0; begin < file.size(); begin += block) {
    const index_t m = std::min(block, file.size() - begin);
    file.read(begin, m, buf.data());
    check_tokens_below(buf.data(), m, vocab, what, begin);
  }
}

}  // namespace ssmx::data
