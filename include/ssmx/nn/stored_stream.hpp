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

namespace ssmx::nn {

template <class T>
class StoredStream {
 public:
  using CV = TensorView<const T>;
  StoredStream() = default;
  // Zeros, [rows, width].
  StoredStream(index_t rows, index_t width, bool bf16_storage) : bf16_(bf16_storage) {
    if (bf16_) {
      half_ = Tensor<bf16>(Dims{rows, width}, Tag::Activations);
      std::fill_n(half_.data(), half_.numel(), bf16(0.0f));
    } else {
      full_ = zeros<T>(Dims{rows, width}, Tag::Activations);
    }
  }
  bool empty() const { return bf16_ ? half_.empty() : full_.empty(); }
  void clear() { *this = StoredStream(); }

  // Rows [r0, r1): a view of the storage, or (bfloat16) their values converted into `buf`,
  // which must outlive the view.
  CV read(index_t r0, index_t r1, Tensor<T>& buf) const {
    if (!bf16_) return CV(full_.view()).slice(r0, r1);
    const index_t w = half_.extent(1);
    buf = Tensor<T>(Dims{r1 - r0, w}, Tag::Workspace);  // one stretch's rows, converted
    const bf16* src = half_.data() + r0 * w;
    T* dst = buf.data();
    for (index_t i = 0, n = (r1 - r0) * w; i < n; ++i) dst[i] = T(float(src[i]));
    return buf.view();
  }
  // Rows [r0, r1) through f(TensorView<T>): written in place, or (bfloat16) into a buffer
  // that is then stored, rounded.
  template <class F>
  void write(index_t r0, index_t r1, F&& f) {
    if (!bf16_) {
      f(full_.view().slice(r0, r1));
      return;
    }
    const index_t w = half_.extent(1);
    Tensor<T> buf = zeros<T>(Dims{r1 - r0, w}, Tag::Workspace);
    f(buf.view());
    bf16* dst = half_.data() + r0 * w;
    const T* src = buf.data();
    for (index_t i = 0, n = (r1 - r0) * w; i < n; ++i) dst[i] = bf16(float(src[i]));
  }
  void write(index_t r0, CV values) {
    write(r0, r0 + values.extent(0), [&](TensorView<T> v) { std::copy_n(values.data(), values.numel(), v.data()); });
  }

 private:
  bool bf16_ = false;
  Tensor<T> full_;
  Tensor<bf16> half_;
};

}  // namespace ssmx::nn
