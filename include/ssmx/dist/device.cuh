// ssmx — device (Space::Cuda) buffers in the communicator's operations; compile with nvcc
// and link ssmx::dist and ssmx::cuda.
//
// With a CUDA-aware MPI (Open MPI built with CUDA: MPIX_Query_cuda_support() returns 1 at
// run time) device pointers go to MPI as they are. Otherwise every operation stages
// through one pinned host buffer (cudaMallocHost, grown on demand): device-to-host copy,
// the host operation, host-to-device copy. Debian's Open MPI is not CUDA-aware, so there
// the staging path runs. The same Communicator carries the timeouts of its host
// operations. NCCL is not used: the operations here are few and large (gradient buckets,
// halo rows, the stream between layer blocks), where MPI's bandwidth suffices.
#pragma once

#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support (Open MPI)
#endif

#include <cuda_runtime.h>

#include "../cuda.cuh"
#include "communicator.hpp"

namespace ssmx::dist {

// Whether the MPI library passes device pointers itself (compiled with CUDA support and
// reporting it at run time).
inline bool cuda_aware_mpi() {
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  return MPIX_Query_cuda_support() == 1;
#else
  return false;
#endif
}

// Device-buffer operations over a Communicator. Not thread-safe (one staging buffer).
class DeviceTransport {
 public:
  enum class Mode { automatic, direct, staged };
  explicit DeviceTransport(Communicator& comm, Mode mode = Mode::automatic)
      : comm_(comm), direct_(mode == Mode::direct || (mode == Mode::automatic && cuda_aware_mpi())) {
    SSMX_REQUIRE(mode != Mode::direct || cuda_aware_mpi(), ValueError,
                 "DeviceTransport: direct device buffers need a CUDA-aware MPI; this one is not (use Mode::staged)");
  }
  DeviceTransport(const DeviceTransport&) = delete;
  DeviceTransport& operator=(const DeviceTransport&) = delete;
  ~DeviceTransport() {
    if (pinned_) SSMX_CUDA_LOG(cudaFreeHost(pinned_));
  }
  bool direct() const noexcept { return direct_; }

  template <class T>
  void allreduce_sum(TensorView<T, Space::Cuda> v) {
    require_contiguous(v, "allreduce_sum");
    if (direct_) return comm_.allreduce_sum(v.data(), std::size_t(v.numel()));
    TensorView<T> h = stage_out(TensorView<const T, Space::Cuda>(v));
    comm_.allreduce_sum(h);
    stage_in(v, h);
  }
  template <class T>
  void broadcast(TensorView<T, Space::Cuda> v, int root) {
    require_contiguous(v, "broadcast");
    if (direct_) return comm_.broadcast(host_alias(v), root);
    TensorView<T> h = comm_.rank() == root ? stage_out(TensorView<const T, Space::Cuda>(v)) : host_view<T>(v.dims());
    comm_.broadcast(h, root);
    stage_in(v, h);
  }
  template <class T>
  void send(TensorView<const T, Space::Cuda> v, int dest, int tag = 0) {
    require_contiguous(v, "send");
    if (direct_) return comm_.send(host_alias(v), dest, tag);
    comm_.send(TensorView<const T>(stage_out(v)), dest, tag);
  }
  template <class T>
  void recv(TensorView<T, Space::Cuda> v, int source, int tag = 0) {
    require_contiguous(v, "recv");
    if (direct_) return comm_.recv(host_alias(v), source, tag);
    TensorView<T> h = host_view<T>(v.dims());
    comm_.recv(h, source, tag);
    stage_in(v, h);
  }

 private:
  template <class V>
  static void require_contiguous(const V& v, const char* who) {
    SSMX_REQUIRE(v.is_contiguous(), ShapeError, "DeviceTransport::", who, ": the device view of shape ",
                 v.dims().str(), " must be contiguous");
  }
  // A CUDA-aware MPI reads device pointers; the host-space view only carries pointer and shape.
  template <class T>
  static TensorView<T> host_alias(TensorView<T, Space::Cuda> v) {
    return TensorView<T>(v.data(), v.dims());
  }
  template <class T>
  static TensorView<const T> host_alias(TensorView<const T, Space::Cuda> v) {
    return TensorView<const T>(v.data(), v.dims());
  }
  template <class T>
  TensorView<T> host_view(const Dims& d) {
    const std::size_t bytes = std::size_t(d.numel()) * sizeof(T);
    if (bytes > capacity_) {
      if (pinned_) SSMX_CUDA_CHECK(cudaFreeHost(pinned_));
      pinned_ = nullptr;
      capacity_ = 0;
      SSMX_CUDA_CHECK(cudaMallocHost(&pinned_, bytes));
      capacity_ = bytes;
    }
    return TensorView<T>(static_cast<T*>(pinned_), d);
  }
  template <class T>
  TensorView<T> stage_out(TensorView<const T, Space::Cuda> v) {
    TensorView<T> h = host_view<T>(v.dims());
    SSMX_CUDA_CHECK(cudaMemcpyAsync(h.data(), v.data(), std::size_t(v.numel()) * sizeof(T), cudaMemcpyDeviceToHost,
                                    cudaStreamPerThread));
    SSMX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
    return h;
  }
  template <class T>
  void stage_in(TensorView<T, Space::Cuda> v, TensorView<T> h) {
    SSMX_CUDA_CHECK(cudaMemcpyAsync(v.data(), h.data(), std::size_t(v.numel()) * sizeof(T), cudaMemcpyHostToDevice,
                                    cudaStreamPerThread));
    SSMX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  }

  Communicator& comm_;
  bool direct_ = false;
  void* pinned_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace ssmx::dist
