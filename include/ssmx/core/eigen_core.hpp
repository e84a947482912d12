// ssmx — <Eigen/Core>, included once for every ssmx header that uses Eigen. GCC 12 reports
// -Wmaybe-uninitialized inside its own AVX-512 intrinsics (the self-initialised result of
// _mm512_undefined_ps, GCC bug 105593) wherever Eigen's matrix-product packing inlines them;
// the warning is silenced for the headers included here (the intrinsics and Eigen), where
// it says nothing about the calling code. Private header.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
