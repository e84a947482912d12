// ssmx — SIMD registers on the host through Eigen's packet math: one Pack<T> is one
// register of float or double lanes of the ISA the translation unit is compiled for
// (8 floats with AVX2, 16 with AVX-512, 4 with SSE2; 1 without vectorisation). The
// transcendental functions are Eigen's (pexp, plog, generic_plog1p, generic_expm1), so
// no polynomial is written here. The functors of functors.hpp are written once for a
// scalar or a Pack: +, -, *, / and the math:: functions below take either.
// Host only: CUDA device code computes one coefficient per thread with scalars.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include "../core/eigen_core.hpp"
#include <limits>
#include <type_traits>

#include "../config.hpp"

// Eigen's packet types carry vector attributes that GCC reports when they appear as
// template arguments; the warning says nothing about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace ssmx::simd {

template <class T>
struct Pack {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ssmx::simd::Pack: float or double");
  using scalar = T;
  using Raw = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int size = Eigen::internal::unpacket_traits<Raw>::size;
  Raw v;

  Pack() = default;
  explicit Pack(Raw r) : v(r) {}
  // Every lane set to x (so that T(1), T(0.5) in a functor written for scalars work).
  template <class U, class = std::enable_if_t<std::is_arithmetic_v<U>>>
  explicit Pack(U x) : v(Eigen::internal::pset1<Raw>(T(x))) {}

  static Pack load(const T* p) { return Pack(Eigen::internal::ploadu<Raw>(p)); }
  void store(T* p) const { Eigen::internal::pstoreu(p, v); }
  // The first n lanes from p, the rest zero (n < size).
  static Pack load_partial(const T* p, int n) {
    alignas(64) T tmp[size] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return load(tmp);
  }
  void store_partial(T* p, int n) const {
    alignas(64) T tmp[size];
    store(tmp);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
  T sum() const { return Eigen::internal::predux(v); }  // lanes added in a fixed order
};

template <class T>
struct is_pack : std::false_type {};
template <class T>
struct is_pack<Pack<T>> : std::true_type {};
template <class T>
inline constexpr bool is_pack_v = is_pack<std::decay_t<T>>::value;

// Lanes of a Pack<T> for this build (1 where Eigen does not vectorise T).
template <class T>
inline constexpr int lanes = Pack<T>::size;

namespace ei = Eigen::internal;

template <class T> inline Pack<T> operator+(Pack<T> a, Pack<T> b) { return Pack<T>(ei::padd(a.v, b.v)); }
template <class T> inline Pack<T> operator-(Pack<T> a, Pack<T> b) { return Pack<T>(ei::psub(a.v, b.v)); }
template <class T> inline Pack<T> operator*(Pack<T> a, Pack<T> b) { return Pack<T>(ei::pmul(a.v, b.v)); }
template <class T> inline Pack<T> operator/(Pack<T> a, Pack<T> b) { return Pack<T>(ei::pdiv(a.v, b.v)); }
template <class T> inline Pack<T> operator-(Pack<T> a) { return Pack<T>(ei::pnegate(a.v)); }
template <class T> inline Pack<T>& operator+=(Pack<T>& a, Pack<T> b) { return a = a + b; }
// a * b + c in one rounding where the ISA has FMA.
template <class T> inline Pack<T> fma(Pack<T> a, Pack<T> b, Pack<T> c) { return Pack<T>(ei::pmadd(a.v, b.v, c.v)); }
template <class T> inline Pack<T> abs(Pack<T> a) { return Pack<T>(ei::pabs(a.v)); }
template <class T> inline Pack<T> log(Pack<T> a) { return Pack<T>(ei::plog(a.v)); }
template <class T> inline Pack<T> log1p(Pack<T> a) { return Pack<T>(ei::generic_plog1p(a.v)); }
template <class T> inline Pack<T> expm1(Pack<T> a) { return Pack<T>(ei::generic_expm1(a.v)); }
template <class T> inline Pack<T> sqrt(Pack<T> a) { return Pack<T>(ei::psqrt(a.v)); }

// Lane masks: all bits set where the comparison holds.
template <class T> inline Pack<T> ge(Pack<T> a, Pack<T> b) { return Pack<T>(ei::pcmp_le(b.v, a.v)); }
template <class T> inline Pack<T> eq(Pack<T> a, Pack<T> b) { return Pack<T>(ei::pcmp_eq(a.v, b.v)); }
// mask ? a : b, lane by lane.
template <class T> inline Pack<T> select(Pack<T> mask, Pack<T> a, Pack<T> b) {
  return Pack<T>(ei::pselect(mask.v, a.v, b.v));
}

template <class T> inline Pack<T> lt(Pack<T> a, Pack<T> b) { return Pack<T>(ei::pcmp_lt(a.v, b.v)); }

// Eigen clamps the argument of exp to the normal range; outside it the result is what the
// true exp gives in T: 0 below (the denormal range is not resolved), +inf above. A NaN
// stays NaN.
template <class T> inline Pack<T> exp(Pack<T> a) {
  constexpr bool f = std::is_same_v<T, float>;
  constexpr T lowest = f ? T(-87.3365447) : T(-708.3964185322641);
  constexpr T highest = f ? T(88.7228394) : T(709.782712893384);
  const Pack<T> e(ei::pexp(a.v));
  return select(lt(a, Pack<T>(lowest)), Pack<T>(0),
                select(lt(Pack<T>(highest), a), Pack<T>(std::numeric_limits<T>::infinity()), e));
}

}  // namespace ssmx::simd

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
