// ssmx — elementwise functors. Each carries its value and its vector-Jacobian product,
// with the derivative written beside the rule. The same functor runs on the CPU and in
// CUDA kernels (SSMX_HOST_DEVICE), so both backends share one source of truth.
//
// Unary:  y = f(x);            vjp(x, y, g) = g * f'(x)   (may use the cached y)
// Binary: y = f(l, r);         vjp_l(l, r, y, g) = g * df/dl,  vjp_r(...) = g * df/dr
// T is a scalar or, on the host, a SIMD register (simd::Pack): the fused scan evaluates
// the same functors a register at a time, so there is one rule per operation.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include "math.hpp"

namespace ssmx::op {

struct Neg {
  static constexpr const char* name = "neg";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return -x; }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T, T g) const { return -g; }  // (-x)' = -1
};
struct Exp {
  static constexpr const char* name = "exp";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::exp(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T y, T g) const { return g * y; }  // (e^x)' = e^x
};
struct Log {
  static constexpr const char* name = "log";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::log(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T x, T, T g) const { return g / x; }  // (log x)' = 1/x
};
struct Softplus {
  static constexpr const char* name = "softplus";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::softplus(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T x, T, T g) const { return g * math::sigmoid(x); }  // softplus' = σ
};
struct Sigmoid {
  static constexpr const char* name = "sigmoid";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::sigmoid(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T y, T g) const { return g * y * (T(1) - y); }  // σ' = σ(1-σ)
};
struct Silu {
  static constexpr const char* name = "silu";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return x * math::sigmoid(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T x, T, T g) const {
    T s = math::sigmoid(x);
    return g * s * (T(1) + x * (T(1) - s));  // (xσ)' = σ + xσ(1-σ)
  }
};
struct Tanh {
  static constexpr const char* name = "tanh";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::tanh(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T y, T g) const { return g * (T(1) - y * y); }  // tanh' = 1 - tanh²
};
struct Sqrt {
  static constexpr const char* name = "sqrt";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::sqrt(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T y, T g) const { return g * T(0.5) / y; }  // (√x)' = 1/(2√x)
};
struct Rsqrt {
  static constexpr const char* name = "rsqrt";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return math::rsqrt(x); }
  template <class T> SSMX_HOST_DEVICE T vjp(T, T y, T g) const { return g * T(-0.5) * y * y * y; }  // (x^-½)' = -½x^-3/2
};
struct Square {
  static constexpr const char* name = "square";
  template <class T> SSMX_HOST_DEVICE T operator()(T x) const { return x * x; }
  template <class T> SSMX_HOST_DEVICE T vjp(T x, T, T g) const { return g * T(2) * x; }  // (x²)' = 2x
};

struct Add {
  static constexpr const char* name = "add";
  template <class T> SSMX_HOST_DEVICE T operator()(T l, T r) const { return l + r; }
  template <class T> SSMX_HOST_DEVICE T vjp_l(T, T, T, T g) const { return g; }  // (l + r)'l = 1
  template <class T> SSMX_HOST_DEVICE T vjp_r(T, T, T, T g) const { return g; }  // (l + r)'r = 1
};
struct Sub {
  static constexpr const char* name = "sub";
  template <class T> SSMX_HOST_DEVICE T operator()(T l, T r) const { return l - r; }
  template <class T> SSMX_HOST_DEVICE T vjp_l(T, T, T, T g) const { return g; }   // (l - r)'l = 1
  template <class T> SSMX_HOST_DEVICE T vjp_r(T, T, T, T g) const { return -g; }  // (l - r)'r = -1
};
struct Mul {
  static constexpr const char* name = "mul";
  template <class T> SSMX_HOST_DEVICE T operator()(T l, T r) const { return l * r; }
  template <class T> SSMX_HOST_DEVICE T vjp_l(T, T r, T, T g) const { return g * r; }  // (l r)'l = r
  template <class T> SSMX_HOST_DEVICE T vjp_r(T l, T, T, T g) const { return g * l; }  // (l r)'r = l
};
struct Div {
  static constexpr const char* name = "div";
  template <class T> SSMX_HOST_DEVICE T operator()(T l, T r) const { return l / r; }
  template <class T> SSMX_HOST_DEVICE T vjp_l(T, T r, T, T g) const { return g / r; }       // (l/r)'l = 1/r
  template <class T> SSMX_HOST_DEVICE T vjp_r(T, T r, T y, T g) const { return -g * y / r; }  // (l/r)'r = -l/r²
};
struct Maximum {
  static constexpr const char* name = "maximum";
  template <class T> SSMX_HOST_DEVICE T operator()(T l, T r) const { return math::select(math::ge(l, r), l, r); }
  template <class T> SSMX_HOST_DEVICE T vjp_l(T l, T r, T, T g) const {  // 1 where l wins
    return math::select(math::ge(l, r), g, T(0));
  }
  template <class T> SSMX_HOST_DEVICE T vjp_r(T l, T r, T, T g) const { return math::select(math::ge(l, r), T(0), g); }
};

// Reductions: identity, combine, and the VJP of one input element given the reduced value.
struct SumReduce {
  static constexpr const char* name = "sum";
  template <class T> SSMX_HOST_DEVICE static T init() { return T(0); }
  template <class T> SSMX_HOST_DEVICE static T combine(T a, T b) { return a + b; }
  template <class T> SSMX_HOST_DEVICE static T finish(T acc, index_t) { return acc; }
  template <class T> SSMX_HOST_DEVICE static T vjp(T, T, T g, index_t) { return g; }  // (Σx)'xi = 1
};
struct MeanReduce {
  static constexpr const char* name = "mean";
  template <class T> SSMX_HOST_DEVICE static T init() { return T(0); }
  template <class T> SSMX_HOST_DEVICE static T combine(T a, T b) { return a + b; }
  template <class T> SSMX_HOST_DEVICE static T finish(T acc, index_t n) { return acc / T(n); }
  template <class T> SSMX_HOST_DEVICE static T vjp(T, T, T g, index_t n) { return g / T(n); }  // (Σx/n)'xi = 1/n
};
struct MaxReduce {
  static constexpr const char* name = "max";
  template <class T> SSMX_HOST_DEVICE static T init() { return -T(INFINITY); }
  template <class T> SSMX_HOST_DEVICE static T combine(T a, T b) { return math::select(math::ge(a, b), a, b); }
  template <class T> SSMX_HOST_DEVICE static T finish(T acc, index_t) { return acc; }
  template <class T> SSMX_HOST_DEVICE static T vjp(T x, T y, T g, index_t) {  // 1 at the max
    return math::select(math::eq(x, y), g, T(0));
  }
};

}  // namespace ssmx::op
