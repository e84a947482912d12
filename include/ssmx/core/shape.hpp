// ssmx — extents. `Dims` is the runtime shape of a tensor (rank <= 4, row-major);
// `Shape<E...>` fixes some extents at compile time and leaves `dynamic` ones to run time,
// as std::mdspan's extents do: Shape<dynamic, 256, 16> is [tokens, P, N] with P and N fixed.
#pragma once

#include <array>
#include <cstddef>
#include <initializer_list>
#include <ostream>
#include <string>

#include "../config.hpp"
#include "error.hpp"

namespace ssmx {

inline constexpr index_t dynamic = -1;
inline constexpr int max_rank = 4;

// A runtime shape: rank and extents, row-major.
struct Dims {
  int rank = 0;
  std::array<index_t, max_rank> extent{1, 1, 1, 1};

  Dims() = default;
  Dims(std::initializer_list<index_t> e) {
    SSMX_REQUIRE(e.size() <= std::size_t(max_rank), ShapeError, "rank ", e.size(), " exceeds the maximum rank ", max_rank);
    rank = int(e.size());
    int i = 0;
    for (index_t x : e) {
      SSMX_REQUIRE(x >= 0, ShapeError, "extent ", i, " is negative (", x, ")");
      extent[std::size_t(i++)] = x;
    }
  }
  index_t operator[](int i) const { return extent[std::size_t(i)]; }
  index_t& operator[](int i) { return extent[std::size_t(i)]; }
  index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank; ++i) n *= extent[std::size_t(i)];
    return n;
  }
  friend bool operator==(const Dims& a, const Dims& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }
  friend bool operator!=(const Dims& a, const Dims& b) { return !(a == b); }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(extent[std::size_t(i)]);
    return s + "]";
  }
  friend std::ostream& operator<<(std::ostream& os, const Dims& d) { return os << d.str(); }
};

// Row-major strides of a contiguous tensor with these dims.
inline std::array<index_t, max_rank> contiguous_strides(const Dims& d) {
  std::array<index_t, max_rank> s{0, 0, 0, 0};
  index_t acc = 1;
  for (int i = d.rank - 1; i >= 0; --i) {
    s[std::size_t(i)] = acc;
    acc *= d[i];
  }
  return s;
}

// Compile-time extents. Static ones are checked against runtime tensors by check().
template <index_t... E>
struct Shape {
  static constexpr int rank = int(sizeof...(E));
  static_assert(rank <= max_rank, "ssmx::Shape: at most 4 extents are supported");
  static_assert(((E == dynamic || E >= 0) && ...), "ssmx::Shape: an extent must be >= 0 or ssmx::dynamic");
  static constexpr std::array<index_t, sizeof...(E)> static_extents{E...};
  static constexpr int rank_dynamic = int(((E == dynamic ? 1 : 0) + ... + 0));

  std::array<index_t, std::size_t(rank_dynamic) + 1> dynamic_extents{};  // +1 keeps the array non-empty

  Shape() { static_assert(rank_dynamic == 0, "ssmx::Shape: give a value for every dynamic extent"); }
  template <class... I, class = std::enable_if_t<sizeof...(I) == std::size_t(rank_dynamic) && (sizeof...(I) > 0)>>
  explicit Shape(I... dyn) : dynamic_extents{index_t(dyn)...} {}

  static constexpr index_t static_extent(int i) { return static_extents[std::size_t(i)]; }

  Dims dims() const {
    Dims d;
    d.rank = rank;
    int k = 0;
    for (int i = 0; i < rank; ++i) {
      index_t e = static_extents[std::size_t(i)];
      d[i] = (e == dynamic) ? dynamic_extents[std::size_t(k++)] : e;
    }
    return d;
  }
  operator Dims() const { return dims(); }  // NOLINT: a Shape is a Dims with static facts

  // Throws ShapeError, naming `what`, unless `d` agrees with every static extent.
  static void check(const Dims& d, const char* what) {
    SSMX_REQUIRE(d.rank == rank, ShapeError, "tensor '", what, "' has rank ", d.rank, " ", d.str(), ", expected rank ",
                 rank);
    for (int i = 0; i < rank; ++i) {
      index_t e = static_extents[std::size_t(i)];
      SSMX_REQUIRE(e == dynamic || d[i] == e, ShapeError, "tensor '", what, "' has extent ", d[i], " in dimension ", i,
                   " (shape ", d.str(), "), expected ", e);
    }
  }
};

}  // namespace ssmx
