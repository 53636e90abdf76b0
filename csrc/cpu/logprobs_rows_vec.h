// The vectorised row kernels of logprobs_rows.h, written once over at::vec::Vectorized<float> and compiled
// once per instruction set: logprobs_rows_avx2.cpp and logprobs_rows_avx512.cpp set CPU_CAPABILITY and the
// target, include the vec headers, then this file with ALIGNFAST_VEC_NS naming the namespace.
// The math (and why d = (x - M) / tau) is in logprobs_rows.h.
#pragma once

#ifndef ALIGNFAST_VEC_NS
#error "define ALIGNFAST_VEC_NS (avx2 or avx512) and include the at::vec headers first"
#endif

namespace alignfast::logprobs::ALIGNFAST_VEC_NS {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();  // 8 floats (AVX2) or 16 (AVX-512)
constexpr int64_t kStep = 2 * kW;    // elements per step: two float vectors (one bf16/fp16 vector)

// Load / store kStep consecutive elements of a row as two float vectors.
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

// e^d for d <= 0 (or -inf, or NaN), the only arguments the vocabulary-wide sums have: d = (x - M)/tau in the
// forward, -gap in the backward. The polynomial is ATen's exp_u20 (degree 5 on r = d - n ln 2, |r| <= ln2/2,
// ~2e-6 relative; bench/NOTES-logprobs.md, change 3), and like exp_u20 the result is 0 below ln FLT_MIN, so
// -inf and the `lowest` that stands for it give 0 and no denormal is ever produced (the cut is at -87.33,
// a hair above ln FLT_MIN = -87.3365, so that n = -126 comes with r > 0 and 2^n p stays normal). What exp_u20 spends on
// arguments of any sign (clamps at both ends, floor through two conversions, 2^(n-1) built in integers, a
// blend and two multiplies: ~19 instructions) is ~10 here (change 4): n = round(d log2 e) stays a float and
// AVX-512's scalef multiplies by 2^n with the zero-mask for free; AVX2 adds n into the exponent field (the
// result is normal for every kept lane: d >= ln FLT_MIN) and clears the rest with an and-not.
// Row scalars (e_t, the rescale factor) keep std::exp.
#if defined(CPU_CAPABILITY_AVX512)
using Kept = __mmask16;  // the lanes vexp computed (d >= -87.33); the others are 0
#else
using Kept = int;  // unused: AVX2 has no mask registers
#endif
inline Vec vexp(const Vec& d, Kept& kept) {
  const Vec log2e(1.44269504088896341f), ln2(0.693147180559945309f);
  const Vec c1(0.999999701f), c2(0.499991506f), c3(0.166676521f), c4(0.0418978221f), c5(0.00828929059f);
  const Vec one(1.f);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = d;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_GE_OQ);  // d >= ~ln FLT_MIN, so 2^n p is normal
  kept = keep;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec r(_mm512_fnmadd_ps(n, ln2, x));
  const Vec p = at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, c5, c4),
                                                                                     c3), c2), c1), one);
  return Vec(_mm512_maskz_scalef_ps(keep, p, n));
#else
  kept = 0;
  const __m256 x = d;
  const __m256 drop = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_NGE_UQ);  // d < ~ln FLT_MIN, or NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec r(_mm256_fnmadd_ps(n, ln2, x));
  const Vec p = at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, at::vec::fmadd(r, c5, c4),
                                                                                     c3), c2), c1), one);
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return Vec(_mm256_andnot_ps(drop, _mm256_castsi256_ps(scaled)));
#endif
}

inline Vec vexp(const Vec& d) {
  Kept kept;
  return vexp(d, kept);
}

// The entropy's W += e d with d = -inf where the logit is -inf (e = 0 there, but 0 * -inf is NaN). AVX-512
// adds only the lanes vexp kept (a masked FMA: d needs no clamp); AVX2 clamps d to `lowest` first.
inline Vec entropy_arg(const Vec& d, const Vec& lowest) {
#if defined(CPU_CAPABILITY_AVX512)
  (void)lowest;
  return d;
#else
  return at::vec::maximum(d, lowest);
#endif
}
inline Vec add_entropy_term(const Vec& w, const Vec& e, const Vec& d, Kept kept) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_mask3_fmadd_ps(e, d, w, kept));
#else
  (void)kept;
  return at::vec::fmadd(e, d, w);
#endif
}

inline float reduce_add(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, v);
}

// One read per block for most blocks: a block is summed against the running max M while its own max is
// tracked in the same pass; only a block whose max exceeds M (a new record) is summed again, against the new
// max, after the blocks before it are rescaled. The number of record-breaking blocks in a row of n blocks is
// ~ln n for logits in no particular order (5 of the 149 blocks of a 151936-entry row), so the block-max pass
// that every block used to take first is almost always gone; a row sorted by increasing logit still reads
// every block twice, as before. Every summed term keeps d = (x - M)/tau <= 0: summing against a reference
// below the max (and letting d go positive) was tried and loses the entropy's precision, since
// log S - W/S then cancels the shift (1.6e-4 absolute at V = 151936, the tests' tolerance is 5e-5).
// WITH_ENTROPY = false skips W (one multiply-add per element) when the caller does not want the entropy;
// SCALED = false (tau = 1) skips the multiply by 1/tau.
template <bool WITH_ENTROPY, bool SCALED, typename scalar_t>
inline RowStats<float> forward_row_impl(const scalar_t* x, int64_t V, int64_t t, float inv_temp) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const Vec vinv(inv_temp), vlowest(std::numeric_limits<float>::lowest());
  float M = -inf;  // running raw max of the blocks summed so far
  Vec vs(0.f), vw(0.f);  // per-lane S_off and W, relative to M
  float s_tail = 0.f, w_tail = 0.f;
  const int64_t t_lo = (t / kStep) * kStep;  // the step that holds the target
  auto scale = [&](const Vec& d) { return SCALED ? d * vinv : d; };
  // Sum e^d (and e^d d) over the vector part [b0, bv) of a block, relative to M; with TRACK_MAX, also
  // returns the block's max of x.
  auto sum_block = [&](auto track_max, int64_t b0, int64_t bv) {
    constexpr bool TRACK_MAX = decltype(track_max)::value;
    const Vec vM(M);
    Vec vmax(-inf);
    for (int64_t v = b0; v < bv; v += kStep) {
      Vec a, b;
      load2(x + v, a, b);
      if constexpr (TRACK_MAX) vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
      Vec da = scale(a - vM), db = scale(b - vM);
      if constexpr (WITH_ENTROPY) {  // AVX2: -inf -> lowest, so that e * d = 0 (vexp gives 0 for either)
        da = entropy_arg(da, vlowest);
        db = entropy_arg(db, vlowest);
      }
      Kept ka, kb;
      Vec ea = vexp(da, ka), eb = vexp(db, kb);
      if constexpr (WITH_ENTROPY) {
        vw = add_entropy_term(vw, ea, da, ka);
        vw = add_entropy_term(vw, eb, db, kb);
      }
      if (v == t_lo) {  // keep the target out of S_off
        alignas(64) float buf[kStep];
        ea.store(buf);
        eb.store(buf + kW);
        buf[t - v] = 0.f;
        ea = Vec::loadu(buf);
        eb = Vec::loadu(buf + kW);
      }
      vs = vs + ea + eb;
    }
    if constexpr (TRACK_MAX) {
      return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
    } else {
      return -inf;
    }
  };
  auto rescale_to = [&](float new_max, int64_t b0) {
    // Fold the lanes into the scalar accumulators so that W' = c (W + shift S) applies the shift exactly
    // once; S counts the target's term once its block has been summed (S_off never does).
    if (M != -inf) {
      const float shift = (M - new_max) * inv_temp, c = std::exp(shift);
      const float s_off = reduce_add(vs) + s_tail;
      vs = Vec(0.f);
      s_tail = c * s_off;
      if constexpr (WITH_ENTROPY) {
        const float w_all = reduce_add(vw) + w_tail;
        const float s_seen = s_off + (t < b0 ? std::exp((static_cast<float>(x[t]) - M) * inv_temp) : 0.f);
        vw = Vec(0.f);
        w_tail = c * (w_all + shift * s_seen);
      }
    }
    M = new_max;
  };
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    const int64_t bv = b0 + ((b1 - b0) / kStep) * kStep;  // end of the vectorised part
    float tail_max = -inf;
    for (int64_t v = bv; v < b1; ++v) tail_max = nan_max(tail_max, static_cast<float>(x[v]));
    if (M == -inf) {
      // No reference yet: the block's max first (two reads of this block).
      Vec vmax(-inf);
      for (int64_t v = b0; v < bv; v += kStep) {
        Vec a, b;
        load2(x + v, a, b);
        vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
      }
      const float bm = nan_max(tail_max, at::vec::vec_reduce_all<float>(  // at::vec::maximum keeps a NaN
                                             [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax));
      if (!(bm < inf)) return finish_row<float>(bm, bm, 0.f, 0.f, (static_cast<float>(x[t]) - bm) * inv_temp);
      if (bm == -inf) continue;
      M = bm;
      sum_block(std::false_type{}, b0, bv);
    } else {
      const Vec vs0 = vs, vw0 = vw;
      const float s_tail0 = s_tail, w_tail0 = w_tail;
      const float bm = nan_max(tail_max, sum_block(std::true_type{}, b0, bv));
      if (!(bm < inf)) return finish_row<float>(bm, bm, 0.f, 0.f, (static_cast<float>(x[t]) - bm) * inv_temp);
      if (bm > M) {  // a new max: undo this block's sums, rescale the earlier blocks, sum it again
        vs = vs0, vw = vw0, s_tail = s_tail0, w_tail = w_tail0;
        rescale_to(bm, b0);
        sum_block(std::false_type{}, b0, bv);
      }
    }
    for (int64_t v = bv; v < b1; ++v) {
      const float d = std::max((static_cast<float>(x[v]) - M) * inv_temp, std::numeric_limits<float>::lowest());
      const float e = std::exp(d);
      if (v != t) s_tail += e;
      if constexpr (WITH_ENTROPY) w_tail += e * d;
    }
  }
  const float s_off = reduce_add(vs) + s_tail;
  const float w = WITH_ENTROPY ? reduce_add(vw) + w_tail : 0.f;
  return finish_row<float>(M, M * inv_temp, s_off, w, (static_cast<float>(x[t]) - M) * inv_temp);
}

template <typename scalar_t>
inline RowStats<float> forward_row_vec(const scalar_t* x, int64_t V, int64_t t, float inv_temp, bool with_entropy) {
  if (inv_temp == 1.f) {
    return with_entropy ? forward_row_impl<true, false>(x, V, t, inv_temp) : forward_row_impl<false, false>(x, V, t, inv_temp);
  }
  return with_entropy ? forward_row_impl<true, true>(x, V, t, inv_temp) : forward_row_impl<false, true>(x, V, t, inv_temp);
}

template <typename scalar_t, typename out_t>
inline void backward_row_vec(const scalar_t* x, int64_t V, int64_t t, float inv_temp, RowStats<float> st, float g_lp,
                             float g_ent, out_t* out) {
  if (st.lse == std::numeric_limits<float>::infinity()) {  // a +inf logit: NaN gradient, as documented
    std::fill(out, out + V, static_cast<out_t>(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  const Vec vinv(inv_temp), vlse(st.lse), vbig(1e4f), vzero(0.f);
  const Vec vgent(g_ent), vcoef(g_ent * st.entropy + g_lp);  // p * (g_ent * gap - (g_ent * H + g_lp))
  const int64_t vend = (V / kStep) * kStep;
  for (int64_t v = 0; v < vend; v += kStep) {
    Vec a, b;
    load2(x + v, a, b);
    // gap = -log p in [0, big]: >= 0 even when lse - z is contracted into an FMA (p <= 1), and p = 0 gives 0.
    const Vec ga = at::vec::minimum(at::vec::maximum(vlse - a * vinv, vzero), vbig);
    const Vec gb = at::vec::minimum(at::vec::maximum(vlse - b * vinv, vzero), vbig);
    const Vec pa = vexp(ga.neg()), pb = vexp(gb.neg());
    const Vec oa = vinv * pa * at::vec::fmsub(vgent, ga, vcoef);
    const Vec ob = vinv * pb * at::vec::fmsub(vgent, gb, vcoef);
    store2(out + v, oa, ob);
  }
  for (int64_t v = vend; v < V; ++v) {
    const float gap = std::min(std::max(st.lse - static_cast<float>(x[v]) * inv_temp, 0.f), 1e4f);
    out[v] = static_cast<out_t>(inv_temp * std::exp(-gap) * (g_ent * gap - (g_ent * st.entropy + g_lp)));
  }
  if (t < 0) return;  // a slice of the row without the target (linear_token_logprobs' vocabulary tiles)
  const float lp = st.logprob;
  const float p_t = std::exp(lp);  // 0 for a -inf target, whose gap -lp is inf: its entropy term is 0
  const float target = g_lp * -std::expm1(lp) + (p_t > 0 ? g_ent * p_t * (-lp - st.entropy) : 0.f);
  out[t] = static_cast<out_t>(inv_temp * target);
}

}  // namespace alignfast::logprobs::ALIGNFAST_VEC_NS

// The out-of-line functions logprobs_rows.h declares, for this instruction set.
#define ALIGNFAST_DEFINE_VEC_ROWS()                                                                                 \
  namespace alignfast::logprobs::ALIGNFAST_VEC_NS {                                                                 \
  RowStats<float> forward_row(const float* x, int64_t V, int64_t t, float inv_temp, bool with_entropy) {          \
    return forward_row_vec(x, V, t, inv_temp, with_entropy);                                                        \
  }                                                                                                                 \
  RowStats<float> forward_row(const c10::BFloat16* x, int64_t V, int64_t t, float inv_temp, bool with_entropy) {  \
    return forward_row_vec(x, V, t, inv_temp, with_entropy);                                                        \
  }                                                                                                                 \
  RowStats<float> forward_row(const c10::Half* x, int64_t V, int64_t t, float inv_temp, bool with_entropy) {      \
    return forward_row_vec(x, V, t, inv_temp, with_entropy);                                                        \
  }                                                                                                                 \
  template <typename scalar_t, typename out_t>                                                                      \
  void backward_row(const scalar_t* x, int64_t V, int64_t t, float inv_temp, RowStats<float> st, float g_lp,       \
                    float g_ent, out_t* out) {                                                                      \
    backward_row_vec<scalar_t, out_t>(x, V, t, inv_temp, st, g_lp, g_ent, out);                                     \
  }                                                                                                                 \
  template void backward_row<float, float>(const float*, int64_t, int64_t, float, RowStats<float>, float, float,   \
                                           float*);                                                                 \
  template void backward_row<float, c10::BFloat16>(const float*, int64_t, int64_t, float, RowStats<float>, float,  \
                                                   float, c10::BFloat16*);                                          \
  template void backward_row<float, c10::Half>(const float*, int64_t, int64_t, float, RowStats<float>, float,      \
                                               float, c10::Half*);                                                  \
  template void backward_row<c10::BFloat16, float>(const c10::BFloat16*, int64_t, int64_t, float, RowStats<float>, \
                                                   float, float, float*);                                           \
  template void backward_row<c10::BFloat16, c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, float,         \
                                                           RowStats<float>, float, float, c10::BFloat16*);          \
  template void backward_row<c10::BFloat16, c10::Half>(const c10::BFloat16*, int64_t, int64_t, float,             \
                                                       RowStats<float>, float, float, c10::Half*);                  \
  template void backward_row<c10::Half, float>(const c10::Half*, int64_t, int64_t, float, RowStats<float>, float,  \
                                               float, float*);                                                      \
  template void backward_row<c10::Half, c10::BFloat16>(const c10::Half*, int64_t, int64_t, float, RowStats<float>, \
                                                       float, float, c10::BFloat16*);                               \
  template void backward_row<c10::Half, c10::Half>(const c10::Half*, int64_t, int64_t, float, RowStats<float>,     \
                                                   float, float, c10::Half*);                                       \
  }
