// ssmx — the math the functors use, identical on host and device. On the host every
// function also takes a SIMD register (simd::Pack), so that a functor written once runs
// one coefficient at a time or one register at a time.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include <cmath>

#include "../config.hpp"
#include "simd.hpp"

namespace ssmx::math {

#if defined(__CUDA_ARCH__)
SSMX_HOST_DEVICE float exp(float x) { return ::expf(x); }
SSMX_HOST_DEVICE double exp(double x) { return ::exp(x); }
SSMX_HOST_DEVICE float log(float x) { return ::logf(x); }
SSMX_HOST_DEVICE double log(double x) { return ::log(x); }
SSMX_HOST_DEVICE float log1p(float x) { return ::log1pf(x); }
SSMX_HOST_DEVICE double log1p(double x) { return ::log1p(x); }
SSMX_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
SSMX_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
SSMX_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
SSMX_HOST_DEVICE double sqrt(double x) { return ::sqrt(x); }
SSMX_HOST_DEVICE float rsqrt(float x) { return ::rsqrtf(x); }
SSMX_HOST_DEVICE double rsqrt(double x) { return ::rsqrt(x); }
SSMX_HOST_DEVICE float abs(float x) { return ::fabsf(x); }
SSMX_HOST_DEVICE double abs(double x) { return ::fabs(x); }
SSMX_HOST_DEVICE float expm1(float x) { return ::expm1f(x); }
SSMX_HOST_DEVICE double expm1(double x) { return ::expm1(x); }
#else
template <class T>
inline T exp(T x) {
  return std::exp(x);
}
template <class T>
inline T log(T x) {
  return std::log(x);
}
template <class T>
inline T log1p(T x) {
  return std::log1p(x);
}
template <class T>
inline T tanh(T x) {
  return std::tanh(x);
}
template <class T>
inline T sqrt(T x) {
  return std::sqrt(x);
}
template <class T>
inline T rsqrt(T x) {
  return T(1) / std::sqrt(x);
}
template <class T>
inline T abs(T x) {
  return std::abs(x);
}
template <class T>
inline T expm1(T x) {
  return std::expm1(x);
}

// The same functions on a SIMD register (Eigen's packet math).
template <class T>
inline simd::Pack<T> exp(simd::Pack<T> x) {
  return simd::exp(x);
}
template <class T>
inline simd::Pack<T> log(simd::Pack<T> x) {
  return simd::log(x);
}
template <class T>
inline simd::Pack<T> log1p(simd::Pack<T> x) {
  return simd::log1p(x);
}
template <class T>
inline simd::Pack<T> expm1(simd::Pack<T> x) {
  return simd::expm1(x);
}
template <class T>
inline simd::Pack<T> sqrt(simd::Pack<T> x) {
  return simd::sqrt(x);
}
template <class T>
inline simd::Pack<T> rsqrt(simd::Pack<T> x) {
  return simd::Pack<T>(1) / simd::sqrt(x);
}
template <class T>
inline simd::Pack<T> abs(simd::Pack<T> x) {
  return simd::abs(x);
}
// tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|)) with the sign of x: accurate near 0, no overflow.
template <class T>
inline simd::Pack<T> tanh(simd::Pack<T> x) {
  const simd::Pack<T> e = simd::expm1(simd::Pack<T>(-2) * simd::abs(x));
  const simd::Pack<T> t = -e / (simd::Pack<T>(2) + e);
  return simd::select(simd::ge(x, simd::Pack<T>(0)), t, -t);
}
template <class T>
inline simd::Pack<T> select(simd::Pack<T> mask, simd::Pack<T> a, simd::Pack<T> b) {
  return simd::select(mask, a, b);
}
template <class T>
inline simd::Pack<T> ge(simd::Pack<T> a, simd::Pack<T> b) {
  return simd::ge(a, b);
}
template <class T>
inline simd::Pack<T> eq(simd::Pack<T> a, simd::Pack<T> b) {
  return simd::eq(a, b);
}
#endif

// Comparisons and choice, written once for a scalar (a bool) or a register (a lane mask).
template <class T>
SSMX_HOST_DEVICE bool ge(T a, T b) {
  return a >= b;
}
template <class T>
SSMX_HOST_DEVICE bool eq(T a, T b) {
  return a == b;
}
template <class T>
SSMX_HOST_DEVICE T select(bool m, T a, T b) {
  return m ? a : b;
}

template <class T>
SSMX_HOST_DEVICE T max(T a, T b) {
  return math::select(math::ge(b, a), b, a);  // b where b >= a, else a (a NaN a stays a)
}
template <class T>
SSMX_HOST_DEVICE T min(T a, T b) {
  return math::select(math::ge(a, b), b, a);
}
template <class T>
SSMX_HOST_DEVICE T sigmoid(T x) {
  // e = exp(-|x|) <= 1 never overflows: 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below.
  const T e = math::exp(-math::abs(x));
  const T r = T(1) / (T(1) + e);
  return math::select(math::ge(x, T(0)), r, e * r);
}
template <class T>
SSMX_HOST_DEVICE T softplus(T x) {
  return math::max(x, T(0)) + math::log1p(math::exp(-math::abs(x)));  // log(1 + e^x) without overflow
}

}  // namespace ssmx::math
