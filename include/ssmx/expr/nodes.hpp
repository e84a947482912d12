// ssmx — expression nodes. A node only describes a computation: it stores its operands
// (terminals as views, sub-expressions by value) and knows its shape. Evaluators
// (evaluator.hpp) compute. Shapes broadcast as in NumPy: extents are right-aligned and a
// size-1 extent stretches. Rank is at most 4.
// Private header: include <ssmx/expr/expr.hpp>.
//
// Concept Expression (C++17 comment-concept):
//   typename E::value_type      float or double (what coefficients compute in)
//   E::space                    Space::Host or Space::Cuda (Constant: any_space)
//   Dims E::dims() const        the shape
#pragma once

#include <type_traits>
#include <utility>

#include "../core/tensor.hpp"
#include "functors.hpp"

namespace ssmx {

// Base of every expression node (CRTP; ExprTag lives in core/tensor.hpp). Gives `is_expression_v`.
template <class Derived>
struct ExprBase : ExprTag {
  const Derived& derived() const { return static_cast<const Derived&>(*this); }
};
template <class E>
inline constexpr bool is_expression_v = std::is_base_of_v<ExprTag, std::decay_t<E>>;

namespace expr {

// A scalar constant's space: it combines with either.
inline constexpr int any_space = -1;

template <class A, class B>
constexpr Space common_space() {
  constexpr int sa = int(A::space_id), sb = int(B::space_id);
  static_assert(sa == any_space || sb == any_space || sa == sb,
                "ssmx: an expression mixes Host and Cuda tensors; copy one side to the other space first");
  return Space(sa == any_space ? sb : sa);
}

// NumPy broadcasting of two shapes; throws ShapeError naming the operation.
inline Dims broadcast_dims(const Dims& a, const Dims& b, const char* what) {
  Dims out;
  out.rank = a.rank > b.rank ? a.rank : b.rank;
  for (int i = 0; i < out.rank; ++i) {
    int ia = a.rank - out.rank + i, ib = b.rank - out.rank + i;
    index_t ea = ia >= 0 ? a[ia] : 1, eb = ib >= 0 ? b[ib] : 1;
    SSMX_REQUIRE(ea == eb || ea == 1 || eb == 1, ShapeError, what, ": shapes ", a.str(), " and ", b.str(),
                 " do not broadcast (dimension ", i, ": ", ea, " vs ", eb, ")");
    out[i] = ea == 1 ? eb : ea;
  }
  return out;
}

// ---- terminals -------------------------------------------------------------------------

// A tensor view as a leaf. Stored elements may be bf16/half; they compute as float.
template <class Stored, Space S>
struct Leaf : ExprBase<Leaf<Stored, S>> {
  using stored_type = std::remove_const_t<Stored>;
  using value_type = compute_t<stored_type>;
  static constexpr Space space = S;
  static constexpr int space_id = int(S);
  TensorView<const stored_type, S> view;
  explicit Leaf(TensorView<const stored_type, S> v) : view(v) {}
  Dims dims() const { return view.dims(); }
};

// A scalar, broadcast to any shape.
template <class T>
struct Constant : ExprBase<Constant<T>> {
  using value_type = T;
  static constexpr int space_id = any_space;
  T value;
  explicit Constant(T v) : value(v) {}
  Dims dims() const { return Dims{}; }
};

// ---- elementwise -----------------------------------------------------------------------

template <class Op, class E>
struct Unary : ExprBase<Unary<Op, E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  explicit Unary(E e) : child(std::move(e)) {}
  Dims dims() const { return child.dims(); }
};

template <class Op, class L, class R>
struct Binary : ExprBase<Binary<Op, L, R>> {
  static_assert(std::is_same_v<typename L::value_type, typename R::value_type>,
                "ssmx: both operands of an elementwise operation must have the same value type (float or double)");
  using value_type = typename L::value_type;
  static constexpr int space_id = int(common_space<L, R>());
  L lhs;
  R rhs;
  Dims shape;
  Binary(L l, R r) : lhs(std::move(l)), rhs(std::move(r)), shape(broadcast_dims(lhs.dims(), rhs.dims(), Op::name)) {}
  Dims dims() const { return shape; }
};

// ---- shape changes ---------------------------------------------------------------------

// Inserts a size-1 dimension at `axis` (0 <= axis <= rank).
template <class E>
struct Unsqueeze : ExprBase<Unsqueeze<E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  int axis;
  Unsqueeze(E e, int ax) : child(std::move(e)), axis(ax) {
    Dims d = child.dims();
    SSMX_REQUIRE(d.rank < max_rank, ShapeError, "unsqueeze: rank ", d.rank, " tensor ", d.str(),
                 " cannot gain a dimension (maximum rank ", max_rank, ")");
    SSMX_REQUIRE(ax >= 0 && ax <= d.rank, ShapeError, "unsqueeze: axis ", ax, " is out of range for shape ", d.str());
  }
  Dims dims() const {
    Dims d = child.dims(), o;
    o.rank = d.rank + 1;
    for (int i = 0, k = 0; i < o.rank; ++i) o[i] = (i == axis) ? 1 : d[k++];
    return o;
  }
};

// Swaps the last two dimensions (rank >= 2).
template <class E>
struct Transpose : ExprBase<Transpose<E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  explicit Transpose(E e) : child(std::move(e)) {
    SSMX_REQUIRE(child.dims().rank >= 2, ShapeError, "transpose needs rank >= 2, got shape ", child.dims().str());
  }
  Dims dims() const {
    Dims d = child.dims();
    std::swap(d[d.rank - 1], d[d.rank - 2]);
    return d;
  }
};

// Stretches size-1 dimensions of `child` to `shape` (NumPy broadcast_to).
template <class E>
struct BroadcastTo : ExprBase<BroadcastTo<E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  Dims shape;
  BroadcastTo(E e, const Dims& d) : child(std::move(e)), shape(d) {
    Dims b = broadcast_dims(child.dims(), d, "broadcast_to");
    SSMX_REQUIRE(b == d, ShapeError, "broadcast_to: shape ", child.dims().str(), " cannot be broadcast to ", d.str());
  }
  Dims dims() const { return shape; }
};

// The same elements, row-major, with other extents (NumPy reshape of a C-ordered array).
// Materialised: the child is evaluated into a contiguous buffer (a contiguous leaf is read
// in place) and viewed with the new extents.
template <class E>
struct Reshape : ExprBase<Reshape<E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  Dims shape;
  Reshape(E e, const Dims& d) : child(std::move(e)), shape(d) {
    SSMX_REQUIRE(d.numel() == child.dims().numel(), ShapeError, "reshape: cannot reshape ", child.dims().str(), " (",
                 child.dims().numel(), " elements) to ", d.str(), " (", d.numel(), " elements)");
  }
  Dims dims() const { return shape; }
};

// ---- reductions ------------------------------------------------------------------------

// Reduces one axis with Op (SumReduce, MeanReduce, MaxReduce); keepdim leaves it as size 1.
template <class Op, class E>
struct Reduce : ExprBase<Reduce<Op, E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  int axis;
  bool keepdim;
  Reduce(E e, int ax, bool keep) : child(std::move(e)), axis(ax), keepdim(keep) {
    Dims d = child.dims();
    if (axis < 0) axis += d.rank;
    SSMX_REQUIRE(axis >= 0 && axis < d.rank, ShapeError, Op::name, ": axis ", ax, " is out of range for shape ",
                 d.str());
  }
  Dims dims() const {
    Dims d = child.dims(), o;
    if (keepdim) {
      d[axis] = 1;
      return d;
    }
    o.rank = d.rank - 1;
    for (int i = 0, k = 0; i < d.rank; ++i)
      if (i != axis) o[k++] = d[i];
    return o;
  }
};

// Reduces every element to a rank-0 scalar (materialised by the backend's reduction).
template <class Op, class E>
struct ReduceAll : ExprBase<ReduceAll<Op, E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  explicit ReduceAll(E e) : child(std::move(e)) {}
  Dims dims() const { return Dims{}; }
};

// ---- materialised nodes ----------------------------------------------------------------

// Matrix product of rank-2 operands [M, K] x [K, N] (Eigen on the host, cuBLAS on the GPU).
template <class L, class R>
struct MatMul : ExprBase<MatMul<L, R>> {
  static_assert(std::is_same_v<typename L::value_type, typename R::value_type>,
                "ssmx: matmul operands must have the same value type");
  using value_type = typename L::value_type;
  static constexpr int space_id = int(common_space<L, R>());
  L lhs;
  R rhs;
  MatMul(L l, R r) : lhs(std::move(l)), rhs(std::move(r)) {
    Dims a = lhs.dims(), b = rhs.dims();
    SSMX_REQUIRE(a.rank == 2 && b.rank == 2, ShapeError, "matmul: operands must be rank 2, got ", a.str(), " and ",
                 b.str());
    SSMX_REQUIRE(a[1] == b[0], ShapeError, "matmul: inner extents differ: ", a.str(), " x ", b.str());
  }
  Dims dims() const { return Dims{lhs.dims()[0], rhs.dims()[1]}; }
};

struct SoftmaxKind {
  static constexpr const char* name = "softmax";
  static constexpr bool log = false;
};
struct LogSoftmaxKind {
  static constexpr const char* name = "log_softmax";
  static constexpr bool log = true;
};

// Softmax or log-softmax over the last axis.
template <class Kind, class E>
struct Softmax : ExprBase<Softmax<Kind, E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  explicit Softmax(E e) : child(std::move(e)) {
    SSMX_REQUIRE(child.dims().rank >= 1, ShapeError, Kind::name, " needs rank >= 1");
  }
  Dims dims() const { return child.dims(); }
};

// x ⊙ rsqrt(mean(x², last axis) + eps): RMS normalisation over the last axis without a
// weight (multiply by one outside). Materialised, so that x is evaluated once.
template <class E>
struct RmsNormalize : ExprBase<RmsNormalize<E>> {
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  E child;
  double eps;
  RmsNormalize(E e, double epsilon) : child(std::move(e)), eps(epsilon) {
    SSMX_REQUIRE(child.dims().rank >= 1, ShapeError, "rms_normalize needs rank >= 1");
    SSMX_REQUIRE(eps > 0 && eps < 1e300, ValueError, "rms_normalize: eps is ", eps, ", expected a finite number > 0");
  }
  Dims dims() const { return child.dims(); }
};

// Causal depthwise convolution over the token axis (the short convolution of Mamba-style
// blocks). x is [n + W - 1, C]: the W - 1 rows before the first output token (the halo)
// come first, so a caller can continue a sequence exactly. With tap j reaching W - 1 - j
// tokens back,
//   out[t, c] = bias[c] + Σ_j w[c, j] · x[t + j, c] · m[j, t]
// where the optional tap mask m ([W, n], entries 0 or 1) cuts taps that would cross a
// document start. weight is [C, W] or PyTorch's Conv1d layout [C, 1, W]; bias is [C] or
// absent (an empty view).
template <class E>
struct CausalConv1d : ExprBase<CausalConv1d<E>> {
  static_assert(E::space_id != any_space, "causal_conv1d: the input must be a tensor expression");
  using value_type = typename E::value_type;
  static constexpr int space_id = E::space_id;
  static constexpr Space space = Space(space_id);
  using V = value_type;
  E child;
  Leaf<V, space> weight;
  Leaf<V, space> bias;
  TensorView<const V, space> mask;
  index_t width;

  CausalConv1d(E x, TensorView<const V, space> w, TensorView<const V, space> b, TensorView<const V, space> m)
      : child(std::move(x)), weight(w), bias(b), mask(m), width(w.rank() >= 2 ? w.extent(w.rank() - 1) : 0) {
    const Dims xd = child.dims(), wd = w.dims();
    SSMX_REQUIRE(xd.rank == 2, ShapeError, "causal_conv1d: input must be [tokens + W - 1, channels], got ", xd.str());
    SSMX_REQUIRE((wd.rank == 2 || (wd.rank == 3 && wd[1] == 1)) && wd[0] == xd[1], ShapeError,
                 "causal_conv1d: weight must be [channels, W] or [channels, 1, W] with channels = ", xd[1], ", got ",
                 wd.str());
    SSMX_REQUIRE(width >= 1 && xd[0] >= width, ShapeError, "causal_conv1d: input ", xd.str(), " has fewer than W = ",
                 width, " rows (it must hold W - 1 halo rows before the first token)");
    SSMX_REQUIRE(!b.data() || b.dims() == Dims{xd[1]}, ShapeError, "causal_conv1d: bias must be [", xd[1], "], got ",
                 b.dims().str());
    SSMX_REQUIRE(!m.data() || m.dims() == (Dims{width, xd[0] - width + 1}), ShapeError,
                 "causal_conv1d: tap mask must be [W, tokens] = [", width, ", ", xd[0] - width + 1, "], got ",
                 m.dims().str());
  }
  Dims dims() const { return Dims{child.dims()[0] - width + 1, child.dims()[1]}; }
  bool has_bias() const { return bias.view.data() != nullptr; }
  bool has_mask() const { return mask.data() != nullptr; }
  // w[:, j] as a [C] view.
  TensorView<const V, space> tap(index_t j) const {
    const auto& v = weight.view;
    return TensorView<const V, space>(v.data() + j * v.stride(v.rank() - 1), Dims{v.extent(0)}, {v.stride(0), 0, 0, 0});
  }
  // m[j, :] as an [n, 1] view (broadcast over channels).
  TensorView<const V, space> tap_mask(index_t j) const {
    return TensorView<const V, space>(mask.data() + j * mask.stride(0), Dims{mask.extent(1), 1},
                                      {mask.stride(1), 0, 0, 0});
  }
};

// ---- turning operands into nodes -------------------------------------------------------

template <class X, class = void>
struct to_expr;
template <class E>
struct to_expr<E, std::enable_if_t<is_expression_v<E>>> {
  using type = E;
  static const E& make(const E& e) { return e; }
};
template <class T, Space S>
struct to_expr<Tensor<T, S>> {
  using type = Leaf<T, S>;
  static type make(const Tensor<T, S>& t) { return type(t.view()); }
};
template <class T, Space S>
struct to_expr<TensorView<T, S>> {
  using type = Leaf<std::remove_const_t<T>, S>;
  static type make(const TensorView<T, S>& v) { return type(TensorView<const std::remove_const_t<T>, S>(v)); }
};
template <class X>
using expr_t = typename to_expr<std::decay_t<X>>::type;
template <class X>
decltype(auto) as_expr(const X& x) {
  return to_expr<std::decay_t<X>>::make(x);
}

template <class X, class = void>
inline constexpr bool is_operand_v = false;
template <class X>
inline constexpr bool is_operand_v<X, std::void_t<typename to_expr<std::decay_t<X>>::type>> = true;

}  // namespace expr

// ---- the user-facing vocabulary ---------------------------------------------------------

template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto leaf(const X& x) {
  return expr::as_expr(x);
}

#define SSMX_DEFINE_UNARY(fname, Op)                                  \
  template <class X, class = std::enable_if_t<expr::is_operand_v<X>>> \
  auto fname(const X& x) {                                            \
    return expr::Unary<op::Op, expr::expr_t<X>>(expr::as_expr(x));   \
  }
SSMX_DEFINE_UNARY(exp, Exp)
SSMX_DEFINE_UNARY(log, Log)
SSMX_DEFINE_UNARY(softplus, Softplus)
SSMX_DEFINE_UNARY(sigmoid, Sigmoid)
SSMX_DEFINE_UNARY(silu, Silu)
SSMX_DEFINE_UNARY(tanh, Tanh)
SSMX_DEFINE_UNARY(sqrt, Sqrt)
SSMX_DEFINE_UNARY(rsqrt, Rsqrt)
SSMX_DEFINE_UNARY(square, Square)
#undef SSMX_DEFINE_UNARY

template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto operator-(const X& x) {
  return expr::Unary<op::Neg, expr::expr_t<X>>(expr::as_expr(x));
}

namespace expr {
// Operand pairs for binary operators: two operands (expressions, tensors, views), or an
// operand and a scalar. ADL confines these operators to ssmx's own types.
template <class A, class B>
inline constexpr bool binary_operands_v = is_operand_v<A> && is_operand_v<B>;

template <class Op, class A, class B>
auto make_binary(const A& a, const B& b) {
  if constexpr (std::is_arithmetic_v<B>) {
    using V = typename expr_t<A>::value_type;
    return Binary<Op, expr_t<A>, Constant<V>>(as_expr(a), Constant<V>(V(b)));
  } else if constexpr (std::is_arithmetic_v<A>) {
    using V = typename expr_t<B>::value_type;
    return Binary<Op, Constant<V>, expr_t<B>>(Constant<V>(V(a)), as_expr(b));
  } else {
    return Binary<Op, expr_t<A>, expr_t<B>>(as_expr(a), as_expr(b));
  }
}
template <class A, class B>
inline constexpr bool scalar_operands_v = (is_operand_v<A> && std::is_arithmetic_v<B>) ||
                                          (std::is_arithmetic_v<A> && is_operand_v<B>);
}  // namespace expr

#define SSMX_DEFINE_BINARY(sym, Op)                                                                            \
  template <class A, class B,                                                                                \
            class = std::enable_if_t<expr::binary_operands_v<A, B> || expr::scalar_operands_v<A, B>>>         \
  auto operator sym(const A& a, const B& b) {                                                                \
    return expr::make_binary<op::Op>(a, b);                                                                  \
  }
SSMX_DEFINE_BINARY(+, Add)
SSMX_DEFINE_BINARY(-, Sub)
SSMX_DEFINE_BINARY(*, Mul)
SSMX_DEFINE_BINARY(/, Div)
#undef SSMX_DEFINE_BINARY

// Named forms, which also accept two plain tensors.
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto add(const A& a, const B& b) {
  return expr::make_binary<op::Add>(a, b);
}
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto sub(const A& a, const B& b) {
  return expr::make_binary<op::Sub>(a, b);
}
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto mul(const A& a, const B& b) {
  return expr::make_binary<op::Mul>(a, b);
}
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto div(const A& a, const B& b) {
  return expr::make_binary<op::Div>(a, b);
}
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto maximum(const A& a, const B& b) {
  return expr::make_binary<op::Maximum>(a, b);
}

template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto unsqueeze(const X& x, int axis) {
  return expr::Unsqueeze<expr::expr_t<X>>(expr::as_expr(x), axis);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto transpose(const X& x) {
  return expr::Transpose<expr::expr_t<X>>(expr::as_expr(x));
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto broadcast_to(const X& x, const Dims& d) {
  return expr::BroadcastTo<expr::expr_t<X>>(expr::as_expr(x), d);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto reshape(const X& x, const Dims& d) {
  return expr::Reshape<expr::expr_t<X>>(expr::as_expr(x), d);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto sum(const X& x, int axis, bool keepdim = false) {
  return expr::Reduce<op::SumReduce, expr::expr_t<X>>(expr::as_expr(x), axis, keepdim);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto mean(const X& x, int axis, bool keepdim = false) {
  return expr::Reduce<op::MeanReduce, expr::expr_t<X>>(expr::as_expr(x), axis, keepdim);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto max(const X& x, int axis, bool keepdim = false) {
  return expr::Reduce<op::MaxReduce, expr::expr_t<X>>(expr::as_expr(x), axis, keepdim);
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto sum(const X& x) {
  return expr::ReduceAll<op::SumReduce, expr::expr_t<X>>(expr::as_expr(x));
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto mean(const X& x) {
  return expr::ReduceAll<op::MeanReduce, expr::expr_t<X>>(expr::as_expr(x));
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto max(const X& x) {
  return expr::ReduceAll<op::MaxReduce, expr::expr_t<X>>(expr::as_expr(x));
}
template <class A, class B, class = std::enable_if_t<expr::is_operand_v<A> && expr::is_operand_v<B>>>
auto matmul(const A& a, const B& b) {
  return expr::MatMul<expr::expr_t<A>, expr::expr_t<B>>(expr::as_expr(a), expr::as_expr(b));
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto softmax(const X& x) {
  return expr::Softmax<expr::SoftmaxKind, expr::expr_t<X>>(expr::as_expr(x));
}
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto log_softmax(const X& x) {
  return expr::Softmax<expr::LogSoftmaxKind, expr::expr_t<X>>(expr::as_expr(x));
}

// x ⊙ rsqrt(mean(x², last axis) + eps); see RmsNormalize.
template <class X, class = std::enable_if_t<expr::is_operand_v<X>>>
auto rms_normalize(const X& x, double eps) {
  return expr::RmsNormalize<expr::expr_t<X>>(expr::as_expr(x), eps);
}

// Causal depthwise convolution of x ([n + W - 1, C], halo rows first); see CausalConv1d.
template <class X, class V, Space S, class = std::enable_if_t<expr::is_operand_v<X>>>
auto causal_conv1d(const X& x, TensorView<const V, S> weight, TensorView<const V, S> bias = {},
                   TensorView<const V, S> tap_mask = {}) {
  return expr::CausalConv1d<expr::expr_t<X>>(expr::as_expr(x), weight, bias, tap_mask);
}

}  // namespace ssmx
