// Element access through a TensorView of device memory is a compile-time error on the host.
// expect-error: element access is for host tensors
#include <ssmx/core/tensor.hpp>

#if defined(SSMX_FAILTEST)
constexpr ssmx::Space space = ssmx::Space::Cuda;
#else
constexpr ssmx::Space space = ssmx::Space::Host;
#endif

int main() {
  float storage[6] = {0, 1, 2, 3, 4, 5};
  ssmx::TensorView<float, space> v(storage, ssmx::Dims{2, 3});
  return v(1, 2) == 5.0f ? 0 : 1;
}
