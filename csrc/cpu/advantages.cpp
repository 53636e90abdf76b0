// compute_advantages on CPU: KL-shaped rewards and GAE in one backward pass per row (rows in
// parallel), then batch whitening as a cheap second phase. Spec: alignfast/reference/advantages.py.
//
// Phase 1, per row (at::parallel_for): walk t = T-1 .. 0 once, skipping masked positions; the first
// valid token met is the row's last, where the score is added. Each row also leaves its whitening
// statistics (count, mean, M2; the M2 pass re-reads the row while it is still in L1/L2).
// Phase 2: merge the row statistics in row order (deterministic), then scale the valid advantages.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "advantages_math.h"

namespace alignfast {
namespace {

template <typename scalar_t, KlEstimator EST>
void gae_rows(const scalar_t* logprobs, const scalar_t* ref_logprobs, const scalar_t* values,
              const at::opmath_type<scalar_t>* scores, const bool* mask, at::opmath_type<scalar_t>* rewards,
              at::opmath_type<scalar_t>* advantages, at::opmath_type<scalar_t>* returns,
              at::opmath_type<scalar_t>* kl, MeanM2<double>* row_stats, int64_t B, int64_t T, double kl_coef_,
              double gamma_, double lam_) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t kl_coef = static_cast<acc_t>(kl_coef_);
  const acc_t gamma = static_cast<acc_t>(gamma_);
  const acc_t gamma_lam = static_cast<acc_t>(gamma_ * lam_);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * T;
      acc_t next_value = 0;  // value at the next valid position (0 after the last: the bootstrap)
      acc_t next_adv = 0;    // advantage at the next valid position
      bool score_placed = false;
      double sum = 0;
      int64_t n = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = row + t;
        if (!mask[i]) {
          rewards[i] = advantages[i] = returns[i] = kl[i] = acc_t(0);
          continue;
        }
        const acc_t v = static_cast<acc_t>(values[i]);
        const acc_t k = kl_estimate<EST>(static_cast<acc_t>(logprobs[i]) - static_cast<acc_t>(ref_logprobs[i]));
        acc_t r = -kl_coef * k;
        if (!score_placed) {
          r += scores[b];
          score_placed = true;
        }
        const acc_t delta = r + gamma * next_value - v;
        const acc_t a = delta + gamma_lam * next_adv;
        rewards[i] = r;
        kl[i] = k;
        advantages[i] = a;
        returns[i] = a + v;
        next_value = v;
        next_adv = a;
        sum += a;
        ++n;
      }
      MeanM2<double> s{};
      if (n > 0) {
        s.n = static_cast<double>(n);
        s.mean = sum / s.n;
        for (int64_t t = 0; t < T; ++t) {
          const double d = mask[row + t] ? static_cast<double>(advantages[row + t]) - s.mean : 0.0;
          s.m2 += d * d;
        }
      }
      row_stats[b] = s;
    }
  });
}

template <typename acc_t>
void whiten_rows(acc_t* advantages, const bool* mask, int64_t B, int64_t T, const MeanM2<double>* row_stats) {
  MeanM2<double> total{};
  for (int64_t b = 0; b < B; ++b) total = merge(total, row_stats[b]);
  const acc_t mean = static_cast<acc_t>(total.mean);
  const acc_t rstd = static_cast<acc_t>(whiten_rstd(total));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * T; i < end * T; ++i) {
      // Branch-free so it vectorises; masked positions hold 0 and keep it.
      advantages[i] = mask[i] ? (advantages[i] - mean) * rstd : acc_t(0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compute_advantages_cpu(
    const at::Tensor& logprobs_, const at::Tensor& ref_logprobs_, const at::Tensor& values_,
    const at::Tensor& scores_, const at::Tensor& mask_, double kl_coef, c10::string_view kl_estimator, double gamma,
    double lam, bool whiten) {
  check_advantages_args(logprobs_, ref_logprobs_, values_, scores_, mask_, gamma, lam);
  const KlEstimator est = parse_kl_estimator(kl_estimator);
  const at::Tensor logprobs = logprobs_.contiguous();
  const at::Tensor ref_logprobs = ref_logprobs_.contiguous();
  const at::Tensor values = values_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_type = at::toOpMathType(logprobs.scalar_type());
  const at::Tensor scores = scores_.to(out_type).contiguous();
  auto opts = logprobs.options().dtype(out_type);
  at::Tensor rewards = at::empty({B, T}, opts), advantages = at::empty({B, T}, opts);
  at::Tensor returns = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  if (B * T == 0) return {rewards, advantages, returns, kl};
  std::vector<MeanM2<double>> row_stats(B);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "compute_advantages_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_kl_estimator(est, [&](auto est_tag) {
      gae_rows<scalar_t, decltype(est_tag)::value>(
          logprobs.const_data_ptr<scalar_t>(), ref_logprobs.const_data_ptr<scalar_t>(),
          values.const_data_ptr<scalar_t>(), scores.const_data_ptr<acc_t>(), mask.const_data_ptr<bool>(),
          rewards.mutable_data_ptr<acc_t>(), advantages.mutable_data_ptr<acc_t>(), returns.mutable_data_ptr<acc_t>(),
          kl.mutable_data_ptr<acc_t>(), row_stats.data(), B, T, kl_coef, gamma, lam);
    });
    if (whiten) {
      whiten_rows<acc_t>(advantages.mutable_data_ptr<acc_t>(), mask.const_data_ptr<bool>(), B, T, row_stats.data());
    }
  });
  return {rewards, advantages, returns, kl};
}

}  // namespace
}  // namespace alignfast

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("compute_advantages", &alignfast::compute_advantages_cpu);
}
