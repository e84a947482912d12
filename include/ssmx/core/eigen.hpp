// ssmx — zero-copy interop with Eigen: a host tensor viewed as an Eigen::Map, and an Eigen
// matrix viewed as a TensorView. Both directions alias the same memory.
#pragma once

#include "eigen_core.hpp"

#include "tensor.hpp"

namespace ssmx {

template <class T>
using RowMatrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A rank-2 (or rank-1, as a row) host view as a row-major Eigen::Map with outer stride.
template <class T>
auto as_eigen(TensorView<T, Space::Host> v) {
  SSMX_REQUIRE(v.rank() == 1 || v.rank() == 2, ShapeError, "as_eigen: expected a rank-1 or rank-2 tensor, got shape ",
               v.dims().str());
  const index_t rows = v.rank() == 2 ? v.extent(0) : 1;
  const index_t cols = v.rank() == 2 ? v.extent(1) : v.extent(0);
  const index_t inner = v.rank() == 2 ? v.stride(1) : v.stride(0);
  SSMX_REQUIRE(inner == 1 || cols <= 1, ShapeError, "as_eigen: the last dimension must be contiguous (stride ", inner,
               ")");
  const index_t outer = v.rank() == 2 ? v.stride(0) : cols;
  using Mat = std::conditional_t<std::is_const_v<T>, const RowMatrix<T>, RowMatrix<T>>;
  return Eigen::Map<Mat, Eigen::Unaligned, Eigen::OuterStride<>>(v.data(), rows, cols,
                                                                 Eigen::OuterStride<>(outer > 0 ? outer : cols));
}
template <class T>
auto as_eigen(Tensor<T>& t) {
  return as_eigen(t.view());
}
template <class T>
auto as_eigen(const Tensor<T>& t) {
  return as_eigen(t.view());
}

// A view of an Eigen dense object's memory (any storage order) as a rank-2 tensor view.
template <class Derived>
auto view_of(Eigen::PlainObjectBase<Derived>& m) {
  using T = typename Derived::Scalar;
  const bool row_major = Derived::IsRowMajor;
  std::array<index_t, max_rank> strides{row_major ? index_t(m.outerStride()) : 1,
                                        row_major ? 1 : index_t(m.outerStride()), 0, 0};
  return TensorView<T>(m.data(), Dims{index_t(m.rows()), index_t(m.cols())}, strides);
}

}  // namespace ssmx
