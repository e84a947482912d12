// ssmx — evaluators: the computing side of expression nodes (Eigen's TensorEvaluator
// split). An evaluator is built on the host for the extents it will be indexed with
// (the output's, padded to rank 4 and right-aligned), is trivially copyable, and is passed
// by value into a CPU loop or a CUDA kernel. Broadcasting resolves to stride 0 at the
// leaves. Nodes that cannot be computed one coefficient at a time (matmul, softmax, full
// reductions) are materialised into temporaries owned by an EvalContext when the
// evaluator is built, and then read like leaves.
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include <array>
#include <memory>
#include <vector>

#include "nodes.hpp"

namespace ssmx {

template <class T, Space S, class E>
void assign(TensorView<T, S> out, const E& e);

namespace backend {
// Per-space execution: run(out, evaluator, accumulate), gemm, reduce_all.
// Host: backend/cpu/exec.hpp. Cuda: backend/cuda/exec.cuh (via <ssmx/cuda.cuh>).
template <Space S>
struct Exec {
  static_assert(S == Space::Host,
                "ssmx: expressions on Space::Cuda need the CUDA backend: include <ssmx/cuda.cuh> and compile with nvcc");
};
}  // namespace backend

namespace expr {

struct Index4 {
  index_t i[4];
};
using Ext4 = std::array<index_t, 4>;

// Extents right-aligned into rank 4, leading ones set to 1.
inline Ext4 pad_extents(const Dims& d) {
  Ext4 e{1, 1, 1, 1};
  for (int k = 0; k < d.rank; ++k) e[std::size_t(4 - d.rank + k)] = d[k];
  return e;
}

// Owns the temporaries that materialised nodes need while an evaluation is in flight.
template <Space S>
class EvalContext {
 public:
  template <class T>
  Tensor<T, S>& temp(const Dims& d) {
    auto h = std::make_unique<Holder<T>>(Tensor<T, S>(d, Tag::Workspace));
    Tensor<T, S>& ref = h->t;
    temps_.push_back(std::move(h));
    return ref;
  }

 private:
  struct HolderBase {
    virtual ~HolderBase() = default;
  };
  template <class T>
  struct Holder : HolderBase {
    explicit Holder(Tensor<T, S>&& x) : t(std::move(x)) {}
    Tensor<T, S> t;
  };
  std::vector<std::unique_ptr<HolderBase>> temps_;
};

template <class E, Space S, class = void>
struct Evaluator;

template <Space S, class E>
Evaluator<E, S> make_evaluator(const E& e, EvalContext<S>& ctx, const Ext4& view) {
  return Evaluator<E, S>(e, ctx, view);
}

// Reads a (possibly broadcast) strided view; the shared piece of leaves and materialised nodes.
template <class Stored, class V>
struct ViewReader {
  const Stored* data = nullptr;
  index_t st[4] = {0, 0, 0, 0};
  ViewReader() = default;
  template <Space S>
  ViewReader(const TensorView<const Stored, S>& v, const Ext4& view) : data(v.data()) {
    const Dims& d = v.dims();
    for (int k = 0; k < d.rank; ++k) {
      std::size_t p = std::size_t(4 - d.rank + k);
      SSMX_REQUIRE(d[k] == 1 || d[k] == view[p], ShapeError, "tensor of shape ", d.str(),
                   " does not broadcast to the evaluated extents (dimension ", k, ": ", d[k], " vs ", view[p], ")");
      st[p] = d[k] == 1 ? 0 : v.stride(k);
    }
  }
  SSMX_HOST_DEVICE V coeff(const Index4& i) const {
    return V(data[i.i[0] * st[0] + i.i[1] * st[1] + i.i[2] * st[2] + i.i[3] * st[3]]);
  }
};

template <class Stored, Space S>
struct Evaluator<Leaf<Stored, S>, S> : ViewReader<Stored, typename Leaf<Stored, S>::value_type> {
  Evaluator(const Leaf<Stored, S>& l, EvalContext<S>&, const Ext4& view)
      : ViewReader<Stored, typename Leaf<Stored, S>::value_type>(l.view, view) {}
};

template <class T, Space S>
struct Evaluator<Constant<T>, S> {
  T value;
  Evaluator(const Constant<T>& c, EvalContext<S>&, const Ext4&) : value(c.value) {}
  SSMX_HOST_DEVICE T coeff(const Index4&) const { return value; }
};

template <class Op, class E, Space S>
struct Evaluator<Unary<Op, E>, S> {
  Evaluator<E, S> child;
  Evaluator(const Unary<Op, E>& u, EvalContext<S>& ctx, const Ext4& view) : child(u.child, ctx, view) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return Op{}(child.coeff(i)); }
};

template <class Op, class L, class R, Space S>
struct Evaluator<Binary<Op, L, R>, S> {
  Evaluator<L, S> lhs;
  Evaluator<R, S> rhs;
  Evaluator(const Binary<Op, L, R>& b, EvalContext<S>& ctx, const Ext4& view)
      : lhs(b.lhs, ctx, view), rhs(b.rhs, ctx, view) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return Op{}(lhs.coeff(i), rhs.coeff(i)); }
};

template <class E, Space S>
struct Evaluator<BroadcastTo<E>, S> {
  Evaluator<E, S> child;
  Evaluator(const BroadcastTo<E>& b, EvalContext<S>& ctx, const Ext4& view) : child(b.child, ctx, view) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return child.coeff(i); }
};

template <class E, Space S>
struct Evaluator<Unsqueeze<E>, S> {
  Evaluator<E, S> child;
  int pos;  // padded position of the inserted axis
  static Ext4 child_view(const Unsqueeze<E>& u, const Ext4& view, int pos) {
    SSMX_REQUIRE(view[0] == 1 || pos == 0, ShapeError, "unsqueeze: cannot evaluate a rank-4 broadcast of shape ",
                 u.dims().str());
    Ext4 c{1, 1, 1, 1};
    for (int k = 0; k < pos; ++k) c[std::size_t(k + 1)] = view[std::size_t(k)];
    for (int k = pos + 1; k < 4; ++k) c[std::size_t(k)] = view[std::size_t(k)];
    return c;
  }
  Evaluator(const Unsqueeze<E>& u, EvalContext<S>& ctx, const Ext4& view)
      : child(u.child, ctx, child_view(u, view, 4 - u.dims().rank + u.axis)), pos(4 - u.dims().rank + u.axis) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const {
    Index4 j{{0, 0, 0, 0}};
    for (int k = 0; k < pos; ++k) j.i[k + 1] = i.i[k];
    for (int k = pos + 1; k < 4; ++k) j.i[k] = i.i[k];
    return child.coeff(j);
  }
};

template <class E, Space S>
struct Evaluator<Transpose<E>, S> {
  Evaluator<E, S> child;
  static Ext4 swapped(Ext4 v) {
    std::swap(v[2], v[3]);
    return v;
  }
  Evaluator(const Transpose<E>& t, EvalContext<S>& ctx, const Ext4& view) : child(t.child, ctx, swapped(view)) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return child.coeff(Index4{{i.i[0], i.i[1], i.i[3], i.i[2]}}); }
};

template <class Op, class E, Space S>
struct Evaluator<Reduce<Op, E>, S> {
  using V = typename E::value_type;
  Evaluator<E, S> child;
  int pos;       // padded position of the reduced axis in the child
  bool insert;   // the axis was dropped from the output (keepdim = false)
  index_t n;     // extent of the reduced axis
  static Ext4 child_view(const Reduce<Op, E>& r, const Ext4& view) {
    Dims cd = r.child.dims();
    int p = 4 - cd.rank + r.axis;
    Ext4 c = view;
    if (!r.keepdim) {
      SSMX_REQUIRE(view[0] == 1 || cd.rank < 4, ShapeError, Op::name,
                   ": cannot broadcast the reduction of a rank-4 tensor to rank 4");
      for (int k = 0; k < p; ++k) c[std::size_t(k)] = view[std::size_t(k + 1)];
    }
    c[std::size_t(p)] = cd[r.axis];
    return c;
  }
  Evaluator(const Reduce<Op, E>& r, EvalContext<S>& ctx, const Ext4& view)
      : child(r.child, ctx, child_view(r, view)),
        pos(4 - r.child.dims().rank + r.axis),
        insert(!r.keepdim),
        n(r.child.dims()[r.axis]) {}
  SSMX_HOST_DEVICE V coeff(const Index4& i) const {
    Index4 j = i;
    if (insert)
      for (int k = 0; k < pos; ++k) j.i[k] = i.i[k + 1];
    V acc = Op::template init<V>();
    for (index_t k = 0; k < n; ++k) {
      j.i[pos] = k;
      acc = Op::combine(acc, V(child.coeff(j)));
    }
    return Op::finish(acc, n);
  }
};

// ---- materialised nodes -----------------------------------------------------------------

// Materialises `e` into a contiguous temporary of ctx, unless it already is a contiguous
// leaf of the compute type; returns a view either way.
template <Space S, class E>
TensorView<const typename E::value_type, S> materialize(const E& e, EvalContext<S>& ctx) {
  using V = typename E::value_type;
  if constexpr (std::is_same_v<E, Leaf<V, S>>) {
    if (e.view.is_contiguous()) return e.view;
  } else if constexpr (std::is_same_v<E, Transpose<Leaf<V, S>>>) {
    // A transposed contiguous matrix is read in place (column-major) by gemm.
    const auto& v = e.child.view;
    if (v.rank() == 2 && v.is_contiguous())
      return TensorView<const V, S>(v.data(), e.dims(), {v.stride(1), v.stride(0), 0, 0});
  }
  Tensor<V, S>& t = ctx.template temp<V>(e.dims());
  ssmx::assign(t.view(), e);
  return t.view();
}

template <class L, class R, Space S>
struct Evaluator<MatMul<L, R>, S> : ViewReader<typename L::value_type, typename L::value_type> {
  using V = typename L::value_type;
  static TensorView<const V, S> compute(const MatMul<L, R>& m, EvalContext<S>& ctx) {
    TensorView<const V, S> a = materialize(m.lhs, ctx), b = materialize(m.rhs, ctx);
    Tensor<V, S>& c = ctx.template temp<V>(m.dims());
    backend::Exec<S>::gemm(a, b, c.view(), V(0));
    return c.view();
  }
  Evaluator(const MatMul<L, R>& m, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(compute(m, ctx), view) {}
};

template <class Kind, class E, Space S>
struct Evaluator<Softmax<Kind, E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  static TensorView<const V, S> compute(const Softmax<Kind, E>& s, EvalContext<S>& ctx) {
    TensorView<const V, S> x = materialize(s.child, ctx);
    const int last = x.rank() - 1;
    Dims rd = x.dims();
    rd[last] = 1;
    Tensor<V, S>& m = ctx.template temp<V>(rd);
    ssmx::assign(m.view(), ssmx::max(x, last, true));  // subtract the row max: exp never overflows
    Tensor<V, S>& z = ctx.template temp<V>(rd);
    ssmx::assign(z.view(), ssmx::sum(ssmx::exp(leaf(x) - leaf(m)), last, true));
    Tensor<V, S>& y = ctx.template temp<V>(x.dims());
    if constexpr (Kind::log)
      ssmx::assign(y.view(), leaf(x) - leaf(m) - ssmx::log(z));
    else
      ssmx::assign(y.view(), ssmx::exp(leaf(x) - leaf(m)) / leaf(z));
    return y.view();
  }
  Evaluator(const Softmax<Kind, E>& s, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(compute(s, ctx), view) {}
};

template <class Op, class E, Space S>
struct Evaluator<ReduceAll<Op, E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  static TensorView<const V, S> compute(const ReduceAll<Op, E>& r, EvalContext<S>& ctx) {
    TensorView<const V, S> x = materialize(r.child, ctx);
    Tensor<V, S>& out = ctx.template temp<V>(Dims{});
    backend::Exec<S>::template reduce_all<Op>(x, out.view());
    return out.view();
  }
  Evaluator(const ReduceAll<Op, E>& r, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(compute(r, ctx), view) {}
};

}  // namespace expr

// ---- evaluation entry points ----------------------------------------------------------------

namespace expr {
template <class T, Space S, class E>
void run_assign(TensorView<T, S> out, const E& e, bool accumulate) {
  static_assert(E::space_id == any_space || Space(E::space_id) == S,
                "ssmx: the expression and the destination live in different memory spaces");
  Dims ed = e.dims();
  Dims b = broadcast_dims(ed, out.dims(), "assign");
  SSMX_REQUIRE(b == out.dims(), ShapeError, "assign: an expression of shape ", ed.str(),
               " cannot be written to a tensor of shape ", out.dims().str());
  EvalContext<S> ctx;
  auto ev = make_evaluator(e, ctx, pad_extents(out.dims()));
  backend::Exec<S>::run(out, ev, accumulate);
}
}  // namespace expr

// out = e: one pass over out (one loop on the CPU, one kernel on the GPU).
template <class T, Space S, class E>
void assign(TensorView<T, S> out, const E& e) {
  expr::run_assign(out, expr::as_expr(e), false);
}
template <class T, Space S, class E>
void assign(Tensor<T, S>& out, const E& e) {
  expr::run_assign(out.view(), expr::as_expr(e), false);
}
// out += e in the same single pass.
template <class T, Space S, class E>
void accumulate(TensorView<T, S> out, const E& e) {
  expr::run_assign(out, expr::as_expr(e), true);
}
template <class T, Space S, class E>
void accumulate(Tensor<T, S>& out, const E& e) {
  expr::run_assign(out.view(), expr::as_expr(e), true);
}

// A new tensor holding the value of `e`.
template <class E, class = std::enable_if_t<is_expression_v<E>>>
auto eval(const E& e, Tag tag = Tag::Activations) {
  using V = typename E::value_type;
  constexpr Space S = E::space_id == expr::any_space ? Space::Host : Space(E::space_id);
  Tensor<V, S> out(e.dims(), tag);
  expr::run_assign(out.view(), e, false);
  return out;
}

}  // namespace ssmx
