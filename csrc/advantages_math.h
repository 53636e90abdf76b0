// compute_advantages: the per-token math and the argument checks shared by the CPU kernel
// (csrc/cpu/advantages.cpp) and the CUDA kernels (csrc/cuda/advantages.cu), so both compute the
// same thing in the same order. Spec: alignfast/reference/advantages.py.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <type_traits>

#include "common.h"
#include "host_device.h"


namespace alignfast {

// whitening: (A - mean) * rsqrt(var + kWhitenEps), as TRL's and verl's masked_whiten.
constexpr double kWhitenEps = 1e-8;

enum class KlEstimator : int { k1 = 0, k2 = 1, k3 = 2, abs = 3 };

inline KlEstimator parse_kl_estimator(c10::string_view name) {
  if (name == "k1") return KlEstimator::k1;
  if (name == "k2") return KlEstimator::k2;
  if (name == "k3") return KlEstimator::k3;
  if (name == "abs") return KlEstimator::abs;
  TORCH_CHECK(false, "alignfast: argument 'kl_estimator' must be one of ['k1', 'k2', 'k3', 'abs'], got '",
              std::string(name.data(), name.size()), "'");
}

// Calls f(std::integral_constant<KlEstimator, E>{}) for the runtime estimator e, so the estimator is a
// compile-time constant inside the kernels' inner loops.
template <class F>
void dispatch_kl_estimator(KlEstimator e, F&& f) {
  switch (e) {
    case KlEstimator::k1: f(std::integral_constant<KlEstimator, KlEstimator::k1>{}); break;
    case KlEstimator::k2: f(std::integral_constant<KlEstimator, KlEstimator::k2>{}); break;
    case KlEstimator::k3: f(std::integral_constant<KlEstimator, KlEstimator::k3>{}); break;
    case KlEstimator::abs: f(std::integral_constant<KlEstimator, KlEstimator::abs>{}); break;
  }
}


// kl_t from d = logprobs - ref_logprobs: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d, abs = |d|.
template <KlEstimator EST, typename acc_t>
ALIGNFAST_HD inline acc_t kl_estimate(acc_t d) {
  if constexpr (EST == KlEstimator::k1) {
    return d;
  } else if constexpr (EST == KlEstimator::k2) {
    return acc_t(0.5) * d * d;
  } else if constexpr (EST == KlEstimator::k3) {
    return expm1_(-d) + d;  // expm1: no cancellation for small d
  } else {
    return d < acc_t(0) ? -d : d;
  }
}

// Whitening statistics of a set of advantages: count, mean and sum of squared deviations (M2).
// Sets merge with Chan et al.'s formula, so rows (CPU) or blocks (CUDA) reduce independently and
// the batch statistics come from one ordered merge: deterministic for a given shape.
// An aggregate without default member initialisers, so CUDA can keep it in __shared__ memory:
// create it with MeanM2<T>{} (all zero).
template <typename T>
struct MeanM2 {
  T n, mean, m2;
};

template <typename T>
ALIGNFAST_HD inline MeanM2<T> merge(const MeanM2<T>& a, const MeanM2<T>& b) {
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  MeanM2<T> out{};
  out.n = a.n + b.n;
  const T delta = b.mean - a.mean;
  out.mean = a.mean + delta * (b.n / out.n);
  out.m2 = a.m2 + b.m2 + delta * delta * (a.n * (b.n / out.n));
  return out;
}

// Unbiased variance (0 below two samples, as alignfast.reference.masked_whiten) -> 1/sqrt(var + eps).
template <typename T>
ALIGNFAST_HD inline T whiten_rstd(const MeanM2<T>& s) {
  const T var = s.n > T(1) ? s.m2 / (s.n - T(1)) : T(0);
  return T(1) / sqrt_(var + T(kWhitenEps));
}

// Guards for direct torch.ops.alignfast.compute_advantages calls (the Python wrapper checks first,
// with friendlier messages).
inline void check_advantages_args(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                  const at::Tensor& values, const at::Tensor& scores, const at::Tensor& mask,
                                  double gamma, double lam) {
  ALIGNFAST_CHECK_ARG(logprobs.dim() == 2, "logprobs", "must be [B, T], got shape ", logprobs.sizes());
  ALIGNFAST_CHECK_ARG(logprobs.is_floating_point(), "logprobs", "must be floating point, got ", logprobs.dtype());
  check_same_shape(logprobs, "logprobs", ref_logprobs, "ref_logprobs");
  check_same_shape(logprobs, "logprobs", values, "values");
  check_same_shape(logprobs, "logprobs", mask, "mask");
  ALIGNFAST_CHECK_ARG(ref_logprobs.dtype() == logprobs.dtype(), "ref_logprobs", "must have the dtype of logprobs");
  ALIGNFAST_CHECK_ARG(values.dtype() == logprobs.dtype(), "values", "must have the dtype of logprobs");
  ALIGNFAST_CHECK_ARG(mask.scalar_type() == at::kBool, "mask", "must be bool, got ", mask.dtype());
  ALIGNFAST_CHECK_ARG(scores.dim() == 1 && scores.size(0) == logprobs.size(0), "scores",
                      "must be [B] with B = ", logprobs.size(0), ", got shape ", scores.sizes());
  ALIGNFAST_CHECK_ARG(scores.is_floating_point(), "scores", "must be floating point, got ", scores.dtype());
  check_device(logprobs, "logprobs", ref_logprobs, "ref_logprobs");
  check_device(logprobs, "logprobs", values, "values");
  check_device(logprobs, "logprobs", scores, "scores");
  check_device(logprobs, "logprobs", mask, "mask");
  ALIGNFAST_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0, "gamma", "must be in [0, 1], got ", gamma);
  ALIGNFAST_CHECK_ARG(lam >= 0.0 && lam <= 1.0, "lam", "must be in [0, 1], got ", lam);
}

}  // namespace alignfast
