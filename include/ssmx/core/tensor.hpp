// ssmx — Tensor (owning, contiguous, tracked) and TensorView (non-owning, strided).
//
// The memory space is part of the type: Tensor<float> lives on the host,
// Tensor<float, Space::Cuda> on the GPU. Layout is row-major; a sequence tensor is
// [batch, time, channels...] or [time, channels...] for one sequence.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dtype.hpp"
#include "memory.hpp"
#include "shape.hpp"

namespace ssmx {

// Every expression node derives from ExprTag (see expr/nodes.hpp); tensors accept them in `=`.
struct ExprTag {};
template <class E>
using enable_if_expr_t = std::enable_if_t<std::is_base_of_v<ExprTag, std::decay_t<E>>, int>;

// A non-owning view: pointer, extents and element strides (0 for a broadcast dimension).
template <class T, Space S = Space::Host>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  static constexpr Space space = S;

  TensorView() = default;
  TensorView(T* data, const Dims& dims) : data_(data), dims_(dims), strides_(contiguous_strides(dims)) {}
  TensorView(T* data, const Dims& dims, const std::array<index_t, max_rank>& strides)
      : data_(data), dims_(dims), strides_(strides) {}
  // A view of mutable data converts to a view of const data.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U, S>& o) : data_(o.data()), dims_(o.dims()), strides_(o.strides()) {}  // NOLINT

  TensorView(const TensorView&) = default;
  TensorView& operator=(const TensorView&) = default;  // rebinds, as a pointer does
  // view = expr writes the expression's values into the viewed elements (one pass).
  template <class E, enable_if_expr_t<E> = 0>
  const TensorView& operator=(const E& e) const {
    assign(*this, e);
    return *this;
  }

  T* data() const noexcept { return data_; }
  const Dims& dims() const noexcept { return dims_; }
  const std::array<index_t, max_rank>& strides() const noexcept { return strides_; }
  int rank() const noexcept { return dims_.rank; }
  index_t extent(int i) const { return dims_[i]; }
  index_t stride(int i) const { return strides_[std::size_t(i)]; }
  index_t numel() const { return dims_.numel(); }
  bool is_contiguous() const {
    auto c = contiguous_strides(dims_);
    for (int i = 0; i < dims_.rank; ++i)
      if (dims_[i] != 1 && c[std::size_t(i)] != strides_[std::size_t(i)]) return false;
    return true;
  }

  // Element access (host views only).
  template <class... I>
  T& operator()(I... idx) const {
    static_assert(S == Space::Host, "element access is for host tensors; copy a device tensor to the host first");
    index_t off = 0;
    std::size_t k = 0;
    ((off += index_t(idx) * strides_[k++]), ...);
    (void)k;
    return data_[off];
  }
  T& operator[](index_t linear) const { return data_[linear]; }  // contiguous views

  // Rows [begin, end) of dimension 0.
  TensorView slice(index_t begin, index_t end) const {
    SSMX_REQUIRE(dims_.rank >= 1 && 0 <= begin && begin <= end && end <= dims_[0], ShapeError, "slice [", begin, ", ",
                 end, ") is out of range for a tensor of shape ", dims_.str());
    Dims d = dims_;
    d[0] = end - begin;
    return TensorView(data_ + begin * strides_[0], d, strides_);
  }
  // Rows [begin, end) of dimension `axis`.
  TensorView slice(int axis, index_t begin, index_t end) const {
    SSMX_REQUIRE(axis >= 0 && axis < dims_.rank && 0 <= begin && begin <= end && end <= dims_[axis], ShapeError,
                 "slice [", begin, ", ", end, ") of dimension ", axis, " is out of range for a tensor of shape ",
                 dims_.str());
    Dims d = dims_;
    d[axis] = end - begin;
    return TensorView(data_ + begin * strides_[std::size_t(axis)], d, strides_);
  }
  // The same elements with other extents; the view must be contiguous.
  TensorView reshape(const Dims& d) const {
    SSMX_REQUIRE(is_contiguous(), ShapeError, "reshape of a non-contiguous view of shape ", dims_.str());
    SSMX_REQUIRE(d.numel() == numel(), ShapeError, "cannot reshape ", dims_.str(), " (", numel(), " elements) to ",
                 d.str(), " (", d.numel(), " elements)");
    return TensorView(data_, d);
  }

 private:
  T* data_ = nullptr;
  Dims dims_{};
  std::array<index_t, max_rank> strides_{0, 0, 0, 0};
};

// An owning, contiguous tensor whose storage goes through the tracked allocator.
template <class T, Space S = Space::Host>
class Tensor {
 public:
  using value_type = T;
  static constexpr Space space = S;

  Tensor() = default;
  explicit Tensor(const Dims& dims, Tag tag = Tag::Activations)
      : buf_(std::size_t(dims.numel()), S, tag), dims_(dims) {}
  template <index_t... E>
  explicit Tensor(const Shape<E...>& shape, Tag tag = Tag::Activations) : Tensor(shape.dims(), tag) {}

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  // Copies are explicit (clone()): an accidental copy of a long sequence is a bug.
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  // t = expr evaluates into the existing storage (shapes must agree or broadcast).
  template <class E, enable_if_expr_t<E> = 0>
  Tensor& operator=(const E& e) {
    assign(view(), e);
    return *this;
  }

  T* data() noexcept { return buf_.data(); }
  const T* data() const noexcept { return buf_.data(); }
  const Dims& dims() const noexcept { return dims_; }
  int rank() const noexcept { return dims_.rank; }
  index_t extent(int i) const { return dims_[i]; }
  index_t numel() const { return dims_.numel(); }
  std::size_t bytes() const { return std::size_t(numel()) * sizeof(T); }
  Tag tag() const noexcept { return buf_.tag(); }
  bool empty() const noexcept { return buf_.size() == 0; }

  TensorView<T, S> view() noexcept { return {data(), dims_}; }
  TensorView<const T, S> view() const noexcept { return {data(), dims_}; }
  operator TensorView<T, S>() noexcept { return view(); }              // NOLINT
  operator TensorView<const T, S>() const noexcept { return view(); }  // NOLINT

  template <class... I>
  T& operator()(I... idx) {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const {
    return view()(idx...);
  }
  T& operator[](index_t i) { return data()[i]; }
  const T& operator[](index_t i) const { return data()[i]; }

  // Reinterprets the extents in place (same element count).
  void reshape(const Dims& d) {
    SSMX_REQUIRE(d.numel() == numel(), ShapeError, "cannot reshape ", dims_.str(), " to ", d.str());
    dims_ = d;
  }

  Tensor clone(Tag tag) const;
  Tensor clone() const { return clone(this->tag()); }

 private:
  Buffer<T> buf_;
  Dims dims_{};
};

// ---- host helpers --------------------------------------------------------------------

namespace detail {
template <class T>
void host_copy(TensorView<T, Space::Host> dst, TensorView<const T, Space::Host> src) {
  SSMX_REQUIRE(dst.dims() == src.dims(), ShapeError, "copy: destination shape ", dst.dims().str(),
               " differs from source shape ", src.dims().str());
  if (dst.is_contiguous() && src.is_contiguous()) {
    if (src.numel()) std::memcpy(dst.data(), src.data(), std::size_t(src.numel()) * sizeof(T));
    return;
  }
  Dims d = dst.dims();
  std::array<index_t, max_rank> e{1, 1, 1, 1}, sd{0, 0, 0, 0}, ss{0, 0, 0, 0};
  for (int i = 0; i < d.rank; ++i) {
    e[std::size_t(max_rank - d.rank + i)] = d[i];
    sd[std::size_t(max_rank - d.rank + i)] = dst.stride(i);
    ss[std::size_t(max_rank - d.rank + i)] = src.stride(i);
  }
  for (index_t i0 = 0; i0 < e[0]; ++i0)
    for (index_t i1 = 0; i1 < e[1]; ++i1)
      for (index_t i2 = 0; i2 < e[2]; ++i2)
        for (index_t i3 = 0; i3 < e[3]; ++i3)
          dst.data()[i0 * sd[0] + i1 * sd[1] + i2 * sd[2] + i3 * sd[3]] =
              src.data()[i0 * ss[0] + i1 * ss[1] + i2 * ss[2] + i3 * ss[3]];
}
}  // namespace detail

// Copies src into dst (same extents; host views, any strides).
template <class T>
void copy(TensorView<T, Space::Host> dst, TensorView<const T, Space::Host> src) {
  detail::host_copy<T>(dst, src);
}
template <class T>
void copy(TensorView<T, Space::Host> dst, TensorView<T, Space::Host> src) {
  detail::host_copy<T>(dst, TensorView<const T, Space::Host>(src));
}

template <class T, Space S>
Tensor<T, S> Tensor<T, S>::clone(Tag tag) const {
  Tensor out(dims_, tag);
  detail::copy_bytes(out.data(), S, data(), S, bytes());
  return out;
}

// A copy of t in memory space D (a clone when D is t's own space).
template <Space D, class T, Space S>
Tensor<T, D> to_space(const Tensor<T, S>& t, Tag tag) {
  Tensor<T, D> out(t.dims(), tag);
  detail::copy_bytes(out.data(), D, t.data(), S, t.bytes());
  return out;
}
template <Space D, class T, Space S>
Tensor<T, D> to_space(const Tensor<T, S>& t) {
  return to_space<D>(t, t.tag());
}

// Sets every element of a host view to `value`.
template <class T>
void fill(TensorView<T, Space::Host> v, T value) {
  if (v.is_contiguous()) {
    std::fill(v.data(), v.data() + v.numel(), value);
    return;
  }
  Tensor<T> tmp(v.dims(), Tag::Workspace);
  std::fill(tmp.data(), tmp.data() + tmp.numel(), value);
  copy<T>(v, tmp.view());
}
template <class T>
void fill(Tensor<T>& t, T value) {
  fill<T>(t.view(), value);
}

// A tensor of zeros in space S.
template <class T, Space S = Space::Host>
Tensor<T, S> zeros(const Dims& d, Tag tag = Tag::Activations) {
  Tensor<T, S> t(d, tag);
  detail::zero_bytes(t.data(), S, t.bytes());
  return t;
}

// A host tensor holding `values` (row-major), checked against the extents.
template <class T>
Tensor<T> from_vector(const Dims& d, const std::vector<T>& values, Tag tag = Tag::Activations) {
  SSMX_REQUIRE(index_t(values.size()) == d.numel(), ShapeError, "from_vector: ", values.size(),
               " values for shape ", d.str(), " (", d.numel(), " elements)");
  Tensor<T> t(d, tag);
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

template <class T>
std::vector<std::remove_const_t<T>> to_vector(TensorView<T, Space::Host> v) {
  Tensor<std::remove_const_t<T>> tmp(v.dims(), Tag::Workspace);
  copy<std::remove_const_t<T>>(tmp.view(), TensorView<const std::remove_const_t<T>>(v));
  return std::vector<std::remove_const_t<T>>(tmp.data(), tmp.data() + tmp.numel());
}
// The values of a tensor in any space, row-major, on the host.
template <class T, Space S>
std::vector<T> to_vector(const Tensor<T, S>& t) {
  std::vector<T> v(std::size_t(t.numel()));
  detail::copy_bytes(v.data(), Space::Host, t.data(), S, t.bytes());
  return v;
}

// Throws ShapeError naming `what` unless `v` has exactly the extents `expected`.
inline void check_dims(const Dims& actual, const Dims& expected, const char* what) {
  SSMX_REQUIRE(actual == expected, ShapeError, "tensor '", what, "' has shape ", actual.str(), ", expected ",
               expected.str());
}

}  // namespace ssmx
