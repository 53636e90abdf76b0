// ppo_loss on CPU: one pass over the tokens (rows in parallel) computes the clipped policy and value
// losses, the stats, and, when asked, each token's gradient of the token-sum loss (Liger-style fused
// forward/backward: backward only scales these by grad_output / n). Spec: alignfast/reference/ppo_loss.py.
// Per-row sums are kept in double and merged in row order, so results do not depend on the thread count.
// float32 inputs on AVX2 CPUs take the 8-wide path of cpu/ppo_loss_avx2.h; the rest this scalar loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/ppo_loss_avx2.h"
#include "ppo_loss_math.h"

namespace alignfast {
namespace {

using RowSums = std::array<double, kNumPpoStats>;

template <typename scalar_t>
void ppo_rows(const scalar_t* logprobs, const scalar_t* old_logprobs, const scalar_t* advantages,
              const scalar_t* values, const scalar_t* old_values, const scalar_t* returns, const bool* mask,
              scalar_t* grad_logprobs, scalar_t* grad_values, RowSums* row_sums, int64_t B, int64_t T,
              double cliprange, double cliprange_value, double vf_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(cliprange), eps_v = static_cast<acc_t>(cliprange_value);
  const acc_t c_v = static_cast<acc_t>(vf_coef);
  const bool want_grad = grad_logprobs != nullptr;
#ifdef ALIGNFAST_HAVE_AVX2_PATH
  const bool vectorised = std::is_same_v<scalar_t, float> && avx2::supported();
#endif
  parallel_rows(B, 4 * T, [&](int64_t begin, int64_t end) {  // ~4 ns a token; threads only for big calls
    for (int64_t b = begin; b < end; ++b) {
      RowSums s{};
      int64_t i = b * T;
#ifdef ALIGNFAST_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorised) {  // 8 tokens at a time; the row's last T % 8 tokens go through the scalar loop
          avx2::ppo_blocks(logprobs, old_logprobs, advantages, values, old_values, returns, mask, grad_logprobs,
                           grad_values, i, T / 8, eps, eps_v, c_v, s.data());
          i += T / 8 * 8;
        }
      }
#endif
      for (; i < (b + 1) * T; ++i) {
        if (!mask[i]) {  // skipped, not multiplied by 0: garbage at masked positions cannot leak in
          if (want_grad) grad_logprobs[i] = grad_values[i] = scalar_t(0);
          continue;
        }
        const PpoToken<acc_t> tok = ppo_token<acc_t>(
            static_cast<acc_t>(logprobs[i]), static_cast<acc_t>(old_logprobs[i]), static_cast<acc_t>(advantages[i]),
            static_cast<acc_t>(values[i]), static_cast<acc_t>(old_values[i]), static_cast<acc_t>(returns[i]), eps,
            eps_v, c_v);
        s[kPgLoss] += tok.pg;
        s[kVfLoss] += tok.vf;
        s[kClipFrac] += tok.pg_clipped;
        s[kVfClipFrac] += tok.vf_clipped;
        s[kApproxKl] += static_cast<double>(tok.log_ratio) * tok.log_ratio;
        s[kRatio] += tok.ratio;
        s[kNumValid] += 1;
        if (want_grad) {
          grad_logprobs[i] = static_cast<scalar_t>(tok.grad_logprob);
          grad_values[i] = static_cast<scalar_t>(tok.grad_value);
        }
      }
      row_sums[b] = s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_cpu(
    const at::Tensor& logprobs_, const at::Tensor& old_logprobs_, const at::Tensor& advantages_,
    const at::Tensor& values_, const at::Tensor& old_values_, const at::Tensor& returns_, const at::Tensor& mask_,
    double cliprange, double cliprange_value, double vf_coef, bool compute_grad) {
  check_ppo_args(logprobs_, old_logprobs_, advantages_, values_, old_values_, returns_, mask_, cliprange,
                 cliprange_value, vf_coef);
  const at::Tensor logprobs = logprobs_.contiguous(), old_logprobs = old_logprobs_.contiguous();
  const at::Tensor advantages = advantages_.contiguous(), values = values_.contiguous();
  const at::Tensor old_values = old_values_.contiguous(), returns = returns_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_opts = logprobs.options().dtype(at::toOpMathType(logprobs.scalar_type()));
  at::Tensor loss = at::empty({}, out_opts);
  at::Tensor stats = at::empty({kNumPpoStats}, out_opts);
  at::Tensor grad_logprobs = at::empty(compute_grad ? logprobs.sizes() : at::IntArrayRef{0}, logprobs.options());
  at::Tensor grad_values = at::empty(compute_grad ? values.sizes() : at::IntArrayRef{0}, values.options());
  std::vector<RowSums> row_sums(B);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "ppo_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ppo_rows<scalar_t>(logprobs.const_data_ptr<scalar_t>(), old_logprobs.const_data_ptr<scalar_t>(),
                       advantages.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
                       old_values.const_data_ptr<scalar_t>(), returns.const_data_ptr<scalar_t>(),
                       mask.const_data_ptr<bool>(), compute_grad ? grad_logprobs.mutable_data_ptr<scalar_t>() : nullptr,
                       compute_grad ? grad_values.mutable_data_ptr<scalar_t>() : nullptr, row_sums.data(), B, T,
                       cliprange, cliprange_value, vf_coef);
    RowSums total{};
    for (const RowSums& s : row_sums) {
      for (int k = 0; k < kNumPpoStats; ++k) total[k] += s[k];
    }
    double loss_d;
    RowSums means;
    ppo_finalize<double>(total.data(), vf_coef, &loss_d, means.data());
    loss.fill_(static_cast<acc_t>(loss_d));
    acc_t* out = stats.mutable_data_ptr<acc_t>();
    for (int k = 0; k < kNumPpoStats; ++k) out[k] = static_cast<acc_t>(means[k]);
  });
  return {loss, stats, grad_logprobs, grad_values};
}

// ppo_loss's backward: the saved per-token gradients of n * loss times grad_loss / n. ATen's own multiply would
// split 65K tokens over two threads (its grain is 32768 elements), and on a busy machine its barrier waits
// for a descheduled worker for milliseconds (bench/NOTES-threads.md); parallel_rows keeps a call this small
// on the calling thread. Empty [0] outputs for a gradient not asked for.
std::tuple<at::Tensor, at::Tensor> ppo_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& stats,
                                                         const at::Tensor& grad_logprobs, const at::Tensor& grad_values,
                                                         bool need_logprobs, bool need_values) {
  ALIGNFAST_CHECK_ARG(grad_loss.numel() == 1, "grad_loss", "must hold one element, got shape ", grad_loss.sizes());
  ALIGNFAST_CHECK_ARG(stats.dim() == 1 && stats.size(0) == kNumPpoStats, "stats", "must be [", kNumPpoStats,
                      "], got ", stats.sizes());
  check_same_shape(grad_logprobs, "grad_logprobs", grad_values, "grad_values");
  const double n = std::max(stats[kNumValid].item<double>(), 1.0);
  const double scale = grad_loss.item<double>() / n;
  const int64_t rows = grad_logprobs.dim() == 2 ? grad_logprobs.size(0) : 1;
  const int64_t numel = grad_logprobs.numel();
  const int64_t cols = rows > 0 ? numel / rows : 0;
  auto scaled = [&](const at::Tensor& g, bool need) {
    if (!need) return at::empty({0}, g.options());
    const at::Tensor src = g.contiguous();
    at::Tensor out = at::empty_like(src);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "ppo_loss_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* in = src.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const acc_t c = static_cast<acc_t>(scale);
      parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {  // ~1 ns a token
        for (int64_t i = begin * cols; i < end * cols; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * c);
      });
    });
    return out;
  };
  return {scaled(grad_logprobs, need_logprobs), scaled(grad_values, need_values)};
}

}  // namespace
}  // namespace alignfast

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("ppo_loss", &alignfast::ppo_loss_cpu);
  m.impl("ppo_loss_backward", &alignfast::ppo_loss_backward_cpu);
}
