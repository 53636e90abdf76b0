// bf16 x bf16 -> float32 GEMMs on oneDNN's brgemm micro-kernel: see cpu/bf16_gemm.h.
#include "cpu/bf16_gemm.h"

#include <ATen/native/CPUBlas.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <set>
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
  std::vector<BFloat16> packed(packed_numel(even(K), N));
  pack_transposed(w, K, K, N, packed.data(), even(K));
  float c[M * N];
  try {
    gemm(c, N, a, 6, M, packed.data(), even(K), N, /*accumulate=*/false);
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

// ---------------------------------------------------------------- AVX-512 packing and rounding
// These run only where the CPU has AVX512_BF16 (available(); such CPUs have AVX512F/BW/VL too), so the functions
// are compiled for it one by one instead of the whole file. Each does a 16 x 16 block in registers and leaves the
// edges to the scalar loops below.
#if defined(__x86_64__) && defined(__GNUC__)
#define ALIGNFAST_BF16_SIMD 1
#define ALIGNFAST_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Transposes 16 rows of 16 32-bit lanes in place: r[i][j] -> r[j][i].
ALIGNFAST_AVX512_BF16 inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of single lanes
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 2 x 2 blocks of lane pairs
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now r[4g + m] holds in its 128-bit chunk c column 4c + m of rows 4g..4g + 3, and output row 4c + m needs
  // chunk c of r[m], r[4 + m], r[8 + m], r[12 + m]: a 4 x 4 transpose of chunks, in two shuffle steps.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// dst[p * kBlockN + j] = src[j * ld + p] for 32-bit lanes, in whole 16 x 16 blocks only: j < cols / 16 * 16 and
// p < pairs / 16 * 16 (the caller does the edges).
ALIGNFAST_AVX512_BF16 void pack_transposed_simd(const uint32_t* src, int64_t ld, int64_t pairs, int64_t cols,
                                                uint32_t* dst) {
  __m512i r[16];
  for (int64_t j0 = 0; j0 + 16 <= cols; j0 += 16) {
    for (int64_t p0 = 0; p0 + 16 <= pairs; p0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (j0 + i) * ld + p0);
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (p0 + i) * kBlockN + j0, r[i]);
    }
  }
}

// dst[p][j][0..1] = (src[2p][j], src[2p + 1][j]) for whole 32-column runs of j; returns the columns done.
ALIGNFAST_AVX512_BF16 int64_t pack_rows_simd(const BFloat16* src, int64_t ld, int64_t K, int64_t cols,
                                             BFloat16* dst) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(kInterleave);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  const int64_t done = cols / 32 * 32;
  for (int64_t k = 0; k + 1 < K; k += 2) {
    const BFloat16* a = src + k * ld;
    BFloat16* out = dst + (k / 2) * kBlockN * 2;
    for (int64_t j = 0; j < done; j += 32) {
      const __m512i x = _mm512_loadu_si512(a + j), y = _mm512_loadu_si512(a + ld + j);
      _mm512_storeu_si512(out + 2 * j, _mm512_permutex2var_epi16(x, idx_lo, y));
      _mm512_storeu_si512(out + 2 * j + 32, _mm512_permutex2var_epi16(x, idx_hi, y));
    }
  }
  return done;
}

// out[i * ld_out + j] = bf16(src[i * ld + j]) for whole 16-column runs; returns the columns done.
ALIGNFAST_AVX512_BF16 int64_t round_rows_simd(const float* src, int64_t ld, int64_t rows, int64_t cols,
                                              BFloat16* out, int64_t ld_out) {
  const int64_t done = cols / 16 * 16;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < done; j += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i * ld + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ld_out + j), reinterpret_cast<const __m256i&>(v));
    }
  }
  return done;
}

// out_t[j * ld_t + i] = bf16(src[i * ld + j]) for whole 16 x 16 blocks; the rows and columns done are
// rows / 16 * 16 and cols / 16 * 16.
ALIGNFAST_AVX512_BF16 void round_transposed_simd(const float* src, int64_t ld, int64_t rows, int64_t cols,
                                                 BFloat16* out_t, int64_t ld_t) {
  __m512i r[16];
  for (int64_t i0 = 0; i0 + 16 <= rows; i0 += 16) {
    for (int64_t j0 = 0; j0 + 16 <= cols; j0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(src + (i0 + i) * ld + j0));
      transpose16x16(r);
      for (int j = 0; j < 16; ++j) {
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_castsi512_ps(r[j]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_t + (j0 + j) * ld_t + i0),
                            reinterpret_cast<const __m256i&>(v));
      }
    }
  }
}
#endif

bool simd() {
#ifdef ALIGNFAST_BF16_SIMD
  static const bool on = cpu_has_avx512_bf16();
  return on;
#else
  return false;
#endif
}

// dst[p][j][r] = B[2p + r][j] for p in [p0, p1), j in [j0, j1) (one packed block; zeros past K stay as set).
template <typename Get>
void pack_scalar(int64_t K, int64_t p0, int64_t p1, int64_t j0, int64_t j1, BFloat16* dst, Get&& get) {
  for (int64_t p = p0; p < p1; ++p) {
    BFloat16* row = dst + p * kBlockN * 2;
    const int64_t k = 2 * p;
    for (int64_t j = j0; j < j1; ++j) {
      row[2 * j] = get(k, j);
      if (k + 1 < K) row[2 * j + 1] = get(k + 1, j);
    }
  }
}

}  // namespace

bool available() { return onednn_chosen() && hardware_ready(); }

void pack_transposed(const BFloat16* src, int64_t ld, int64_t K, int64_t N, BFloat16* dst, int64_t Kp) {
  const int64_t pairs = even(K) / 2, block = Kp / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    const BFloat16* s = src + n0 * ld;
    BFloat16* d = dst + b * block;
    const int64_t cols = std::min(kBlockN, N - n0);
    std::memset(static_cast<void*>(d), 0, sizeof(BFloat16) * block);
    auto get = [&](int64_t k, int64_t j) { return s[j * ld + k]; };
    int64_t p_done = 0, j_done = 0;
#ifdef ALIGNFAST_BF16_SIMD
    // A pair (B[2p][j], B[2p + 1][j]) is one 32-bit word of W's row j when K and ld are even: a word transpose.
    if (simd() && K % 2 == 0 && ld % 2 == 0) {
      pack_transposed_simd(reinterpret_cast<const uint32_t*>(s), ld / 2, pairs, cols, reinterpret_cast<uint32_t*>(d));
      p_done = pairs / 16 * 16;
      j_done = cols / 16 * 16;
    }
#endif
    pack_scalar(K, 0, p_done, j_done, cols, d, get);
    pack_scalar(K, p_done, pairs, 0, cols, d, get);
  }
}

void pack_rows(const BFloat16* src, int64_t ld, int64_t K, int64_t N, BFloat16* dst, int64_t Kp) {
  const int64_t pairs = even(K) / 2, block = Kp / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    const BFloat16* s = src + n0;
    BFloat16* d = dst + b * block;
    const int64_t cols = std::min(kBlockN, N - n0);
    std::memset(static_cast<void*>(d), 0, sizeof(BFloat16) * block);
    auto get = [&](int64_t k, int64_t j) { return s[k * ld + j]; };
    int64_t j_done = 0;
#ifdef ALIGNFAST_BF16_SIMD
    if (simd()) j_done = pack_rows_simd(s, ld, K, cols, d);  // every whole pair of rows; the odd last row below
#endif
    pack_scalar(K, 0, K / 2, j_done, cols, d, get);
    pack_scalar(K, K / 2, pairs, 0, cols, d, get);
  }
}

// The distinct brgemm shapes this process has used (alignfast_bf16_gemm_shapes): each is a kernel per thread. Each
// thread checks its own set first, so the shared one (and its lock) is touched once per shape and thread.
std::mutex g_shapes_mutex;
std::set<std::array<int64_t, 6>> g_shapes;

void note_shape(const std::array<int64_t, 6>& shape) {
  static thread_local std::set<std::array<int64_t, 6>> seen;
  if (!seen.insert(shape).second) return;
  std::lock_guard<std::mutex> lock(g_shapes_mutex);
  g_shapes.insert(shape);
}

// The rows of the next brgemm call from `left` rows: 256, else whole 64-row blocks, else the rest, so that M takes
// one of 7 values for callers whose row counts are multiples of 16 (bf16_gemm.h). 256-row blocks ran within 1% of
// one call of all 1024 rows in the probe (bench/NOTES-gemm.md).
static int64_t next_rows(int64_t left) {
  if (left >= 256) return 256;
  if (left >= 64) return left / 64 * 64;
  return left;
}

void gemm(float* c, int64_t ldc, const BFloat16* a, int64_t lda, int64_t M, const BFloat16* b_packed, int64_t Kp,
          int64_t N, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  const int64_t block = Kp / 2 * kBlockN * 2;
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kBlockN, ++b) {
    const int64_t cols = std::min(kBlockN, N - n0);
    for (int64_t m0 = 0, rows = next_rows(M); m0 < M; m0 += rows, rows = next_rows(M - m0)) {
      note_shape({rows, cols, Kp, lda, ldc, accumulate ? 1 : 0});
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
      at::native::cpublas::brgemm(rows, cols, Kp, lda, kBlockN, ldc, accumulate, a + m0 * lda, b_packed + b * block,
                                  c + m0 * ldc + n0, /*is_vnni=*/true);
#else  // a libtorch without the bf16 brgemm: the probe fails here and the float32 tiles run instead
      TORCH_CHECK(false, "alignfast: this libtorch has no bf16 x bf16 -> float32 brgemm");
#endif
    }
  }
  // Hands back the thread's AMX tile state where brgemm took it (nothing to do on AVX-512 CPUs). Once per call
  // so no caller can forget it; re-taking it costs one tile-config load per call.
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

void round_for_products(const float* src, int64_t ld, int64_t rows, int64_t cols, BFloat16* out, BFloat16* out_t,
                        int64_t ld_t) {
  const int64_t ld_out = even(cols);
  const bool vec = simd();
  if (out != nullptr) {
    int64_t j_done = 0;
#ifdef ALIGNFAST_BF16_SIMD
    if (vec) j_done = round_rows_simd(src, ld, rows, cols, out, ld_out);
#endif
    for (int64_t i = 0; i < rows; ++i) {
      const float* s = src + i * ld;
      BFloat16* o = out + i * ld_out;
      for (int64_t j = j_done; j < cols; ++j) o[j] = s[j];
      if (ld_out != cols) o[cols] = 0.0f;
    }
  }
  if (out_t != nullptr) {
    int64_t i_done = 0, j_done = 0;
#ifdef ALIGNFAST_BF16_SIMD
    if (vec) {
      round_transposed_simd(src, ld, rows, cols, out_t, ld_t);
      i_done = rows / 16 * 16;
      j_done = cols / 16 * 16;
    }
#endif
    // The edges: columns past j_done for every row, rows past i_done for the columns before it.
    for (int64_t j = 0; j < cols; ++j) {
      BFloat16* o = out_t + j * ld_t;
      for (int64_t i = j < j_done ? i_done : 0; i < rows; ++i) o[i] = src[i * ld + j];
      std::fill(o + rows, o + ld_t, BFloat16(0.0f));
    }
  }
}

}  // namespace bf16
}  // namespace cpu
}  // namespace alignfast

extern "C" int64_t alignfast_bf16_gemm_shapes() {
  std::lock_guard<std::mutex> lock(alignfast::cpu::bf16::g_shapes_mutex);
  return static_cast<int64_t>(alignfast::cpu::bf16::g_shapes.size());
}

extern "C" int alignfast_bf16_gemm_available() { return alignfast::cpu::bf16::available() ? 1 : 0; }
