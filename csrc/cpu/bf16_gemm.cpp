// bf16 x bf16 -> float32 GEMMs on oneDNN's brgemm micro-kernel: see cpu/bf16_gemm.h.
#include "cpu/bf16_gemm.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "cpu/gemm.h"

namespace alignfast {
namespace cpu {
namespace bf16 {
namespace {

using c10::BFloat16;

// A 3 x 4 x 5 product through the whole path (packing, brgemm, padding): small integers, so the float32 result
// is exact. Where brgemm is not compiled into libtorch with oneDNN's micro-kernel API it throws instead.
bool probe() {
  constexpr int64_t M = 3, K = 5, N = 4;
  BFloat16 a[M * 6] = {}, w[N * K];
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * 6 + k] = static_cast<float>(i + k - 2);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) w[n * K + k] = static_cast<float>(n * k % 3 - 1);
  std::vector<BFloat16> packed(packed_numel(K, N));
  pack_transposed(w, K, K, N, packed.data());
  float c[M * N];
  try {
    gemm(c, N, a, 6, M, packed.data(), K, N, /*accumulate=*/false);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float want = 0;
      for (int64_t k = 0; k < K; ++k) want += static_cast<float>(a[i * 6 + k]) * static_cast<float>(w[n * K + k]);
      if (c[i * N + n] != want) return false;
    }
  }
  return true;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool hardware_ready() {
  static const bool ready = cpu_has_avx512_bf16() && probe();
  return ready;
}

// Packs one block of up to kBlockN columns: dst[p][j][r] = B[2p + r][n0 + j], zeros past K and past N.
template <typename Get>
void pack_block(int64_t K, int64_t cols, BFloat16* dst, Get&& get) {
  const int64_t pairs = even(K) / 2;
  std::memset(static_cast<void*>(dst), 0, sizeof(BFloat16) * pairs * kBlockN * 2);
  for (int64_t p = 0; p < pairs; ++p) {
    BFloat16* row = dst + p * kBlockN * 2;
    const int64_t k = 2 * p;
    for (int64_t j = 0; j < cols; ++j) {
      row[2 * j] = get(k, j);
      if (k + 1 < K) row[2 * j + 1] = get(k + 1, j);
    }
  }
}

}  // namespace

bool available() { return onednn_chosen() && hardware_ready(); }

void pack_transposed(const BFloat16* src, int64_t ld, int64_t K, int64_t N, BFloat16* dst) {
  const int64_t block = even(K) / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    const BFloat16* s = src + n0 * ld;
    pack_block(K, std::min(kBlockN, N - n0), dst + b * block, [&](int64_t k, int64_t j) { return s[j * ld + k]; });
  }
}

void pack_rows(const BFloat16* src, int64_t ld, int64_t K, int64_t N, BFloat16* dst) {
  const int64_t block = even(K) / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    const BFloat16* s = src + n0;
    pack_block(K, std::min(kBlockN, N - n0), dst + b * block, [&](int64_t k, int64_t j) { return s[k * ld + j]; });
  }
}

void gemm(float* c, int64_t ldc, const BFloat16* a, int64_t lda, int64_t M, const BFloat16* b_packed, int64_t K,
          int64_t N, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  const int64_t Kp = even(K), block = Kp / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    // The whole of M in one call: the micro-kernel blocks M itself, and one call per column block measured
    // fastest ([1024, 512] x [512, 32000]: 67.6 ms against 70.1 with 64-row blocks).
    at::native::cpublas::brgemm(M, std::min(kBlockN, N - n0), Kp, lda, kBlockN, ldc, accumulate, a,
                                b_packed + b * block, c + n0, /*is_vnni=*/true);
  }
  // Hands back the thread's AMX tile state where brgemm took it (nothing to do on AVX-512 CPUs). Once per call
  // so no caller can forget it; re-taking it costs one tile-config load per call.
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

void round_for_products(const float* src, int64_t ld, int64_t rows, int64_t cols, BFloat16* out, BFloat16* out_t) {
  const int64_t ld_out = even(cols), ld_t = even(rows);
  if (out != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      const float* s = src + i * ld;
      BFloat16* o = out + i * ld_out;
      for (int64_t j = 0; j < cols; ++j) o[j] = s[j];
      if (ld_out != cols) o[cols] = 0.0f;
    }
  }
  if (out_t != nullptr) {
    constexpr int64_t kTile = 32;  // a 32 x 32 float block (4 KiB) read, written transposed
    for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile);
      for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
        const int64_t j1 = std::min(cols, j0 + kTile);
        for (int64_t j = j0; j < j1; ++j) {
          BFloat16* o = out_t + j * ld_t;
          for (int64_t i = i0; i < i1; ++i) o[i] = src[i * ld + j];
        }
      }
    }
    if (ld_t != rows) {
      for (int64_t j = 0; j < cols; ++j) out_t[j * ld_t + rows] = 0.0f;
    }
  }
}

}  // namespace bf16
}  // namespace cpu
}  // namespace alignfast

extern "C" int alignfast_bf16_gemm_available() { return alignfast::cpu::bf16::available() ? 1 : 0; }
