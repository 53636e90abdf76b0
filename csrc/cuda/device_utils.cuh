// Small device-side building blocks shared by the CUDA kernels of csrc/cuda (header only, no kernels).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace alignfast::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Number of SMs of a device (for grid-stride kernels that size their grid to the machine).
inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// N contiguous elements from p, in loads of at most 16 bytes. p must be aligned to the load size
// (min(16, N * sizeof(T)) bytes); the caller checks the base pointers once on the host.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[N]) {
  constexpr int kPer = (16 / int(sizeof(T))) < N ? 16 / int(sizeof(T)) : N;
  static_assert(N % kPer == 0, "N must be a multiple of the elements per 16-byte load");
  struct alignas(sizeof(T) * kPer) Pack {
    T v[kPer];
  };
  const Pack* packs = reinterpret_cast<const Pack*>(p);
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    const Pack pack = packs[k];
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k * kPer + j] = pack.v[j];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&in)[N]) {
  constexpr int kPer = (16 / int(sizeof(T))) < N ? 16 / int(sizeof(T)) : N;
  static_assert(N % kPer == 0, "N must be a multiple of the elements per 16-byte store");
  struct alignas(sizeof(T) * kPer) Pack {
    T v[kPer];
  };
  Pack* packs = reinterpret_cast<Pack*>(p);
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    Pack pack;
#pragma unroll
    for (int j = 0; j < kPer; ++j) pack.v[j] = in[k * kPer + j];
    packs[k] = pack;
  }
}

}  // namespace alignfast::cuda
