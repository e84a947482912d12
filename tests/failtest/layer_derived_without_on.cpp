// A layer derived from another inherits its `on<S>`; the model would silently train the base
// layer. Naming the derived layer in a model is a compile-time error until it declares its own.
// expect-error: inherits its `on`
#include <ssmx/nn/diagonal_ssm.hpp>
#include <ssmx/nn/scan_layer.hpp>

#include <type_traits>

template <class T, ssmx::index_t P, ssmx::index_t N>
struct Scaled : ssmx::nn::DiagonalSSM<T, P, N> {
#if !defined(SSMX_FAILTEST)
  template <ssmx::Space S2>
  using on = Scaled;
#endif
  using ssmx::nn::DiagonalSSM<T, P, N>::DiagonalSSM;
};

int main() {
  using L = ssmx::nn::layer_on_t<Scaled<float, 4, 2>, ssmx::Space::Host>;
  return std::is_same_v<L, Scaled<float, 4, 2>> ? 0 : 1;
}
