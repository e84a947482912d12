// The program both packaging consumers build: make a tensor, check a value, view it through
// Eigen (so the Eigen dependency must have been found), print a line the test looks for.
#include <ssmx/ssmx.hpp>

#include <cstdio>

int main() {
  ssmx::Tensor<float> t(ssmx::Shape<2, 3>{});
  for (ssmx::index_t i = 0; i < t.numel(); ++i) t[i] = float(i);
  auto m = ssmx::as_eigen(t);
  m(1, 2) += 10.0f;  // aliases the tensor's memory
  if (t(1, 2) != 15.0f || m.sum() != 25.0f) {
    std::printf("ssmx consumer FAILED: t(1, 2) = %g, sum = %g\n", double(t(1, 2)), double(m.sum()));
    return 1;
  }
  if (ssmx::memory_stats(ssmx::Space::Host).current < t.bytes()) {
    std::printf("ssmx consumer FAILED: the tracked allocator did not record the tensor\n");
    return 1;
  }
  std::printf("ssmx consumer ok (ssmx %s)\n", SSMX_VERSION_STRING);
  return 0;
}
