// bfloat16 x bfloat16 -> float32 CPU GEMMs on oneDNN's brgemm micro-kernel (bench/NOTES-gemm.md, "bf16 tiles").
//
// Why: linear_token_logprobs with bf16 weights wants float32 logits (its row kernels and merged tile stats are
// float32) from bf16 operands. ATen offers no such product on CPU (mm's out_dtype is CUDA-only, mkldnn_matmul
// insists on output dtype == input dtype, and MKL's cblas_gemm_bf16bf16f32 runs an AVX2 emulation on AMD: 309 ms
// for [1024, 512] x [512, 32000] on one Zen 5 core). libtorch exports oneDNN's brgemm micro-kernel behind
// at::native::cpublas::brgemm, which on a CPU with AVX512_BF16 does the same product in 68 ms (497 GFLOP/s): the
// products of two bf16 values are exact in float32, the sums are float32 (vdpbf16ps), as in the float32 GEMM of
// the converted operands, but without converting them and at ~3x the float32 rate.
//
// The micro-kernel wants B in oneDNN's "VNNI" layout for bf16: pairs of consecutive k interleaved, so that one
// 32-bit lane holds (B[2p][n], B[2p + 1][n]). Packed B here: [ceil(N / kBlockN)][Kp / 2][kBlockN][2], Kp >= K
// even (the callers' padded K), zeros in the padding; A stays row-major (zeros in its columns K..Kp).
//
// Every distinct (M, N, K, lda, ldb, ldc) costs a JIT-compiled kernel (~50-160 us, ~20 KiB) that libtorch keeps for
// the life of each thread, so the shapes given to brgemm must come from a small set however the row counts of
// the calls vary (a training run sees thousands): gemm() cuts M into blocks of 256 (then 192, 128 or 64, and one
// block under 64 rows), and the callers pad their row counts to multiples of 16 and keep K, lda and ldc
// independent of them. Each new kernel also pins glibc's heap: one per row count, over 43 row counts, left
// ~700 MiB of free heap resident (bench/NOTES-gemm.md, "memory").
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace alignfast {
namespace cpu {
namespace bf16 {

constexpr int64_t kBlockN = 64;  // columns of B per packed block (oneDNN's brgemm B blocks: 16, 32, 48 or 64)

// Whether this process runs bf16 GEMMs here: oneDNN is the chosen CPU GEMM library (cpu/gemm.h), oneDNN is
// enabled (torch.backends.mkldnn), the CPU has AVX512_BF16, and a probe product through brgemm came out exact
// (a libtorch built without oneDNN's micro-kernel API fails the probe instead of the caller).
bool available();

inline int64_t even(int64_t k) { return k + (k & 1); }
inline int64_t round_up(int64_t k, int64_t granule) { return (k + granule - 1) / granule * granule; }
// Elements of a packed B with Kp (even) rows and N columns.
inline int64_t packed_numel(int64_t Kp, int64_t N) { return (N + kBlockN - 1) / kBlockN * (Kp / 2) * kBlockN * 2; }

// Pack B[k][n] = src[n * ld + k], k < K, into Kp packed rows (B given as its transpose: W's rows for z = h @ W.T).
void pack_transposed(const c10::BFloat16* src, int64_t ld, int64_t K, int64_t N, c10::BFloat16* dst, int64_t Kp);
// Pack B[k][n] = src[k * ld + n], k < K, into Kp packed rows (B row-major: W's rows for dh = dz @ W, h's rows for
// dW = dz.T @ h).
void pack_rows(const c10::BFloat16* src, int64_t ld, int64_t K, int64_t N, c10::BFloat16* dst, int64_t Kp);

// C[M, N] = A[M, Kp] @ B, or C += with accumulate. A: row-major bf16, leading dimension lda >= Kp; B: packed with
// Kp rows; C: row-major float32, leading dimension ldc. Single-threaded (the callers parallelise over tiles).
void gemm(float* c, int64_t ldc, const c10::BFloat16* a, int64_t lda, int64_t M, const c10::BFloat16* b_packed,
          int64_t Kp, int64_t N, bool accumulate);

// Rounds src [rows, cols] (float32, leading dimension ld) to bf16 (to nearest even) for the A operands of
// dh = dz @ W and dW = dz.T @ h: row-major into `out` ([rows, even(cols)], zero padding column) and transposed
// into `out_t` ([cols, ld_t], columns rows..ld_t zero); either may be null.
void round_for_products(const float* src, int64_t ld, int64_t rows, int64_t cols, c10::BFloat16* out,
                        c10::BFloat16* out_t, int64_t ld_t);

}  // namespace bf16
}  // namespace cpu
}  // namespace alignfast

// How many distinct shapes gemm() has handed to brgemm in this process (a kernel each, per thread).
extern "C" int64_t alignfast_bf16_gemm_shapes();
// 1 when available() holds (for alignfast info and the tests); the probe runs on the first call.
extern "C" int alignfast_bf16_gemm_available();
