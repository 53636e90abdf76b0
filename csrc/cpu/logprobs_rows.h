// Per-row kernels shared by token_logprobs and linear_token_logprobs on CPU.
//
// For one row x[0..V) of logits, temperature tau, target t, with the row's raw maximum M = max x:
//
//   forward   d_v = (x_v - M) / tau  (<= 0 exactly: no rounding can make the max's own term positive),
//             m = M / tau,  S = sum_v e^{d_v},  S_off = sum_{v != t} e^{d_v},
//             W = sum_v e^{d_v} d_v                         (terms with d_v = -inf are 0)
//             lse = m + log S
//             logprob = d_t - log S = -log1p(S_off / e^{d_t})   (precise when t is near the max)
//             entropy = log S - W / S                       (two non-negative terms: no cancellation)
//   backward  p_v = e^{min(z_v - lse, 0)}                   (z_v = x_v / tau; the clamp keeps p <= 1 when
//                                                             z_v - lse is contracted into an FMA or tau is tiny)
//             dx_v = (1/tau) [ g_lp (1[v = t] - p_v) + g_ent p_v ((lse - z_v) - entropy) ]
//             with 1 - p_t = -expm1(logprob) and lse - z_t = -logprob at the target, so a very
//             confident row keeps its small target gradient (no 1 - 0.99999 cancellation).
//             The backward also takes a slice of a row (x, V = the slice's, stats of the whole row) with
//             t < 0 when the target lies outside the slice: every entry is then p_v's term only.
//
// Subtracting the raw maximum before scaling (not z = x / tau first, then z - m) is what keeps a tiny
// temperature finite: at tau = 1e-9, z is ~1e10, and x * inv_tau - m evaluated as one FMA (what the compiler
// may contract it to) leaves the max's term up to half an ulp of 1e10, ~512, above 0: e^512 = inf.
//
// Rows with a +inf logit (documented in alignfast/ops, same as torch.log_softmax and the reference): lse
// = +inf, logprob = -inf for a finite target and NaN for a +inf target, entropy NaN, gradient NaN. A row of
// -inf only: logprob and entropy NaN, lse -inf.
//
// One read of the row from memory: it is processed in blocks small enough for L1, so the running max changes
// at most once per block and costs one scalar rescale instead of one exp per element. The scalar path takes
// each block's max first, then its sums; the vector path sums a block against the running max while taking
// its max, and sums it again only when it holds a new max (logprobs_rows_vec.h), which for logits in no
// particular order is ~ln(blocks) times per row.
//
// The vectorised versions (logprobs_rows_vec.h) use at::vec compiled twice, for AVX2+FMA and for AVX-512
// (logprobs_rows_avx2.cpp, logprobs_rows_avx512.cpp), chosen at run time; the scalar versions run elsewhere
// and for double.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace alignfast::logprobs {

// Per-row results of the forward pass.
template <typename acc_t>
struct RowStats {
  acc_t logprob;
  acc_t entropy;
  acc_t lse;
};

constexpr int64_t kBlock = 1024;  // elements per block: 4 KiB of float, stays in L1

// Combine the reductions of a row into its outputs (shared by the scalar and vector paths).
// raw_max: M (unscaled); m = M / tau; d_t = (x_t - M) / tau.
template <typename acc_t>
inline RowStats<acc_t> finish_row(acc_t raw_max, acc_t m, acc_t s_off, acc_t w, acc_t d_t) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  RowStats<acc_t> r;
  if (raw_max != raw_max) return {nan, nan, nan};  // a NaN logit (nan_max kept it): NaN like log_softmax
  if (raw_max == -inf) return {nan, nan, -inf};  // every logit is -inf: no distribution; NaN like log_softmax
  if (raw_max == inf) return {std::isnan(d_t) ? nan : -inf, nan, inf};  // d_t = inf - inf for a +inf target
  const acc_t e_t = std::exp(d_t);
  const acc_t s = s_off + e_t;
  acc_t log_s;
  if (d_t > acc_t(-20)) {
    // log S = d_t + log1p(S_off / e_t): exact to the last bits when the target is (near) the max.
    const acc_t l1p = std::log1p(s_off / e_t);
    r.logprob = -l1p;
    log_s = d_t + l1p;
  } else {
    log_s = std::log(s);
    r.logprob = d_t - log_s;  // -inf for a -inf target
  }
  r.lse = m + log_s;
  r.entropy = log_s - w / s;
  return r;
}

// max(a, b) that keeps a NaN in either argument (std::max drops one in its second). A row's max is NaN when any
// logit is: the row's stats are then NaN, as log_softmax's are, wherever the NaN sits (the vector exp gives 0 for a
// NaN argument, so a sum alone would drop it).
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// ---------------------------------------------------------------- scalar (any type, double accumulation ok)

// Accumulates in double whatever acc_t is: one running sum over a 150K-entry row in float would lose ~1e-4
// relative (the vector paths keep 16-32 partial sums instead).
template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> forward_row_scalar(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp_) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr double lowest = std::numeric_limits<double>::lowest();
  const double inv_temp = static_cast<double>(inv_temp_);
  auto at = [&](int64_t v) { return static_cast<double>(static_cast<acc_t>(x[v])); };
  double M = -inf, s_off = 0, w = 0;  // M: running raw max
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    double bm = -inf;
    for (int64_t v = b0; v < b1; ++v) bm = nan_max(bm, at(v));
    if (!(bm < inf)) {  // a NaN or a +inf logit: the row's stats are finish_row's non-finite ones
      return finish_row<acc_t>(static_cast<acc_t>(bm), static_cast<acc_t>(bm), 0, 0,
                               static_cast<acc_t>((at(t) - bm) * inv_temp));
    }
    if (bm > M) {
      if (M != -inf) {
        // W' = sum e^{d'} d' = c (W + shift S) over the elements seen so far; S includes the target's term
        // once its block has been read (S_off never does).
        const double shift = (M - bm) * inv_temp, c = std::exp(shift);
        const double s_seen = s_off + (t < b0 ? std::exp((at(t) - M) * inv_temp) : 0.0);
        w = c * (w + shift * s_seen);
        s_off *= c;
      }
      M = bm;
    }
    if (M == -inf) continue;
    for (int64_t v = b0; v < b1; ++v) {
      const double d = std::max((at(v) - M) * inv_temp, lowest);  // -inf -> lowest: e = 0, e * d = 0
      const double e = std::exp(d);
      if (v != t) s_off += e;
      w += e * d;
    }
  }
  const RowStats<double> r = finish_row<double>(M, M * inv_temp, s_off, w, (at(t) - M) * inv_temp);
  return {static_cast<acc_t>(r.logprob), static_cast<acc_t>(r.entropy), static_cast<acc_t>(r.lse)};
}

template <typename scalar_t, typename acc_t, typename out_t>
inline void backward_row_scalar(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp, RowStats<acc_t> st,
                                acc_t g_lp, acc_t g_ent, out_t* out) {
  if (st.lse == std::numeric_limits<acc_t>::infinity()) {  // a +inf logit: no gradient (NaN, as documented)
    std::fill(out, out + V, static_cast<out_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  constexpr acc_t big = 1e4;  // p_v = e^{-gap} is 0 beyond ~745 (double): clamp keeps 0 * gap finite
  for (int64_t v = 0; v < V; ++v) {
    const acc_t z = static_cast<acc_t>(x[v]) * inv_temp;
    const acc_t gap = std::min(std::max(st.lse - z, acc_t(0)), big);  // -log p_v in [0, big]: p = 0 gives 0
    const acc_t p = std::exp(-gap);
    out[v] = static_cast<out_t>(inv_temp * p * (g_ent * (gap - st.entropy) - g_lp));
  }
  if (t < 0) return;  // a slice of the row without the target (linear_token_logprobs' vocabulary tiles)
  const acc_t lp = st.logprob;
  const acc_t p_t = std::exp(lp);  // 0 for a -inf target, whose gap -lp is inf: its entropy term is 0
  const acc_t target = g_lp * -std::expm1(lp) + (p_t > 0 ? g_ent * p_t * (-lp - st.entropy) : acc_t(0));
  out[t] = static_cast<out_t>(inv_temp * target);
}

// ---------------------------------------------------------------- vectorised (float accumulation)
// Defined in logprobs_rows_avx2.cpp and logprobs_rows_avx512.cpp, one per instruction set.

#define ALIGNFAST_DECLARE_VEC_ROWS(ns)                                                                              \
  namespace ns {                                                                                                    \
  RowStats<float> forward_row(const float* x, int64_t V, int64_t t, float inv_temp, bool with_entropy);           \
  RowStats<float> forward_row(const c10::BFloat16* x, int64_t V, int64_t t, float inv_temp, bool with_entropy);   \
  RowStats<float> forward_row(const c10::Half* x, int64_t V, int64_t t, float inv_temp, bool with_entropy);       \
  template <typename scalar_t, typename out_t>                                                                      \
  void backward_row(const scalar_t* x, int64_t V, int64_t t, float inv_temp, RowStats<float> st, float g_lp,       \
                    float g_ent, out_t* out);                                                                       \
  }

#if defined(__GNUC__) && defined(__x86_64__) && !defined(ALIGNFAST_NO_VEC)
#define ALIGNFAST_LOGPROBS_VEC 1
ALIGNFAST_DECLARE_VEC_ROWS(avx2)
ALIGNFAST_DECLARE_VEC_ROWS(avx512)
#endif

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest instruction set both this CPU and the build support; ALIGNFAST_CPU_ISA=avx2|scalar caps it
// (to compare them, or to rule out AVX-512 frequency effects).
Isa cpu_isa();

template <typename scalar_t, typename acc_t>
inline constexpr bool kVecPath = std::is_same_v<acc_t, float> &&
                                 (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                                  std::is_same_v<scalar_t, c10::Half>);

// The row kernels the ops call: vectorised where the CPU has it and the accumulation is float.
template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> forward_row(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp,
                                   bool with_entropy = true) {
#ifdef ALIGNFAST_LOGPROBS_VEC
  if constexpr (kVecPath<scalar_t, acc_t>) {
    switch (cpu_isa()) {
      case Isa::kAvx512: return avx512::forward_row(x, V, t, inv_temp, with_entropy);
      case Isa::kAvx2: return avx2::forward_row(x, V, t, inv_temp, with_entropy);
      default: break;
    }
  }
#endif
  return forward_row_scalar<scalar_t, acc_t>(x, V, t, inv_temp);
}

template <typename scalar_t, typename acc_t, typename out_t>
inline void backward_row(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp, RowStats<acc_t> st, acc_t g_lp,
                         acc_t g_ent, out_t* out) {
#ifdef ALIGNFAST_LOGPROBS_VEC
  if constexpr (kVecPath<scalar_t, acc_t> && kVecPath<out_t, float>) {
    switch (cpu_isa()) {
      case Isa::kAvx512: return avx512::backward_row<scalar_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);
      case Isa::kAvx2: return avx2::backward_row<scalar_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);
      default: break;
    }
  }
#endif
  backward_row_scalar<scalar_t, acc_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);
}

}  // namespace alignfast::logprobs
