// ssmx — lifted expressions: the part of a scan layer's maps that lives on [tokens × state]
// and is evaluated one coefficient (or one SIMD register of coefficients) at a time inside
// the fused scan, never materialised.
//
// A layer's decay, inject and readout are ordinary expressions. Their nodes fall in two
// kinds:
//   lifted    StateLeaf (the scan state, where the readout wrote leaf(h)), and Unary /
//             Binary nodes with a lifted or broadcast operand: coefficient-wise maps over
//             [tokens, state...];
//   operands  everything else: Unsqueeze / BroadcastTo (the broadcast into the state) of a
//             token-level subtree, a leaf, a constant, or any other subtree (matmul, softplus
//             of a [tokens, N] tensor, ...). Operands are computed once per stretch, with a
//             tape for their own backward pass, and read through broadcast strides.
// The evaluators here are trivially copyable, built on the host with pointers into the
// operands' values and cotangent buffers, and run in a CPU loop (scalar and SIMD paths) or
// a CUDA kernel (scalar path). Coordinates are those of the domain [tokens, state...]
// padded to rank 4; a "row" is the last state axis, so a row of coefficients is read with
// stride 1 (a contiguous operand) or 0 (one broadcast along the row).
// Private header: include <ssmx/expr/expr.hpp>.
#pragma once

#include <type_traits>

#include "evaluator.hpp"

namespace ssmx {

namespace expr {

// The scan state as a leaf of the readout: [tokens, state...]. Only lifted evaluators read it.
template <class T, Space S>
struct StateLeaf : ExprBase<StateLeaf<T, S>> {
  using value_type = T;
  static constexpr Space space = S;
  static constexpr int space_id = int(S);
  Dims shape;
  explicit StateLeaf(const Dims& d) : shape(d) {}
  Dims dims() const { return shape; }
};

}  // namespace expr

// What the fused scan passes to a layer's readout in place of the states' view: leaf(h)
// (or h used as an operand) becomes a StateLeaf. It answers the shape queries of a view.
template <class T, Space S = Space::Host>
struct StateRef {
  Dims shape;
  const Dims& dims() const { return shape; }
  int rank() const { return shape.rank; }
  index_t extent(int i) const { return shape[i]; }
};

namespace expr {

template <class T, Space S>
struct to_expr<StateRef<T, S>> {
  using type = StateLeaf<T, S>;
  static type make(const StateRef<T, S>& r) { return type(r.shape); }
};

// ---- classification ------------------------------------------------------------------

// Whether a subtree reads the scan state.
template <class E>
struct has_state : std::false_type {};
template <class T, Space S>
struct has_state<StateLeaf<T, S>> : std::true_type {};
template <class Op, class E>
struct has_state<Unary<Op, E>> : has_state<E> {};
template <class Op, class L, class R>
struct has_state<Binary<Op, L, R>> : std::bool_constant<has_state<L>::value || has_state<R>::value> {};
template <class E>
struct has_state<Unsqueeze<E>> : has_state<E> {};
template <class E>
struct has_state<Transpose<E>> : has_state<E> {};
template <class E>
struct has_state<BroadcastTo<E>> : has_state<E> {};
template <class Op, class E>
struct has_state<Reduce<Op, E>> : has_state<E> {};
template <class Op, class E>
struct has_state<ReduceAll<Op, E>> : has_state<E> {};
template <class Kind, class E>
struct has_state<Softmax<Kind, E>> : has_state<E> {};
template <class E>
struct has_state<CausalConv1d<E>> : has_state<E> {};
template <class E>
struct has_state<Reshape<E>> : has_state<E> {};
template <class E>
struct has_state<RmsNormalize<E>> : has_state<E> {};
template <class L, class R>
struct has_state<MatMul<L, R>> : std::bool_constant<has_state<L>::value || has_state<R>::value> {};

// A broadcast into the state: the boundary between a lifted node and a token-level operand.
template <class E>
struct is_broadcast : std::false_type {};
template <class E>
struct is_broadcast<Unsqueeze<E>> : std::true_type {};
template <class E>
struct is_broadcast<BroadcastTo<E>> : std::true_type {};

template <class E>
struct is_lifted : std::false_type {};
template <class T, Space S>
struct is_lifted<StateLeaf<T, S>> : std::true_type {};
template <class Op, class E>
struct is_lifted<Unary<Op, E>> : std::bool_constant<is_lifted<E>::value || is_broadcast<E>::value> {};
template <class Op, class L, class R>
struct is_lifted<Binary<Op, L, R>>
    : std::bool_constant<is_lifted<L>::value || is_broadcast<L>::value || is_lifted<R>::value ||
                         is_broadcast<R>::value> {};

// Whether `E` can be evaluated coefficient by coefficient over the domain: a lifted tree
// whose operands do not read the state, or a single operand that does not.
template <class E>
struct liftable : std::bool_constant<!has_state<E>::value> {};
template <class T, Space S>
struct liftable<StateLeaf<T, S>> : std::true_type {};
template <class Op, class E>
struct liftable<Unary<Op, E>> : std::bool_constant<is_lifted<Unary<Op, E>>::value ? liftable<E>::value
                                                                                   : !has_state<E>::value> {};
template <class Op, class L, class R>
struct liftable<Binary<Op, L, R>>
    : std::bool_constant<is_lifted<Binary<Op, L, R>>::value ? liftable<L>::value && liftable<R>::value
                                                            : !has_state<L>::value && !has_state<R>::value> {};

// The value an operand's reader views: the child of a broadcast, else the operand itself.
template <class E>
struct operand_child {
  using type = E;
  static const E& get(const E& e) { return e; }
};
template <class E>
struct operand_child<Unsqueeze<E>> {
  using type = E;
  static const E& get(const Unsqueeze<E>& e) { return e.child; }
};
template <class E>
struct operand_child<BroadcastTo<E>> {
  using type = E;
  static const E& get(const BroadcastTo<E>& e) { return e.child; }
};

// ---- the unique reduction of the readout over the state ----------------------------------
// A fusable readout reads the state only inside one Reduce (sum or mean over a state axis)
// of a liftable tree: y = rest(reduce(lifted(h, ...)), ...).

template <class E>
struct state_reduce_count : std::integral_constant<int, 0> {};
template <class Op, class E>
struct state_reduce_count<Unary<Op, E>> : state_reduce_count<E> {};
template <class Op, class L, class R>
struct state_reduce_count<Binary<Op, L, R>>
    : std::integral_constant<int, state_reduce_count<L>::value + state_reduce_count<R>::value> {};
template <class E>
struct state_reduce_count<Unsqueeze<E>> : state_reduce_count<E> {};
template <class E>
struct state_reduce_count<Transpose<E>> : state_reduce_count<E> {};
template <class E>
struct state_reduce_count<BroadcastTo<E>> : state_reduce_count<E> {};
template <class Op, class E>
struct state_reduce_count<Reduce<Op, E>>
    : std::integral_constant<int, has_state<E>::value ? 1 : state_reduce_count<E>::value> {};
template <class Op, class E>
struct state_reduce_count<ReduceAll<Op, E>> : state_reduce_count<E> {};
template <class Kind, class E>
struct state_reduce_count<Softmax<Kind, E>> : state_reduce_count<E> {};
template <class E>
struct state_reduce_count<CausalConv1d<E>> : state_reduce_count<E> {};
template <class E>
struct state_reduce_count<Reshape<E>> : state_reduce_count<E> {};
template <class E>
struct state_reduce_count<RmsNormalize<E>> : state_reduce_count<E> {};
template <class L, class R>
struct state_reduce_count<MatMul<L, R>>
    : std::integral_constant<int, state_reduce_count<L>::value + state_reduce_count<R>::value> {};

// The type of that Reduce node (void when there is none).
template <class E>
struct state_reduce {
  using type = void;
};
template <class A, class B>
using first_non_void_t = std::conditional_t<std::is_void_v<A>, B, A>;
template <class Op, class E>
struct state_reduce<Unary<Op, E>> : state_reduce<E> {};
template <class Op, class L, class R>
struct state_reduce<Binary<Op, L, R>> {
  using type = first_non_void_t<typename state_reduce<L>::type, typename state_reduce<R>::type>;
};
template <class E>
struct state_reduce<Unsqueeze<E>> : state_reduce<E> {};
template <class E>
struct state_reduce<Transpose<E>> : state_reduce<E> {};
template <class E>
struct state_reduce<BroadcastTo<E>> : state_reduce<E> {};
template <class Op, class E>
struct state_reduce<Reduce<Op, E>> {
  using type = std::conditional_t<has_state<E>::value, Reduce<Op, E>, typename state_reduce<E>::type>;
};
template <class Op, class E>
struct state_reduce<ReduceAll<Op, E>> : state_reduce<E> {};
template <class Kind, class E>
struct state_reduce<Softmax<Kind, E>> : state_reduce<E> {};
template <class E>
struct state_reduce<CausalConv1d<E>> : state_reduce<E> {};
template <class E>
struct state_reduce<Reshape<E>> : state_reduce<E> {};
template <class E>
struct state_reduce<RmsNormalize<E>> : state_reduce<E> {};
template <class L, class R>
struct state_reduce<MatMul<L, R>> {
  using type = first_non_void_t<typename state_reduce<L>::type, typename state_reduce<R>::type>;
};

// Calls f(node) on the state reduction inside e.
struct StateReduceVisitor {
  template <class F, class Stored, Space S>
  static void go(const Leaf<Stored, S>&, F&) {}
  template <class F, class T>
  static void go(const Constant<T>&, F&) {}
  template <class F, class Op, class E>
  static void go(const Unary<Op, E>& e, F& f) { go(e.child, f); }
  template <class F, class Op, class L, class R>
  static void go(const Binary<Op, L, R>& e, F& f) {
    go(e.lhs, f);
    go(e.rhs, f);
  }
  template <class F, class E>
  static void go(const Unsqueeze<E>& e, F& f) { go(e.child, f); }
  template <class F, class E>
  static void go(const Transpose<E>& e, F& f) { go(e.child, f); }
  template <class F, class E>
  static void go(const BroadcastTo<E>& e, F& f) { go(e.child, f); }
  template <class F, class Op, class E>
  static void go(const Reduce<Op, E>& e, F& f) {
    if constexpr (has_state<E>::value)
      f(e);
    else
      go(e.child, f);
  }
  template <class F, class Op, class E>
  static void go(const ReduceAll<Op, E>& e, F& f) { go(e.child, f); }
  template <class F, class Kind, class E>
  static void go(const Softmax<Kind, E>& e, F& f) { go(e.child, f); }
  template <class F, class E>
  static void go(const CausalConv1d<E>& e, F& f) { go(e.child, f); }
  template <class F, class E>
  static void go(const Reshape<E>& e, F& f) { go(e.child, f); }
  template <class F, class E>
  static void go(const RmsNormalize<E>& e, F& f) { go(e.child, f); }
  template <class F, class L, class R>
  static void go(const MatMul<L, R>& e, F& f) {
    go(e.lhs, f);
    go(e.rhs, f);
  }
};

// The readout with its state reduction replaced by a leaf holding the reduction's value.
template <class V, Space S>
struct SubstituteStateReduce {
  Leaf<V, S> value;
  template <class Stored>
  Leaf<Stored, S> operator()(const Leaf<Stored, S>& e) const {
    return e;
  }
  template <class T>
  Constant<T> operator()(const Constant<T>& e) const {
    return e;
  }
  template <class Op, class E>
  auto operator()(const Unary<Op, E>& e) const {
    auto c = (*this)(e.child);
    return Unary<Op, decltype(c)>(std::move(c));
  }
  template <class Op, class L, class R>
  auto operator()(const Binary<Op, L, R>& e) const {
    auto l = (*this)(e.lhs);
    auto r = (*this)(e.rhs);
    return Binary<Op, decltype(l), decltype(r)>(std::move(l), std::move(r));
  }
  template <class E>
  auto operator()(const Unsqueeze<E>& e) const {
    auto c = (*this)(e.child);
    return Unsqueeze<decltype(c)>(std::move(c), e.axis);
  }
  template <class E>
  auto operator()(const Transpose<E>& e) const {
    auto c = (*this)(e.child);
    return Transpose<decltype(c)>(std::move(c));
  }
  template <class E>
  auto operator()(const BroadcastTo<E>& e) const {
    auto c = (*this)(e.child);
    return BroadcastTo<decltype(c)>(std::move(c), e.shape);
  }
  template <class Op, class E>
  auto operator()(const Reduce<Op, E>& e) const {
    if constexpr (has_state<E>::value) {
      return value;
    } else {
      auto c = (*this)(e.child);
      return Reduce<Op, decltype(c)>(std::move(c), e.axis, e.keepdim);
    }
  }
  template <class Op, class E>
  auto operator()(const ReduceAll<Op, E>& e) const {
    auto c = (*this)(e.child);
    return ReduceAll<Op, decltype(c)>(std::move(c));
  }
  template <class Kind, class E>
  auto operator()(const Softmax<Kind, E>& e) const {
    auto c = (*this)(e.child);
    return Softmax<Kind, decltype(c)>(std::move(c));
  }
  template <class E>
  auto operator()(const CausalConv1d<E>& e) const {
    auto c = (*this)(e.child);
    return CausalConv1d<decltype(c)>(std::move(c), e.weight.view, e.bias.view, e.mask);
  }
  template <class E>
  auto operator()(const Reshape<E>& e) const {
    auto c = (*this)(e.child);
    return Reshape<decltype(c)>(std::move(c), e.shape);
  }
  template <class E>
  auto operator()(const RmsNormalize<E>& e) const {
    auto c = (*this)(e.child);
    return RmsNormalize<decltype(c)>(std::move(c), e.eps);
  }
  template <class L, class R>
  auto operator()(const MatMul<L, R>& e) const {
    auto l = (*this)(e.lhs);
    auto r = (*this)(e.rhs);
    return MatMul<decltype(l), decltype(r)>(std::move(l), std::move(r));
  }
};

// ---- readers and accumulators over the domain ----------------------------------------------

// Element strides of a view against the padded domain extents (0 where it broadcasts).
template <class V, Space S>
void domain_strides(const TensorView<const V, S>& v, const Ext4& domain, index_t (&st)[4]) {
  const ViewReader<V, V> r(v, domain);
  for (int k = 0; k < 4; ++k) st[k] = r.st[k];
}

// p[0, len) = v, a register at a time (host code).
template <class V>
inline void fill_row(V* p, index_t len, V v) {
  using P = simd::Pack<V>;
  const P pv(v);
  index_t j = 0;
  for (; j + P::size <= len; j += P::size) pv.store(p + j);
  for (; j < len; ++j) p[j] = v;
}

// Reads an operand at domain coordinates: begin_row fixes a row (and where it starts).
// On the host a row is read through a contiguous pointer, so that the SIMD loop has no
// branch: a row with stride 1 directly, any other (a broadcast along the row, stride 0, or
// a strided one) after copying it into a scratch row of row_len elements (bind()).
template <class V>
struct LiftSrc {
  const V* base = nullptr;
  index_t st[4] = {0, 0, 0, 0};
  const V* row = nullptr;
  const V* ptr = nullptr;  // host: the row, contiguous
  V* scratch = nullptr;    // host: row_len elements for a strided row
  V value = V(0);          // host: the value of a row broadcast along its length
  index_t len = 0;         // row_len
  // Takes its scratch row from `cursor` (the host passes provide one per tile).
  void bind(V*& cursor, index_t row_len) {
    len = row_len;
    if (st[3] != 1 && st[3] != 0) {
      scratch = cursor;
      cursor += row_len;
    }
  }
  SSMX_INLINE void begin_row(const Index4& i) {
    row = base + i.i[0] * st[0] + i.i[1] * st[1] + i.i[2] * st[2] + i.i[3] * st[3];
    refresh();
  }
  // The next row along padded axis 2 (the rows of a tile follow one another there).
  SSMX_INLINE void next_row() {
    row += st[2];
    refresh();
  }
  SSMX_INLINE void refresh() {
#if !defined(__CUDA_ARCH__)
    if (st[3] == 1) {
      ptr = row;
    } else if (st[3] == 0) {
      value = row[0];
    } else {
      for (index_t j = 0; j < len; ++j) scratch[j] = row[j * st[3]];
      ptr = scratch;
    }
#endif
  }
#if !defined(__CUDA_ARCH__)
  SSMX_HOST_INLINE V at(index_t j) const { return st[3] == 0 ? value : ptr[j]; }
  template <class P>
  SSMX_HOST_INLINE P pack(index_t j) const {
    return st[3] == 0 ? P(value) : P::load(ptr + j);
  }
#else
  __device__ V at(index_t j) const { return row[j * st[3]]; }
#endif
};

// Accumulates at domain coordinates into a buffer of its own shape: coordinates that the
// buffer broadcasts along are summed (in a fixed order). Tiles that would add into the
// same elements get their own copy (`tile_stride` apart), summed afterwards in tile order.
// On the host a row along which the buffer broadcasts collects in one register, added as
// its lanes' sum by end_row; a strided row collects in a scratch row.
template <class V>
struct LiftDst {
  V* base0 = nullptr;  // tile 0's copy
  index_t tile_stride = 0;
  index_t st[4] = {0, 0, 0, 0};
  V* base = nullptr;
  V* row = nullptr;
  V* ptr = nullptr;      // host: where a contiguous or strided row collects
  V* scratch = nullptr;  // host: row_len elements for a strided row
  index_t len = 0;
  V acc_scalar = V(0);   // a broadcast row's single coefficients so far
  alignas(64) V acc[16] = {};  // host: its register (up to 16 lanes; the same layout for
                               // host and device code, which does not use it)
  void bind(V*& cursor, index_t row_len) {
    len = row_len;
    if (st[3] != 1 && st[3] != 0) {
      scratch = cursor;
      cursor += row_len;
    }
  }
  SSMX_INLINE void set_tile(index_t k) { base = base0 + k * tile_stride; }
  SSMX_INLINE void begin_row(const Index4& i) {
    row = base + i.i[0] * st[0] + i.i[1] * st[1] + i.i[2] * st[2] + i.i[3] * st[3];
    reset();
  }
  // The next row along padded axis 2 (after end_row).
  SSMX_INLINE void next_row() {
    row += st[2];
    reset();
  }
  SSMX_INLINE void reset() {
    acc_scalar = V(0);
#if !defined(__CUDA_ARCH__)
    if (st[3] == 1) {
      ptr = row;
    } else if (st[3] == 0) {
      simd::Pack<V>(0).store(acc);
    } else {
      fill_row(scratch, len, V(0));
      ptr = scratch;
    }
#endif
  }
#if !defined(__CUDA_ARCH__)
  SSMX_HOST_INLINE void add(index_t j, V g) {
    if (st[3] == 0)
      acc_scalar += g;
    else
      ptr[j] += g;
  }
  template <class P>
  SSMX_HOST_INLINE void add_pack(index_t j, P g) {
    if (st[3] == 0)
      (P::load(acc) + g).store(acc);
    else
      (P::load(ptr + j) + g).store(ptr + j);
  }
  // Adds what the row collected into the buffer: a broadcast row as the sum of its
  // register's lanes and its single coefficients, a strided one element by element.
  SSMX_HOST_INLINE void end_row() {
    if (st[3] == 1) return;
    if (st[3] == 0) {
      *row += simd::Pack<V>::load(acc).sum() + acc_scalar;
    } else {
      for (index_t j = 0; j < len; ++j) row[j * st[3]] += scratch[j];
    }
  }
#else
  __device__ void add(index_t j, V g) {
    if (st[3] == 0)
      acc_scalar += g;
    else
      row[j * st[3]] += g;
  }
  __device__ void end_row() {
    if (st[3] == 0) *row += acc_scalar;
  }
#endif
};

// The scan loop's view of the state row being evaluated: h (values), gh (dL/dh, accumulated).
template <class V>
struct RowState {
  const V* h = nullptr;
  V* gh = nullptr;
};

// ---- lifted evaluators -------------------------------------------------------------------

template <class E, class V, class = void>
struct LiftNode;

// An operand: read through its broadcast strides; its cotangent accumulated when wanted.
template <class V>
struct LiftOperand {
  LiftSrc<V> src;
  LiftDst<V> dst;
  bool grad = false;
  static constexpr int scratch_rows = 2;  // bind() takes at most this many rows of scratch
  void bind(V*& cursor, index_t row_len) {
    src.bind(cursor, row_len);
    if (grad) dst.bind(cursor, row_len);
  }
  SSMX_INLINE void set_tile(index_t k) {
    if (grad) dst.set_tile(k);
  }
  SSMX_INLINE void begin_row(const Index4& i) {
    src.begin_row(i);
    if (grad) dst.begin_row(i);
  }
  SSMX_INLINE void next_row() {
    src.next_row();
    if (grad) dst.next_row();
  }
  SSMX_INLINE void end_row() {
    if (grad) dst.end_row();
  }
  SSMX_INLINE bool needs_grad() const { return grad; }
  SSMX_INLINE V at(index_t j, const RowState<V>&) const { return src.at(j); }
  SSMX_INLINE void vjp_at(index_t j, V g, const RowState<V>&) {
    if (grad) dst.add(j, g);
  }
#if !defined(__CUDA_ARCH__)
  template <class P>
  SSMX_HOST_INLINE P pack(index_t j, const RowState<V>&) const {
    return src.template pack<P>(j);
  }
  template <class P>
  SSMX_HOST_INLINE void vjp_pack(index_t j, P g, const RowState<V>&) {
    if (grad) dst.add_pack(j, g);
  }
#endif
};

template <class V>
struct LiftConstant {
  V value = V(0);
  static constexpr int scratch_rows = 0;
  void bind(V*&, index_t) {}
  SSMX_INLINE void set_tile(index_t) {}
  SSMX_INLINE void begin_row(const Index4&) {}
  SSMX_INLINE void next_row() {}
  SSMX_INLINE void end_row() {}
  SSMX_INLINE bool needs_grad() const { return false; }
  SSMX_INLINE V at(index_t, const RowState<V>&) const { return value; }
  SSMX_INLINE void vjp_at(index_t, V, const RowState<V>&) {}
#if !defined(__CUDA_ARCH__)
  template <class P>
  SSMX_HOST_INLINE P pack(index_t, const RowState<V>&) const {
    return P(value);
  }
  template <class P>
  SSMX_HOST_INLINE void vjp_pack(index_t, P, const RowState<V>&) {}
#endif
};

// The node type of any subtree: lifted nodes mirror it, the rest are operands.
template <class E, class V>
using lift_node_t =
    std::conditional_t<is_lifted<E>::value, LiftNode<E, V>,
                       std::conditional_t<std::is_same_v<E, Constant<V>>, LiftConstant<V>, LiftOperand<V>>>;

template <class T, Space S, class V>
struct LiftNode<StateLeaf<T, S>, V> {
  bool grad = false;  // dL/dh is wanted (the backward pass)
  static constexpr int scratch_rows = 0;
  void bind(V*&, index_t) {}
  SSMX_INLINE void set_tile(index_t) {}
  SSMX_INLINE void begin_row(const Index4&) {}
  SSMX_INLINE void next_row() {}
  SSMX_INLINE void end_row() {}
  SSMX_INLINE bool needs_grad() const { return grad; }
  SSMX_INLINE V at(index_t j, const RowState<V>& s) const { return s.h[j]; }
  SSMX_INLINE void vjp_at(index_t j, V g, const RowState<V>& s) { s.gh[j] += g; }
#if !defined(__CUDA_ARCH__)
  template <class P>
  SSMX_HOST_INLINE P pack(index_t j, const RowState<V>& s) const {
    return P::load(s.h + j);
  }
  template <class P>
  SSMX_HOST_INLINE void vjp_pack(index_t j, P g, const RowState<V>& s) {
    (P::load(s.gh + j) + g).store(s.gh + j);
  }
#endif
};

template <class Op, class E, class V>
struct LiftNode<Unary<Op, E>, V> {
  lift_node_t<E, V> child;
  static constexpr int scratch_rows = lift_node_t<E, V>::scratch_rows;
  void bind(V*& cursor, index_t row_len) { child.bind(cursor, row_len); }
  SSMX_INLINE void set_tile(index_t k) { child.set_tile(k); }
  SSMX_INLINE void begin_row(const Index4& i) { child.begin_row(i); }
  SSMX_INLINE void next_row() { child.next_row(); }
  SSMX_INLINE void end_row() { child.end_row(); }
  SSMX_INLINE bool needs_grad() const { return child.needs_grad(); }
  SSMX_INLINE V at(index_t j, const RowState<V>& s) const { return Op{}(child.at(j, s)); }
  SSMX_INLINE void vjp_at(index_t j, V g, const RowState<V>& s) {
    if (!child.needs_grad()) return;
    const V x = child.at(j, s);
    child.vjp_at(j, Op{}.vjp(x, Op{}(x), g), s);
  }
#if !defined(__CUDA_ARCH__)
  template <class P>
  SSMX_HOST_INLINE P pack(index_t j, const RowState<V>& s) const {
    return Op{}(child.template pack<P>(j, s));
  }
  template <class P>
  SSMX_HOST_INLINE void vjp_pack(index_t j, P g, const RowState<V>& s) {
    if (!child.needs_grad()) return;
    const P x = child.template pack<P>(j, s);
    child.vjp_pack(j, Op{}.vjp(x, Op{}(x), g), s);
  }
#endif
};

template <class Op, class L, class R, class V>
struct LiftNode<Binary<Op, L, R>, V> {
  lift_node_t<L, V> lhs;
  lift_node_t<R, V> rhs;
  static constexpr int scratch_rows = lift_node_t<L, V>::scratch_rows + lift_node_t<R, V>::scratch_rows;
  void bind(V*& cursor, index_t row_len) {
    lhs.bind(cursor, row_len);
    rhs.bind(cursor, row_len);
  }
  SSMX_INLINE void set_tile(index_t k) {
    lhs.set_tile(k);
    rhs.set_tile(k);
  }
  SSMX_INLINE void begin_row(const Index4& i) {
    lhs.begin_row(i);
    rhs.begin_row(i);
  }
  SSMX_INLINE void next_row() {
    lhs.next_row();
    rhs.next_row();
  }
  SSMX_INLINE void end_row() {
    lhs.end_row();
    rhs.end_row();
  }
  SSMX_INLINE bool needs_grad() const { return lhs.needs_grad() || rhs.needs_grad(); }
  SSMX_INLINE V at(index_t j, const RowState<V>& s) const { return Op{}(lhs.at(j, s), rhs.at(j, s)); }
  SSMX_INLINE void vjp_at(index_t j, V g, const RowState<V>& s) {
    const V l = lhs.at(j, s), r = rhs.at(j, s), y = Op{}(l, r);
    if (lhs.needs_grad()) lhs.vjp_at(j, Op{}.vjp_l(l, r, y, g), s);
    if (rhs.needs_grad()) rhs.vjp_at(j, Op{}.vjp_r(l, r, y, g), s);
  }
#if !defined(__CUDA_ARCH__)
  template <class P>
  SSMX_HOST_INLINE P pack(index_t j, const RowState<V>& s) const {
    return Op{}(lhs.template pack<P>(j, s), rhs.template pack<P>(j, s));
  }
  template <class P>
  SSMX_HOST_INLINE void vjp_pack(index_t j, P g, const RowState<V>& s) {
    const P l = lhs.template pack<P>(j, s), r = rhs.template pack<P>(j, s), y = Op{}(l, r);
    if (lhs.needs_grad()) lhs.vjp_pack(j, Op{}.vjp_l(l, r, y, g), s);
    if (rhs.needs_grad()) rhs.vjp_pack(j, Op{}.vjp_r(l, r, y, g), s);
  }
#endif
};

}  // namespace expr
}  // namespace ssmx
