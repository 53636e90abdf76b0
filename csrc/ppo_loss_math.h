// ppo_loss: the per-token losses and gradients shared by the CPU kernel (csrc/cpu/ppo_loss.cpp) and
// the CUDA kernels (csrc/cuda/ppo_loss.cu). Spec: alignfast/reference/ppo_loss.py.
//
// Gradients (subgradients at the kinks), chosen to agree with autograd of the reference:
//   max(x, y): the larger input gets the gradient; on a tie each gets half (torch.maximum's rule).
//     Ties are the common case, not a corner: inside the clip range clip(r) == r exactly.
//   clip(x, lo, hi): passes the gradient on the open interval lo < x < hi, so a ratio or value exactly
//     on a bound counts as clipped (torch 2.14's clamp with scalar bounds does the same; its clamp with
//     tensor bounds splits the gradient with the bound there instead; either is a valid subgradient,
//     and exact hits have probability 0 except with a clip range of 0).
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>

#include "common.h"
#include "host_device.h"


namespace alignfast {

// Index of each accumulated quantity; the op's stats output holds their token means in this order
// (vf_loss with its 1/2), then the number of valid tokens.
enum PpoStat : int { kPgLoss = 0, kVfLoss, kClipFrac, kVfClipFrac, kApproxKl, kRatio, kNumValid, kNumPpoStats };

template <typename acc_t>
struct PpoToken {
  acc_t pg;          // max(-A r, -A clip(r))
  acc_t vf;          // max((v - R)^2, (v_clip - R)^2)  (without the 1/2)
  acc_t log_ratio;   // logprobs - old_logprobs
  acc_t ratio;       // exp(log_ratio)
  bool pg_clipped;   // -A clip(r) > -A r
  bool vf_clipped;   // (v_clip - R)^2 > (v - R)^2
  acc_t grad_logprob;  // d(pg + vf_coef/2 vf) / d logprobs
  acc_t grad_value;    // d(pg + vf_coef/2 vf) / d values
};


template <typename acc_t>
ALIGNFAST_HD inline acc_t clamp_(acc_t x, acc_t lo, acc_t hi) {
  // torch.clamp: min(max(x, lo), hi)
  const acc_t y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

// Gradient of max(x1, x2) given the gradients g1, g2 of its arguments (torch.maximum's rule).
template <typename acc_t>
ALIGNFAST_HD inline acc_t max_grad(acc_t x1, acc_t x2, acc_t g1, acc_t g2) {
  if (x1 > x2) return g1;
  if (x2 > x1) return g2;
  return acc_t(0.5) * (g1 + g2);
}

template <typename acc_t>
ALIGNFAST_HD inline PpoToken<acc_t> ppo_token(acc_t logprob, acc_t old_logprob, acc_t advantage, acc_t value,
                                              acc_t old_value, acc_t ret, acc_t cliprange, acc_t cliprange_value,
                                              acc_t vf_coef) {
  PpoToken<acc_t> out;
  out.log_ratio = logprob - old_logprob;
  out.ratio = exp_(out.log_ratio);
  const acc_t lo = acc_t(1) - cliprange, hi = acc_t(1) + cliprange;
  const acc_t ratio_clipped = clamp_(out.ratio, lo, hi);
  const acc_t pg1 = -advantage * out.ratio;
  const acc_t pg2 = -advantage * ratio_clipped;
  out.pg = pg1 > pg2 ? pg1 : pg2;
  out.pg_clipped = pg2 > pg1;
  // d ratio / d logprob = ratio; the clipped branch has gradient only inside (lo, hi).
  const acc_t g1 = -advantage * out.ratio;
  const acc_t g2 = (out.ratio > lo && out.ratio < hi) ? g1 : acc_t(0);
  out.grad_logprob = max_grad(pg1, pg2, g1, g2);

  const acc_t vlo = old_value - cliprange_value, vhi = old_value + cliprange_value;
  // A NaN old value gives NaN bounds, which torch.clamp returns and clamp_'s comparisons would pass over: the
  // token's value loss and gradient are then NaN, as the reference's are, never a finite value that hides it.
  const bool old_nan = old_value != old_value;
  const acc_t value_clipped = old_nan ? old_value : clamp_(value, vlo, vhi);
  const acc_t e1 = value - ret, e2 = value_clipped - ret;
  const acc_t vf1 = e1 * e1, vf2 = e2 * e2;
  out.vf = vf1 > vf2 ? vf1 : vf2;
  out.vf_clipped = vf2 > vf1;
  const acc_t h1 = acc_t(2) * e1;
  const acc_t h2 = (value > vlo && value < vhi) ? acc_t(2) * e2 : acc_t(0);
  out.grad_value = old_nan ? old_value : acc_t(0.5) * vf_coef * max_grad(vf1, vf2, h1, h2);
  return out;
}

// Guards for direct torch.ops.alignfast.ppo_loss calls (the Python wrapper checks first).
inline void check_ppo_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                           const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                           const at::Tensor& mask, double cliprange, double cliprange_value, double vf_coef) {
  ALIGNFAST_CHECK_ARG(logprobs.dim() == 2, "logprobs", "must be [B, T], got shape ", logprobs.sizes());
  ALIGNFAST_CHECK_ARG(logprobs.is_floating_point(), "logprobs", "must be floating point, got ", logprobs.dtype());
  const at::Tensor* others[] = {&old_logprobs, &advantages, &values, &old_values, &returns};
  const char* names[] = {"old_logprobs", "advantages", "values", "old_values", "returns"};
  for (int k = 0; k < 5; ++k) {
    check_same_shape(logprobs, "logprobs", *others[k], names[k]);
    check_device(logprobs, "logprobs", *others[k], names[k]);
    ALIGNFAST_CHECK_ARG(others[k]->dtype() == logprobs.dtype(), names[k], "must have the dtype of logprobs (",
                        logprobs.dtype(), "), got ", others[k]->dtype());
  }
  check_same_shape(logprobs, "logprobs", mask, "mask");
  check_device(logprobs, "logprobs", mask, "mask");
  ALIGNFAST_CHECK_ARG(mask.scalar_type() == at::kBool, "mask", "must be bool, got ", mask.dtype());
  ALIGNFAST_CHECK_ARG(std::isfinite(cliprange) && cliprange >= 0, "cliprange", "must be finite and >= 0, got ",
                      cliprange);
  ALIGNFAST_CHECK_ARG(std::isfinite(cliprange_value) && cliprange_value >= 0, "cliprange_value",
                      "must be finite and >= 0, got ", cliprange_value);
  ALIGNFAST_CHECK_ARG(std::isfinite(vf_coef) && vf_coef >= 0, "vf_coef", "must be finite and >= 0, got ", vf_coef);
}

// loss and the token means from the sums of the kNumPpoStats quantities (sums[kNumValid] = n).
template <typename T>
ALIGNFAST_HD inline void ppo_finalize(const T* sums, T vf_coef, T* loss, T* stats) {
  const T n = sums[kNumValid];
  const T inv = n > T(0) ? T(1) / n : T(0);
  stats[kPgLoss] = sums[kPgLoss] * inv;
  stats[kVfLoss] = T(0.5) * sums[kVfLoss] * inv;
  stats[kClipFrac] = sums[kClipFrac] * inv;
  stats[kVfClipFrac] = sums[kVfClipFrac] * inv;
  stats[kApproxKl] = T(0.5) * sums[kApproxKl] * inv;
  stats[kRatio] = sums[kRatio] * inv;
  stats[kNumValid] = n;
  *loss = stats[kPgLoss] + vf_coef * stats[kVfLoss];
}

}  // namespace alignfast
