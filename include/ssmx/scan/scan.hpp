// ssmx — the first-order linear recurrence ("linear scan") and its adjoint, per backend.
//
// Layout: every sequence tensor is a rank-3 view [batch, time, channels]. `channels` is the
// product of the state dimensions, flattened by the caller (a state [P, N] per token is
// P*N channels). Channels are independent; the recurrence runs along `time`.
//
//   forward  linear_scan:          h_t = a_t ⊙ h_{t-1} + b_t,         h_{-1} = h0 (0 if absent)
//                                  h_final = h_{T-1}                   (if given)
//   reverse  reverse_linear_scan:  δ_t = g_t + a_{t+1} ⊙ δ_{t+1},      δ_{T-1} = g_{T-1} + carry_in
//                                  carry_out = a_0 ⊙ δ_0               (if given)
//
// carry_in is what the chunk after this one hands back (a_T ⊙ δ_T); carry_out is what this
// chunk hands to the one before it. Scanning a sequence in chunks with h_final -> h0 and
// carry_out -> carry_in gives exactly the whole-sequence result (to rounding).
//
// Strides: batch and time strides are free (a time slice [batch, t0:t1, channels] of a
// contiguous tensor works as is; a stride 0 broadcasts an input); the channel stride must be
// 1 unless channels == 1. h0, h_final, carry_in, carry_out are [batch, channels] views (same
// rule) or empty (data() == nullptr).
// Aliasing: h may be the same view as b (in place), delta the same view as g, h_final the
// same as h0, carry_out the same as carry_in. Other partial overlaps are not supported.
//
// Both scans use the associative, non-commutative operator on pairs
//   (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)       ("apply step 1, then step 2")
// exposed as ssmx::scan::AffineOp so that other code (e.g. the MPI_Exscan carry of sequence
// parallelism) composes chunks with the same math.
//
// Backends: Space::Host is defined in backend/cpu/scan.hpp (included here); Space::Cuda in
// backend/cuda/scan.cuh, reached through <ssmx/cuda.cuh> compiled with nvcc.
#pragma once

#include <type_traits>

#include "../config.hpp"
#include "../core/error.hpp"
#include "../core/memory.hpp"
#include "../core/tensor.hpp"

namespace ssmx::scan {

// One step of the recurrence, h -> a h + b, or the composition of several.
template <class T>
struct AffinePair {
  T a;  // multiplier: the product of the steps' a
  T b;  // offset: the state reached from a zero initial state
};

// (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2): the left operand happens first. Associative, not
// commutative; the identity is (1, 0). Usable on the host and the device.
template <class T>
struct AffineOp {
  SSMX_HOST_DEVICE AffinePair<T> operator()(const AffinePair<T>& first, const AffinePair<T>& second) const {
    return {first.a * second.a, second.a * first.b + second.b};
  }
  SSMX_HOST_DEVICE static AffinePair<T> identity() { return {T(1), T(0)}; }
  // The state after applying p to h.
  SSMX_HOST_DEVICE static T apply(const AffinePair<T>& p, T h) { return p.a * h + p.b; }
};

namespace detail {

template <class T>
struct type_identity {
  using type = T;
};
// Keeps a parameter out of template argument deduction (T and S come from `h` / `delta`).
template <class T>
using nondeduced_t = typename type_identity<T>::type;

// Extents and element strides of a [batch, time, channels] view, all 64-bit: offsets of
// sequences with batch * time * channels > 2^31 elements are computed in index_t.
struct SeqLayout {
  index_t stride_batch = 0, stride_time = 0;  // channel stride is 1
  SSMX_HOST_DEVICE index_t offset(index_t batch, index_t t, index_t c) const {
    return batch * stride_batch + t * stride_time + c;
  }
};

// Extents shared by every argument of one scan call.
struct ScanExtents {
  index_t batch = 0, time = 0, channels = 0;
};

template <class T, Space S>
SeqLayout seq_layout(const TensorView<T, S>& v) {
  return {v.stride(0), v.stride(1)};
}
// Row stride of a [batch, channels] state view (0 for an empty view).
template <class T, Space S>
index_t state_stride(const TensorView<T, S>& v) {
  return v.data() ? v.stride(0) : 0;
}

template <class T, Space S>
void check_sequence(const TensorView<T, S>& v, const ScanExtents* expected, const char* fn, const char* name) {
  SSMX_REQUIRE(v.data() != nullptr || v.numel() == 0, ShapeError, fn, ": tensor '", name,
               "' is empty (null data) but a [batch, time, channels] sequence is required");
  SSMX_REQUIRE(v.rank() == 3, ShapeError, fn, ": tensor '", name, "' has rank ", v.rank(), " (shape ", v.dims().str(),
               "), expected rank 3 [batch, time, channels]");
  if (expected) {
    const Dims want{expected->batch, expected->time, expected->channels};
    SSMX_REQUIRE(v.dims() == want, ShapeError, fn, ": tensor '", name, "' has shape ", v.dims().str(), ", expected ",
                 want.str(), " [batch, time, channels]");
  }
  SSMX_REQUIRE(v.extent(2) <= 1 || v.stride(2) == 1, ShapeError, fn, ": tensor '", name,
               "' has channel stride ", v.stride(2), " (shape ", v.dims().str(),
               "), expected 1: the channel dimension must be contiguous");
}

template <class T, Space S>
void check_state(const TensorView<T, S>& v, const ScanExtents& e, const char* fn, const char* name) {
  if (v.data() == nullptr) {
    SSMX_REQUIRE(v.rank() == 0 || v.numel() == 0, ShapeError, fn, ": tensor '", name, "' has shape ", v.dims().str(),
                 " but no data; pass an empty view to omit it");
    return;
  }
  const Dims want{e.batch, e.channels};
  SSMX_REQUIRE(v.dims() == want, ShapeError, fn, ": tensor '", name, "' has shape ", v.dims().str(), ", expected ",
               want.str(), " [batch, channels]");
  SSMX_REQUIRE(v.extent(1) <= 1 || v.stride(1) == 1, ShapeError, fn, ": tensor '", name, "' has channel stride ",
               v.stride(1), ", expected 1: the channel dimension must be contiguous");
}

// The aliasing the scans allow: none, or exactly the same view.
template <class T, class U, Space S>
void check_alias(const TensorView<T, S>& out, const TensorView<U, S>& in, const char* fn, const char* out_name,
                 const char* in_name) {
  if (!out.data() || !in.data() || out.numel() == 0 || in.numel() == 0) return;
  const void* o = out.data();
  const void* i = in.data();
  if (o != i) return;  // distinct starts: partial overlaps are the caller's responsibility
  SSMX_REQUIRE(out.strides() == in.strides(), ShapeError, fn, ": tensor '", out_name, "' aliases '", in_name,
               "' with different strides; in-place use needs the same view");
}

}  // namespace detail
}  // namespace ssmx::scan

namespace ssmx::backend {

// The scan implementation of one memory space. Space::Host: backend/cpu/scan.hpp;
// Space::Cuda: backend/cuda/scan.cuh. Contract (views already validated):
//   static void forward(ScanExtents, const T* a, SeqLayout, const T* b, SeqLayout, T* h, SeqLayout,
//                       const T* h0, index_t h0_stride, T* h_final, index_t hf_stride);
//   static void reverse(ScanExtents, const T* a, SeqLayout, const T* g, SeqLayout, T* delta, SeqLayout,
//                       const T* carry_in, index_t ci_stride, T* carry_out, index_t co_stride);
template <Space S>
struct ScanImpl {
  static_assert(S != Space::Cuda, "ssmx::linear_scan on Space::Cuda: include <ssmx/cuda.cuh> and compile with nvcc for Space::Cuda");
  static_assert(S == Space::Host || S == Space::Cuda, "ssmx::ScanImpl: unknown memory space");
};

}  // namespace ssmx::backend

#include "../backend/cpu/scan.hpp"

namespace ssmx::scan {

// h_t = a_t ⊙ h_{t-1} + b_t over [batch, time, channels]; see the top of this file.
// T, S are deduced from `h`; a, b, h0 convert from Tensor / mutable views.
template <class T, Space S>
void linear_scan(detail::nondeduced_t<TensorView<const T, S>> a, detail::nondeduced_t<TensorView<const T, S>> b,
                 TensorView<T, S> h, detail::nondeduced_t<TensorView<const T, S>> h0 = {},
                 detail::nondeduced_t<TensorView<T, S>> h_final = {}) {
  static_assert(is_compute_type_v<T>, "ssmx::linear_scan: T must be float or double");
  constexpr const char* fn = "linear_scan";
  detail::check_sequence(a, nullptr, fn, "a");
  const detail::ScanExtents e{a.extent(0), a.extent(1), a.extent(2)};
  detail::check_sequence(b, &e, fn, "b");
  detail::check_sequence(h, &e, fn, "h");
  detail::check_state(h0, e, fn, "h0");
  detail::check_state(h_final, e, fn, "h_final");
  detail::check_alias(h, b, fn, "h", "b");
  detail::check_alias(h_final, h0, fn, "h_final", "h0");
  if (e.batch == 0 || e.channels == 0) return;
  backend::ScanImpl<S>::template forward<T>(e, a.data(), detail::seq_layout(a), b.data(), detail::seq_layout(b),
                                            h.data(), detail::seq_layout(h), h0.data(), detail::state_stride(h0),
                                            h_final.data(), detail::state_stride(h_final));
}

// δ_t = g_t + a_{t+1} ⊙ δ_{t+1}, δ_{T-1} = g_{T-1} + carry_in; carry_out = a_0 ⊙ δ_0.
// T, S are deduced from `delta`.
template <class T, Space S>
void reverse_linear_scan(detail::nondeduced_t<TensorView<const T, S>> a, detail::nondeduced_t<TensorView<const T, S>> g,
                         TensorView<T, S> delta, detail::nondeduced_t<TensorView<const T, S>> carry_in = {},
                         detail::nondeduced_t<TensorView<T, S>> carry_out = {}) {
  static_assert(is_compute_type_v<T>, "ssmx::reverse_linear_scan: T must be float or double");
  constexpr const char* fn = "reverse_linear_scan";
  detail::check_sequence(a, nullptr, fn, "a");
  const detail::ScanExtents e{a.extent(0), a.extent(1), a.extent(2)};
  detail::check_sequence(g, &e, fn, "g");
  detail::check_sequence(delta, &e, fn, "delta");
  detail::check_state(carry_in, e, fn, "carry_in");
  detail::check_state(carry_out, e, fn, "carry_out");
  detail::check_alias(delta, g, fn, "delta", "g");
  detail::check_alias(carry_out, carry_in, fn, "carry_out", "carry_in");
  if (e.batch == 0 || e.channels == 0) return;
  backend::ScanImpl<S>::template reverse<T>(e, a.data(), detail::seq_layout(a), g.data(), detail::seq_layout(g),
                                            delta.data(), detail::seq_layout(delta), carry_in.data(),
                                            detail::state_stride(carry_in), carry_out.data(),
                                            detail::state_stride(carry_out));
}

}  // namespace ssmx::scan

namespace ssmx {
using scan::linear_scan;
using scan::reverse_linear_scan;
}  // namespace ssmx
