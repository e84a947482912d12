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
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/cpu/conv1d.hpp"
#include "nodes.hpp"

namespace ssmx {

template <class T, Space S, class E>
void assign(TensorView<T, S> out, const E& e);
template <class T, Space S, class E>
void accumulate(TensorView<T, S> out, const E& e);

namespace backend {
// Per-space execution: run(out, evaluator, accumulate), gemm, reduce_all; the device adds
// reduce_axis(x, axis, out) (x and out contiguous; the host reduces along an axis in the
// evaluator's own loop).
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
  // Contiguous and not broadcast: element i of the output is element i here.
  static constexpr bool linear_capable = true;
  bool linear_ok(const Ext4& view) const {
    index_t acc = 1;
    for (int k = 3; k >= 0; --k) {
      if (view[std::size_t(k)] != 1 && st[k] != acc) return false;
      acc *= view[std::size_t(k)];
    }
    return true;
  }
  SSMX_HOST_DEVICE V coeff_linear(index_t i) const { return V(data[i]); }
#if !defined(__CUDA_ARCH__)
  // Host SIMD: a register of consecutive coefficients along the last axis from i.
  static constexpr bool packet_capable = std::is_same_v<Stored, V>;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4& i) const {
    const Stored* p = data + i.i[0] * st[0] + i.i[1] * st[1] + i.i[2] * st[2] + i.i[3] * st[3];
    if (st[3] == 1) return P::load(p);
    if (st[3] == 0) return P(*p);
    alignas(64) V tmp[P::size];
    for (int l = 0; l < P::size; ++l) tmp[l] = p[l * st[3]];
    return P::load(tmp);
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t i) const {
    return P::load(data + i);
  }
#endif
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
  static constexpr bool linear_capable = true;
  bool linear_ok(const Ext4&) const { return true; }
  SSMX_HOST_DEVICE T coeff_linear(index_t) const { return value; }
#if !defined(__CUDA_ARCH__)
  static constexpr bool packet_capable = true;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4&) const {
    return P(value);
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t) const {
    return P(value);
  }
#endif
};

// Evaluators that may take the host's SIMD path have packet<P>(i) and packet_linear<P>(i)
// (packet_capable): leaves, constants and elementwise nodes over them.
template <class Ev, class = void>
struct has_packet : std::false_type {};
#if !defined(__CUDA_ARCH__)
template <class Ev>
struct has_packet<Ev, std::enable_if_t<Ev::packet_capable>> : std::true_type {};
#endif

// Evaluators that may take the linear path have linear_ok(view) and coeff_linear(i);
// the others are read through coordinates only.
template <class Ev, class = void>
struct has_linear : std::false_type {};
template <class Ev>
struct has_linear<Ev, std::enable_if_t<Ev::linear_capable>> : std::true_type {};
template <class Ev>
bool linear_ok(const Ev& ev, const Ext4& view) {
  if constexpr (has_linear<Ev>::value)
    return ev.linear_ok(view);
  else
    return false;
}

template <class Op, class E, Space S>
struct Evaluator<Unary<Op, E>, S> {
  Evaluator<E, S> child;
  Evaluator(const Unary<Op, E>& u, EvalContext<S>& ctx, const Ext4& view) : child(u.child, ctx, view) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return Op{}(child.coeff(i)); }
  static constexpr bool linear_capable = has_linear<Evaluator<E, S>>::value;
  bool linear_ok(const Ext4& v) const { return expr::linear_ok(child, v); }
  SSMX_HOST_DEVICE auto coeff_linear(index_t i) const { return Op{}(child.coeff_linear(i)); }
#if !defined(__CUDA_ARCH__)
  static constexpr bool packet_capable = has_packet<Evaluator<E, S>>::value;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4& i) const {
    return Op{}(child.template packet<P>(i));
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t i) const {
    return Op{}(child.template packet_linear<P>(i));
  }
#endif
};

template <class Op, class L, class R, Space S>
struct Evaluator<Binary<Op, L, R>, S> {
  Evaluator<L, S> lhs;
  Evaluator<R, S> rhs;
  Evaluator(const Binary<Op, L, R>& b, EvalContext<S>& ctx, const Ext4& view)
      : lhs(b.lhs, ctx, view), rhs(b.rhs, ctx, view) {}
  SSMX_HOST_DEVICE auto coeff(const Index4& i) const { return Op{}(lhs.coeff(i), rhs.coeff(i)); }
  static constexpr bool linear_capable = has_linear<Evaluator<L, S>>::value && has_linear<Evaluator<R, S>>::value;
  bool linear_ok(const Ext4& v) const { return expr::linear_ok(lhs, v) && expr::linear_ok(rhs, v); }
  SSMX_HOST_DEVICE auto coeff_linear(index_t i) const { return Op{}(lhs.coeff_linear(i), rhs.coeff_linear(i)); }
#if !defined(__CUDA_ARCH__)
  static constexpr bool packet_capable = has_packet<Evaluator<L, S>>::value && has_packet<Evaluator<R, S>>::value;
  template <class P>
  SSMX_HOST_INLINE P packet(const Index4& i) const {
    return Op{}(lhs.template packet<P>(i), rhs.template packet<P>(i));
  }
  template <class P>
  SSMX_HOST_INLINE P packet_linear(index_t i) const {
    return Op{}(lhs.template packet_linear<P>(i), rhs.template packet_linear<P>(i));
  }
#endif
};

template <Space S, class E>
TensorView<const typename E::value_type, S> materialize(const E& e, EvalContext<S>& ctx);

// A broadcast repeats its operand: a computed operand is materialised once first, so
// that an expensive sub-expression (exp, softplus, ...) is not recomputed per copy.
template <class E, Space S>
struct Evaluator<BroadcastTo<E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  Evaluator(const BroadcastTo<E>& b, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(materialize(b.child, ctx), view) {}
};

// Coordinate remapping without branches: child coordinate k takes parent coordinate
// src[k] (4 reads the constant 0).
struct CoordMap {
  int src[4];
  SSMX_HOST_DEVICE Index4 apply(const Index4& i) const {
    const index_t ext[5] = {i.i[0], i.i[1], i.i[2], i.i[3], 0};
    return Index4{{ext[src[0]], ext[src[1]], ext[src[2]], ext[src[3]]}};
  }
};

// A view with a size-1 dimension inserted at `axis`: an unsqueeze read in place.
template <class T, Space S>
TensorView<T, S> unsqueezed_view(const TensorView<T, S>& v, int axis) {
  Dims d;
  d.rank = v.rank() + 1;
  std::array<index_t, max_rank> st{0, 0, 0, 0};
  for (int i = 0, k = 0; i < d.rank; ++i) {
    if (i == axis) {
      d[i] = 1;
    } else {
      d[i] = v.extent(k);
      st[std::size_t(i)] = v.stride(k);
      ++k;
    }
  }
  return TensorView<T, S>(v.data(), d, st);
}

template <class Stored, Space S>
struct Evaluator<Unsqueeze<Leaf<Stored, S>>, S> : ViewReader<Stored, typename Leaf<Stored, S>::value_type> {
  Evaluator(const Unsqueeze<Leaf<Stored, S>>& u, EvalContext<S>&, const Ext4& view)
      : ViewReader<Stored, typename Leaf<Stored, S>::value_type>(unsqueezed_view(u.child.view, u.axis), view) {}
};

// Unsqueeze exists to broadcast: a computed child is materialised once (see BroadcastTo).
template <class E, Space S>
struct Evaluator<Unsqueeze<E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  Evaluator(const Unsqueeze<E>& u, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(unsqueezed_view(materialize(u.child, ctx), u.axis), view) {}
};

template <class Stored, Space S>
struct Evaluator<Transpose<Leaf<Stored, S>>, S> : ViewReader<Stored, typename Leaf<Stored, S>::value_type> {
  static TensorView<const Stored, S> swapped(const TensorView<const Stored, S>& v) {
    Dims d = v.dims();
    auto st = v.strides();
    std::swap(d[d.rank - 1], d[d.rank - 2]);
    std::swap(st[std::size_t(d.rank - 1)], st[std::size_t(d.rank - 2)]);
    return TensorView<const Stored, S>(v.data(), d, st);
  }
  Evaluator(const Transpose<Leaf<Stored, S>>& t, EvalContext<S>&, const Ext4& view)
      : ViewReader<Stored, typename Leaf<Stored, S>::value_type>(swapped(t.child.view), view) {}
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

// The loop that computes a reduction, one output coefficient at a time. Used only to
// materialise Reduce nodes (below).
template <class Op, class E>
struct ReduceLoop : Reduce<Op, E> {
  explicit ReduceLoop(const Reduce<Op, E>& r) : Reduce<Op, E>(r) {}
};

template <class Op, class E, Space S>
struct Evaluator<ReduceLoop<Op, E>, S> {
  using V = typename E::value_type;
  Evaluator<E, S> child;
  CoordMap map;    // parent coordinates -> child coordinates (the reduced one set per step)
  int pos;         // padded position of the reduced axis in the child
  index_t n;       // extent of the reduced axis
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
  static CoordMap make_map(const Reduce<Op, E>& r, int p) {
    CoordMap m{{0, 1, 2, 3}};
    if (!r.keepdim)
      for (int k = 0; k < p; ++k) m.src[k] = k + 1;
    m.src[p] = 4;
    return m;
  }
  Evaluator(const ReduceLoop<Op, E>& r, EvalContext<S>& ctx, const Ext4& view)
      : child(r.child, ctx, child_view(r, view)),
        map(make_map(r, 4 - r.child.dims().rank + r.axis)),
        pos(4 - r.child.dims().rank + r.axis),
        n(r.child.dims()[r.axis]) {}
  SSMX_HOST_DEVICE V coeff(const Index4& i) const {
    Index4 j = map.apply(i);
    V acc = Op::template init<V>();
#if !defined(__CUDA_ARCH__)
    // Host: a reduction along the last axis combines registers, then their lanes, then
    // the remainder (a fixed order).
    if constexpr (has_packet<Evaluator<E, S>>::value) {
      using P = simd::Pack<V>;
      if (pos == 3 && n >= 2 * P::size) {
        P pacc = P(Op::template init<V>());
        index_t k = 0;
        for (; k + P::size <= n; k += P::size) {
          j.i[3] = k;
          pacc = Op::combine(pacc, child.template packet<P>(j));
        }
        alignas(64) V lanes[P::size];
        pacc.store(lanes);
        for (int l = 0; l < P::size; ++l) acc = Op::combine(acc, lanes[l]);
        for (; k < n; ++k) {
          j.i[3] = k;
          acc = Op::combine(acc, V(child.coeff(j)));
        }
        return Op::finish(acc, n);
      }
    }
#endif
    for (index_t k = 0; k < n; ++k) {
      j.i[pos] = k;
      acc = Op::combine(acc, V(child.coeff(j)));
    }
    return Op::finish(acc, n);
  }
};

// Reducing a stored tensor: walk the reduced axis with a pointer stride.
template <class Op, class Stored, Space S>
struct Evaluator<ReduceLoop<Op, Leaf<Stored, S>>, S> {
  using V = compute_t<Stored>;
  ViewReader<Stored, V> base;  // reads element 0 of the reduced axis
  index_t step, n;
  Evaluator(const ReduceLoop<Op, Leaf<Stored, S>>& r, EvalContext<S>&, const Ext4& view)
      : base(reduced_view(r), view), step(r.child.view.stride(r.axis)), n(r.child.dims()[r.axis]) {}
  // The child with the reduced axis dropped (keepdim: kept at extent 1).
  static TensorView<const Stored, S> reduced_view(const ReduceLoop<Op, Leaf<Stored, S>>& r) {
    const auto& v = r.child.view;
    Dims d = v.dims();
    auto st = v.strides();
    if (r.keepdim) {
      d[r.axis] = 1;
      st[std::size_t(r.axis)] = 0;
      return TensorView<const Stored, S>(v.data(), d, st);
    }
    Dims o;
    o.rank = d.rank - 1;
    std::array<index_t, max_rank> os{0, 0, 0, 0};
    for (int i = 0, k = 0; i < d.rank; ++i)
      if (i != r.axis) {
        o[k] = d[i];
        os[std::size_t(k++)] = st[std::size_t(i)];
      }
    return TensorView<const Stored, S>(v.data(), o, os);
  }
  SSMX_HOST_DEVICE V coeff(const Index4& i) const {
    const Stored* p = base.data + i.i[0] * base.st[0] + i.i[1] * base.st[1] + i.i[2] * base.st[2] + i.i[3] * base.st[3];
    V acc = Op::template init<V>();
    index_t k = 0;
#if !defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<Stored, V>) {  // contiguous: registers, then lanes, then the rest
      using P = simd::Pack<V>;
      if (step == 1 && n >= 2 * P::size) {
        P pacc = P(Op::template init<V>());
        for (; k + P::size <= n; k += P::size) pacc = Op::combine(pacc, P::load(p + k));
        alignas(64) V lanes[P::size];
        pacc.store(lanes);
        for (int l = 0; l < P::size; ++l) acc = Op::combine(acc, lanes[l]);
      }
    }
#endif
    for (; k < n; ++k) acc = Op::combine(acc, V(p[k * step]));
    return Op::finish(acc, n);
  }
};

// A reduction is computed once into a temporary and then read like a leaf: inside a
// larger expression it is usually broadcast (mean(x², -1, keepdim) in a norm), and a lazy
// reduction would be recomputed for every element it is broadcast to.
template <class Op, class E, Space S>
struct Evaluator<Reduce<Op, E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  static TensorView<const V, S> compute(const Reduce<Op, E>& r, EvalContext<S>& ctx);
  Evaluator(const Reduce<Op, E>& r, EvalContext<S>& ctx, const Ext4& view) : ViewReader<V, V>(compute(r, ctx), view) {}
};

// ---- materialised nodes -----------------------------------------------------------------

// Materialises `e` into a contiguous temporary of ctx, unless it already is a contiguous
// leaf of the compute type; returns a view either way.
// Nodes whose evaluator computes into a fresh contiguous buffer: materialising one is
// computing it, with no copy.
template <class E>
struct computes_buffer : std::false_type {};
template <class L, class R>
struct computes_buffer<MatMul<L, R>> : std::true_type {};
template <class Kind, class E>
struct computes_buffer<Softmax<Kind, E>> : std::true_type {};
template <class E>
struct computes_buffer<RmsNormalize<E>> : std::true_type {};
template <class E>
struct computes_buffer<CausalConv1d<E>> : std::true_type {};
template <class E>
struct computes_buffer<Reshape<E>> : std::true_type {};

template <Space S, class E>
TensorView<const typename E::value_type, S> materialize(const E& e, EvalContext<S>& ctx) {
  using V = typename E::value_type;
  if constexpr (computes_buffer<E>::value) {
    return Evaluator<E, S>::compute(e, ctx);
  } else if constexpr (std::is_same_v<E, Leaf<V, S>>) {
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

// An operand of gemm: as materialize, and a column-major leaf (e.g. a tied LM head, the
// embedding read transposed through strides) is read in place too, which would otherwise
// cost a copy of the whole matrix per product.
template <Space S, class E>
TensorView<const typename E::value_type, S> gemm_operand(const E& e, EvalContext<S>& ctx) {
  using V = typename E::value_type;
  auto column_major = [](const TensorView<const V, S>& v) {
    return v.rank() == 2 && v.extent(0) > 1 && v.stride(0) == 1 && v.stride(1) == v.extent(0);
  };
  if constexpr (std::is_same_v<E, Leaf<V, S>>) {
    if (column_major(e.view)) return e.view;
  } else if constexpr (std::is_same_v<E, Transpose<Leaf<V, S>>>) {  // its transpose: row-major
    const auto& v = e.child.view;
    if (column_major(v)) return TensorView<const V, S>(v.data(), e.dims(), {v.stride(1), v.stride(0), 0, 0});
  }
  return materialize(e, ctx);
}

template <class E>
struct is_matmul : std::false_type {};
template <class L, class R>
struct is_matmul<MatMul<L, R>> : std::true_type {};

// Whether the memory spans of two views (first to last element, by strides) intersect.
template <class A, class B, Space S>
bool overlaps(const TensorView<A, S>& a, const TensorView<B, S>& b) {
  auto span = [](const auto& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(v.data());
    std::ptrdiff_t lo = 0, hi = 0;
    for (int i = 0; i < v.rank(); ++i) {
      if (v.extent(i) == 0) return std::make_pair(p, p);
      const std::ptrdiff_t d = std::ptrdiff_t((v.extent(i) - 1) * v.stride(i));
      (d < 0 ? lo : hi) += d;
    }
    const std::ptrdiff_t size = std::ptrdiff_t(sizeof(*v.data()));
    return std::make_pair(p + lo * size, p + (hi + 1) * size);
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

template <class L, class R, Space S>
struct Evaluator<MatMul<L, R>, S> : ViewReader<typename L::value_type, typename L::value_type> {
  using V = typename L::value_type;
  static TensorView<const V, S> compute(const MatMul<L, R>& m, EvalContext<S>& ctx) {
    TensorView<const V, S> a = gemm_operand(m.lhs, ctx), b = gemm_operand(m.rhs, ctx);
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

template <class E, Space S>
struct Evaluator<CausalConv1d<E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  // On the host, one pass over the rows for all taps (backend/cpu/conv1d.hpp); elsewhere W
  // accumulating passes over the [n, C] output, one per tap.
  static TensorView<const V, S> compute(const CausalConv1d<E>& c, EvalContext<S>& ctx) {
    TensorView<const V, S> x = materialize(c.child, ctx);
    Tensor<V, S>& out = ctx.template temp<V>(c.dims());
    const index_t n = out.extent(0);
    if constexpr (S == Space::Host && (std::is_same_v<V, float> || std::is_same_v<V, double>)) {
      if (x.stride(1) == 1) {
        const index_t C = x.extent(1);
        const Work<V> taps = backend::cpu::conv1d_taps(c.weight.view, c.width);
        Work<V> bias;
        if (c.has_bias()) {
          bias = Work<V>(std::size_t(C));
          for (index_t k = 0; k < C; ++k) bias[std::size_t(k)] = c.bias.view.data()[k * c.bias.view.stride(0)];
        }
        const backend::cpu::Conv1dMask mask{c.mask.data(), c.has_mask() ? c.mask.stride(0) : 0,
                                            c.has_mask() ? c.mask.stride(1) : 0};
        backend::cpu::conv1d_forward<V>(x.data(), x.stride(0), taps.data(), c.has_bias() ? bias.data() : nullptr, mask,
                                        n, C, c.width, out.data(), C);
        return out.view();
      }
    }
    if (c.has_bias())
      ssmx::assign(out.view(), c.bias);
    else
      ssmx::assign(out.view(), Constant<V>(V(0)));
    for (index_t j = 0; j < c.width; ++j) {
      auto term = leaf(x.slice(j, j + n)) * leaf(c.tap(j));
      if (c.has_mask())
        ssmx::accumulate(out.view(), term * leaf(c.tap_mask(j)));
      else
        ssmx::accumulate(out.view(), term);
    }
    return out.view();
  }
  Evaluator(const CausalConv1d<E>& c, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(compute(c, ctx), view) {}
};

template <class E, Space S>
struct Evaluator<RmsNormalize<E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  static TensorView<const V, S> compute(const RmsNormalize<E>& r, EvalContext<S>& ctx) {
    TensorView<const V, S> x = materialize(r.child, ctx);
    Tensor<V, S>& y = ctx.template temp<V>(x.dims());
    ssmx::assign(y.view(), leaf(x) * ssmx::rsqrt(ssmx::mean(ssmx::square(leaf(x)), -1, true) + V(r.eps)));
    return y.view();
  }
  Evaluator(const RmsNormalize<E>& r, EvalContext<S>& ctx, const Ext4& view)
      : ViewReader<V, V>(compute(r, ctx), view) {}
};

template <class E, Space S>
struct Evaluator<Reshape<E>, S> : ViewReader<typename E::value_type, typename E::value_type> {
  using V = typename E::value_type;
  // The child in a contiguous buffer (a contiguous leaf in place), viewed with the new extents.
  static TensorView<const V, S> compute(const Reshape<E>& r, EvalContext<S>& ctx) {
    if constexpr (!std::is_same_v<E, Transpose<Leaf<V, S>>>) {  // materialize reads that one strided
      return TensorView<const V, S>(materialize(r.child, ctx).data(), r.shape);
    } else {
      Tensor<V, S>& t = ctx.template temp<V>(r.child.dims());
      ssmx::assign(t.view(), r.child);
      return TensorView<const V, S>(t.data(), r.shape);
    }
  }
  Evaluator(const Reshape<E>& r, EvalContext<S>& ctx, const Ext4& view) : ViewReader<V, V>(compute(r, ctx), view) {}
};

}  // namespace expr

namespace expr {
template <class Op, class E, Space S>
TensorView<const typename E::value_type, S> Evaluator<Reduce<Op, E>, S>::compute(const Reduce<Op, E>& r,
                                                                                 EvalContext<S>& ctx) {
  Tensor<V, S>& t = ctx.template temp<V>(r.dims());
  bool blocked = false;  // many threads per output
  if constexpr (S != Space::Host) {
    // Few outputs over a long axis (the parameter gradients summed over tokens) would leave
    // the device nearly idle with one thread per output: a block reduction per output
    // instead, over the materialised child. Many outputs (or short axes) keep the fused
    // loop below, which never materialises the child.
    const index_t L = r.child.dims()[r.axis], outputs = t.numel();
    blocked = L >= 64 && outputs < 32768;
    if (blocked) backend::Exec<S>::template reduce_axis<Op, V>(materialize(r.child, ctx), r.axis, t.view());
  }
  if (!blocked) ssmx::assign(t.view(), ReduceLoop<Op, E>(r));  // one sequential loop per output (the host's order)
  return t.view();
}
}  // namespace expr

// ---- evaluation entry points ----------------------------------------------------------------

namespace expr {
template <class T, Space S, class E>
void run_assign(TensorView<T, S> out, const E& e, bool accumulate) {
  static_assert(E::space_id == any_space || Space(E::space_id) == S,
                "ssmx: the expression and the destination live in different memory spaces");
  const Dims ed = e.dims(), od = out.dims();
  bool fits = ed.rank <= od.rank;
  for (int i = 0; fits && i < ed.rank; ++i) {
    const index_t x = ed[i], y = od[od.rank - ed.rank + i];
    fits = x == y || x == 1;
  }
  SSMX_REQUIRE(fits, ShapeError, "assign: an expression of shape ", ed.str(), " cannot be written to a tensor of shape ",
               od.str());
  EvalContext<S> ctx;
  if constexpr (is_matmul<E>::value && S == Space::Host && std::is_same_v<T, typename E::value_type>) {
    // A product written to (or added to) a whole row-major matrix that neither operand
    // overlaps: gemm writes it there (beta 1 to add), with no temporary and no extra pass.
    if (ed.rank == 2 && od.rank == 2 && ed[0] == od[0] && ed[1] == od[1] && out.stride(1) == 1 &&
        out.stride(0) == out.extent(1)) {
      auto a = gemm_operand(e.lhs, ctx), b = gemm_operand(e.rhs, ctx);
      if (!overlaps(a, out) && !overlaps(b, out)) {
        backend::Exec<S>::gemm(a, b, out, accumulate ? T(1) : T(0));
        return;
      }
    }
  }
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

// ---- fill and copy in any memory space ----------------------------------------------------
// The host forms (core/tensor.hpp) are more specialised and win overload resolution for host
// views; these serve device views (and cross-space copies) with the same calls.

// Sets every element of v to `value` (one kernel on the GPU).
template <class T, Space S>
void fill(TensorView<T, S> v, T value) {
  assign(v, expr::Constant<T>(value));
}
template <class T, Space S>
void fill(Tensor<T, S>& t, T value) {
  assign(t.view(), expr::Constant<T>(value));
}

// dst = src, same extents. Within one space any strides; across spaces (host <-> device)
// both views must be contiguous. A copy to host memory returns once the values are there.
template <class T, Space D, Space Sr>
void copy(TensorView<T, D> dst, TensorView<const T, Sr> src) {
  SSMX_REQUIRE(dst.dims() == src.dims(), ShapeError, "copy: destination shape ", dst.dims().str(),
               " differs from source shape ", src.dims().str());
  if constexpr (D == Sr) {
    assign(dst, expr::Leaf<T, Sr>(src));
  } else {
    SSMX_REQUIRE(dst.is_contiguous() && src.is_contiguous(), ShapeError, "copy from ", space_name(Sr), " to ",
                 space_name(D), ": both views of shape ", dst.dims().str(), " must be contiguous");
    detail::copy_bytes(dst.data(), D, src.data(), Sr, std::size_t(src.numel()) * sizeof(T));
  }
}
template <class T, Space D, Space Sr>
void copy(TensorView<T, D> dst, TensorView<T, Sr> src) {
  copy<T>(dst, TensorView<const T, Sr>(src));
}

}  // namespace ssmx
