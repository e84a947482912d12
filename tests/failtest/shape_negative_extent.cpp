// An extent is >= 0 or ssmx::dynamic (-1); -3 is a compile-time error.
// expect-error: an extent must be >= 0 or ssmx::dynamic
#include <ssmx/core/shape.hpp>

#if defined(SSMX_FAILTEST)
using S = ssmx::Shape<ssmx::dynamic, -3>;
#else
using S = ssmx::Shape<ssmx::dynamic, 3>;
#endif

int main() { return S(2).dims().numel() == 6 ? 0 : 1; }
