// Helpers for math written once and compiled for both the CPU kernels and the CUDA kernels.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define ALIGNFAST_HD __host__ __device__
#else
#define ALIGNFAST_HD
#endif

namespace alignfast {

// Overloads for float and double that call the device intrinsic in device code and std:: on the host.
ALIGNFAST_HD inline float exp_(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}
ALIGNFAST_HD inline double exp_(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
ALIGNFAST_HD inline float expm1_(float x) {
#ifdef __CUDA_ARCH__
  return expm1f(x);
#else
  return std::expm1(x);
#endif
}
ALIGNFAST_HD inline double expm1_(double x) {
#ifdef __CUDA_ARCH__
  return ::expm1(x);
#else
  return std::expm1(x);
#endif
}
ALIGNFAST_HD inline float sqrt_(float x) {
#ifdef __CUDA_ARCH__
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
ALIGNFAST_HD inline double sqrt_(double x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

}  // namespace alignfast
