// ssmx fuzz targets — shared pieces. A target is one LLVMFuzzerTestOneInput(); built with
// libFuzzer (clang -fsanitize=fuzzer, tests/fuzz/run_fuzz.sh) it is fuzzed, built with
// replay_main.cpp (any compiler, ctest `fuzz/replay_*`) it runs over the seed corpus.
//
// The contract a target checks: whatever the bytes, the parser returns or throws an
// ssmx::Error; any other exception escapes the target and is reported as a crash, as are
// sanitizer findings, hangs (-timeout) and memory blow-ups (-rss_limit_mb).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ssmx_fuzz {

// A memory file whose content is replaced by each input, and its path (/proc/self/fd/N):
// the parsers open files by name, and this keeps every iteration off the disk.
class MemoryFile {
 public:
  explicit MemoryFile(const char* name) {
    fd_ = ::memfd_create(name, 0);
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  void set(const std::uint8_t* data, std::size_t size) {
    if (::ftruncate(fd_, 0) != 0) std::abort();
    std::size_t done = 0;
    while (done < size) {
      const ssize_t w = ::pwrite(fd_, data + done, size - done, off_t(done));
      if (w <= 0) std::abort();
      done += std::size_t(w);
    }
  }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace ssmx_fuzz
