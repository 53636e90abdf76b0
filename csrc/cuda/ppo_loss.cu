// ppo_loss on CUDA: one elementwise pass over the tokens computes the clipped losses, the stats and
// (when asked) each token's gradient of the token-sum loss; a one-block kernel reduces the per-block
// partial sums in a fixed order (deterministic) and writes loss and stats. Spec:
// alignfast/reference/ppo_loss.py; per-token math shared with the CPU kernel in ppo_loss_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/device_utils.cuh"
#include "ppo_loss_math.h"

namespace alignfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;

// Grid-stride over the tokens (consecutive threads, consecutive tokens: coalesced). Each block writes
// its kNumPpoStats partial sums to partials[blockIdx.x].
template <typename scalar_t, bool WANT_GRAD>
__global__ void __launch_bounds__(kThreads) ppo_tokens_kernel(const scalar_t* __restrict__ logprobs, const scalar_t* __restrict__ old_logprobs,
                                  const scalar_t* __restrict__ advantages, const scalar_t* __restrict__ values,
                                  const scalar_t* __restrict__ old_values, const scalar_t* __restrict__ returns,
                                  const bool* __restrict__ mask, scalar_t* __restrict__ grad_logprobs,
                                  scalar_t* __restrict__ grad_values, at::opmath_type<scalar_t>* __restrict__ partials,
                                  int64_t n, at::opmath_type<scalar_t> cliprange,
                                  at::opmath_type<scalar_t> cliprange_value, at::opmath_type<scalar_t> vf_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kNumPpoStats][kThreads / kWarpSize];
  acc_t sums[kNumPpoStats];
#pragma unroll
  for (int k = 0; k < kNumPpoStats; ++k) sums[k] = acc_t(0);

  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    if (!mask[i]) {  // skipped, not multiplied by 0
      if constexpr (WANT_GRAD) {
        grad_logprobs[i] = scalar_t(0);
        grad_values[i] = scalar_t(0);
      }
      continue;
    }
    const PpoToken<acc_t> tok = ppo_token<acc_t>(
        static_cast<acc_t>(logprobs[i]), static_cast<acc_t>(old_logprobs[i]), static_cast<acc_t>(advantages[i]),
        static_cast<acc_t>(values[i]), static_cast<acc_t>(old_values[i]), static_cast<acc_t>(returns[i]), cliprange,
        cliprange_value, vf_coef);
    sums[kPgLoss] += tok.pg;
    sums[kVfLoss] += tok.vf;
    sums[kClipFrac] += tok.pg_clipped ? acc_t(1) : acc_t(0);
    sums[kVfClipFrac] += tok.vf_clipped ? acc_t(1) : acc_t(0);
    sums[kApproxKl] += tok.log_ratio * tok.log_ratio;
    sums[kRatio] += tok.ratio;
    sums[kNumValid] += acc_t(1);
    if constexpr (WANT_GRAD) {
      grad_logprobs[i] = static_cast<scalar_t>(tok.grad_logprob);
      grad_values[i] = static_cast<scalar_t>(tok.grad_value);
    }
  }

  // Block sums: a shuffle tree per warp, then warp 0 adds the warps' sums in order.
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < kNumPpoStats; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) sums[k] += __shfl_down_sync(kFullMask, sums[k], offset);
    if (lane == 0) smem[k][warp] = sums[k];
  }
  __syncthreads();
  if (threadIdx.x < kNumPpoStats) {
    acc_t total = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += smem[threadIdx.x][w];
    partials[int64_t(blockIdx.x) * kNumPpoStats + threadIdx.x] = total;
  }
}

// One block: adds the per-block partial sums (double, fixed order) and writes loss and stats.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) ppo_finalize_kernel(const acc_t* __restrict__ partials, int num_partials, double vf_coef,
                                    acc_t* __restrict__ loss, acc_t* __restrict__ stats) {
  __shared__ double smem[kNumPpoStats][kThreads];
  double sums[kNumPpoStats];
#pragma unroll
  for (int k = 0; k < kNumPpoStats; ++k) sums[k] = 0.0;
  for (int p = threadIdx.x; p < num_partials; p += kThreads) {
#pragma unroll
    for (int k = 0; k < kNumPpoStats; ++k) sums[k] += static_cast<double>(partials[int64_t(p) * kNumPpoStats + k]);
  }
#pragma unroll
  for (int k = 0; k < kNumPpoStats; ++k) smem[k][threadIdx.x] = sums[k];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
#pragma unroll
      for (int k = 0; k < kNumPpoStats; ++k) smem[k][threadIdx.x] += smem[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double total[kNumPpoStats], means[kNumPpoStats], loss_d;
    for (int k = 0; k < kNumPpoStats; ++k) total[k] = smem[k][0];
    ppo_finalize<double>(total, vf_coef, &loss_d, means);
    *loss = static_cast<acc_t>(loss_d);
    for (int k = 0; k < kNumPpoStats; ++k) stats[k] = static_cast<acc_t>(means[k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_cuda(
    const at::Tensor& logprobs_, const at::Tensor& old_logprobs_, const at::Tensor& advantages_,
    const at::Tensor& values_, const at::Tensor& old_values_, const at::Tensor& returns_, const at::Tensor& mask_,
    double cliprange, double cliprange_value, double vf_coef, bool compute_grad) {
  check_ppo_args(logprobs_, old_logprobs_, advantages_, values_, old_values_, returns_, mask_, cliprange,
                 cliprange_value, vf_coef);
  const c10::cuda::CUDAGuard guard(logprobs_.device());
  const at::Tensor logprobs = logprobs_.contiguous(), old_logprobs = old_logprobs_.contiguous();
  const at::Tensor advantages = advantages_.contiguous(), values = values_.contiguous();
  const at::Tensor old_values = old_values_.contiguous(), returns = returns_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const int64_t n = logprobs.numel();
  const auto out_opts = logprobs.options().dtype(at::toOpMathType(logprobs.scalar_type()));
  at::Tensor grad_logprobs = at::empty(compute_grad ? logprobs.sizes() : at::IntArrayRef{0}, logprobs.options());
  at::Tensor grad_values = at::empty(compute_grad ? values.sizes() : at::IntArrayRef{0}, values.options());
  if (n == 0) return {at::zeros({}, out_opts), at::zeros({kNumPpoStats}, out_opts), grad_logprobs, grad_values};
  at::Tensor loss = at::empty({}, out_opts);
  at::Tensor stats = at::empty({kNumPpoStats}, out_opts);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = int64_t(sm_count(logprobs.get_device())) * kBlocksPerSm;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks));
  at::Tensor partials = at::empty({blocks, kNumPpoStats}, out_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "ppo_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          logprobs.const_data_ptr<scalar_t>(), old_logprobs.const_data_ptr<scalar_t>(),
          advantages.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
          old_values.const_data_ptr<scalar_t>(), returns.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
          compute_grad ? grad_logprobs.mutable_data_ptr<scalar_t>() : nullptr,
          compute_grad ? grad_values.mutable_data_ptr<scalar_t>() : nullptr, partials.mutable_data_ptr<acc_t>(), n,
          static_cast<acc_t>(cliprange), static_cast<acc_t>(cliprange_value), static_cast<acc_t>(vf_coef));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (compute_grad) {
      launch(ppo_tokens_kernel<scalar_t, true>);
    } else {
      launch(ppo_tokens_kernel<scalar_t, false>);
    }
    ppo_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, vf_coef,
                                                            loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, grad_logprobs, grad_values};
}

}  // namespace
}  // namespace alignfast::cuda

TORCH_LIBRARY_IMPL(alignfast, CUDA, m) {
  m.impl("ppo_loss", &alignfast::cuda::ppo_loss_cuda);
}
