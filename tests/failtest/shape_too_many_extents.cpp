// A Shape has at most four extents; a fifth is a compile-time error.
// expect-error: at most 4 extents are supported
#include <ssmx/core/shape.hpp>

#if defined(SSMX_FAILTEST)
using S = ssmx::Shape<1, 2, 3, 4, 5>;
#else
using S = ssmx::Shape<1, 2, 3, 4>;
#endif

int main() { return S().dims().numel() == 24 ? 0 : 1; }
