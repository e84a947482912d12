// ssmx — the exception hierarchy of the public API.
//
// Device internals work with status codes (cudaError_t) and convert to these at the
// edge; every message names the tensor or resource, what was expected and what was found.
#pragma once

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ssmx {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A tensor has the wrong rank or extents.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// An argument or a value in the data is out of range (token id >= vocab, NaN loss, ...).
class ValueError : public Error {
 public:
  using Error::Error;
};

// A device call failed, or the requested device/space is not available in this build.
class DeviceError : public Error {
 public:
  using Error::Error;
};

// An allocation failed; names the bytes requested and the memory space.
class OutOfMemoryError : public Error {
 public:
  OutOfMemoryError(std::size_t requested, std::string space, std::string detail = {})
      : Error(make_message(requested, space, detail)), requested_(requested), space_(std::move(space)) {}
  std::size_t requested_bytes() const noexcept { return requested_; }
  const std::string& space() const noexcept { return space_; }

 private:
  static std::string make_message(std::size_t requested, const std::string& space, const std::string& detail) {
    std::ostringstream os;
    os << "out of memory: could not allocate " << requested << " bytes in memory space " << space;
    if (!detail.empty()) os << " (" << detail << ")";
    return os.str();
  }
  std::size_t requested_;
  std::string space_;
};

// Reading or writing a file failed; names the file and the field.
class IOError : public Error {
 public:
  using Error::Error;
};

namespace detail {
// Concatenates streamable pieces into one message: str("tensor ", name, " has rank ", r).
template <class... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace ssmx

// Throws ErrorType with the streamed message when cond is false. For public-API checks.
#define SSMX_REQUIRE(cond, ErrorType, ...)                          \
  do {                                                              \
    if (!(cond)) throw ErrorType(::ssmx::detail::str(__VA_ARGS__)); \
  } while (0)
