// ssmx — the host executor: one OpenMP loop per assignment, Eigen for matrix products,
// deterministic full reductions (fixed blocks summed in a fixed order).
// Private header: include <ssmx/ssmx.hpp>.
#pragma once

#include "../../core/eigen_core.hpp"
#include <algorithm>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../core/eigen.hpp"
#include "../../expr/evaluator.hpp"

namespace ssmx::backend {

template <>
struct Exec<Space::Host> {
  // Elements per parallel block: large enough to amortise the coordinate decomposition.
  static constexpr index_t block = 4096;

  template <class T, class Ev>
  static void run(TensorView<T, Space::Host> out, const Ev& ev, bool accumulate) {
    const expr::Ext4 e = expr::pad_extents(out.dims());
    index_t st[4] = {0, 0, 0, 0};
    for (int k = 0; k < out.rank(); ++k) st[4 - out.rank() + k] = out.stride(k);
    const index_t n = out.numel();
    const index_t nblocks = (n + block - 1) / block;
    T* data = out.data();
    // SIMD registers (Eigen's packet math) where the evaluator and the output allow them.
    constexpr bool packets = expr::has_packet<Ev>::value && std::is_same_v<T, std::decay_t<decltype(ev.coeff(expr::Index4{}))>>;
    using P = simd::Pack<compute_t<T>>;
    if (out.is_contiguous() && expr::linear_ok(ev, e)) {
      if constexpr (expr::has_linear<Ev>::value) {
        // Flat loop over contiguous, same-shaped operands: vectorises.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nblocks > 1 && !omp_in_parallel())
#endif
        for (index_t blk = 0; blk < nblocks; ++blk) {
          const index_t begin = blk * block, end = begin + block < n ? begin + block : n;
          index_t i = begin;
          if constexpr (packets) {
            if (accumulate)
              for (; i + P::size <= end; i += P::size)
                (P::load(data + i) + ev.template packet_linear<P>(i)).store(data + i);
            else
              for (; i + P::size <= end; i += P::size) ev.template packet_linear<P>(i).store(data + i);
          }
          if (accumulate) {
            for (; i < end; ++i) data[i] = T(compute_t<T>(data[i]) + compute_t<T>(ev.coeff_linear(i)));
          } else {
            for (; i < end; ++i) data[i] = T(ev.coeff_linear(i));
          }
        }
        return;
      }
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nblocks > 1 && !omp_in_parallel())
#endif
    for (index_t blk = 0; blk < nblocks; ++blk) {
      index_t begin = blk * block, end = begin + block < n ? begin + block : n;
      expr::Index4 i;
      index_t r = begin;
      for (int k = 3; k >= 0; --k) {
        i.i[k] = r % e[std::size_t(k)];
        r /= e[std::size_t(k)];
      }
      for (index_t lin = begin; lin < end;) {
        // innermost run: contiguous in the last coordinate
        index_t run_len = e[3] - i.i[3];
        if (run_len > end - lin) run_len = end - lin;
        T* row = data + i.i[0] * st[0] + i.i[1] * st[1] + i.i[2] * st[2];
        expr::Index4 j = i;
        index_t t0 = 0;
        if constexpr (packets) {  // a contiguous run of the output: registers first
          if (st[3] == 1) {
            if (accumulate)
              for (; t0 + P::size <= run_len; t0 += P::size, j.i[3] += P::size)
                (P::load(row + j.i[3]) + ev.template packet<P>(j)).store(row + j.i[3]);
            else
              for (; t0 + P::size <= run_len; t0 += P::size, j.i[3] += P::size)
                ev.template packet<P>(j).store(row + j.i[3]);
          }
        }
        if (accumulate) {
          for (index_t t = t0; t < run_len; ++t, ++j.i[3])
            row[j.i[3] * st[3]] = T(compute_t<T>(row[j.i[3] * st[3]]) + compute_t<T>(ev.coeff(j)));
        } else {
          for (index_t t = t0; t < run_len; ++t, ++j.i[3]) row[j.i[3] * st[3]] = T(ev.coeff(j));
        }
        lin += run_len;
        i.i[3] += run_len;
        for (int k = 3; k > 0 && i.i[k] >= e[std::size_t(k)]; --k) {
          i.i[k] = 0;
          ++i.i[k - 1];
        }
      }
    }
  }

  // c = a x b (+ beta c), all row-major rank-2 views; a and b may be transposed views
  // of contiguous data (stride pattern (1, ld)).
  //
  // Determinism: Eigen's own parallel GEMM chooses its blocking by thread count, which
  // changes the summation order. We split the rows into fixed blocks instead and run each
  // block inside our parallel region, where Eigen computes serially with the same
  // blocking whatever the number of threads: results are bit-identical for 1 or N threads.
  // A product of at most gemm_row_block rows (a short chunk, a generation step) is split
  // into fixed blocks of gemm_col_block columns instead, so that its threads share the
  // columns (a step's head and projections have many columns and few rows). The split
  // depends on the shapes alone: the same blocks, and the same bits, for any thread count.
  static constexpr index_t gemm_row_block = 256;
  static constexpr index_t gemm_col_block = 256;
  static constexpr double serial_gemm_work = 65536;  // m·n·k; Eigen's own threshold is 100000

  template <class V>
  static void gemm(TensorView<const V, Space::Host> a, TensorView<const V, Space::Host> b,
                   TensorView<V, Space::Host> c, V beta) {
    const index_t m = a.extent(0), n = b.extent(1);
    const bool by_columns = m <= gemm_row_block && n > gemm_col_block;
    const index_t nblocks = by_columns ? (n + gemm_col_block - 1) / gemm_col_block
                                       : (m + gemm_row_block - 1) / gemm_row_block;
    auto product = [&](TensorView<const V, Space::Host> ab, TensorView<const V, Space::Host> bb,
                       TensorView<V, Space::Host> cb) {
      if (few_rows_product(ab, bb, cb, beta)) return;
      auto C = as_eigen(cb);
      with_matrix(ab, [&](const auto& A) {
        with_matrix(bb, [&](const auto& B) {
          if (beta == V(0)) {
            C.noalias() = A * B;
          } else {  // accumulated by the kernel into C: no temporary for A·B
            if (beta != V(1)) C *= beta;
            C.noalias() += A * B;
          }
        });
      });
    };
    auto run_block = [&](index_t blk) {
      if (by_columns) {
        const index_t c0 = blk * gemm_col_block, c1 = std::min(n, c0 + gemm_col_block);
        product(a, b.slice(1, c0, c1), c.slice(1, c0, c1));
      } else {
        const index_t r0 = blk * gemm_row_block, r1 = std::min(m, r0 + gemm_row_block);
        product(a.slice(r0, r1), b, c.slice(r0, r1));
      }
    };
#if defined(_OPENMP)
    // Small products run serially: a thread team costs more than the work. Below this size
    // Eigen does not parallelise either, so the choice depends on the shapes alone.
    const double work = double(m) * double(b.extent(1)) * double(a.extent(1));
    if (!omp_in_parallel() && work >= serial_gemm_work) {
      // Inside the team Eigen runs each block serially: with several threads because it is
      // in a parallel region, with one because its own thread count is then one too.
#pragma omp parallel for schedule(static)
      for (index_t blk = 0; blk < nblocks; ++blk) run_block(blk);
      return;
    }
#endif
    for (index_t blk = 0; blk < nblocks; ++blk) run_block(blk);
  }

  // out[0] = Op over all of x (contiguous). Fixed blocks, combined in order: deterministic.
  template <class Op, class V>
  static void reduce_all(TensorView<const V, Space::Host> x, TensorView<V, Space::Host> out) {
    const index_t n = x.numel();
    const index_t nblocks = (n + block - 1) / block;
    std::vector<V> partial(std::size_t(nblocks > 0 ? nblocks : 1), Op::template init<V>());
    const V* d = x.data();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nblocks > 1 && !omp_in_parallel())
#endif
    for (index_t blk = 0; blk < nblocks; ++blk) {
      V acc = Op::template init<V>();
      index_t end = (blk + 1) * block < n ? (blk + 1) * block : n;
      for (index_t k = blk * block; k < end; ++k) acc = Op::combine(acc, d[k]);
      partial[std::size_t(blk)] = acc;
    }
    V acc = Op::template init<V>();
    for (V p : partial) acc = Op::combine(acc, p);
    out.data()[0] = Op::finish(acc, n);
  }

 private:
  // C = A B (+ beta C) for 2..gemm_few_rows rows of A (a generation step over a few
  // sequences and their window rows, a short chunk), without Eigen's GEMM, which packs the
  // whole of B for every product: with B column-contiguous (a transposed weight, the tied
  // head) each column meets the rows of A, kept in cache, as dot products; with B
  // row-contiguous each row of B is added into the rows of C it scales. B is read once.
  // False when the operands have neither layout (or one row: Eigen's own GEMV is that).
  static constexpr index_t gemm_few_rows = 8;
  template <class V>
  static bool few_rows_product(TensorView<const V, Space::Host> a, TensorView<const V, Space::Host> b,
                               TensorView<V, Space::Host> c, V beta) {
    const index_t m = a.extent(0), k = a.extent(1), n = b.extent(1);
    if (m < 2 || m > gemm_few_rows || k < 2 || n < 2) return false;
    using Vec = Eigen::Map<const Eigen::Matrix<V, Eigen::Dynamic, 1>>;
    auto C = as_eigen(c);
    if (a.stride(1) == 1 && b.stride(0) == 1) {  // rows of A . columns of B
      for (index_t j = 0; j < n; ++j) {
        const Vec bj(b.data() + j * b.stride(1), k);
        for (index_t i = 0; i < m; ++i) {
          const V d = Vec(a.data() + i * a.stride(0), k).dot(bj);
          C(i, j) = beta == V(0) ? d : beta * C(i, j) + d;
        }
      }
      return true;
    }
    if (b.stride(1) == 1) {  // C[i, :] += A[i, kk] B[kk, :]
      if (beta == V(0))
        C.setZero();
      else
        C *= beta;
      const auto B = as_eigen(b);
      for (index_t kk = 0; kk < k; ++kk)
        for (index_t i = 0; i < m; ++i) C.row(i) += a.data()[i * a.stride(0) + kk * a.stride(1)] * B.row(kk);
      return true;
    }
    return false;
  }

  // Calls f with an Eigen expression for a row-major or transposed-contiguous rank-2 view.
  template <class V, class F>
  static void with_matrix(TensorView<const V, Space::Host> v, F&& f) {
    if (v.stride(1) == 1 || v.extent(1) == 1) {
      f(as_eigen(v));
    } else {
      using ColMap = Eigen::Map<const Eigen::Matrix<V, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>, Eigen::Unaligned,
                                Eigen::OuterStride<>>;
      SSMX_REQUIRE(v.stride(0) == 1, ShapeError, "gemm: operand of shape ", v.dims().str(),
                   " is neither row- nor column-contiguous");
      f(ColMap(v.data(), v.extent(0), v.extent(1), Eigen::OuterStride<>(v.stride(1))));
    }
  }
};

}  // namespace ssmx::backend
