// ssmx — reverse-mode automatic differentiation over expressions.
//
// A Tape<E> is built by evaluating an expression once, keeping the value of every inner
// node (leaves are read in place). backward() then walks the expression from the root
// with a cotangent, applying each functor's VJP, and accumulates dL/dleaf into the
// gradient tensors of the leaves named as targets. A layer author writes only forward
// expressions; no derivative is written by hand.
//
//   auto y = exp(-softplus(matmul(x, w) + b));
//   Tensor<double> gw = zeros<double>(w.dims()), gb = zeros<double>(b.dims());
//   backward(y, g, {wrt(w, gw), wrt(b, gb)});      // gw += dL/dw, gb += dL/db
//
// Leaves are identified by their data pointer and extents, so a tensor used twice in an
// expression receives both contributions. A leaf that is a slice of a contiguous target
// (one half of a fused weight, the token rows of a window) receives its gradient in the
// matching part of the target's gradient. Subtrees with no target leaf are skipped.
// Private header: include <ssmx/autodiff/autodiff.hpp>.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "vjp_nodes.hpp"

namespace ssmx {

// A leaf to differentiate with respect to, and where its gradient accumulates.
template <class T, Space S>
struct GradTarget {
  const void* data;
  Dims dims;
  TensorView<T, S> grad;
  bool contiguous = false;  // the leaf and its gradient are both contiguous: slices of it match too
};

// wrt(x, gx): differentiate with respect to the tensor (or view) x; accumulate into gx.
template <class X, class T, Space S>
GradTarget<T, S> wrt(const X& x, TensorView<T, S> grad) {
  auto lv = expr::as_expr(x).view;
  static_assert(decltype(lv)::space == S, "wrt: the leaf and its gradient must live in the same memory space");
  SSMX_REQUIRE(grad.dims() == lv.dims(), ShapeError, "wrt: gradient of shape ", grad.dims().str(),
               " for a leaf of shape ", lv.dims().str());
  return GradTarget<T, S>{lv.data(), lv.dims(), grad, lv.is_contiguous() && grad.is_contiguous()};
}
template <class X, class T, Space S>
GradTarget<T, S> wrt(const X& x, Tensor<T, S>& grad) {
  return wrt(x, grad.view());
}

template <class T, Space S>
using GradTargets = std::vector<GradTarget<T, S>>;

namespace autodiff {

using expr::BroadcastTo;
using expr::CausalConv1d;
using expr::Constant;
using expr::Leaf;
using expr::MatMul;
using expr::Reduce;
using expr::ReduceAll;
using expr::Reshape;
using expr::RmsNormalize;
using expr::Softmax;
using expr::Transpose;
using expr::Unary;
using expr::Binary;
using expr::Unsqueeze;

// ---- views used in the backward pass --------------------------------------------------

using expr::unsqueezed_view;

template <class T, Space S>
TensorView<T, S> remove_axis(TensorView<T, S> v, int axis) {
  Dims d;
  d.rank = v.rank() - 1;
  std::array<index_t, max_rank> st{0, 0, 0, 0};
  for (int i = 0, k = 0; i < v.rank(); ++i)
    if (i != axis) {
      d[k] = v.extent(i);
      st[std::size_t(k++)] = v.stride(i);
    }
  return TensorView<T, S>(v.data(), d, st);
}
template <class T, Space S>
TensorView<T, S> swap_last(TensorView<T, S> v) {
  Dims d = v.dims();
  auto st = v.strides();
  std::swap(d[d.rank - 1], d[d.rank - 2]);
  std::swap(st[std::size_t(d.rank - 1)], st[std::size_t(d.rank - 2)]);
  return TensorView<T, S>(v.data(), d, st);
}

// The sum over axis 0 of a contiguous host tensor v ([n, ...]) into out ([...] or [1, ...]):
// row after row, a register of columns at a time. Each column is summed in token order from
// zero, as the element-wise reduction does, so the result is the same to the bit; walking
// the rows instead of each column's strided elements reads every cache line once.
template <class V>
void sum_leading_rows(TensorView<const V, Space::Host> v, TensorView<V, Space::Host> out) {
  const index_t n = v.extent(0), w = v.numel() / std::max<index_t>(n, 1);
  V* o = out.data();
  std::fill(o, o + w, V(0));
  for (index_t k = 0; k < n; ++k) {
    const V* row = v.data() + k * w;
    for (index_t j = 0; j < w; ++j) o[j] += row[j];
  }
}

// Sums `g` over the dimensions that broadcasting stretched, giving a tensor of `target` dims.
template <class V, Space S>
Tensor<V, S> reduce_to(TensorView<const V, S> g, const Dims& target) {
  Tensor<V, S> cur;
  TensorView<const V, S> v = g;
  if constexpr (S == Space::Host) {  // the common case: a bias-like target summed over the tokens
    const bool lead = v.rank() == target.rank + 1 || (v.rank() == target.rank && target[0] == 1);
    bool rest_same = lead && v.is_contiguous() && v.extent(0) > 1;
    for (int i = 1; rest_same && i < v.rank(); ++i) rest_same = v.extent(i) == target[i - (v.rank() - target.rank)];
    if (rest_same) {
      Tensor<V, S> out(target, Tag::Workspace);
      sum_leading_rows<V>(v, out.view());
      return out;
    }
  }
  // Leading dimensions that the target lacks.
  while (v.rank() > target.rank) {
    Dims d = v.dims();
    Dims nd;
    nd.rank = d.rank - 1;
    for (int i = 1; i < d.rank; ++i) nd[i - 1] = d[i];
    Tensor<V, S> next(nd, Tag::Workspace);
    assign(next.view(), ssmx::sum(v, 0));
    cur = std::move(next);
    v = cur.view();
  }
  for (int i = 0; i < target.rank; ++i) {
    if (target[i] == 1 && v.extent(i) != 1) {
      Dims nd = v.dims();
      nd[i] = 1;
      Tensor<V, S> next(nd, Tag::Workspace);
      assign(next.view(), ssmx::sum(v, i, true));
      cur = std::move(next);
      v = cur.view();
    }
  }
  if (cur.empty() || cur.dims() != target) {
    Tensor<V, S> out(target, Tag::Workspace);
    assign(out.view(), v);
    return out;
  }
  return cur;
}

// ---- tapes ------------------------------------------------------------------------------

template <class E, Space S>
struct Tape;

template <class E, Space S>
struct NodeTape {
  using V = typename E::value_type;
  Tensor<V, S> value_;
  TensorView<const V, S> value() const { return value_.view(); }
};

template <class Stored, Space S>
struct Tape<Leaf<Stored, S>, S> {
  using V = compute_t<Stored>;
  TensorView<const V, S> view;
  Tensor<V, S> converted;  // for bf16/half leaves: their values in the compute type
  explicit Tape(const Leaf<Stored, S>& l) {
    if constexpr (std::is_same_v<Stored, V>) {
      view = l.view;
    } else {
      converted = Tensor<V, S>(l.dims(), Tag::Workspace);
      assign(converted.view(), l);
      view = converted.view();
    }
  }
  TensorView<const V, S> value() const { return view; }
};

template <class T, Space S>
struct Tape<Constant<T>, S> {
  Tensor<T, S> value_;
  explicit Tape(const Constant<T>& c) : value_(Dims{}, Tag::Workspace) { assign(value_.view(), c); }
  TensorView<const T, S> value() const { return value_.view(); }
};

template <class Op, class E, Space S>
struct Tape<Unary<Op, E>, S> : NodeTape<Unary<Op, E>, S> {
  Tape<E, S> child;
  explicit Tape(const Unary<Op, E>& u) : child(u.child) {
    this->value_ = eval(Unary<Op, Leaf<typename E::value_type, S>>(Leaf<typename E::value_type, S>(child.value())),
                        Tag::Workspace);
  }
};

template <class Op, class L, class R, Space S>
struct Tape<Binary<Op, L, R>, S> : NodeTape<Binary<Op, L, R>, S> {
  using V = typename L::value_type;
  Tape<L, S> lhs;
  Tape<R, S> rhs;
  explicit Tape(const Binary<Op, L, R>& b) : lhs(b.lhs), rhs(b.rhs) {
    this->value_ = eval(Binary<Op, Leaf<V, S>, Leaf<V, S>>(Leaf<V, S>(lhs.value()), Leaf<V, S>(rhs.value())),
                        Tag::Workspace);
  }
};

template <class E, Space S>
struct Tape<Unsqueeze<E>, S> {
  Tape<E, S> child;
  int axis;
  explicit Tape(const Unsqueeze<E>& u) : child(u.child), axis(u.axis) {}
  auto value() const { return unsqueezed_view(child.value(), axis); }
};

template <class E, Space S>
struct Tape<Transpose<E>, S> {
  Tape<E, S> child;
  explicit Tape(const Transpose<E>& t) : child(t.child) {}
  auto value() const { return swap_last(child.value()); }
};

template <class E, Space S>
struct Tape<BroadcastTo<E>, S> : NodeTape<BroadcastTo<E>, S> {
  Tape<E, S> child;
  explicit Tape(const BroadcastTo<E>& b) : child(b.child) {
    using ChildV = typename E::value_type;
    this->value_ = eval(BroadcastTo<Leaf<ChildV, S>>(Leaf<ChildV, S>(child.value()), b.shape), Tag::Workspace);
  }
};

// The child's value viewed with the new extents (copied first when it is not contiguous).
template <class E, Space S>
struct Tape<Reshape<E>, S> {
  using V = typename E::value_type;
  Tape<E, S> child;
  Tensor<V, S> copy_;  // the child's value, when that is not contiguous
  Dims shape;
  explicit Tape(const Reshape<E>& r) : child(r.child), shape(r.shape) {
    if (!child.value().is_contiguous()) copy_ = eval(Leaf<V, S>(child.value()), Tag::Workspace);
  }
  TensorView<const V, S> value() const {
    const TensorView<const V, S> v = copy_.empty() ? child.value() : copy_.view();
    return TensorView<const V, S>(v.data(), shape);
  }
};

template <class Op, class E, Space S>
struct Tape<Reduce<Op, E>, S> : NodeTape<Reduce<Op, E>, S> {
  Tape<E, S> child;
  explicit Tape(const Reduce<Op, E>& r) : child(r.child) {
    using ChildV = typename E::value_type;
    this->value_ = eval(Reduce<Op, Leaf<ChildV, S>>(Leaf<ChildV, S>(child.value()), r.axis, r.keepdim), Tag::Workspace);
  }
};

template <class Op, class E, Space S>
struct Tape<ReduceAll<Op, E>, S> : NodeTape<ReduceAll<Op, E>, S> {
  Tape<E, S> child;
  explicit Tape(const ReduceAll<Op, E>& r) : child(r.child) {
    using ChildV = typename E::value_type;
    this->value_ = eval(ReduceAll<Op, Leaf<ChildV, S>>(Leaf<ChildV, S>(child.value())), Tag::Workspace);
  }
};

template <class L, class R, Space S>
struct Tape<MatMul<L, R>, S> : NodeTape<MatMul<L, R>, S> {
  using V = typename L::value_type;
  Tape<L, S> lhs;
  Tape<R, S> rhs;
  explicit Tape(const MatMul<L, R>& m) : lhs(m.lhs), rhs(m.rhs) {
    this->value_ = eval(MatMul<Leaf<V, S>, Leaf<V, S>>(Leaf<V, S>(lhs.value()), Leaf<V, S>(rhs.value())),
                        Tag::Workspace);
  }
};

template <class Kind, class E, Space S>
struct Tape<Softmax<Kind, E>, S> : NodeTape<Softmax<Kind, E>, S> {
  Tape<E, S> child;
  explicit Tape(const Softmax<Kind, E>& s) : child(s.child) {
    using ChildV = typename E::value_type;
    this->value_ = eval(Softmax<Kind, Leaf<ChildV, S>>(Leaf<ChildV, S>(child.value())), Tag::Workspace);
  }
};

template <class E, Space S>
struct Tape<RmsNormalize<E>, S> : NodeTape<RmsNormalize<E>, S> {
  using V = typename E::value_type;
  Tape<E, S> child;
  explicit Tape(const RmsNormalize<E>& r) : child(r.child) {
    this->value_ = eval(RmsNormalize<Leaf<V, S>>(Leaf<V, S>(child.value()), r.eps), Tag::Workspace);
  }
};

template <class E, Space S>
struct Tape<CausalConv1d<E>, S> : NodeTape<CausalConv1d<E>, S> {
  using V = typename E::value_type;
  Tape<E, S> child;
  explicit Tape(const CausalConv1d<E>& c) : child(c.child) {
    this->value_ = eval(CausalConv1d<Leaf<V, S>>(Leaf<V, S>(child.value()), c.weight.view, c.bias.view, c.mask),
                        Tag::Workspace);
  }
};

// ---- which subtrees need a gradient ------------------------------------------------------
// (All overloads are declared first: they call each other through the expression tree.)

template <class T, Space S, class Stored>
bool needs_grad(const Leaf<Stored, S>& l, const GradTargets<T, S>& targets);
template <class T, Space S, class C>
bool needs_grad(const Constant<C>&, const GradTargets<T, S>&);
template <class T, Space S, class Op, class E>
bool needs_grad(const Unary<Op, E>& u, const GradTargets<T, S>& t);
template <class T, Space S, class Op, class L, class R>
bool needs_grad(const Binary<Op, L, R>& b, const GradTargets<T, S>& t);
template <class T, Space S, class L, class R>
bool needs_grad(const MatMul<L, R>& m, const GradTargets<T, S>& t);
template <class T, Space S, class E>
bool needs_grad(const CausalConv1d<E>& c, const GradTargets<T, S>& t);
template <class T, Space S, class E, class = decltype(std::declval<const E&>().child)>
bool needs_grad(const E& e, const GradTargets<T, S>& t);

template <class T, Space S, class V, class Stored>
void backward(const Leaf<Stored, S>& l, const Tape<Leaf<Stored, S>, S>&, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class C>
void backward(const Constant<C>&, const Tape<Constant<C>, S>&, TensorView<const V, S>, const GradTargets<T, S>&);
template <class T, Space S, class V, class Op, class E>
void backward(const Unary<Op, E>& u, const Tape<Unary<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class Op, class L, class R>
void backward(const Binary<Op, L, R>& b, const Tape<Binary<Op, L, R>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class E>
void backward(const Unsqueeze<E>& u, const Tape<Unsqueeze<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class E>
void backward(const Transpose<E>& t, const Tape<Transpose<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class E>
void backward(const BroadcastTo<E>& b, const Tape<BroadcastTo<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class Op, class E>
void backward(const Reduce<Op, E>& r, const Tape<Reduce<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class E>
void backward(const Reshape<E>& r, const Tape<Reshape<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class Op, class E>
void backward(const ReduceAll<Op, E>& r, const Tape<ReduceAll<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class L, class R>
void backward(const MatMul<L, R>& m, const Tape<MatMul<L, R>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class Kind, class E>
void backward(const Softmax<Kind, E>& s, const Tape<Softmax<Kind, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);

template <class T, Space S, class V, class E>
void backward(const CausalConv1d<E>& c, const Tape<CausalConv1d<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);
template <class T, Space S, class V, class E>
void backward(const RmsNormalize<E>& r, const Tape<RmsNormalize<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets);


// Where leaf `l`'s gradient goes: the target that is `l` itself, else the part of a
// contiguous target that `l` is a slice of; an empty view when none.
template <class T, Space S, class Stored>
TensorView<T, S> target_grad(const Leaf<Stored, S>& l, const GradTargets<T, S>& targets) {
  const auto& v = l.view;
  for (const auto& t : targets)
    if (t.data == static_cast<const void*>(v.data()) && t.dims == v.dims()) return t.grad;
  if constexpr (std::is_same_v<Stored, T>) {
    index_t last = 0;  // offset of the leaf's last element from its first
    for (int i = 0; i < v.rank(); ++i) {
      if (v.extent(i) == 0 || v.stride(i) < 0) return {};
      last += (v.extent(i) - 1) * v.stride(i);
    }
    const auto p = reinterpret_cast<std::uintptr_t>(v.data());
    for (const auto& t : targets) {
      const auto base = reinterpret_cast<std::uintptr_t>(t.data);
      if (!t.contiguous || p < base || (p - base) % sizeof(T) != 0) continue;
      const index_t off = index_t((p - base) / sizeof(T));
      if (off + last < t.dims.numel()) return TensorView<T, S>(t.grad.data() + off, v.dims(), v.strides());
    }
  }
  return {};
}

// A matrix product's operand that is a leaf (a parameter, or a slice of one) or a transposed
// leaf (the x·Wᵀ of every linear map) receives its cotangent as one product added to its
// gradient: gemm with beta 1 straight into the gradient (expr::run_assign), instead of the
// product into a temporary and then a pass adding it. `direct()` is the cotangent of the
// operand, `transposed()` its transpose (what the leaf under a Transpose receives), both as
// products of views read in place. False when the operand is anything else.
template <class E>
struct is_leaf_operand : std::false_type {};
template <class Stored, Space S>
struct is_leaf_operand<Leaf<Stored, S>> : std::true_type {};
template <class E>
struct is_transposed_leaf_operand : std::false_type {};
template <class Stored, Space S>
struct is_transposed_leaf_operand<Transpose<Leaf<Stored, S>>> : std::true_type {};

template <class T, Space S, class E, class Direct, class Transposed>
bool add_product_to_leaf_grad(const E& e, const GradTargets<T, S>& targets, Direct direct, Transposed transposed) {
  if constexpr (is_leaf_operand<E>::value) {
    TensorView<T, S> grad = target_grad(e, targets);
    if (grad.data()) accumulate(grad, direct());
    return true;
  } else if constexpr (is_transposed_leaf_operand<E>::value) {
    TensorView<T, S> grad = target_grad(e.child, targets);
    if (grad.data()) accumulate(grad, transposed());
    return true;
  } else {
    (void)e, (void)targets, (void)direct, (void)transposed;
    return false;
  }
}

template <class T, Space S, class Stored>
bool needs_grad(const Leaf<Stored, S>& l, const GradTargets<T, S>& targets) {
  return target_grad(l, targets).data() != nullptr;
}
template <class T, Space S, class C>
bool needs_grad(const Constant<C>&, const GradTargets<T, S>&) {
  return false;
}
template <class T, Space S, class Op, class E>
bool needs_grad(const Unary<Op, E>& u, const GradTargets<T, S>& t) {
  return needs_grad(u.child, t);
}
template <class T, Space S, class Op, class L, class R>
bool needs_grad(const Binary<Op, L, R>& b, const GradTargets<T, S>& t) {
  return needs_grad(b.lhs, t) || needs_grad(b.rhs, t);
}
template <class T, Space S, class L, class R>
bool needs_grad(const MatMul<L, R>& m, const GradTargets<T, S>& t) {
  return needs_grad(m.lhs, t) || needs_grad(m.rhs, t);
}
template <class T, Space S, class E>
bool needs_grad(const CausalConv1d<E>& c, const GradTargets<T, S>& t) {
  return needs_grad(c.child, t) || needs_grad(c.weight, t) || (c.has_bias() && needs_grad(c.bias, t));
}
template <class T, Space S, class E, class>
bool needs_grad(const E& e, const GradTargets<T, S>& t) {
  return needs_grad(e.child, t);
}

// ---- backward -----------------------------------------------------------------------------

template <class T, Space S, class V, class Stored>
void backward(const Leaf<Stored, S>& l, const Tape<Leaf<Stored, S>, S>&, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  TensorView<T, S> grad = target_grad(l, targets);
  if (grad.data()) accumulate(grad, g);
}

template <class T, Space S, class V, class C>
void backward(const Constant<C>&, const Tape<Constant<C>, S>&, TensorView<const V, S>, const GradTargets<T, S>&) {}

template <class T, Space S, class V, class Op, class E>
void backward(const Unary<Op, E>& u, const Tape<Unary<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(u.child, targets)) return;
  Tensor<V, S> gx = eval(expr::Map3<expr::UnaryVjp<Op>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>>(
                             {}, Leaf<V, S>(tape.child.value()), Leaf<V, S>(tape.value()), Leaf<V, S>(g)),
                         Tag::Workspace);
  backward(u.child, tape.child, TensorView<const V, S>(gx.view()), targets);
}

template <class T, Space S, class V, class Op, class L, class R>
void backward(const Binary<Op, L, R>& b, const Tape<Binary<Op, L, R>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  Leaf<V, S> l(tape.lhs.value()), r(tape.rhs.value()), y(tape.value()), gl(g);
  if (needs_grad(b.lhs, targets)) {
    Tensor<V, S> full = eval(expr::Map4<expr::BinaryVjpL<Op>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>>({}, l, r, y, gl),
                             Tag::Workspace);
    if (full.dims() == b.lhs.dims()) {  // not broadcast: the cotangent as it is
      backward(b.lhs, tape.lhs, TensorView<const V, S>(full.view()), targets);
    } else {
      Tensor<V, S> part = reduce_to(TensorView<const V, S>(full.view()), b.lhs.dims());
      backward(b.lhs, tape.lhs, TensorView<const V, S>(part.view()), targets);
    }
  }
  if (needs_grad(b.rhs, targets)) {
    Tensor<V, S> full = eval(expr::Map4<expr::BinaryVjpR<Op>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>>({}, l, r, y, gl),
                             Tag::Workspace);
    if (full.dims() == b.rhs.dims()) {  // not broadcast: the cotangent as it is
      backward(b.rhs, tape.rhs, TensorView<const V, S>(full.view()), targets);
    } else {
      Tensor<V, S> part = reduce_to(TensorView<const V, S>(full.view()), b.rhs.dims());
      backward(b.rhs, tape.rhs, TensorView<const V, S>(part.view()), targets);
    }
  }
}

template <class T, Space S, class V, class E>
void backward(const Unsqueeze<E>& u, const Tape<Unsqueeze<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (needs_grad(u.child, targets)) backward(u.child, tape.child, remove_axis(g, u.axis), targets);
}

template <class T, Space S, class V, class E>
void backward(const Transpose<E>& t, const Tape<Transpose<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (needs_grad(t.child, targets)) backward(t.child, tape.child, swap_last(g), targets);
}

// The cotangent viewed with the child's extents (copied first when it is not contiguous).
template <class T, Space S, class V, class E>
void backward(const Reshape<E>& r, const Tape<Reshape<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(r.child, targets)) return;
  if (g.is_contiguous()) {
    backward(r.child, tape.child, TensorView<const V, S>(g.data(), r.child.dims()), targets);
  } else {
    Tensor<V, S> gc = eval(Leaf<V, S>(g), Tag::Workspace);
    backward(r.child, tape.child, TensorView<const V, S>(gc.data(), r.child.dims()), targets);
  }
}

template <class T, Space S, class V, class E>
void backward(const BroadcastTo<E>& b, const Tape<BroadcastTo<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(b.child, targets)) return;
  Tensor<V, S> part = reduce_to(g, b.child.dims());
  backward(b.child, tape.child, TensorView<const V, S>(part.view()), targets);
}

template <class T, Space S, class V, class Op, class E>
void backward(const Reduce<Op, E>& r, const Tape<Reduce<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(r.child, targets)) return;
  TensorView<const V, S> y = tape.value(), gk = g;
  if (!r.keepdim) {
    y = unsqueezed_view(y, r.axis);
    gk = unsqueezed_view(gk, r.axis);
  }
  index_t n = r.child.dims()[r.axis];
  Tensor<V, S> gx = eval(expr::Map3<expr::ReduceVjp<Op>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>>(
                             {n}, Leaf<V, S>(tape.child.value()), Leaf<V, S>(y), Leaf<V, S>(gk)),
                         Tag::Workspace);
  backward(r.child, tape.child, TensorView<const V, S>(gx.view()), targets);
}

template <class T, Space S, class V, class Op, class E>
void backward(const ReduceAll<Op, E>& r, const Tape<ReduceAll<Op, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(r.child, targets)) return;
  index_t n = r.child.dims().numel();
  Tensor<V, S> gx = eval(expr::Map3<expr::ReduceVjp<Op>, Leaf<V, S>, Leaf<V, S>, Leaf<V, S>>(
                             {n}, Leaf<V, S>(tape.child.value()), Leaf<V, S>(tape.value()), Leaf<V, S>(g)),
                         Tag::Workspace);
  backward(r.child, tape.child, TensorView<const V, S>(gx.view()), targets);
}

template <class T, Space S, class V, class L, class R>
void backward(const MatMul<L, R>& m, const Tape<MatMul<L, R>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  const auto a = tape.lhs.value(), b = tape.rhs.value();
  if (needs_grad(m.lhs, targets)) {  // dL/dA = G Bᵀ; A = Xᵀ: dL/dX = B Gᵀ
    if (!add_product_to_leaf_grad(
            m.lhs, targets, [&] { return ssmx::matmul(g, transpose(b)); },
            [&] { return ssmx::matmul(b, transpose(g)); })) {
      Tensor<V, S> ga = eval(ssmx::matmul(g, transpose(b)), Tag::Workspace);
      backward(m.lhs, tape.lhs, TensorView<const V, S>(ga.view()), targets);
    }
  }
  if (needs_grad(m.rhs, targets)) {  // dL/dB = Aᵀ G; B = Wᵀ: dL/dW = Gᵀ A
    if (!add_product_to_leaf_grad(
            m.rhs, targets, [&] { return ssmx::matmul(transpose(a), g); },
            [&] { return ssmx::matmul(transpose(g), a); })) {
      Tensor<V, S> gb = eval(ssmx::matmul(transpose(a), g), Tag::Workspace);
      backward(m.rhs, tape.rhs, TensorView<const V, S>(gb.view()), targets);
    }
  }
}

template <class T, Space S, class V, class Kind, class E>
void backward(const Softmax<Kind, E>& s, const Tape<Softmax<Kind, E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(s.child, targets)) return;
  const int last = g.rank() - 1;
  Leaf<V, S> y(tape.value()), gl(g);
  Tensor<V, S> gx;
  if constexpr (Kind::log)  // dx = g - softmax(x) Σg
    gx = eval(gl - ssmx::exp(y) * ssmx::sum(gl, last, true), Tag::Workspace);
  else  // dx = y ⊙ (g - Σ g⊙y)
    gx = eval(y * (gl - ssmx::sum(gl * y, last, true)), Tag::Workspace);
  backward(s.child, tape.child, TensorView<const V, S>(gx.view()), targets);
}

// y = x ⊙ ρ, ρ = rsqrt(mean(x²) + eps) over the last axis:  dx = ρ ⊙ (g - y ⊙ mean(g ⊙ y)).
template <class T, Space S, class V, class E>
void backward(const RmsNormalize<E>& r, const Tape<RmsNormalize<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  if (!needs_grad(r.child, targets)) return;
  Leaf<V, S> x(tape.child.value()), y(tape.value()), gl(g);
  Tensor<V, S> gx = eval(ssmx::rsqrt(ssmx::mean(ssmx::square(x), -1, true) + V(r.eps)) *
                             (gl - y * ssmx::mean(gl * y, -1, true)),
                         Tag::Workspace);
  backward(r.child, tape.child, TensorView<const V, S>(gx.view()), targets);
}

// out[t] = b + Σ_j w_j ⊙ x[t + j] ⊙ m_j[t]:
//   dx[t + j] += g[t] ⊙ w_j ⊙ m_j[t],  dw_j = Σ_t g[t] ⊙ x[t + j] ⊙ m_j[t],  db = Σ_t g[t]
template <class T, Space S, class V, class E>
void backward(const CausalConv1d<E>& c, const Tape<CausalConv1d<E>, S>& tape, TensorView<const V, S> g,
              const GradTargets<T, S>& targets) {
  const index_t n = g.extent(0);
  if constexpr (S == Space::Host && (std::is_same_v<V, float> || std::is_same_v<V, double>)) {
    // On the host, one pass each for dL/dx and for the weight and bias (backend/cpu/conv1d.hpp).
    const TensorView<const V, S> x = tape.child.value();
    if (g.stride(1) == 1 && x.stride(1) == 1) {
      namespace cpu = backend::cpu;
      const index_t C = x.extent(1), W = c.width;
      const Work<V> taps = cpu::conv1d_taps(c.weight.view, W);
      const cpu::Conv1dMask mask{c.mask.data(), c.has_mask() ? c.mask.stride(0) : 0, c.has_mask() ? c.mask.stride(1) : 0};
      if (needs_grad(c.child, targets)) {
        Tensor<V, S> gx(c.child.dims(), Tag::Workspace);
        cpu::conv1d_backward_input<V>(g.data(), g.stride(0), taps.data(), mask, n, C, W, gx.data());
        backward(c.child, tape.child, TensorView<const V, S>(gx.view()), targets);
      }
      const bool wg = needs_grad(c.weight, targets), bg = c.has_bias() && needs_grad(c.bias, targets);
      if (!wg && !bg) return;
      Work<V> gtaps(wg ? std::size_t(W * C) : 0);
      Tensor<V, S> gb(Dims{C}, Tag::Workspace);
      cpu::conv1d_backward_weight<V>(g.data(), g.stride(0), x.data(), x.stride(0), mask, n, C, W,
                                     wg ? gtaps.data() : nullptr, bg ? gb.data() : nullptr);
      if (wg) {
        Tensor<V, S> gw(c.weight.dims(), Tag::Workspace);  // row-major [C, W] or [C, 1, W]
        for (index_t k = 0; k < C; ++k)
          for (index_t j = 0; j < W; ++j) gw.data()[k * W + j] = gtaps[std::size_t(j * C + k)];
        backward(c.weight, Tape<Leaf<V, S>, S>(c.weight), TensorView<const V, S>(gw.view()), targets);
      }
      if (bg) backward(c.bias, Tape<Leaf<V, S>, S>(c.bias), TensorView<const V, S>(gb.view()), targets);
      return;
    }
  }
  Leaf<V, S> gl(g);
  if (needs_grad(c.child, targets)) {
    Tensor<V, S> gx(c.child.dims(), Tag::Workspace);
    ssmx::assign(gx.view(), Constant<V>(V(0)));
    for (index_t j = 0; j < c.width; ++j) {  // taps one after another: their rows overlap
      if (c.has_mask())
        ssmx::accumulate(gx.view().slice(j, j + n), gl * leaf(c.tap(j)) * leaf(c.tap_mask(j)));
      else
        ssmx::accumulate(gx.view().slice(j, j + n), gl * leaf(c.tap(j)));
    }
    backward(c.child, tape.child, TensorView<const V, S>(gx.view()), targets);
  }
  if (needs_grad(c.weight, targets)) {
    const TensorView<const V, S> x = tape.child.value();
    Tensor<V, S> gw(c.weight.dims(), Tag::Workspace);
    const index_t last = gw.view().rank() - 1;
    for (index_t j = 0; j < c.width; ++j) {
      TensorView<V, S> col(gw.data() + j * gw.view().stride(int(last)), Dims{gw.view().extent(0)},
                           {gw.view().stride(0), 0, 0, 0});
      if (c.has_mask())
        ssmx::assign(col, ssmx::sum(gl * leaf(x.slice(j, j + n)) * leaf(c.tap_mask(j)), 0));
      else
        ssmx::assign(col, ssmx::sum(gl * leaf(x.slice(j, j + n)), 0));
    }
    backward(c.weight, Tape<Leaf<V, S>, S>(c.weight), TensorView<const V, S>(gw.view()), targets);
  }
  if (c.has_bias() && needs_grad(c.bias, targets)) {
    Tensor<V, S> gb = eval(ssmx::sum(gl, 0), Tag::Workspace);
    backward(c.bias, Tape<Leaf<V, S>, S>(c.bias), TensorView<const V, S>(gb.view()), targets);
  }
}

}  // namespace autodiff

template <class E, Space S = (E::space_id == expr::any_space ? Space::Host : Space(E::space_id))>
using Tape = autodiff::Tape<E, S>;

// Accumulates into each target's gradient the VJP of `e` (with the tape of a previous
// forward evaluation) for the output cotangent `g`.
template <class E, class T, Space S>
void backward(const E& e, const Tape<E, S>& tape, TensorView<const typename E::value_type, S> g,
              const GradTargets<T, S>& targets) {
  SSMX_REQUIRE(g.dims() == e.dims(), ShapeError, "backward: cotangent of shape ", g.dims().str(),
               " for an expression of shape ", e.dims().str());
  autodiff::backward(e, tape, g, targets);
}

// Builds the tape and runs backward in one call.
template <class E, class G, class T, Space S>
void backward(const E& e, const G& g, std::initializer_list<GradTarget<T, S>> targets) {
  Tape<E, S> tape(e);
  GradTargets<T, S> tg(targets);
  auto gv = expr::as_expr(g).view;
  backward(e, tape, TensorView<const typename E::value_type, S>(gv), tg);
}

}  // namespace ssmx
