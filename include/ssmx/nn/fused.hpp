// ssmx — the fused scan of a scan layer, derived from its own expressions.
//
// The rule (which layers fuse). Each map is split where it broadcasts into the state
// (expr/lifted.hpp): decay and inject must be liftable (coefficient-wise over
// [tokens, state...] above their broadcasts), and the readout must read the state h only
// inside ONE sum or mean over a state axis of a liftable tree:
//     readout = rest(reduce(lifted(h, operands...)), ...)
// DiagonalSSM, Mamba, Mamba2, the example GatedSSM and any layer written in that vocabulary
// satisfy it. A layer that does not (a max over the state, h inside a matmul, two
// reductions of h) takes the materialised path of scan_layer.hpp; so does a layer that
// declares `static constexpr bool fused = false`. Fused::value says which one a layer gets.
//
// What is computed where. The operands (token-level subtrees: the matmuls, softplus of a
// [tokens, N] tensor, leaves) are evaluated once per stretch, with tapes, as [tokens, ...]
// tensors; matrix products stay GEMMs over the whole stretch. The state is cut into tiles of
// whole rows (the last state axis), independent of the thread count; per tile:
//   forward   h^t = a^t ⊙ h^{t-1} + b^t with a, b evaluated coefficient by coefficient
//             (SIMD registers on the host) and h kept in an L1/L2-resident tile; the
//             readout's reduction accumulated on the fly; the last state written out.
//   backward  recompute a and h for the tile over the stretch; walk time backwards:
//             dL/dh from the reduction's VJP, δ^t = dL/dh^t + a^{t+1} ⊙ δ^{t+1}, and
//             δ ⊙ h^{t-1}, δ pushed through the decay's and the inject's VJPs into the
//             operands' cotangents, summed over broadcast axes as they are produced.
// Then the operands' own backward passes (through their tapes) give the parameter
// gradients and dL/d(maps' input). No [tokens × state] tensor exists in the fused path
// except the tile buffers (2 · tokens · tile width per thread) and, for TruncatedAdjoint,
// its carried sums.
//
// Determinism: a tile is walked by one thread in a fixed order; an operand broadcast along
// a tiled axis gets one cotangent copy per tile, summed in tile order. The results are
// bit-identical for any number of threads.
// Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../autodiff/autodiff.hpp"
#include "../expr/lifted.hpp"
#include "../scan/scan.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ssmx::nn::fused {

using expr::Ext4;
using expr::Index4;

// [n] + state dims, e.g. [n, P, N].
inline Dims domain_dims(index_t n, const Dims& state) {
  Dims d;
  d.rank = state.rank + 1;
  d[0] = n;
  for (int i = 0; i < state.rank; ++i) d[i + 1] = state[i];
  return d;
}

// ---- tiles -------------------------------------------------------------------------------

// How the domain [n, state...] of one stretch is walked. Coordinates are padded to rank 4;
// the walk's last axis is the vector axis (SIMD registers run along it), the others name a
// row. Natural walk: the vector axis is the last state axis. Transposed walk (a rank-2
// state [A, B] with a short B, e.g. [P, N] with N = 16): the vector axis is A and the rows
// run over B, so that rows are long and a reduction over B adds whole registers instead of
// summing each row. A tile is a range of rows times a range of the vector axis; tiles
// depend on the shapes only.
struct TilePlan {
  index_t n = 0;         // tokens
  index_t S = 0;         // state coefficients per token
  bool transposed = false;
  int token_axis = 0;    // padded position of the token axis
  Ext4 domain{1, 1, 1, 1};  // the walk's extents (axes 2 and 3 swapped when transposed)
  index_t vec = 1;       // extent of the vector axis
  index_t rows = 0;      // S / vec
  index_t tile_rows = 1, tile_vec = 1, row_tiles = 1, vec_tiles = 1, ntiles = 1;
  index_t block = 1;     // backward: tokens recomputed at a time
  Dims state_dims;       // the state's own shape
  int state_rank() const { return state_dims.rank; }

  index_t row_begin(index_t k) const { return (k / vec_tiles) * tile_rows; }
  index_t row_count(index_t k) const { return std::min(rows, row_begin(k) + tile_rows) - row_begin(k); }
  index_t vec_begin(index_t k) const { return (k % vec_tiles) * tile_vec; }
  index_t vec_count(index_t k) const { return std::min(vec, vec_begin(k) + tile_vec) - vec_begin(k); }
  // Walk coordinates of row r at token 0, vector coordinate v.
  Index4 row_coords(index_t r, index_t v) const {
    Index4 i{{0, 0, 0, v}};
    for (int p = 2; p > token_axis; --p) {
      i.i[p] = r % domain[std::size_t(p)];
      r /= domain[std::size_t(p)];
    }
    return i;
  }
  // The state's flat index (row-major in the state's own axes) of row r, vector coordinate v.
  index_t state_index(index_t r, index_t v) const { return transposed ? v * rows + r : r * vec + v; }
  // Domain strides of a buffer in walk order.
  void to_walk(index_t (&st)[4]) const {
    if (transposed) std::swap(st[2], st[3]);
  }
  // An axis that tiles split: then two tiles may add into one element of a buffer that is
  // broadcast along it.
  bool tiled_axis(int p) const {
    if (domain[std::size_t(p)] <= 1) return false;
    if (p == 3) return vec_tiles > 1;
    return p > token_axis && row_tiles > 1;
  }
};

// Test hook: force the natural (1) or transposed (2) walk where it applies; 0: the rule.
inline int& walk_override() {
  static int w = 0;
  return w;
}

// The walk and the tiles of one stretch of n tokens. The transposed walk is taken for a
// rank-2 state whose last extent is under four registers and not longer than the first.
// Tiles are about a quarter of the state (at least 1024 coefficients): long rows, and a
// few tiles to share out. The backward pass keeps a and h of a tile for `block` tokens at a
// time (about 1 MiB of them, an L2's share) and recomputes block by block.
inline TilePlan make_plan(index_t n, const Dims& state, std::size_t elem_size, int lanes) {
  TilePlan p;
  p.n = n;
  p.S = state.numel();
  p.state_dims = state;
  p.token_axis = 3 - state.rank;
  p.domain = expr::pad_extents(domain_dims(n, state));
  const index_t last = state[state.rank - 1];
  bool transposed = state.rank == 2 && last < 4 * lanes && state[0] >= last;
  if (walk_override() == 1) transposed = false;
  if (walk_override() == 2) transposed = state.rank == 2;
  p.transposed = transposed;
  if (transposed) std::swap(p.domain[2], p.domain[3]);
  p.vec = p.domain[3];
  p.rows = p.S / p.vec;
  const index_t width = std::max<index_t>(1024, p.S / 4);  // coefficients per tile
  if (transposed) {
    p.tile_rows = p.rows;
    p.tile_vec = std::min(p.vec, std::max<index_t>(lanes, width / p.rows / lanes * lanes));
  } else {
    p.tile_vec = p.vec;
    p.tile_rows = std::max<index_t>(1, std::min<index_t>(p.rows, width / p.vec));
  }
  p.row_tiles = (p.rows + p.tile_rows - 1) / p.tile_rows;
  p.vec_tiles = (p.vec + p.tile_vec - 1) / p.tile_vec;
  p.ntiles = p.row_tiles * p.vec_tiles;
  constexpr std::size_t budget = std::size_t(1) << 20;
  const std::size_t per_token = 2 * std::size_t(p.tile_rows * p.tile_vec) * elem_size;
  p.block = std::min<index_t>(std::max<index_t>(n, 1), std::max<index_t>(8, index_t(budget / per_token)));
  return p;
}
template <class T>
TilePlan make_plan(index_t n, const Dims& state) {
#if !defined(__CUDA_ARCH__)
  return make_plan(n, state, sizeof(T), simd::lanes<T>);
#else
  return make_plan(n, state, sizeof(T), 1);
#endif
}

// ---- building the lifted evaluators -----------------------------------------------------

// What the builders need to know: the tiles, and (backward) the leaves to differentiate.
template <class T, Space S>
struct BuildContext {
  const TilePlan* plan = nullptr;
  const GradTargets<T, S>* targets = nullptr;  // null: forward only
  bool state_grad = false;                     // dL/dh wanted from the readout's reduction
};

// Walk-order strides of a view against the padded domain.
template <class T, Space S>
void walk_strides(TensorView<const T, S> v, const TilePlan& plan, index_t (&st)[4]) {
  Ext4 d = plan.domain;
  if (plan.transposed) std::swap(d[2], d[3]);  // the view's own (unwalked) domain
  expr::domain_strides(v, d, st);
  plan.to_walk(st);
}

// An accumulator over the domain into `v` (tile copies tile_stride apart).
template <class T, Space S>
expr::LiftDst<T> make_dst(TensorView<T, S> v, const TilePlan& plan, index_t tile_stride) {
  expr::LiftDst<T> d;
  d.base0 = d.base = v.data();
  d.tile_stride = tile_stride;
  walk_strides(TensorView<const T, S>(v), plan, d.st);
  return d;
}
template <class T, Space S>
expr::LiftSrc<T> make_src(TensorView<const T, S> v, const TilePlan& plan) {
  expr::LiftSrc<T> r;
  r.base = v.data();
  walk_strides(v, plan, r.st);
  return r;
}

// Whether tiles would add into the same elements of a buffer with these walk strides.
inline bool needs_tile_copies(const index_t (&st)[4], const TilePlan& plan) {
  if (plan.ntiles <= 1) return false;
  for (int p = 0; p < 4; ++p)
    if (plan.tiled_axis(p) && st[p] == 0) return true;
  return false;
}

template <class E, class T, Space S, class = void>
struct LiftBuild;

// An operand: its value (with the tape of its inner nodes) and its cotangent. Where the
// walk's vector axis runs across the value's rows (a transposed walk over a [A, B] value),
// the value is read from a transposed copy and the cotangent collected transposed, so that
// every register is one contiguous load.
template <class E, class T, Space S>
struct LiftBuild<E, T, S, std::enable_if_t<!expr::is_lifted<E>::value && !std::is_same_v<E, expr::Constant<T>>>> {
  static_assert(!expr::has_state<E>::value, "fused scan: an operand reads the state");
  using Child = typename expr::operand_child<E>::type;
  static constexpr bool unsqueezed = std::is_same_v<E, expr::Unsqueeze<Child>>;
  Child child;
  Tape<Child, S> tape;
  int axis = 0;
  const TilePlan* plan;
  bool grad = false;
  bool permuted = false;  // read from `perm`, a copy with the last two axes swapped
  Tensor<T, S> perm;
  index_t copies = 1;
  Tensor<T, S> cot;  // [copies, child's numel] (transposed like perm when permuted)

  LiftBuild(const E& e, const BuildContext<T, S>& ctx)
      : child(expr::operand_child<E>::get(e)), tape(child), plan(ctx.plan) {
    if constexpr (unsqueezed) axis = e.axis;
    const TensorView<const T, S> v = domain_view(tape.value());
    index_t st[4];
    walk_strides(v, *plan, st);
    permuted = st[3] != 0 && st[3] != 1 && v.rank() >= 2;
    if (permuted) {
      perm = Tensor<T, S>(autodiff::swap_last(TensorView<const T, S>(nullptr, v.dims())).dims(), Tag::Workspace);
      assign(perm.view(), transpose(v));
    }
    grad = ctx.targets && autodiff::needs_grad(child, *ctx.targets);
    if (grad) {
      walk_strides(TensorView<const T, S>(cot_view(nullptr)), *plan, st);
      copies = needs_tile_copies(st, *plan) ? plan->ntiles : 1;
      cot = zeros<T, S>(Dims{copies * child.dims().numel()}, Tag::Workspace);
    }
  }
  // A view of the child's shape as the domain reads it.
  template <class U>
  TensorView<U, S> domain_view(TensorView<U, S> v) const {
    if constexpr (unsqueezed)
      return expr::unsqueezed_view(v, axis);
    else
      return v;
  }
  // The cotangent buffer at p as the domain accumulates into it.
  TensorView<T, S> cot_view(T* p) const {
    const Dims d = domain_view(TensorView<T, S>(nullptr, child.dims())).dims();
    if (!permuted) return TensorView<T, S>(p, d);
    return autodiff::swap_last(TensorView<T, S>(p, autodiff::swap_last(TensorView<T, S>(nullptr, d)).dims()));
  }
  // The evaluator; `grads` false: a forward pass only (any plan with the same walk).
  expr::lift_node_t<E, T> node(bool grads = true) {
    expr::LiftOperand<T> o;
    const TensorView<const T, S> v =
        permuted ? autodiff::swap_last(TensorView<const T, S>(perm.view())) : domain_view(tape.value());
    o.src = make_src<T, S>(v, *plan);
    o.grad = grad && grads;
    if (o.grad) o.dst = make_dst<T, S>(cot_view(cot.data()), *plan, copies > 1 ? child.dims().numel() : 0);
    return o;
  }
  // Sums the tile copies and runs the child's backward pass with the collected cotangent.
  void backward(const GradTargets<T, S>& targets) {
    if (!grad) return;
    const index_t numel = child.dims().numel();
    TensorView<T, S> total(cot.data(), Dims{numel});
    for (index_t k = 1; k < copies; ++k)
      accumulate(total, leaf(TensorView<const T, S>(cot.data() + k * numel, Dims{numel})));
    if (permuted) {  // back to the child's layout
      Tensor<T, S> plain(domain_view(TensorView<T, S>(nullptr, child.dims())).dims(), Tag::Workspace);
      assign(plain.view(), leaf(TensorView<const T, S>(cot_view(cot.data()))));
      ssmx::backward(child, tape, TensorView<const T, S>(plain.data(), child.dims()), targets);
      return;
    }
    ssmx::backward(child, tape, TensorView<const T, S>(cot.data(), child.dims()), targets);
  }
};

template <class T, Space S>
struct LiftBuild<expr::Constant<T>, T, S> {
  T value;
  LiftBuild(const expr::Constant<T>& c, const BuildContext<T, S>&) : value(c.value) {}
  expr::LiftConstant<T> node(bool = true) { return expr::LiftConstant<T>{value}; }
  void backward(const GradTargets<T, S>&) {}
};

template <class U, Space S2, class T, Space S>
struct LiftBuild<expr::StateLeaf<U, S2>, T, S> {
  bool grad;
  LiftBuild(const expr::StateLeaf<U, S2>&, const BuildContext<T, S>& ctx) : grad(ctx.state_grad) {}
  expr::LiftNode<expr::StateLeaf<U, S2>, T> node(bool grads = true) {
    expr::LiftNode<expr::StateLeaf<U, S2>, T> n;
    n.grad = grad && grads;
    return n;
  }
  void backward(const GradTargets<T, S>&) {}
};

template <class Op, class E, class T, Space S>
struct LiftBuild<expr::Unary<Op, E>, T, S, std::enable_if_t<expr::is_lifted<expr::Unary<Op, E>>::value>> {
  LiftBuild<E, T, S> child;
  LiftBuild(const expr::Unary<Op, E>& e, const BuildContext<T, S>& ctx) : child(e.child, ctx) {}
  expr::LiftNode<expr::Unary<Op, E>, T> node(bool grads = true) { return {child.node(grads)}; }
  void backward(const GradTargets<T, S>& targets) { child.backward(targets); }
};

template <class Op, class L, class R, class T, Space S>
struct LiftBuild<expr::Binary<Op, L, R>, T, S, std::enable_if_t<expr::is_lifted<expr::Binary<Op, L, R>>::value>> {
  LiftBuild<L, T, S> lhs;
  LiftBuild<R, T, S> rhs;
  LiftBuild(const expr::Binary<Op, L, R>& e, const BuildContext<T, S>& ctx) : lhs(e.lhs, ctx), rhs(e.rhs, ctx) {}
  expr::LiftNode<expr::Binary<Op, L, R>, T> node(bool grads = true) { return {lhs.node(grads), rhs.node(grads)}; }
  void backward(const GradTargets<T, S>& targets) {
    lhs.backward(targets);
    rhs.backward(targets);
  }
};

// ---- the host passes ------------------------------------------------------------------------

namespace host {

// One coefficient (X = T) or one register of them (X = simd::Pack<T>).
template <class X, class T, class N>
SSMX_HOST_INLINE X value(const N& node, index_t j, const expr::RowState<T>& s) {
  if constexpr (std::is_same_v<X, T>)
    return node.at(j, s);
  else
    return node.template pack<X>(j, s);
}
template <class X, class T, class N>
SSMX_HOST_INLINE void vjp(N& node, index_t j, X g, const expr::RowState<T>& s) {
  if constexpr (std::is_same_v<X, T>)
    node.vjp_at(j, g, s);
  else
    node.vjp_pack(j, g, s);
}
template <class X, class T>
SSMX_HOST_INLINE X load(const T* p) {
  if constexpr (std::is_same_v<X, T>)
    return *p;
  else
    return X::load(p);
}
template <class X, class T>
SSMX_HOST_INLINE void store(T* p, X v) {
  if constexpr (std::is_same_v<X, T>)
    *p = v;
  else
    v.store(p);
}
template <class X, class T>
SSMX_HOST_INLINE X read(const expr::LiftSrc<T>& s, index_t j) {
  if constexpr (std::is_same_v<X, T>)
    return s.at(j);
  else
    return s.template pack<X>(j);
}
template <class X, class T>
SSMX_HOST_INLINE void add_to(expr::LiftDst<T>& d, index_t j, X g) {
  if constexpr (std::is_same_v<X, T>)
    d.add(j, g);
  else
    d.add_pack(j, g);
}
template <class X, class T>
SSMX_HOST_INLINE X fma(X a, X b, X c) {
  if constexpr (std::is_same_v<X, T>)
    return a * b + c;
  else
    return simd::fma(a, b, c);
}

// Calls f(X{}, j) over one row: registers first, then single coefficients.
template <class T, class F>
SSMX_HOST_INLINE void for_row(index_t len, F&& f) {
  using P = simd::Pack<T>;
  constexpr index_t L = P::size;
  index_t j = 0;
  if constexpr (L > 1)
    for (; j + L <= len; j += L) f(P(0), j);
  for (; j < len; ++j) f(T(0), j);
}

// The rows of one tile: their coordinates, and whether a row follows the previous one
// along padded axis 2 (then the evaluators just step: next_row) or starts a new run.
struct RowWalk {
  std::vector<Index4> coords;
  std::vector<char> starts_run;
  int token_axis;
  RowWalk(const TilePlan& plan, index_t k) : token_axis(plan.token_axis) {
    const index_t r0 = plan.row_begin(k), nr = plan.row_count(k), v0 = plan.vec_begin(k);
    coords.resize(std::size_t(nr));
    starts_run.resize(std::size_t(nr));
    for (index_t rr = 0; rr < nr; ++rr) {
      coords[std::size_t(rr)] = plan.row_coords(r0 + rr, v0);
      const bool follows = rr > 0 && plan.token_axis < 2 &&
                           coords[std::size_t(rr)].i[2] == coords[std::size_t(rr - 1)].i[2] + 1 &&
                           coords[std::size_t(rr)].i[1] == coords[std::size_t(rr - 1)].i[1];
      starts_run[std::size_t(rr)] = follows ? 0 : 1;
    }
  }
  bool fresh(index_t rr) const { return starts_run[std::size_t(rr)] != 0; }
  Index4 at(index_t t, index_t rr) const {
    Index4 i = coords[std::size_t(rr)];
    i.i[token_axis] = t;
    return i;
  }
};

// A tile's part of a [S] state vector, in the tile's [rows][vector] order, and back.
template <class T>
void gather_state(const TilePlan& plan, index_t k, const T* src, T* tile) {
  const index_t r0 = plan.row_begin(k), nr = plan.row_count(k), v0 = plan.vec_begin(k), nv = plan.vec_count(k);
  for (index_t rr = 0; rr < nr; ++rr)
    for (index_t j = 0; j < nv; ++j) tile[rr * nv + j] = src[plan.state_index(r0 + rr, v0 + j)];
}
template <class T>
void scatter_state(const TilePlan& plan, index_t k, const T* tile, T* dst) {
  const index_t r0 = plan.row_begin(k), nr = plan.row_count(k), v0 = plan.vec_begin(k), nv = plan.vec_count(k);
  for (index_t rr = 0; rr < nr; ++rr)
    for (index_t j = 0; j < nv; ++j) dst[plan.state_index(r0 + rr, v0 + j)] = tile[rr * nv + j];
}

// Positions evaluators at row rr of token t (the rows of a token are visited in order).
template <class... N>
SSMX_HOST_INLINE void to_row(const RowWalk& rows, index_t t, index_t rr, N&... nodes) {
  if (rows.fresh(rr)) {
    const Index4 i = rows.at(t, rr);
    (nodes.begin_row(i), ...);
  } else {
    (nodes.next_row(), ...);
  }
}

// What one stretch's forward pass reads and writes besides the operands.
template <class T>
struct ForwardIO {
  const T* h0 = nullptr;                 // [S], the state before the stretch; null: zero
  T* h_last = nullptr;                   // [S], the state after it; null: not wanted
  T* decay_prod = nullptr;               // [S], multiplied by Π a over the stretch; null: not wanted
  const std::uint8_t* starts = nullptr;  // [n], 1 where a document starts (a = 0); null: none
};

// h^t = a^t ⊙ h^{t-1} + b^t over the stretch, tile by tile; with a readout (x, y) the
// reduction of lifted(h^t) is added into y.
template <class T, class DN, class BN, class XN>
void forward(const TilePlan& plan, const DN& d0, const BN& b0, const XN* x0, const expr::LiftDst<T>* y0,
             const ForwardIO<T>& io) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (plan.ntiles > 1 && !omp_in_parallel())
#endif
  for (index_t k = 0; k < plan.ntiles; ++k) {
    const index_t nr = plan.row_count(k), nv = plan.vec_count(k), w = nr * nv;
    DN d = d0;
    BN b = b0;
    XN x{};
    expr::LiftDst<T> y{};
    Work<T> scratch(std::size_t((DN::scratch_rows + BN::scratch_rows + XN::scratch_rows + 1) * nv));
    T* cursor = scratch.data();
    d.set_tile(k);
    b.set_tile(k);
    d.bind(cursor, nv);
    b.bind(cursor, nv);
    if (x0) {
      x = *x0;
      y = *y0;
      x.set_tile(k);
      y.set_tile(k);
      x.bind(cursor, nv);
      y.bind(cursor, nv);
    }
    Work<T> hbuf(std::size_t(w), T(0)), pbuf;
    T* h = hbuf.data();
    if (io.h0) gather_state(plan, k, io.h0, h);
    T* prod = nullptr;  // Π a of the tile so far
    if (io.decay_prod) {
      pbuf = Work<T>(std::size_t(w));
      prod = pbuf.data();
      gather_state(plan, k, io.decay_prod, prod);
    }
    const RowWalk rows(plan, k);
    // One loop per combination of what is wanted, so that none tests it per register.
    auto walk = [&](auto with_y, auto with_prod) {
      constexpr bool Y = decltype(with_y)::value, Pr = decltype(with_prod)::value;
      const expr::RowState<T> none{};
      for (index_t t = 0; t < plan.n; ++t) {
        const bool start = io.starts && io.starts[t];
        for (index_t rr = 0; rr < nr; ++rr) {
          if constexpr (Y)
            to_row(rows, t, rr, d, b, x, y);
          else
            to_row(rows, t, rr, d, b);
          T* hr = h + rr * nv;
          T* pr = prod + rr * nv;
          const expr::RowState<T> rs{hr, nullptr};
          auto step = [&](auto tag, index_t j, auto zero_decay) SSMX_LAMBDA_INLINE {
            using X = decltype(tag);
            X a;
            if constexpr (decltype(zero_decay)::value)
              a = X(0);
            else
              a = value<X, T>(d, j, none);
            store<X, T>(hr + j, fma<X, T>(a, load<X, T>(hr + j), value<X, T>(b, j, none)));
            if constexpr (Pr) store<X, T>(pr + j, load<X, T>(pr + j) * a);
            if constexpr (Y) add_to<X, T>(y, j, value<X, T>(x, j, rs));
          };
          if (start)
            for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE { step(tag, j, std::true_type{}); });
          else
            for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE { step(tag, j, std::false_type{}); });
          if constexpr (Y) y.end_row();
        }
      }
    };
    if (x0) {
      if (prod)
        walk(std::true_type{}, std::true_type{});
      else
        walk(std::true_type{}, std::false_type{});
    } else {
      if (prod)
        walk(std::false_type{}, std::true_type{});
      else
        walk(std::false_type{}, std::false_type{});
    }
    if (io.h_last) scatter_state(plan, k, h, io.h_last);
    if (prod) scatter_state(plan, k, prod, io.decay_prod);
  }
}

// What one stretch's backward pass reads and writes besides the operands.
template <class T>
struct BackwardIO {
  const T* h0 = nullptr;                 // [S] or null (zero)
  const std::uint8_t* starts = nullptr;  // [n] or null
  const T* carry_in = nullptr;           // [S], a^{end} ⊙ δ^{end} from the stretch after; null: zero
  T* carry_out = nullptr;                // [S], a^0 ⊙ δ^0 for the stretch before; null: not wanted
  bool maps_grad = true;                 // push δ into the decay and inject (false: the carry only)
  // δ of one tile from a, dL/dh ([1, n, w] views, w = the tile's coefficients in its
  // [rows][vector] order) for a method other than the exact one (truncated, paper), and the
  // tile's index; null: exact, fused.
  std::function<void(TensorView<const T>, TensorView<const T>, TensorView<T>, index_t)> delta;
};

// The backward pass of one stretch. g0 reads dL/d(reduction) over the domain (broadcast
// along the reduced axis), scaled by g_scale (1/len for a mean).
template <class T, class DN, class BN, class XN>
void backward(const TilePlan& plan, const DN& d0, const BN& b0, const XN& x0, const expr::LiftSrc<T>& g0, T g_scale,
              const BackwardIO<T>& io) {
  const index_t n = plan.n;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (plan.ntiles > 1 && !omp_in_parallel())
#endif
  for (index_t k = 0; k < plan.ntiles; ++k) {
    const index_t nr = plan.row_count(k), nv = plan.vec_count(k), w = nr * nv;
    DN d = d0;
    BN b = b0;
    XN x = x0;
    expr::LiftSrc<T> g = g0;
    Work<T> scratch(std::size_t((DN::scratch_rows + BN::scratch_rows + XN::scratch_rows + 1) * nv));
    T* cursor = scratch.data();
    d.set_tile(k);
    b.set_tile(k);
    x.set_tile(k);
    d.bind(cursor, nv);
    b.bind(cursor, nv);
    x.bind(cursor, nv);
    g.bind(cursor, nv);
    // Time in blocks of L tokens (all n for a method other than the exact one): the states
    // before each block (one forward pass), then per block, last to first, a and h of the
    // block recomputed into abuf/hbuf and walked backwards.
    const index_t L = io.delta ? n : std::min(n, plan.block), nb = (n + L - 1) / L;
    Work<T> hstart(std::size_t(nb * w), T(0)), carry(std::size_t(w), T(0)), ghrow(std::size_t(nv), T(0));
    if (io.h0) gather_state(plan, k, io.h0, hstart.data());
    if (io.carry_in) gather_state(plan, k, io.carry_in, carry.data());
    Tensor<T> abuf(Dims{1, L, w}, Tag::Workspace), hbuf(Dims{1, L, w}, Tag::Workspace);
    const RowWalk rows(plan, k);
    const expr::RowState<T> none{};
    // Runs the recurrence over tokens [t0, t1) from `from`; keep_all: a and h of every token
    // into abuf/hbuf (rows t - t0), else only the state after t1 - 1 into `to`.
    auto recompute = [&](index_t t0, index_t t1, const T* from, T* to, bool keep_all) {
      Work<T> hrun;
      if (!keep_all) {
        hrun = Work<T>(std::size_t(w));
        std::copy(from, from + w, hrun.data());
      }
      for (index_t t = t0; t < t1; ++t) {
        const bool start = io.starts && io.starts[t];
        for (index_t rr = 0; rr < nr; ++rr) {
          to_row(rows, t, rr, d, b);
          const T* hp = keep_all ? (t > t0 ? hbuf.data() + (t - 1 - t0) * w : from) + rr * nv : hrun.data() + rr * nv;
          T* at = keep_all ? abuf.data() + (t - t0) * w + rr * nv : nullptr;
          T* ht = keep_all ? hbuf.data() + (t - t0) * w + rr * nv : hrun.data() + rr * nv;
          for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE {
            using X = decltype(tag);
            const X a = start ? X(0) : value<X, T>(d, j, none);
            if (keep_all) store<X, T>(at + j, a);
            store<X, T>(ht + j, fma<X, T>(a, load<X, T>(hp + j), value<X, T>(b, j, none)));
          });
        }
      }
      if (to) std::copy(hrun.begin(), hrun.end(), to);
    };
    for (index_t blk = 0; blk + 1 < nb; ++blk)
      recompute(blk * L, (blk + 1) * L, hstart.data() + blk * w, hstart.data() + (blk + 1) * w, false);
    index_t t0 = 0;  // the block being walked
    auto h_prev = [&](index_t t, index_t rr) SSMX_LAMBDA_INLINE -> const T* {
      return (t > t0 ? hbuf.data() + (t - 1 - t0) * w : hstart.data() + (t0 / L) * w) + rr * nv;
    };
    // dL/dh of row rr at token t into gh (zeroed first), from the reduction's VJP.
    auto state_grad = [&](index_t t, index_t rr, T* gh) SSMX_LAMBDA_INLINE {
      to_row(rows, t, rr, x, g);
      expr::fill_row(gh, nv, T(0));
      const expr::RowState<T> xs{hbuf.data() + (t - t0) * w + rr * nv, gh};
      for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE {
        using X = decltype(tag);
        vjp<X, T>(x, j, read<X, T>(g, j) * X(g_scale), xs);
      });
      x.end_row();
    };
    // δ of row rr at token t into the decay's and the inject's operands.
    auto maps_vjp = [&](index_t t, index_t rr, const T* delta) SSMX_LAMBDA_INLINE {
      const bool start = io.starts && io.starts[t];
      to_row(rows, t, rr, d, b);
      const T* hp = h_prev(t, rr);
      for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE {
        using X = decltype(tag);
        const X dl = load<X, T>(delta + j);
        if (!start) vjp<X, T>(d, j, dl * load<X, T>(hp + j), none);  // dL/da = δ ⊙ h^{t-1} (a = 0 at a start)
        vjp<X, T>(b, j, dl, none);                                     // dL/db = δ
      });
      d.end_row();
      b.end_row();
    };
    if (!io.delta) {
      // Exact: one reverse walk; δ^t = dL/dh^t + carry, carry = a^t ⊙ δ^t.
      Work<T> drow(static_cast<std::size_t>(nv));
      for (index_t blk = nb - 1; blk >= 0; --blk) {
        t0 = blk * L;
        const index_t t1 = std::min(n, t0 + L);
        recompute(t0, t1, hstart.data() + blk * w, nullptr, true);
        for (index_t t = t1 - 1; t >= t0; --t)
          for (index_t rr = 0; rr < nr; ++rr) {
            state_grad(t, rr, ghrow.data());
            const T* at = abuf.data() + (t - t0) * w + rr * nv;
            T* cr = carry.data() + rr * nv;
            for_row<T>(nv, [&](auto tag, index_t j) SSMX_LAMBDA_INLINE {
              using X = decltype(tag);
              const X dl = load<X, T>(ghrow.data() + j) + load<X, T>(cr + j);
              store<X, T>(drow.data() + j, dl);
              store<X, T>(cr + j, load<X, T>(at + j) * dl);
            });
            if (io.maps_grad) maps_vjp(t, rr, drow.data());
          }
      }
      if (io.carry_out) scatter_state(plan, k, carry.data(), io.carry_out);
    } else {
      // Another method: dL/dh of the whole tile first, then δ, then the maps' VJPs.
      recompute(0, n, hstart.data(), nullptr, true);
      Tensor<T> gh(Dims{1, n, w}, Tag::Workspace), delta(Dims{1, n, w}, Tag::Workspace);
      for (index_t t = 0; t < n; ++t)
        for (index_t rr = 0; rr < nr; ++rr) state_grad(t, rr, gh.data() + t * w + rr * nv);
      io.delta(abuf.view(), gh.view(), delta.view(), k);
      if (io.maps_grad)
        for (index_t t = n - 1; t >= 0; --t)
          for (index_t rr = 0; rr < nr; ++rr) maps_vjp(t, rr, delta.data() + t * w + rr * nv);
      if (io.carry_out) {
        for (index_t c = 0; c < w; ++c) carry[std::size_t(c)] = abuf.data()[c] * delta.data()[c];
        scatter_state(plan, k, carry.data(), io.carry_out);
      }
    }
  }
}

}  // namespace host

}  // namespace ssmx::nn::fused
