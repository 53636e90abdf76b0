// Per-row kernels shared by token_logprobs and linear_token_logprobs on CPU.
//
// For one row x[0..V) of logits, temperature tau, z = x / tau, target t:
//
//   forward   m = max z,  S = sum_v e^{z_v - m},  S_off = sum_{v != t} e^{z_v - m},
//             W = sum_v e^{z_v - m} (z_v - m)            (terms with z_v = -inf are 0)
//             lse = m + log S
//             logprob = z_t - lse = -log1p(S_off / e^{z_t - m})   (precise when t is near the max)
//             entropy = log S - W / S                      (two non-negative terms: no cancellation)
//   backward  p_v = e^{z_v - lse}
//             dx_v = (1/tau) [ g_lp (1[v = t] - p_v) + g_ent p_v ((lse - z_v) - entropy) ]
//             with 1 - p_t = -expm1(logprob) and lse - z_t = -logprob at the target, so a very
//             confident row keeps its small target gradient (no 1 - 0.99999 cancellation).
//
// One read of the row from memory: it is processed in blocks small enough for L1 (the block's
// max first, then its sums), so the running max changes at most once per block and costs one
// scalar rescale instead of one exp per element.
//
// The vectorised versions use at::vec compiled for AVX2+FMA (selected at run time; the scalar
// versions run elsewhere and for double). The vec headers are compiled under their own inline
// namespace (CPU_CAPABILITY=AVX2), so they cannot collide with other translation units.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

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
template <typename acc_t>
inline RowStats<acc_t> finish_row(acc_t m, acc_t s_off, acc_t w, acc_t z_t) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  RowStats<acc_t> r;
  if (m == -inf) {  // every logit is -inf: no distribution; NaN like log_softmax
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, nan, -inf};
  }
  const acc_t d_t = z_t - m;  // <= 0, or -inf
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

// ---------------------------------------------------------------- scalar (any type, double accumulation ok)

template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> forward_row_scalar(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t lowest = std::numeric_limits<acc_t>::lowest();
  acc_t m = -inf, s_off = 0, w = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    acc_t bm = -inf;
    for (int64_t v = b0; v < b1; ++v) bm = std::max(bm, static_cast<acc_t>(x[v]));
    bm *= inv_temp;
    if (bm > m) {
      if (m != -inf) {
        // W' = sum e^{z-m'} (z-m') = c (W + shift S) over the elements seen so far; S includes the
        // target's term once its block has been read (S_off never does).
        const acc_t shift = m - bm, c = std::exp(shift);
        const acc_t s_seen = s_off + (t < b0 ? std::exp(static_cast<acc_t>(x[t]) * inv_temp - m) : acc_t(0));
        w = c * (w + shift * s_seen);
        s_off *= c;
      }
      m = bm;
    }
    if (m == -inf) continue;
    for (int64_t v = b0; v < b1; ++v) {
      const acc_t d = std::max(static_cast<acc_t>(x[v]) * inv_temp - m, lowest);  // -inf -> lowest: e = 0, e*d = 0
      const acc_t e = std::exp(d);
      if (v != t) s_off += e;
      w += e * d;
    }
  }
  return finish_row<acc_t>(m, s_off, w, static_cast<acc_t>(x[t]) * inv_temp);
}

template <typename scalar_t, typename acc_t, typename out_t>
inline void backward_row_scalar(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp, RowStats<acc_t> st,
                                acc_t g_lp, acc_t g_ent, out_t* out) {
  constexpr acc_t big = 1e4;  // p_v = e^{-gap} is 0 beyond ~745 (double): clamp keeps 0 * gap finite
  for (int64_t v = 0; v < V; ++v) {
    const acc_t z = static_cast<acc_t>(x[v]) * inv_temp;
    const acc_t p = std::exp(z - st.lse);
    const acc_t gap = std::min(st.lse - z, big);  // -log p_v, clamped so that p = 0 gives 0, not NaN
    out[v] = static_cast<out_t>(inv_temp * p * (g_ent * (gap - st.entropy) - g_lp));
  }
  const acc_t lp = st.logprob;
  const acc_t p_t = std::exp(lp);  // 0 for a -inf target, whose gap -lp is inf: its entropy term is 0
  const acc_t target = g_lp * -std::expm1(lp) + (p_t > 0 ? g_ent * p_t * (-lp - st.entropy) : acc_t(0));
  out[t] = static_cast<out_t>(inv_temp * target);
}

}  // namespace alignfast::logprobs

// ---------------------------------------------------------------- AVX2 + FMA (float accumulation)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(ALIGNFAST_NO_AVX2)
#define ALIGNFAST_LOGPROBS_AVX2 1
#ifdef CPU_CAPABILITY
#error "logprobs_rows.h must be the only place that sets CPU_CAPABILITY in its translation unit"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the feature macros that sleef.h and the vec headers
// test while preprocessing; define them for these includes only (this build has no -mavx2).
#if !defined(__AVX2__)
#define ALIGNFAST_DEFINED_AVX_MACROS 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef ALIGNFAST_DEFINED_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef ALIGNFAST_DEFINED_AVX_MACROS
#endif

namespace alignfast::logprobs::avx2 {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();  // 8 floats
static_assert(kW == 8, "expected the AVX2 build of at::vec");

// Load / store 2*kW consecutive elements of a row as two float vectors.
inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kW);
}
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) { at::vec::load_to_float<c10::BFloat16>(p, a, b); }
inline void load2(const c10::Half* p, Vec& a, Vec& b) { at::vec::load_to_float<c10::Half>(p, a, b); }
inline void store2(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kW);
}
inline void store2(c10::BFloat16* p, const Vec& a, const Vec& b) { at::vec::convert_float_bfloat16(a, b).store(p); }
inline void store2(c10::Half* p, const Vec& a, const Vec& b) { at::vec::convert_float_half(a, b).store(p); }

template <typename scalar_t>
inline RowStats<float> forward_row(const scalar_t* x, int64_t V, int64_t t, float inv_temp) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const Vec vinv(inv_temp), vlowest(std::numeric_limits<float>::lowest()), vzero(0.f);
  float m = -inf;
  Vec vs(0.f), vw(0.f);  // per-lane S_off and W, relative to m
  float s_tail = 0.f, w_tail = 0.f;
  const int64_t t_lo = (t / (2 * kW)) * (2 * kW);  // the 16-element step that holds the target
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    const int64_t bv = b0 + ((b1 - b0) / (2 * kW)) * (2 * kW);  // end of the vectorised part
    Vec vmax(-inf);
    for (int64_t v = b0; v < bv; v += 2 * kW) {
      Vec a, b;
      load2(x + v, a, b);
      vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
    }
    float bm = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
    for (int64_t v = bv; v < b1; ++v) bm = std::max(bm, static_cast<float>(x[v]));
    bm *= inv_temp;
    if (bm > m) {
      if (m != -inf) {
        // Rescale to the new max (rare: at most once per block). Fold the lanes into the scalar
        // accumulators so that W' = c (W + shift S) applies the shift exactly once; S counts the
        // target's term once its block has been read (S_off never does).
        const float shift = m - bm, c = std::exp(shift);
        const float s_off = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vs) + s_tail;
        const float w_all = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vw) + w_tail;
        const float s_seen = s_off + (t < b0 ? std::exp(static_cast<float>(x[t]) * inv_temp - m) : 0.f);
        vw = vzero;
        vs = vzero;
        w_tail = c * (w_all + shift * s_seen);
        s_tail = c * s_off;
      }
      m = bm;
    }
    if (m == -inf) continue;
    const Vec vm(m);
    for (int64_t v = b0; v < bv; v += 2 * kW) {
      Vec a, b;
      load2(x + v, a, b);
      const Vec da = at::vec::maximum(at::vec::fmsub(a, vinv, vm), vlowest);
      const Vec db = at::vec::maximum(at::vec::fmsub(b, vinv, vm), vlowest);
      Vec ea = da.exp(), eb = db.exp();
      vw = at::vec::fmadd(ea, da, vw);
      vw = at::vec::fmadd(eb, db, vw);
      if (v == t_lo) {  // keep the target out of S_off
        alignas(32) float buf[2 * kW];
        ea.store(buf);
        eb.store(buf + kW);
        buf[t - v] = 0.f;
        ea = Vec::loadu(buf);
        eb = Vec::loadu(buf + kW);
      }
      vs = vs + ea + eb;
    }
    for (int64_t v = bv; v < b1; ++v) {
      const float d = std::max(static_cast<float>(x[v]) * inv_temp - m, std::numeric_limits<float>::lowest());
      const float e = std::exp(d);
      if (v != t) s_tail += e;
      w_tail += e * d;
    }
  }
  const float s_off = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vs) + s_tail;
  const float w = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vw) + w_tail;
  return finish_row<float>(m, s_off, w, static_cast<float>(x[t]) * inv_temp);
}

template <typename scalar_t, typename out_t>
inline void backward_row(const scalar_t* x, int64_t V, int64_t t, float inv_temp, RowStats<float> st, float g_lp,
                         float g_ent, out_t* out) {
  const Vec vinv(inv_temp), vlse(st.lse), vbig(1e4f);
  const Vec vgent(g_ent), vcoef(g_ent * st.entropy + g_lp);  // p * (g_ent * gap - (g_ent * H + g_lp))
  const int64_t vend = (V / (2 * kW)) * (2 * kW);
  for (int64_t v = 0; v < vend; v += 2 * kW) {
    Vec a, b;
    load2(x + v, a, b);
    const Vec za = a * vinv, zb = b * vinv;
    const Vec pa = (za - vlse).exp(), pb = (zb - vlse).exp();
    const Vec ga = at::vec::minimum(vlse - za, vbig), gb = at::vec::minimum(vlse - zb, vbig);
    const Vec oa = vinv * pa * at::vec::fmsub(vgent, ga, vcoef);
    const Vec ob = vinv * pb * at::vec::fmsub(vgent, gb, vcoef);
    store2(out + v, oa, ob);
  }
  constexpr float big = 1e4f;
  for (int64_t v = vend; v < V; ++v) {
    const float z = static_cast<float>(x[v]) * inv_temp;
    const float p = std::exp(z - st.lse);
    out[v] = static_cast<out_t>(inv_temp * p * (g_ent * std::min(st.lse - z, big) - (g_ent * st.entropy + g_lp)));
  }
  const float lp = st.logprob;
  const float p_t = std::exp(lp);  // 0 for a -inf target, whose gap -lp is inf: its entropy term is 0
  const float target = g_lp * -std::expm1(lp) + (p_t > 0 ? g_ent * p_t * (-lp - st.entropy) : 0.f);
  out[t] = static_cast<out_t>(inv_temp * target);
}

}  // namespace alignfast::logprobs::avx2

#pragma GCC pop_options
#endif

namespace alignfast::logprobs {

inline bool cpu_has_avx2() {
#ifdef ALIGNFAST_LOGPROBS_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// The row kernels the ops call: AVX2 where the CPU has it and the accumulation is float.
template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> forward_row(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp) {
#ifdef ALIGNFAST_LOGPROBS_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) return avx2::forward_row<scalar_t>(x, V, t, inv_temp);
  }
#endif
  return forward_row_scalar<scalar_t, acc_t>(x, V, t, inv_temp);
}

template <typename scalar_t, typename acc_t, typename out_t>
inline void backward_row(const scalar_t* x, int64_t V, int64_t t, acc_t inv_temp, RowStats<acc_t> st, acc_t g_lp,
                         acc_t g_ent, out_t* out) {
#ifdef ALIGNFAST_LOGPROBS_AVX2
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<out_t, double>) {
    if (cpu_has_avx2()) return avx2::backward_row<scalar_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);
  }
#endif
  backward_row_scalar<scalar_t, acc_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);
}

}  // namespace alignfast::logprobs
