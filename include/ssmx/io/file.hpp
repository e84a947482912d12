// ssmx — files read and written safely (POSIX): a file is opened for reading only when it
// is a regular file, and never in a way that blocks (a FIFO or a device in its place is
// refused before the open, and the open itself is non-blocking); whole-file reads have a
// size bound; writes go through a temporary file renamed over the target (AtomicFile).
// Failures are IOErrors naming the file.
//
// Needs POSIX only (no nlohmann_json): data/token_file.hpp uses it as well.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "../core/error.hpp"

namespace ssmx::io {
namespace detail {

using ::ssmx::detail::str;

inline std::string errno_text(int err) { return err ? std::strerror(err) : "unknown error"; }

// Length of the well-formed UTF-8 sequence at s[i] (1 to 4), or 0 if there is none there:
// no overlong forms, no surrogates, nothing beyond U+10FFFF.
inline std::size_t utf8_sequence(const std::string& s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf)
    n = 2;
  else if (c >= 0xe0 && c <= 0xef)
    n = 3, lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
  else if (c >= 0xf0 && c <= 0xf4)
    n = 4, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
  else
    return 0;
  if (i + n > s.size() || b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if (b(i + k) < 0x80 || b(i + k) > 0xbf) return 0;
  return n;
}

// Untrusted bytes (a tensor name, a shard name, a file's content) made safe to print inside
// double quotes: control characters, quotes, backslashes and bytes that are not well-formed
// UTF-8 are escaped (\n, \", \xff, ...), and the text stops after about `max_bytes`.
inline std::string printable(const std::string& s, std::size_t max_bytes = 200) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  std::size_t i = 0;
  while (i < s.size()) {
    if (out.size() >= max_bytes) {
      out += str("... (", s.size(), " bytes)");
      break;
    }
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const std::size_t n = utf8_sequence(s, i);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (n == 0 || c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out.append(s, i, n);
      i += n;
      continue;
    }
    ++i;
  }
  return out;
}

// What a non-regular file is, for messages.
inline const char* file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "not a regular file";
}

// An owned POSIX file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  // Closes and reports close()'s error (0 if none): a write may only fail at close.
  int close() noexcept {
    if (fd_ < 0) return 0;
    const int rc = ::close(std::exchange(fd_, -1));
    return rc == 0 ? 0 : errno;
  }
  void reset() noexcept { (void)close(); }

 private:
  int fd_ = -1;
};

// Opens `path` read-only if it is a regular file (symbolic links followed). Never blocks:
// the type is checked before the open, which is non-blocking in case a FIFO took the file's
// place in between, and checked again on the open file. On failure returns an empty
// descriptor and sets `why` to what is wrong ("cannot open: ...", "is a FIFO (named pipe),
// not a regular file", "is a dangling symbolic link ...").
inline FileDescriptor try_open_regular(const std::string& path, std::uint64_t& size, std::string& why) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    struct stat lst {};
    if (err == ENOENT && ::lstat(path.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode))
      why = "is a dangling symbolic link (its target does not exist)";
    else if (err == ELOOP)
      why = "cannot open: a loop of symbolic links (" + errno_text(err) + ")";
    else
      why = "cannot open: " + errno_text(err);
    return {};
  }
  if (!S_ISREG(st.st_mode)) {
    why = str("is ", file_type_name(st.st_mode), ", not a regular file");
    return {};
  }
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) {
    why = "cannot open: " + errno_text(errno);
    return {};
  }
  if (::fstat(fd.get(), &st) != 0) {
    why = "cannot stat: " + errno_text(errno);
    return {};
  }
  if (!S_ISREG(st.st_mode)) {
    why = str("is ", file_type_name(st.st_mode), ", not a regular file");
    return {};
  }
  size = std::uint64_t(st.st_size);
  return fd;
}

// The same; IOError "<path>: <why>" on failure.
inline FileDescriptor open_regular(const std::string& path, std::uint64_t& size) {
  std::string why;
  FileDescriptor fd = try_open_regular(path, size, why);
  SSMX_REQUIRE(fd, IOError, path, ": ", why);
  return fd;
}

// Reads exactly n bytes at `offset`; false with `why` set otherwise (a read error, or the
// end of the file first).
inline bool try_pread_all(int fd, void* buf, std::uint64_t n, std::uint64_t offset, std::string& why) {
  auto* p = static_cast<unsigned char*>(buf);
  std::uint64_t done = 0;
  while (done < n) {
    const std::size_t want = std::size_t(std::min<std::uint64_t>(n - done, std::uint64_t(1) << 30));
    const ssize_t got = ::pread(fd, p + done, want, off_t(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      why = "read error: " + errno_text(errno);
      return false;
    }
    if (got == 0) {
      why = str("unexpected end of file (", n, " bytes at offset ", offset, ", the file ended after ", offset + done,
                "; was it truncated while being read?)");
      return false;
    }
    done += std::uint64_t(got);
  }
  return true;
}

// Reads exactly n bytes at `offset`; IOError naming the file and `what` otherwise.
inline void pread_all(int fd, void* buf, std::uint64_t n, std::uint64_t offset, const std::string& path,
                      const std::string& what) {
  std::string why;
  SSMX_REQUIRE(try_pread_all(fd, buf, n, offset, why), IOError, path, ": cannot read ", what, ": ", why);
}

}  // namespace detail

// The whole of a regular file of at most `max_bytes` bytes (a JSON file, a `latest` file).
// IOError naming the file when it is not a regular file, cannot be read, or is larger.
inline std::string read_file_bounded(const std::string& path, std::uint64_t max_bytes) {
  std::uint64_t size = 0;
  const detail::FileDescriptor fd = detail::open_regular(path, size);
  SSMX_REQUIRE(size <= max_bytes, IOError, path, ": the file is ", size, " bytes, more than the ", max_bytes,
               " bytes accepted for it");
  std::string text(std::size_t(size), '\0');
  detail::pread_all(fd.get(), text.data(), size, 0, path, "the file");
  return text;
}

// Writes a file so that `path` holds either its old content or the complete new one, never
// a mixture: the bytes go to "<path>.tmp.<pid>.<n>" in the same directory (created
// exclusively, so nothing already there is opened), which is fsynced and then renamed over
// `path` (atomic on POSIX). If commit() is not reached (an exception, or a failed commit),
// the temporary file is removed and `path` is untouched.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    static std::atomic<unsigned> counter{0};
    int err = 0;
    for (int attempt = 0; attempt < 100 && !fd_; ++attempt) {  // a stale temporary of a dead process: the next name
      tmp_ = path_ + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
      fd_ = detail::FileDescriptor(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
      err = errno;
      if (!fd_ && err != EEXIST) break;
    }
    SSMX_REQUIRE(fd_, IOError, path_, ": cannot create the temporary file ", tmp_, ": ", detail::errno_text(err));
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (!committed_) {
      fd_.reset();
      ::unlink(tmp_.c_str());
    }
  }

  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_.get(), p, std::min<std::size_t>(n, std::size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      SSMX_REQUIRE(w > 0, IOError, path_, ": cannot write the temporary file ", tmp_, ": ", detail::errno_text(errno));
      p += w;
      n -= std::size_t(w);
    }
  }

  // Makes the new content durable and visible under `path`.
  void commit() {
    SSMX_REQUIRE(::fsync(fd_.get()) == 0, IOError, path_, ": cannot flush the temporary file ", tmp_, ": ",
                 detail::errno_text(errno));
    const int close_err = fd_.close();
    SSMX_REQUIRE(close_err == 0, IOError, path_, ": cannot close the temporary file ", tmp_, ": ",
                 detail::errno_text(close_err));
    SSMX_REQUIRE(::rename(tmp_.c_str(), path_.c_str()) == 0, IOError, path_, ": cannot rename the temporary file ",
                 tmp_, " over it: ", detail::errno_text(errno));
    committed_ = true;
    // The rename itself is durable once the directory is synced; best effort (some file
    // systems refuse fsync on directories).
    const auto slash = path_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    detail::FileDescriptor d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (d) (void)::fsync(d.get());
  }

  const std::string& path() const noexcept { return path_; }
  const std::string& temp_path() const noexcept { return tmp_; }

 private:
  std::string path_, tmp_;
  detail::FileDescriptor fd_;
  bool committed_ = false;
};

// Replaces the file at `path` with `text`, atomically (see AtomicFile).
inline void write_file_atomically(const std::string& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

}  // namespace ssmx::io
