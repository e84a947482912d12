// Device buffers through dist::DeviceTransport (include/ssmx/dist/device.cuh), run by every
// rank of an mpiexec job: all-reduce, broadcast and send/recv of device tensors equal the
// host results, through the pinned staging path and, when the MPI is CUDA-aware, directly.
// Without a GPU it prints the skip line ctest looks for and exits 0 on every rank.
#include <cstdio>
#include <vector>

#include <ssmx/dist/device.cuh>

namespace {

using namespace ssmx;

int failures = 0;
void expect(bool ok, const char* what, int rank) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what);
  }
}

std::vector<double> values(int q, index_t n) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = 0.25 * double(q + 1) + double(i) / 7.0;
  return v;
}

void run(dist::Communicator& comm, dist::DeviceTransport::Mode mode) {
  const int R = comm.size(), r = comm.rank();
  dist::DeviceTransport tr(comm, mode);
  const index_t n = 3001;  // not a multiple of anything in particular
  std::vector<double> mine = values(r, n), sum(std::size_t(n), 0.0);
  for (int q = 0; q < R; ++q) {
    const auto v = values(q, n);
    for (index_t i = 0; i < n; ++i) sum[std::size_t(i)] += v[std::size_t(i)];
  }
  Tensor<double> host(Dims{n});
  std::copy(mine.begin(), mine.end(), host.data());
  Tensor<double, Space::Cuda> dev = to_space<Space::Cuda>(host);
  tr.allreduce_sum(dev.view());
  Tensor<double> back = to_space<Space::Host>(dev);
  bool ok = true;
  for (index_t i = 0; i < n; ++i) ok = ok && std::fabs(back[i] - sum[std::size_t(i)]) <= 1e-12 * std::fabs(sum[std::size_t(i)]);
  expect(ok, "allreduce_sum of a device tensor", r);

  Tensor<double, Space::Cuda> b = to_space<Space::Cuda>(host);
  tr.broadcast(b.view(), R - 1);
  back = to_space<Space::Host>(b);
  const auto root = values(R - 1, n);
  ok = true;
  for (index_t i = 0; i < n; ++i) ok = ok && back[i] == root[std::size_t(i)];
  expect(ok, "broadcast of a device tensor", r);

  // A chain r -> r+1: the last rank sends nothing, rank 0 receives nothing.
  Tensor<double, Space::Cuda> in = to_space<Space::Cuda>(zeros<double>(Dims{n}));
  if (r % 2 == 0) {
    if (r + 1 < R) tr.send(TensorView<const double, Space::Cuda>(dev.view()), r + 1, 5);
    if (r > 0) tr.recv(in.view(), r - 1, 5);
  } else {
    if (r > 0) tr.recv(in.view(), r - 1, 5);
    if (r + 1 < R) tr.send(TensorView<const double, Space::Cuda>(dev.view()), r + 1, 5);
  }
  back = to_space<Space::Host>(in);
  ok = true;
  for (index_t i = 0; i < n; ++i) ok = ok && back[i] == (r > 0 ? sum[std::size_t(i)] : 0.0);
  expect(ok, "send/recv of device tensors", r);
}

}  // namespace

int main(int argc, char** argv) {
  dist::Environment env(&argc, &argv);
  dist::Communicator comm;
  // Every rank decides the same way (one machine); a mixed job would be a setup error.
  if (!gpu::device_available()) {
    if (comm.rank() == 0) std::printf("GPU tests skipped: no CUDA device\n");
    return 0;
  }
  try {
    run(comm, dist::DeviceTransport::Mode::staged);
    if (dist::cuda_aware_mpi()) run(comm, dist::DeviceTransport::Mode::direct);
    if (comm.rank() == 0)
      std::printf("device transport: staged%s\n", dist::cuda_aware_mpi() ? " and direct (CUDA-aware MPI)" : " only (MPI is not CUDA-aware)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: error: %s\n", comm.rank(), e.what());
    dist::Environment::abort(1);
  }
  return failures == 0 ? 0 : 1;
}
