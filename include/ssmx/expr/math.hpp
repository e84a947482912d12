// ssmx — scalar math used by the functors, identical on host and device.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include <cmath>

#include "../config.hpp"

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
#endif

template <class T>
SSMX_HOST_DEVICE T max(T a, T b) {
  return a > b ? a : b;
}
template <class T>
SSMX_HOST_DEVICE T min(T a, T b) {
  return a < b ? a : b;
}
template <class T>
SSMX_HOST_DEVICE T sigmoid(T x) {
  // Split by sign so exp never overflows.
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  T e = exp(x);
  return e / (T(1) + e);
}
template <class T>
SSMX_HOST_DEVICE T softplus(T x) {
  return max(x, T(0)) + log1p(exp(-abs(x)));  // log(1 + e^x) without overflow
}

}  // namespace ssmx::math
