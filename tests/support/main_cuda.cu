// The doctest main of the CUDA test binary (ssmx_tests_cuda).
//
// The umbrella comes first and alone: this TU is also the self-containment test of
// <ssmx/cuda.cuh> (the CUDA build keeps to two nvcc TUs, so it has no TU of its own).
#include <ssmx/cuda.cuh>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

// Without a usable device the GPU suite is excluded with a printed reason and the binary
// succeeds: CI builds the CUDA code on machines without a GPU.
int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    std::printf("GPU tests skipped: no CUDA device\n");
    return 0;
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
