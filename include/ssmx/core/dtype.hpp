// ssmx — element types. float and double compute; bf16 and half are storage types
// (converted to float on load, rounded to nearest-even on store) used to halve the bytes
// of stored activations. They are plain 16-bit structs usable on the host and the device,
// bit-compatible with __nv_bfloat16 / __half.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../config.hpp"

namespace ssmx {

enum class DType : std::uint8_t { f32, f64, bf16, f16 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
  }
  return "?";
}

inline std::size_t dtype_size(DType d) { return (d == DType::f32) ? 4 : (d == DType::f64) ? 8 : 2; }

namespace detail {
SSMX_HOST_DEVICE std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
SSMX_HOST_DEVICE float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace detail

// bfloat16: the top 16 bits of an IEEE float.
struct bf16 {
  std::uint16_t bits = 0;
  bf16() = default;
  SSMX_HOST_DEVICE bf16(float f) : bits(round(f)) {}  // NOLINT: implicit like a float
  // From double: rounded to float first, then to bfloat16 (what storing a double stream does).
  SSMX_HOST_DEVICE explicit bf16(double d) : bits(round(static_cast<float>(d))) {}
  SSMX_HOST_DEVICE operator float() const { return detail::bits_float(std::uint32_t(bits) << 16); }

 private:
  SSMX_HOST_DEVICE static std::uint16_t round(float f) {
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return std::uint16_t(u >> 16);
  }
};

// IEEE binary16.
struct half {
  std::uint16_t bits = 0;
  half() = default;
  SSMX_HOST_DEVICE half(float f) : bits(from_float(f)) {}  // NOLINT
  SSMX_HOST_DEVICE explicit half(double d) : bits(from_float(static_cast<float>(d))) {}  // via float, as bf16
  SSMX_HOST_DEVICE operator float() const { return to_float(bits); }

 private:
  SSMX_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t x = detail::float_bits(f);
    std::uint32_t sign = (x >> 16) & 0x8000u;
    std::uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return std::uint16_t(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    if (absx >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // overflow to inf
    if (absx < 0x38800000u) {                                        // subnormal or zero
      if (absx < 0x33000000u) return std::uint16_t(sign);
      std::uint32_t mant = (absx & 0x007fffffu) | 0x00800000u;
      int shift = 113 - int(absx >> 23) + 13;
      std::uint32_t r = mant >> shift;
      std::uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
      if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
      return std::uint16_t(sign | r);
    }
    std::uint32_t r = ((absx >> 13) - (112u << 10));
    std::uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return std::uint16_t(sign | r);
  }
  SSMX_HOST_DEVICE static float to_float(std::uint16_t h) {
    std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return detail::bits_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
      if (m == 0) return detail::bits_float(sign);
      float v = float(m) * (1.0f / 16777216.0f);  // m * 2^-24
      return sign ? -v : v;
    }
    return detail::bits_float(sign | ((e + 112u) << 23) | (m << 13));
  }
};

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::f64;
};
template <>
struct dtype_of<bf16> {
  static constexpr DType value = DType::bf16;
};
template <>
struct dtype_of<half> {
  static constexpr DType value = DType::f16;
};
template <class T>
inline constexpr DType dtype_v = dtype_of<T>::value;

// The type arithmetic on a stored element is done in.
template <class T>
struct compute_type {
  using type = T;
};
template <>
struct compute_type<bf16> {
  using type = float;
};
template <>
struct compute_type<half> {
  using type = float;
};
template <class T>
using compute_t = typename compute_type<T>::type;

template <class T>
inline constexpr bool is_compute_type_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace ssmx
