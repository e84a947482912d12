// ssmx — a layer's stored input stream ([rows, d_model]), the dominant term of the
// adjoint's memory (K·T·P values). Kept in the compute type T, or in bfloat16 to halve
// it: values are rounded once when written and every read returns the rounded values, so
// the forward pass, the backward's recompute and every strategy see the same inputs and
// the gradients are exact for that rounded stream (arithmetic stays in T).
// Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include <algorithm>
#include <utility>

#include "../core/dtype.hpp"
#include "../core/tensor.hpp"
#include "../expr/expr.hpp"

namespace ssmx::nn {

template <class T, Space S = Space::Host>
class StoredStream {
 public:
  using CV = TensorView<const T, S>;
  StoredStream() = default;
  // [rows, width]: rows [0, zero_rows) zero, the others uninitialised (the caller writes
  // every one of them before reading it).
  StoredStream(index_t rows, index_t width, bool bf16_storage, index_t zero_rows) : bf16_(bf16_storage) {
    const index_t z = std::min(std::max<index_t>(zero_rows, 0), rows);
    const std::size_t zero_elems = std::size_t(z * width);
    if (bf16_) {
      half_ = Tensor<bf16, S>(Dims{rows, width}, Tag::Activations);
      ssmx::detail::zero_bytes(half_.data(), S, zero_elems * sizeof(bf16));  // bf16 zero is all-zero bits
    } else {
      full_ = Tensor<T, S>(Dims{rows, width}, Tag::Activations);
      ssmx::detail::zero_bytes(full_.data(), S, zero_elems * sizeof(T));
    }
  }
  bool empty() const { return bf16_ ? half_.empty() : full_.empty(); }
  void clear() { *this = StoredStream(); }

  // Rows [r0, r1): a view of the storage, or (bfloat16) their values converted into `buf`,
  // which must outlive the view.
  CV read(index_t r0, index_t r1, Tensor<T, S>& buf) const {
    if (!bf16_) return CV(full_.view()).slice(r0, r1);
    buf = Tensor<T, S>(Dims{r1 - r0, half_.extent(1)}, Tag::Workspace);  // one stretch's rows, converted
    assign(buf.view(), leaf(TensorView<const bf16, S>(half_.view()).slice(r0, r1)));
    return buf.view();
  }
  // Rows [r0, r1) through f(TensorView<T, S>): written in place, or (bfloat16) into a buffer
  // that is then stored, rounded (through float, once).
  template <class F>
  void write(index_t r0, index_t r1, F&& f) {
    if (!bf16_) {
      f(full_.view().slice(r0, r1));
      return;
    }
    Tensor<T, S> buf = zeros<T, S>(Dims{r1 - r0, half_.extent(1)}, Tag::Workspace);
    f(buf.view());
    assign(half_.view().slice(r0, r1), leaf(buf));  // bf16(float(x)), as bf16 converts
  }
  void write(index_t r0, CV values) {
    write(r0, r0 + values.extent(0), [&](TensorView<T, S> v) { copy<T>(v, values); });
  }

 private:
  bool bf16_ = false;
  Tensor<T, S> full_;
  Tensor<bf16, S> half_;
};

}  // namespace ssmx::nn
