// Helpers for math written once and compiled for both the CPU kernels and the CUDA kernels.
#pragma once
#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define ALIGNFAST_HD __host__ __device__
#else
#define ALIGNFAST_HD
#endif

namespace alignfast {

// exp, expm1, sqrt for float and double: the single-precision device function for float in device
// code (never a silent promotion to double), std:: on the host. The execution space is the same in
// nvcc's host and device passes; only the body differs.
#ifdef __CUDA_ARCH__
#define ALIGNFAST_MATH_BODY(fn)                                   \
  if constexpr (std::is_same_v<T, float>) return fn##f(x); \
  else return ::fn(x);
#else
#define ALIGNFAST_MATH_BODY(fn) return std::fn(x);
#endif
#define ALIGNFAST_MATH_FN(name, fn) \
  template <typename T>             \
  ALIGNFAST_HD inline T name(T x) { \
    ALIGNFAST_MATH_BODY(fn)         \
  }
ALIGNFAST_MATH_FN(exp_, exp)
ALIGNFAST_MATH_FN(expm1_, expm1)
ALIGNFAST_MATH_FN(sqrt_, sqrt)
#undef ALIGNFAST_MATH_FN
#undef ALIGNFAST_MATH_BODY

}  // namespace alignfast
