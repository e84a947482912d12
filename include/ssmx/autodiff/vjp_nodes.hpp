// ssmx — the nodes that evaluate VJPs: elementwise maps of three or four operands with a
// (possibly stateful) functor. Private header: include <ssmx/autodiff/autodiff.hpp>.
#pragma once

#include "../expr/evaluator.hpp"

namespace ssmx::expr {

// f(a, b, c) elementwise; a, b, c broadcast to a common shape.
template <class F, class A, class B, class C>
struct Map3 : ExprBase<Map3<F, A, B, C>> {
  using value_type = typename A::value_type;
  static constexpr int space_id = int(common_space<A, B>());
  F f;
  A a;
  B b;
  C c;
  Dims shape;
  Map3(F fn, A x, B y, C z)
      : f(fn), a(std::move(x)), b(std::move(y)), c(std::move(z)),
        shape(broadcast_dims(broadcast_dims(a.dims(), b.dims(), "vjp"), c.dims(), "vjp")) {}
  Dims dims() const { return shape; }
};

// f(a, b, c, d) elementwise.
template <class F, class A, class B, class C, class D>
struct Map4 : ExprBase<Map4<F, A, B, C, D>> {
  using value_type = typename A::value_type;
  static constexpr int space_id = int(common_space<A, B>());
  F f;
  A a;
  B b;
  C c;
  D d;
  Dims shape;
  Map4(F fn, A w, B x, C y, D z)
      : f(fn), a(std::move(w)), b(std::move(x)), c(std::move(y)), d(std::move(z)),
        shape(broadcast_dims(broadcast_dims(a.dims(), b.dims(), "vjp"), broadcast_dims(c.dims(), d.dims(), "vjp"),
                             "vjp")) {}
  Dims dims() const { return shape; }
};

template <class F, class A, class B, class C, Space S>
struct Evaluator<Map3<F, A, B, C>, S> {
  F f;
  Evaluator<A, S> a;
  Evaluator<B, S> b;
  Evaluator<C, S> c;
  Evaluator(const Map3<F, A, B, C>& m, EvalContext<S>& ctx, const Ext4& v)
      : f(m.f), a(m.a, ctx, v), b(m.b, ctx, v), c(m.c, ctx, v) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return f(a.coeff(i), b.coeff(i), c.coeff(i)); }
  static constexpr bool linear_capable =
      has_linear<Evaluator<A, S>>::value && has_linear<Evaluator<B, S>>::value && has_linear<Evaluator<C, S>>::value;
  bool linear_ok(const Ext4& v) const {
    return expr::linear_ok(a, v) && expr::linear_ok(b, v) && expr::linear_ok(c, v);
  }
  SSMX_HOST_DEVICE auto coeff_linear(index_t i) const { return f(a.coeff_linear(i), b.coeff_linear(i), c.coeff_linear(i)); }
#if !defined(__CUDA_ARCH__)
  static constexpr bool packet_capable =
      has_packet<Evaluator<A, S>>::value && has_packet<Evaluator<B, S>>::value && has_packet<Evaluator<C, S>>::value;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4& i) const {
    return f(a.template packet<P>(i), b.template packet<P>(i), c.template packet<P>(i));
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t i) const {
    return f(a.template packet_linear<P>(i), b.template packet_linear<P>(i), c.template packet_linear<P>(i));
  }
#endif
};

template <class F, class A, class B, class C, class D, Space S>
struct Evaluator<Map4<F, A, B, C, D>, S> {
  F f;
  Evaluator<A, S> a;
  Evaluator<B, S> b;
  Evaluator<C, S> c;
  Evaluator<D, S> d;
  Evaluator(const Map4<F, A, B, C, D>& m, EvalContext<S>& ctx, const Ext4& v)
      : f(m.f), a(m.a, ctx, v), b(m.b, ctx, v), c(m.c, ctx, v), d(m.d, ctx, v) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return f(a.coeff(i), b.coeff(i), c.coeff(i), d.coeff(i)); }
  static constexpr bool linear_capable = has_linear<Evaluator<A, S>>::value && has_linear<Evaluator<B, S>>::value &&
                                         has_linear<Evaluator<C, S>>::value && has_linear<Evaluator<D, S>>::value;
  bool linear_ok(const Ext4& v) const {
    return expr::linear_ok(a, v) && expr::linear_ok(b, v) && expr::linear_ok(c, v) && expr::linear_ok(d, v);
  }
  SSMX_HOST_DEVICE auto coeff_linear(index_t i) const {
    return f(a.coeff_linear(i), b.coeff_linear(i), c.coeff_linear(i), d.coeff_linear(i));
  }
#if !defined(__CUDA_ARCH__)
  static constexpr bool packet_capable = has_packet<Evaluator<A, S>>::value && has_packet<Evaluator<B, S>>::value &&
                                         has_packet<Evaluator<C, S>>::value && has_packet<Evaluator<D, S>>::value;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4& i) const {
    return f(a.template packet<P>(i), b.template packet<P>(i), c.template packet<P>(i), d.template packet<P>(i));
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t i) const {
    return f(a.template packet_linear<P>(i), b.template packet_linear<P>(i), c.template packet_linear<P>(i),
             d.template packet_linear<P>(i));
  }
#endif
};

// Adapters from the functors' vjp members to plain callables.
template <class Op>
struct UnaryVjp {
  template <class T>
  SSMX_HOST_DEVICE T operator()(T x, T y, T g) const {
    return Op{}.vjp(x, y, g);
  }
};
template <class Op>
struct BinaryVjpL {
  template <class T>
  SSMX_HOST_DEVICE T operator()(T l, T r, T y, T g) const {
    return Op{}.vjp_l(l, r, y, g);
  }
};
template <class Op>
struct BinaryVjpR {
  template <class T>
  SSMX_HOST_DEVICE T operator()(T l, T r, T y, T g) const {
    return Op{}.vjp_r(l, r, y, g);
  }
};
template <class Op>
struct ReduceVjp {
  index_t n;
  template <class T>
  SSMX_HOST_DEVICE T operator()(T x, T y, T g) const {
    return Op::vjp(x, y, g, n);
  }
};

}  // namespace ssmx::expr
