// compute_advantages on CUDA. Spec: alignfast/reference/advantages.py; the byte budget and the
// expected speed are in bench/NOTES-advantages.md.
//
// GAE is a right-to-left affine recurrence over the valid tokens of a row. Every position t is a map
// applied to the state s arriving from the right:
//     value scan:      valid: s -> v_t                  masked: s -> s     (s = value at the next valid token)
//     advantage scan:  valid: s -> delta_t + gamma*lam*s  masked: s -> s   (s = advantage at the next valid token)
// Maps x -> a*x + b compose associatively, so one block per row runs a parallel suffix scan:
//   1. each thread loads kItems contiguous tokens (16-byte loads, coalesced across the warp) and
//      composes its chunk's map;
//   2. a block-wide suffix scan (warp shuffles, then one value per warp in shared memory) gives each
//      thread the state entering its chunk from the right;
//   3. the thread finishes its chunk sequentially and stores.
// The value scan runs first (delta_t needs the value at the next valid token; its multiplier also
// tells whether a valid token lies to the right, i.e. where the score goes), then the advantage scan.
// Rows longer than one tile (threads * kItems tokens) are walked tile by tile from the right, carrying
// the three states. Whitening: each row leaves (count, mean, M2); one block merges them in row order
// (Chan's formula, double) into mean and 1/sqrt(var + eps); a last elementwise kernel scales the valid
// advantages (still in L2 at the sizes that matter).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "advantages_math.h"
#include "cuda/device_utils.cuh"

namespace alignfast::cuda {
namespace {

constexpr int kItems = 8;         // contiguous tokens per thread per tile
// A tile holds at most 2048 tokens. The float kernel needs ~82 registers a thread (130 for double):
// at 256 threads two float blocks are resident per SM (264 on an H100, so a 256-row batch runs in one
// wave) with enough bytes in flight to saturate HBM (bench/NOTES-advantages.md); 512 threads would fit
// one block per SM, and for double could not launch at all.
constexpr int kMaxThreads = 256;
constexpr int kStatsThreads = 256;
constexpr int kApplyThreads = 256;

// x -> a*x + b.
template <typename T>
struct Affine {
  T a, b;
};

// (f o g)(x) = f(g(x)): g is the map of the positions to the right of f's.
template <typename T>
__device__ __forceinline__ Affine<T> compose(const Affine<T>& f, const Affine<T>& g) {
  return {f.a * g.a, f.a * g.b + f.b};
}

template <typename T>
__device__ __forceinline__ T apply(const Affine<T>& f, T x) {
  return f.a * x + f.b;
}

template <typename T>
__device__ __forceinline__ Affine<T> shfl_down(const Affine<T>& f, int offset) {
  return {__shfl_down_sync(kFullMask, f.a, offset), __shfl_down_sync(kFullMask, f.b, offset)};
}

// Block-wide suffix composition of the threads' chunk maps (thread i's chunk lies left of thread i+1's).
// Returns F_{i+1} o ... o F_{n-1} (the identity for the last thread) and sets *tile = F_0 o ... o F_{n-1}.
// Every thread of the block must call it (it synchronises); blockDim.x is a multiple of 32;
// smem holds blockDim.x / 32 maps. The fold order is the same in every thread, so *tile is too.
template <typename T>
__device__ Affine<T> block_suffix_scan(const Affine<T>& mine, Affine<T>* tile, Affine<T>* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, num_warps = blockDim.x / kWarpSize;
  // Inclusive suffix within the warp (Hillis-Steele): inc covers lanes [lane, min(lane + 2*offset, 32)).
  Affine<T> inc = mine;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const Affine<T> right = shfl_down(inc, offset);
    if (lane + offset < kWarpSize) inc = compose(inc, right);
  }
  Affine<T> exclusive = shfl_down(inc, 1);
  if (lane == kWarpSize - 1) exclusive = {T(1), T(0)};
  if (lane == 0) smem[warp] = inc;  // the warp's whole map
  __syncthreads();
  Affine<T> right_of_warp{T(1), T(0)};
  for (int w = num_warps - 1; w > warp; --w) right_of_warp = compose(smem[w], right_of_warp);
  Affine<T> all = right_of_warp;
  for (int w = warp; w >= 0; --w) all = compose(smem[w], all);
  *tile = all;
  __syncthreads();  // smem is free for the next call
  return compose(exclusive, right_of_warp);
}

template <typename T>
__device__ __forceinline__ MeanM2<T> shfl_down(const MeanM2<T>& s, int offset) {
  MeanM2<T> out{};
  out.n = __shfl_down_sync(kFullMask, s.n, offset);
  out.mean = __shfl_down_sync(kFullMask, s.mean, offset);
  out.m2 = __shfl_down_sync(kFullMask, s.m2, offset);
  return out;
}

// Loads kItems tokens starting at `start` (< T). VEC: 16-byte loads (T % kItems == 0, aligned base).
template <bool VEC, typename T, typename Out>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t start, int64_t T_len, Out (&out)[kItems]) {
  if constexpr (VEC) {
    T raw[kItems];
    load_vec<T, kItems>(p + start, raw);
#pragma unroll
    for (int j = 0; j < kItems; ++j) out[j] = static_cast<Out>(raw[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) out[j] = start + j < T_len ? static_cast<Out>(p[start + j]) : Out(0);
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int64_t start, int64_t T_len, const T (&in)[kItems]) {
  if constexpr (VEC) {
    store_vec<T, kItems>(p + start, in);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (start + j < T_len) p[start + j] = in[j];
    }
  }
}

// One block per row. Outputs are acc_t (float, or double for double inputs).
template <typename scalar_t, KlEstimator EST, bool VEC>
__global__ void __launch_bounds__(kMaxThreads) gae_rows_kernel(const scalar_t* __restrict__ logprobs, const scalar_t* __restrict__ ref_logprobs,
                                const scalar_t* __restrict__ values, const at::opmath_type<scalar_t>* __restrict__ scores,
                                const bool* __restrict__ mask, at::opmath_type<scalar_t>* __restrict__ rewards,
                                at::opmath_type<scalar_t>* __restrict__ advantages,
                                at::opmath_type<scalar_t>* __restrict__ returns, at::opmath_type<scalar_t>* __restrict__ kl,
                                MeanM2<at::opmath_type<scalar_t>>* __restrict__ row_stats, int64_t T,
                                at::opmath_type<scalar_t> kl_coef, at::opmath_type<scalar_t> gamma,
                                at::opmath_type<scalar_t> gamma_lam) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Affine<acc_t> smem_maps[kMaxThreads / kWarpSize];
  __shared__ MeanM2<acc_t> smem_stats[kMaxThreads / kWarpSize];

  const int64_t b = blockIdx.x;
  const int64_t row = b * T;  // int64: B * T may exceed 2^31
  const int64_t tile_len = int64_t(blockDim.x) * kItems;
  const int64_t num_tiles = (T + tile_len - 1) / tile_len;
  const acc_t score = scores[b];

  // States entering the current tile from the right.
  acc_t carry_value = 0;     // value at the nearest valid token to the right (0 past the last: the bootstrap)
  bool carry_seen = false;   // a valid token lies to the right (so the score is placed already)
  acc_t carry_adv = 0;       // advantage at the nearest valid token to the right
  MeanM2<acc_t> stats{};     // this thread's whitening statistics over all its tiles

  for (int64_t tile = num_tiles - 1; tile >= 0; --tile) {
    const int64_t start = tile * tile_len + int64_t(threadIdx.x) * kItems;  // in [0, T) or past the end
    const bool active = start < T;
    acc_t x0[kItems], x1[kItems], v[kItems];  // x0: logprobs, later kl; x1: ref_logprobs, later rewards
    bool m[kItems];
    if (active) {
      load_chunk<VEC>(logprobs + row, start, T, x0);
      load_chunk<VEC>(ref_logprobs + row, start, T, x1);
      load_chunk<VEC>(values + row, start, T, v);
      load_chunk<VEC>(mask + row, start, T, m);  // past T: false
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        x0[j] = x1[j] = v[j] = acc_t(0);
        m[j] = false;
      }
    }

    // Value scan. A chunk's map is "s -> value of its leftmost valid token", or the identity.
    Affine<acc_t> value_map{acc_t(1), acc_t(0)};
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      if (m[j]) value_map = {acc_t(0), v[j]};
    }
    Affine<acc_t> value_tile;
    const Affine<acc_t> value_right = block_suffix_scan(value_map, &value_tile, smem_maps);
    acc_t next_value = apply(value_right, carry_value);
    // The multiplier of a composition of value maps is exactly 0 iff it holds a valid token.
    bool seen = carry_seen || value_right.a == acc_t(0);

    // Rewards and TD errors, right to left; compose the chunk's advantage map.
    acc_t delta[kItems];
    Affine<acc_t> adv_map{acc_t(1), acc_t(0)};
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      delta[j] = acc_t(0);
      if (!m[j]) continue;
      const acc_t k = kl_estimate<EST>(x0[j] - x1[j]);
      acc_t r = -kl_coef * k;
      if (!seen) {  // the row's last valid token
        r += score;
        seen = true;
      }
      delta[j] = r + gamma * next_value - v[j];
      next_value = v[j];
      x0[j] = k;
      x1[j] = r;
      adv_map = compose(Affine<acc_t>{gamma_lam, delta[j]}, adv_map);
    }
    Affine<acc_t> adv_tile;
    const Affine<acc_t> adv_right = block_suffix_scan(adv_map, &adv_tile, smem_maps);
    acc_t next_adv = apply(adv_right, carry_adv);

    // Advantages and returns; masked positions are 0 in every output.
    acc_t sum = 0, count = 0;
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      if (m[j]) {
        next_adv = delta[j] + gamma_lam * next_adv;
        delta[j] = next_adv;
        v[j] = next_adv + v[j];
        sum += next_adv;
        count += acc_t(1);
      } else {
        x0[j] = x1[j] = delta[j] = v[j] = acc_t(0);
      }
    }
    if (active) {
      store_chunk<VEC>(rewards + row, start, T, x1);
      store_chunk<VEC>(kl + row, start, T, x0);
      store_chunk<VEC>(advantages + row, start, T, delta);
      store_chunk<VEC>(returns + row, start, T, v);
    }
    if (count > acc_t(0)) {  // exact two-pass statistics of the chunk, merged into the thread's
      MeanM2<acc_t> chunk{};
      chunk.n = count;
      chunk.mean = sum / count;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const acc_t d = m[j] ? delta[j] - chunk.mean : acc_t(0);
        chunk.m2 += d * d;
      }
      stats = merge(stats, chunk);
    }

    carry_value = apply(value_tile, carry_value);
    carry_seen = carry_seen || value_tile.a == acc_t(0);
    carry_adv = apply(adv_tile, carry_adv);
  }

  // Row statistics: merge across the warp, then across warps in order (deterministic).
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) stats = merge(stats, shfl_down(stats, offset));
  if (lane == 0) smem_stats[warp] = stats;
  __syncthreads();
  if (threadIdx.x == 0) {
    MeanM2<acc_t> total = smem_stats[0];
    for (int w = 1; w < num_warps; ++w) total = merge(total, smem_stats[w]);
    row_stats[b] = total;
  }
}

// One block: merges the B row statistics (in double, fixed order) into mean and 1/sqrt(var + eps).
template <typename acc_t>
__global__ void __launch_bounds__(kStatsThreads) whiten_stats_kernel(const MeanM2<acc_t>* __restrict__ row_stats, int64_t B, acc_t* __restrict__ moments) {
  __shared__ MeanM2<double> smem[kStatsThreads];
  MeanM2<double> s{};
  for (int64_t b = threadIdx.x; b < B; b += kStatsThreads) {
    const MeanM2<acc_t> r = row_stats[b];
    MeanM2<double> rd{};
    rd.n = r.n;
    rd.mean = r.mean;
    rd.m2 = r.m2;
    s = merge(s, rd);
  }
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int half = kStatsThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) smem[threadIdx.x] = merge(smem[threadIdx.x], smem[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    moments[0] = static_cast<acc_t>(smem[0].mean);
    moments[1] = static_cast<acc_t>(whiten_rstd(smem[0]));
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kApplyThreads) whiten_apply_kernel(acc_t* __restrict__ advantages, const bool* __restrict__ mask, int64_t n,
                                    const acc_t* __restrict__ moments) {
  const acc_t mean = moments[0], rstd = moments[1];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (mask[i]) advantages[i] = (advantages[i] - mean) * rstd;  // masked positions hold 0 already
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compute_advantages_cuda(
    const at::Tensor& logprobs_, const at::Tensor& ref_logprobs_, const at::Tensor& values_,
    const at::Tensor& scores_, const at::Tensor& mask_, double kl_coef, c10::string_view kl_estimator, double gamma,
    double lam, bool whiten) {
  check_advantages_args(logprobs_, ref_logprobs_, values_, scores_, mask_, gamma, lam);
  const KlEstimator est = parse_kl_estimator(kl_estimator);
  const c10::cuda::CUDAGuard guard(logprobs_.device());
  const at::Tensor logprobs = logprobs_.contiguous(), ref_logprobs = ref_logprobs_.contiguous();
  const at::Tensor values = values_.contiguous(), mask = mask_.contiguous();
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_type = at::toOpMathType(logprobs.scalar_type());
  const at::Tensor scores = scores_.to(out_type).contiguous();
  const auto opts = logprobs.options().dtype(out_type);
  at::Tensor rewards = at::empty({B, T}, opts), advantages = at::empty({B, T}, opts);
  at::Tensor returns = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  if (B * T == 0) return {rewards, advantages, returns, kl};
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "alignfast: compute_advantages supports at most 2^31-1 rows");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t threads_needed = (T + kItems - 1) / kItems;
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarpSize, (threads_needed + kWarpSize - 1) / kWarpSize * kWarpSize)));
  const bool vec = T % kItems == 0 && aligned16(logprobs.const_data_ptr()) && aligned16(ref_logprobs.const_data_ptr()) &&
                   aligned16(values.const_data_ptr()) && aligned16(mask.const_data_ptr());
  at::Tensor row_stats = at::empty({B, 3}, opts);  // MeanM2<acc_t> per row

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "compute_advantages_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* stats_ptr = reinterpret_cast<MeanM2<acc_t>*>(row_stats.mutable_data_ptr<acc_t>());
    dispatch_kl_estimator(est, [&](auto est_tag) {
      constexpr KlEstimator EST = decltype(est_tag)::value;
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(B), threads, 0, stream>>>(
            logprobs.const_data_ptr<scalar_t>(), ref_logprobs.const_data_ptr<scalar_t>(),
            values.const_data_ptr<scalar_t>(), scores.const_data_ptr<acc_t>(), mask.const_data_ptr<bool>(),
            rewards.mutable_data_ptr<acc_t>(), advantages.mutable_data_ptr<acc_t>(), returns.mutable_data_ptr<acc_t>(),
            kl.mutable_data_ptr<acc_t>(), stats_ptr, T, static_cast<acc_t>(kl_coef), static_cast<acc_t>(gamma),
            static_cast<acc_t>(gamma * lam));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        launch(gae_rows_kernel<scalar_t, EST, true>);
      } else {
        launch(gae_rows_kernel<scalar_t, EST, false>);
      }
    });
    if (whiten) {
      at::Tensor moments = at::empty({2}, opts);  // mean, 1/sqrt(var + eps)
      whiten_stats_kernel<acc_t><<<1, kStatsThreads, 0, stream>>>(stats_ptr, B, moments.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n = B * T;
      const int64_t max_blocks = int64_t(sm_count(logprobs.get_device())) * 8;
      const int blocks = static_cast<int>(std::min<int64_t>((n + kApplyThreads - 1) / kApplyThreads, max_blocks));
      whiten_apply_kernel<acc_t><<<blocks, kApplyThreads, 0, stream>>>(
          advantages.mutable_data_ptr<acc_t>(), mask.const_data_ptr<bool>(), n, moments.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rewards, advantages, returns, kl};
}

}  // namespace
}  // namespace alignfast::cuda

TORCH_LIBRARY_IMPL(alignfast, CUDA, m) {
  m.impl("compute_advantages", &alignfast::cuda::compute_advantages_cuda);
}
