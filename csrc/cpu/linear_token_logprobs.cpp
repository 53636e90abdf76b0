// CPU kernels of alignfast::linear_token_logprobs and its backward: token_logprobs(hidden @ W.T + b)
// without ever holding the [N, V] logits. Masked rows are dropped before any matmul. The budget of live
// logits, chunk x V floats (float64 for float64 inputs), is spent as vocabulary tiles: [R, V_t] with R = all
// valid rows (split into row blocks only when V_t would fall under kMinTileCols) and V_t = chunk * V / R:
//   forward   z = h @ W[tile].T + b[tile]; the row kernels reduce each row's slice to (lse_k, entropy_k,
//             and logprob_k for the tile holding the target); the tiles of a row are merged at the end
//             (merge_tiles: logsumexp; entropy as sum_k w_k (H_k + lse - lse_k), all terms >= 0;
//             logprob_k - log1p(sum_{j != k} e^{lse_j - lse_k}) so confident rows keep their precision).
//   backward  z recomputed per tile and turned into dz in place (the whole row's saved stats; the target's
//             own term only in its tile), then dW[tile] = dz.T @ h written straight into the gradient (added
//             for later row blocks), dh += dz @ W[tile] (addmm_ into the gradient), db[tile] = sum_rows dz.
//   The GEMMs go through cpu::gemm_into (cpu/gemm.h): ATen's or oneDNN's float32 kernel, as the process chose.
//   Tall GEMMs (all rows at once) at full efficiency, and dW is written once instead of read-modified-
//   written once per row chunk (bench/NOTES-logprobs.md). The workers take whole tiles with single-threaded
//   GEMMs; dh is summed in tile order, so results do not depend on the schedule.
// bfloat16 weights on CPUs with AVX512_BF16, where oneDNN is the chosen library: bf16 x bf16 -> float32 products
// on oneDNN's brgemm (Bf16Tiles below, bench/NOTES-gemm.md "bf16 tiles"). Elsewhere, bfloat16/float16 weights
// (bench/NOTES-logprobs.md, change 5): the GEMMs run in float32, ATen's reduced-precision GEMM being several
// times slower on CPUs without bf16 instructions. hidden and bias are converted
// once ([N, H] and [V] floats), W one tile at a time into a worker's buffer ([V_t, H] floats), and in the
// backward dW[tile] is computed into that buffer once the tile's dh product has used it, then rounded into
// the gradient: no float32 [V, H] copy of W or of dW (except with several row blocks, where dW[tile] sums
// over blocks in float32 before its one rounding); dh sums in float32 and is rounded once.
// Peak extra memory: chunk x V logits + per-row, per-tile stats, and for low-precision weights the float32
// hidden, dh and W tiles.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "cpu/bf16_gemm.h"
#include "cpu/gemm.h"
#include "cpu/logprobs_rows.h"

namespace alignfast {
namespace {

using logprobs::RowStats;

struct Inputs {
  int64_t N, H, V;
  at::ScalarType acc;
};

Inputs check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& tokens, const std::optional<at::Tensor>& mask, double temperature,
                    int64_t chunk) {
  ALIGNFAST_CHECK_ARG(hidden.dim() == 2 && hidden.is_contiguous(), "hidden", "the op takes contiguous [N, H], got ",
                      hidden.sizes());
  ALIGNFAST_CHECK_ARG(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight", "must be [V, ", hidden.size(1),
                      "], got ", weight.sizes());
  ALIGNFAST_CHECK_ARG(weight.size(0) >= 1, "weight", "needs at least one vocabulary row");
  ALIGNFAST_CHECK_ARG(weight.scalar_type() == hidden.scalar_type(), "weight", "has dtype ", weight.scalar_type(),
                      " but hidden has ", hidden.scalar_type());
  check_device(hidden, "hidden", weight, "weight");
  if (bias.has_value()) {
    ALIGNFAST_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias", "must be [", weight.size(0),
                        "], got ", bias->sizes());
    ALIGNFAST_CHECK_ARG(bias->scalar_type() == hidden.scalar_type(), "bias", "has dtype ", bias->scalar_type(),
                        " but hidden has ", hidden.scalar_type());
    check_device(hidden, "hidden", *bias, "bias");
  }
  ALIGNFAST_CHECK_ARG(tokens.dim() == 1 && tokens.size(0) == hidden.size(0) && tokens.scalar_type() == at::kLong &&
                          tokens.is_contiguous(),
                      "tokens", "must be contiguous int64 [", hidden.size(0), "], got ", tokens.scalar_type(), " ",
                      tokens.sizes());
  check_device(hidden, "hidden", tokens, "tokens");
  if (mask.has_value()) {
    ALIGNFAST_CHECK_ARG(mask->scalar_type() == at::kBool && mask->sizes() == tokens.sizes(), "mask",
                        "must be bool [", hidden.size(0), "], got ", mask->scalar_type(), " ", mask->sizes());
    check_device(hidden, "hidden", *mask, "mask");
  }
  ALIGNFAST_CHECK_ARG(usable_temperature(temperature), "temperature",
                      "must be finite and > 0 with 1/temperature a finite float32, got ", temperature);
  ALIGNFAST_CHECK_ARG(chunk >= 1, "chunk_size", "must be >= 1, got ", chunk);
  return {hidden.size(0), hidden.size(1), weight.size(0),
          hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat};
}

// Rows that take part: all, or the mask's true rows (indices into the full batch).
std::optional<at::Tensor> valid_rows(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->nonzero().squeeze(1);
}

at::Tensor take(const at::Tensor& t, const std::optional<at::Tensor>& rows) {
  return rows.has_value() ? t.index_select(0, *rows) : t;
}

// ---------------------------------------------------------------- vocabulary tiles

constexpr int64_t kMinTileCols = 128;  // narrower tiles make short, inefficient GEMMs: split the rows instead
constexpr int64_t kMinTileFlops = 4000000;  // a GEMM under ~1 ms: not worth a second thread

struct Tiling {
  int64_t rows, cols, threads;  // rows per block, vocabulary columns per tile, threads taking tiles
};

// The live-logits budget, chunk x V, is split over the threads (each holds one tile at a time).
// Tiles are a multiple of kColGranule wide (rounded down, within the budget) where they are at least that wide:
// oneDNN compiles a kernel per GEMM shape and keeps it (cpu/gemm.cpp, cpu/bf16_gemm.h), and the width would
// otherwise follow the row count through the rounding of the budget (default chunk = ceil(rows / 16) for float32).
// row_granule: row blocks, when the rows are split, a multiple of it (the bf16 products pad rows to 16).
constexpr int64_t kColGranule = 64;

Tiling tiling(int64_t n, int64_t V, int64_t H, int64_t chunk, int64_t row_granule = 1) {
  const int64_t budget = std::max<int64_t>(1, std::min(chunk, std::max<int64_t>(n, 1))) * V;
  const int64_t min_cols = std::min(V, kMinTileCols);
  // The tiles are cut for the threads the vocabulary could keep busy, whatever the row count: a batch of at most
  // `chunk` rows then has one tile width, so a row's result does not depend on how the batch is split into
  // micro-batches (ops/linear_token_logprobs.py). Small calls use fewer workers, not wider tiles.
  const int64_t tile_threads =
      std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(at::get_num_threads()), V / min_cols));
  const int64_t work_threads = std::max<int64_t>(1, std::max<int64_t>(n, 1) * V * H / kMinTileFlops);
  const int64_t threads = std::min(tile_threads, work_threads);
  const int64_t per_thread = std::max<int64_t>(1, budget / tile_threads);
  int64_t rows = std::max<int64_t>(1, n);
  if (per_thread / rows < min_cols) rows = std::max<int64_t>(1, per_thread / min_cols);
  if (rows < n) {  // only the last block partial (at least one granule: a few KiB more where the budget is tiny)
    rows = std::min(n, std::max(row_granule, rows / row_granule * row_granule));
  }
  int64_t cols = std::clamp<int64_t>(per_thread / rows, 1, V);
  if (cols > kColGranule && cols < V) cols = cols / kColGranule * kColGranule;  // one tile over V stays one
  return {rows, cols, threads};
}

// fn(tile, slot) for every tile in [0, tiles): `threads` workers take tiles from a shared counter (a running
// worker takes over the tiles of a descheduled one), each tile done by one worker with single-threaded ATen
// ops; slot in [0, threads) names the worker's private buffers. Tiles are taken in increasing order.
template <typename Fn>
void for_tiles(int64_t tiles, int64_t threads, Fn&& fn) {
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < tiles; ++k) fn(k, int64_t(0));
    return;
  }
  // The workers call ATen ops: give them this thread's dispatch state (below autograd, as the kernel is),
  // or they would route tensors that require grad back through autograd.
  const at::ThreadLocalState caller_state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t k = next.fetch_add(1); k < tiles; k = next.fetch_add(1)) fn(k, slot);
    }
  });
}

// Lets tile k's contribution to a shared sum in only after tiles 0..k-1 have added theirs, so the sum's
// rounding does not depend on which worker finished first. A worker failing records its exception (fail);
// the others stop waiting with Abandoned, and run() rethrows the first real error whichever exception
// at::parallel_for happened to pass on.
class OrderedTurns {
 public:
  struct Abandoned {};

  template <typename Fn>
  void in_turn(int64_t k, Fn&& fn) {
    while (turn_.load(std::memory_order_acquire) != k) {
      if (failed_.load(std::memory_order_acquire)) throw Abandoned{};
      std::this_thread::yield();
    }
    fn();
    turn_.store(k + 1, std::memory_order_release);
  }
  void fail(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!first_error_) first_error_ = std::move(error);
    failed_.store(true, std::memory_order_release);
  }
  void reset() { turn_.store(0); }
  template <typename Fn>
  void run(Fn&& fn) {
    try {
      fn();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (first_error_) std::rethrow_exception(first_error_);
      throw;
    }
  }

 private:
  std::atomic<int64_t> turn_{0};
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_error_;
};

// Fault injection for tests/ops/test_linear_logprobs_worker_errors.py: ALIGNFAST_TEST_FAIL_TILE=k makes the
// backward's tile k throw before its turn, to check that a worker's error reaches the caller and that no other worker
// waits forever for a turn that will not come. Read once per call; -1 (unset) injects nothing.
int64_t injected_failure_tile() {
  const char* value = std::getenv("ALIGNFAST_TEST_FAIL_TILE");
  if (value == nullptr || *value == '\0') return -1;
  char* end = nullptr;
  const long long tile = std::strtoll(value, &end, 10);
  return *end == '\0' && tile >= 0 ? tile : -1;  // anything but a tile number ("off", "") injects nothing
}

// One row's stats from its tiles' (lse_k, H_k) (stride apart in memory), k_t the tile holding the target and
// lp_t the target's logprob within that tile. Same conventions as logprobs::finish_row for non-finite rows.
template <typename acc_t>
RowStats<acc_t> merge_tiles(const acc_t* lse, const acc_t* ent, int64_t stride, int64_t tiles, int64_t k_t,
                            acc_t lp_t) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  double L = -inf;
  for (int64_t k = 0; k < tiles; ++k) L = logprobs::nan_max(L, static_cast<double>(lse[k * stride]));
  if (L != L) return {nan, nan, nan};  // a tile with a NaN logit
  if (L == -inf) return {nan, nan, static_cast<acc_t>(-inf)};
  const double lse_t = lse[k_t * stride];
  if (L == inf) return {lse_t == inf ? lp_t : static_cast<acc_t>(-inf), nan, static_cast<acc_t>(inf)};
  double lse_all, lp;
  if (lse_t == -inf) {  // every logit of the target's tile is -inf: so is the target's
    double s = 0;
    for (int64_t k = 0; k < tiles; ++k) s += std::exp(static_cast<double>(lse[k * stride]) - L);
    lse_all = L + std::log(s);
    lp = -inf;
  } else if (L - lse_t < 30) {
    // lse = lse_t + log1p(rest): the target's tile holds (most of) the mass, keep log p_t's small value exact
    double rest = 0;
    for (int64_t k = 0; k < tiles; ++k) {
      if (k != k_t) rest += std::exp(static_cast<double>(lse[k * stride]) - lse_t);
    }
    const double l1p = std::log1p(rest);
    lse_all = lse_t + l1p;
    lp = static_cast<double>(lp_t) - l1p;
  } else {
    double s = 0;
    for (int64_t k = 0; k < tiles; ++k) s += std::exp(static_cast<double>(lse[k * stride]) - L);
    lse_all = L + std::log(s);
    lp = static_cast<double>(lp_t) + (lse_t - lse_all);
  }
  double h = 0;
  if (ent != nullptr) {
    // H = sum_k w_k (H_k + lse - lse_k), w_k = e^{lse_k - lse}: the mixture's entropy, every term >= 0.
    for (int64_t k = 0; k < tiles; ++k) {
      const double lk = lse[k * stride];
      if (lk == -inf) continue;
      h += std::exp(lk - lse_all) * (static_cast<double>(ent[k * stride]) + (lse_all - lk));
    }
  }
  return {static_cast<acc_t>(lp), static_cast<acc_t>(h), static_cast<acc_t>(lse_all)};
}

// W[v0 : v0 + cols] in the accumulation type: a view of W itself, or (low-precision weights) converted into the
// worker's buffer (flat, >= cols x H elements).
at::Tensor weight_tile(at::Tensor& buffer, const at::Tensor& weight, int64_t v0, int64_t cols) {
  const at::Tensor w = weight.narrow(0, v0, cols);
  if (weight.scalar_type() == buffer.scalar_type()) return w;
  return buffer.narrow(0, 0, cols * weight.size(1)).view({cols, weight.size(1)}).copy_(w);
}

// z = h @ w.T + b[v0 : v0 + cols] (w: the tile's rows of W, in h's type), written into the worker's buffer
// (flat, >= rows x cols elements): one allocation per worker instead of one per tile, whose pages would be
// faulted in again each time (large allocations are fresh mmaps).
at::Tensor tile_logits(at::Tensor& buffer, const at::Tensor& h, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias, int64_t v0) {
  const int64_t cols = w.size(0);
  at::Tensor z = buffer.narrow(0, 0, h.size(0) * cols).view({h.size(0), cols});
  if (bias.has_value()) z.copy_(bias->narrow(0, v0, cols).unsqueeze(0).expand_as(z));
  cpu::gemm_into(z, h, w.t(), /*accumulate=*/bias.has_value());
  return z;
}

// One weight-tile buffer per worker for low-precision weights (none needed otherwise).
std::vector<at::Tensor> weight_buffers(const at::Tensor& weight, const Tiling& tl, const at::TensorOptions& acc,
                                       bool convert = true) {
  convert = convert && weight.scalar_type() != acc.dtype().toScalarType();
  std::vector<at::Tensor> bufs(tl.threads);
  for (auto& b : bufs) b = at::empty({convert ? tl.cols * weight.size(1) : 0}, acc);
  return bufs;
}

// ---------------------------------------------------------------- bf16 weights on bf16 dot products

// The tile GEMMs of bfloat16 inputs as bf16 x bf16 -> float32 products (cpu/bf16_gemm.h), where the CPU has them:
// no float32 copy of W's tiles or of hidden, and ~3x the float32 GEMM rate on the Zen 5 (bench/NOTES-gemm.md).
//   z      = h @ W[tile].T + b     float32, from the bf16 operands as given: the float32 path's logits up to the
//                                  order of the float32 sums;
//   dh    += bf16(dz) @ W[tile]    dz rounded to bf16 for the products, as eager autograd's bf16 logits gradient
//   dW[tile] = bf16(dz).T @ h      is; products and sums in float32, dh and dW rounded once at the end.
// Per worker one buffer for W's tile, packed transposed for z and then row-wise for dh, and one for bf16(dz),
// row-major for dh and then transposed for dW; per row block h's rows packed for dW, shared by the workers.
// The shapes handed to brgemm depend on H, the tile width and the block of rows only through bf16::gemm's row
// blocks (cpu/bf16_gemm.h: each distinct shape is a kernel kept for the thread's life): the tile width comes from
// the budget per row, which does not vary with the row count (default chunk sizes), and dW's sum over rows runs
// in chunks of kRowChunk rows (the last padded to a multiple of 16 with zeros), each its own [cols, kRowChunk]
// block of the transposed dz.
class Bf16Tiles {
 public:
  static constexpr int64_t kRowChunk = 256;
  static constexpr int64_t kRowGranule = 16;  // the products' rows: row blocks and their padding
  static int64_t padded(int64_t rows) { return cpu::bf16::round_up(rows, kRowGranule); }

  // rows: the valid rows of hidden (bf16, [n, H]); weight: bf16 [V, H]; cols: the tiling's widest tile.
  Bf16Tiles(const at::Tensor& rows, const at::Tensor& weight, int64_t tile_rows, int64_t cols, int64_t threads,
            bool need_dh, bool need_dw)
      : H_(rows.size(1)), Hp_(cpu::bf16::even(H_)), w_(weight.contiguous()) {
    const int64_t n = rows.size(0);
    if (Hp_ == H_ && padded(n) == n && rows.is_contiguous()) {
      h_ = rows;
    } else {  // zero rows up to a multiple of 16, and a zero column for an odd H (the products' K is even)
      h_ = at::zeros({padded(n), Hp_}, rows.options());
      h_.narrow(0, 0, n).narrow(1, 0, H_).copy_(rows);
    }
    using cpu::bf16::even;
    using cpu::bf16::packed_numel;
    const int64_t R = std::min(tile_rows, rows.size(0));
    const int64_t chunks = (R + kRowChunk - 1) / kRowChunk;
    const int64_t w_size = std::max(packed_numel(Hp_, cols), need_dh ? packed_numel(even(cols), H_) : int64_t(0));
    const int64_t dz_size =
        std::max(need_dh ? padded(R) * even(cols) : int64_t(0), need_dw ? chunks * cols * kRowChunk : int64_t(0));
    for (int64_t i = 0; i < threads; ++i) {
      workers_.push_back({at::empty({w_size}, rows.options()), at::empty({dz_size}, rows.options())});
    }
    if (need_dw) h_packed_ = at::empty({chunks * packed_numel(kRowChunk, H_)}, rows.options());
  }

  // Packs h[r0 : r0 + R] for the dW products of the row block, chunk by chunk (before its tiles are handed out).
  void start_block(int64_t r0, int64_t R) {
    if (!h_packed_.defined()) return;
    for (int64_t c0 = 0, k = 0; c0 < R; c0 += kRowChunk, ++k) {
      const int64_t rows = std::min(kRowChunk, R - c0);
      cpu::bf16::pack_rows(h_ptr(r0 + c0), Hp_, rows, H_, h_packed() + k * cpu::bf16::packed_numel(kRowChunk, H_),
                           chunk_k(rows));
    }
  }

  // z[R, cols] = h[r0 : r0 + R] @ W[v0 : v0 + cols].T + b, into the worker's float32 buffer (flat, padded(R) x
  // cols: the product runs over the padded rows, whose logits nobody reads).
  at::Tensor logits(int64_t slot, at::Tensor& buffer, const std::optional<at::Tensor>& bias, int64_t r0, int64_t R,
                    int64_t v0, int64_t cols) {
    Worker& w = workers_[slot];
    cpu::bf16::pack_transposed(w_ptr(v0), H_, H_, cols, bf(w.w), Hp_);
    const int64_t Rp = padded(R);
    at::Tensor z = buffer.narrow(0, 0, Rp * cols).view({Rp, cols});
    if (bias.has_value()) z.copy_(bias->narrow(0, v0, cols).unsqueeze(0).expand_as(z));
    cpu::bf16::gemm(z.data_ptr<float>(), cols, h_ptr(r0), Hp_, Rp, bf(w.w), Hp_, cols, bias.has_value());
    return z.narrow(0, 0, R);
  }

  // Once dz (float32, [R, cols]) is formed: rounds it for dh's product and packs W's tile row-wise (outside the
  // ordered turn in which add_dh runs).
  void prepare_dh(int64_t slot, const at::Tensor& dz, int64_t v0) {
    Worker& w = workers_[slot];
    const int64_t R = dz.size(0), cols = dz.size(1);
    const int64_t Kp = cpu::bf16::even(cols);
    cpu::bf16::round_for_products(dz.const_data_ptr<float>(), cols, R, cols, bf(w.dz), nullptr, 0);
    std::fill(bf(w.dz) + R * Kp, bf(w.dz) + padded(R) * Kp, c10::BFloat16(0.0f));  // padded rows
    cpu::bf16::pack_rows(w_ptr(v0), H_, cols, H_, bf(w.w), Kp);
  }

  // dh_blk[R, H] += bf16(dz) @ W[tile]   (dh_blk: float32 [padded(R), H] rows: the padded rows get += 0)
  void add_dh(int64_t slot, const at::Tensor& dh_blk, int64_t R, int64_t cols) {
    Worker& w = workers_[slot];
    const int64_t Kp = cpu::bf16::even(cols);
    TORCH_CHECK(dh_blk.size(0) == padded(R) && dh_blk.size(1) == H_ && dh_blk.is_contiguous(),
                "alignfast: internal: dh block of ", dh_blk.sizes(), " for ", R, " rows");
    cpu::bf16::gemm(dh_blk.data_ptr<float>(), H_, bf(w.dz), Kp, padded(R), bf(w.w), Kp, H_,
                    /*accumulate=*/true);
  }

  // dw[cols, H] (+)= bf16(dz).T @ h[r0 : r0 + R]   (dw: float32, contiguous rows of H; after add_dh)
  void dw(int64_t slot, const at::Tensor& dz, const at::Tensor& dw, bool accumulate) {
    Worker& w = workers_[slot];
    const int64_t R = dz.size(0), cols = dz.size(1);
    for (int64_t c0 = 0, k = 0; c0 < R; c0 += kRowChunk, ++k) {
      const int64_t rows = std::min(kRowChunk, R - c0);
      c10::BFloat16* dz_t = bf(w.dz) + k * cols * kRowChunk;
      cpu::bf16::round_for_products(dz.const_data_ptr<float>() + c0 * cols, cols, rows, cols, nullptr, dz_t,
                                    kRowChunk);
      cpu::bf16::gemm(dw.data_ptr<float>(), H_, dz_t, kRowChunk, cols,
                      h_packed() + k * cpu::bf16::packed_numel(kRowChunk, H_), chunk_k(rows), H_,
                      accumulate || k > 0);
    }
  }

 private:
  // Uninitialised (at::empty): every element a product reads is written first, the packers and the roundings
  // filling their padding with zeros.
  struct Worker {
    at::Tensor w, dz;  // bf16, flat
  };
  // A chunk's K in dW's product: its rows padded to a multiple of 16 (16 values in all).
  static int64_t chunk_k(int64_t rows) { return cpu::bf16::round_up(rows, kRowGranule); }
  static c10::BFloat16* bf(const at::Tensor& t) { return t.data_ptr<c10::BFloat16>(); }
  c10::BFloat16* h_packed() { return bf(h_packed_); }
  const c10::BFloat16* h_ptr(int64_t r0) const { return h_.const_data_ptr<c10::BFloat16>() + r0 * Hp_; }
  const c10::BFloat16* w_ptr(int64_t v0) const { return w_.const_data_ptr<c10::BFloat16>() + v0 * H_; }

  int64_t H_, Hp_;
  at::Tensor h_, w_;
  std::vector<Worker> workers_;
  at::Tensor h_packed_;  // bf16, flat; undefined without dW
};

// Whether bfloat16 inputs take the bf16-product path here (Bf16Tiles).
bool bf16_products(const at::Tensor& hidden, const at::Tensor& weight) {
  return hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && hidden.device().is_cpu() &&
         cpu::bf16::available();
}

// Forward over vocabulary tiles; h, tok: the valid rows, h and bias in the accumulation type (weight in any
// floating type). Writes logprob, entropy (if with_entropy), lse.
// bf16: h holds the valid rows in bf16 and the products are Bf16Tiles' (bf16_products); else h is in acc_t.
template <typename acc_t>
void tiled_forward(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const int64_t* tok, double temperature, bool with_entropy, int64_t chunk, acc_t* out_lp,
                   acc_t* out_ent, acc_t* out_lse, bool bf16) {
  const int64_t n = h.size(0), V = weight.size(0);
  const Tiling tl = tiling(n, V, h.size(1), chunk, bf16 ? Bf16Tiles::kRowGranule : 1);
  const auto acc_opts = h.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::optional<Bf16Tiles> bf;
  if (bf16) bf.emplace(h, weight, tl.rows, tl.cols, tl.threads, /*need_dh=*/false, /*need_dw=*/false);
  const int64_t tiles = (V + tl.cols - 1) / tl.cols;
  const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < V, "alignfast: argument 'tokens' holds token id ", tok[i], " outside [0, ",
                V, ") at a valid position");
  }
  std::vector<at::Tensor> z_buf(tl.threads);
  const int64_t z_rows = bf16 ? Bf16Tiles::padded(std::min(tl.rows, n)) : std::min(tl.rows, n);
  for (auto& b : z_buf) b = at::empty({z_rows * tl.cols}, acc_opts);
  std::vector<at::Tensor> w_buf = weight_buffers(weight, tl, acc_opts, /*convert=*/!bf16);
  for (int64_t r0 = 0; r0 < n; r0 += tl.rows) {
    const int64_t R = std::min(tl.rows, n - r0);
    const at::Tensor h_blk = h.narrow(0, r0, R);
    // Per tile and row: lse_k and H_k ([tiles, R]); per row: the target's tile logprob. Each tile's entries
    // are written by the one worker that does the tile.
    std::vector<acc_t> lse_k(tiles * R), ent_k(with_entropy ? tiles * R : 0), lp_t(R);
    for_tiles(tiles, tl.threads, [&](int64_t k, int64_t slot) {
      const int64_t v0 = k * tl.cols, cols = std::min(tl.cols, V - v0);
      const at::Tensor z = bf ? bf->logits(slot, z_buf[slot], bias, r0, R, v0, cols)
                              : tile_logits(z_buf[slot], h_blk, weight_tile(w_buf[slot], weight, v0, cols), bias, v0);
      const acc_t* zp = z.const_data_ptr<acc_t>();
      parallel_rows(R, cols, [&](int64_t begin, int64_t end) {  // inline inside for_tiles' workers
        for (int64_t i = begin; i < end; ++i) {
          const int64_t t = tok[r0 + i] - v0;
          const bool here = t >= 0 && t < cols;
          const RowStats<acc_t> st =
              logprobs::forward_row<acc_t, acc_t>(zp + i * cols, cols, here ? t : 0, inv_temp, with_entropy);
          lse_k[k * R + i] = st.lse;
          if (with_entropy) ent_k[k * R + i] = st.entropy;
          if (here) lp_t[i] = st.logprob;
        }
      });
    });
    for (int64_t i = 0; i < R; ++i) {
      const RowStats<acc_t> st = merge_tiles<acc_t>(lse_k.data() + i, with_entropy ? ent_k.data() + i : nullptr, R,
                                                    tiles, tok[r0 + i] / tl.cols, lp_t[i]);
      out_lp[r0 + i] = st.logprob;
      out_lse[r0 + i] = st.lse;
      if (with_entropy) out_ent[r0 + i] = st.entropy;
    }
  }
}

// Backward over vocabulary tiles; h, tok and the stats: the valid rows, h and bias in the accumulation type.
// d_hidden_rows: [n, H] in the accumulation type to add dh into (zeros); d_weight: [V, H] in W's type (any
// contents: every row is written); d_bias: [V] zeros in the accumulation type.
template <typename acc_t>
void tiled_backward(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const int64_t* tok, const acc_t* g_lp, const acc_t* g_ent, const acc_t* lp, const acc_t* ent,
                    const acc_t* ls, double temperature, int64_t chunk, at::Tensor* d_hidden_rows,
                    at::Tensor* d_weight, at::Tensor* d_bias, bool bf16) {
  const int64_t n = h.size(0), V = weight.size(0), H = h.size(1);
  const Tiling tl = tiling(n, V, H, chunk, bf16 ? Bf16Tiles::kRowGranule : 1);
  const int64_t tiles = (V + tl.cols - 1) / tl.cols;
  const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
  const auto acc_opts = h.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::optional<Bf16Tiles> bf;
  if (bf16) bf.emplace(h, weight, tl.rows, tl.cols, tl.threads, d_hidden_rows != nullptr, d_weight != nullptr);
  // Each tile's dz @ W[tile] is added into dh in tile order (OrderedTurns): dh's rounding is the same for
  // any schedule. dW[tile] and db[tile] belong to one tile and so to one worker.
  std::vector<at::Tensor> z_buf(tl.threads);
  const int64_t z_rows = bf16 ? Bf16Tiles::padded(std::min(tl.rows, n)) : std::min(tl.rows, n);
  for (auto& b : z_buf) b = at::empty({z_rows * tl.cols}, acc_opts);
  const bool convert = weight.scalar_type() != acc_opts.dtype().toScalarType();
  // Low-precision dW over several row blocks: summed over the blocks in float32, rounded once at the end.
  at::Tensor dw_acc = d_weight != nullptr && convert && tl.rows < n ? at::empty({V, H}, acc_opts) : at::Tensor();
  // The float32 W tile per worker (converted weights), which with one row block also receives dW[tile]; the
  // bf16 products need it only for that.
  std::vector<at::Tensor> w_buf =
      weight_buffers(weight, tl, acc_opts, /*convert=*/!bf16 || (d_weight != nullptr && !dw_acc.defined()));
  OrderedTurns turns;
  const int64_t failure_tile = injected_failure_tile();
  for (int64_t r0 = 0; r0 < n; r0 += tl.rows) {
    const int64_t R = std::min(tl.rows, n - r0);
    const at::Tensor h_blk = h.narrow(0, r0, R);
    turns.reset();
    if (bf) bf->start_block(r0, R);
    turns.run([&] { for_tiles(tiles, tl.threads, [&](int64_t k, int64_t slot) {
      try {
        if (k == failure_tile) {
          throw std::runtime_error("ALIGNFAST_TEST_FAIL_TILE: injected failure in tile " + std::to_string(k));
        }
        const int64_t v0 = k * tl.cols, cols = std::min(tl.cols, V - v0);
        at::Tensor w;  // the float32 path's W tile, read by the logits and the dh product
        at::Tensor dz = bf ? bf->logits(slot, z_buf[slot], bias, r0, R, v0, cols)
                           : tile_logits(z_buf[slot], h_blk, w = weight_tile(w_buf[slot], weight, v0, cols), bias, v0);
        acc_t* zp = dz.data_ptr<acc_t>();  // dz becomes dL/dz in place
        parallel_rows(R, 2 * cols, [&](int64_t begin, int64_t end) {  // inline inside for_tiles' workers
          for (int64_t i = begin; i < end; ++i) {
            const int64_t r = r0 + i, t = tok[r] - v0;
            const RowStats<acc_t> st{lp[r], ent ? ent[r] : acc_t(0), ls[r]};
            // In place: each element is read before it is written, the target last.
            logprobs::backward_row<acc_t, acc_t, acc_t>(zp + i * cols, cols, (t >= 0 && t < cols) ? t : -1,
                                                        inv_temp, st, g_lp[r], g_ent ? g_ent[r] : acc_t(0),
                                                        zp + i * cols);
          }
        });
        if (d_bias != nullptr) d_bias->narrow(0, v0, cols).add_(dz.sum(0));
        if (d_hidden_rows != nullptr) {
          if (bf) bf->prepare_dh(slot, dz, v0);
          // dh += dz @ w in tile order, straight into the sum: no [R, H] partial per worker; while one worker
          // adds its product, the other is recomputing or differentiating its next tile.
          const at::Tensor dh_blk = d_hidden_rows->narrow(0, r0, bf ? Bf16Tiles::padded(R) : R);
          turns.in_turn(k, [&] {
            if (bf) {
              bf->add_dh(slot, dh_blk, R, cols);
            } else {
              cpu::gemm_into(dh_blk, dz, w, /*accumulate=*/true);
            }
          });
        }
        if (d_weight != nullptr) {
          // Where dW[tile] is formed: the gradient itself; for low-precision weights the float32 sum over row
          // blocks, or with one block the worker's W tile buffer (w is not read after the dh product above).
          at::Tensor dw = !convert ? d_weight->narrow(0, v0, cols)
                          : dw_acc.defined() ? dw_acc.narrow(0, v0, cols)
                                             : w_buf[slot].narrow(0, 0, cols * H).view({cols, H});
          if (bf) {
            bf->dw(slot, dz, dw, /*accumulate=*/r0 > 0);
          } else {
            cpu::gemm_into(dw, dz.t(), h_blk, /*accumulate=*/r0 > 0);
          }
          if (convert && !dw_acc.defined()) d_weight->narrow(0, v0, cols).copy_(dw);
        }
      } catch (const OrderedTurns::Abandoned&) {
        throw;  // another worker failed first: its error is the one run() rethrows
      } catch (...) {
        turns.fail(std::current_exception());
        throw;
      }
    }); });
  }
  if (dw_acc.defined()) d_weight->copy_(dw_acc);
}

// ---------------------------------------------------------------- entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& tokens,
    const std::optional<at::Tensor>& mask, double temperature, bool with_entropy, int64_t chunk) {
  const Inputs in = check_inputs(hidden, weight, bias, tokens, mask, temperature, chunk);
  const auto opts = hidden.options().dtype(in.acc);
  at::Tensor logprobs = at::zeros({in.N}, opts);
  at::Tensor entropy = at::zeros({with_entropy ? in.N : 0}, opts);
  at::Tensor lse = at::zeros({in.N}, opts);
  const auto rows = valid_rows(mask);
  const at::Tensor h = take(hidden, rows);
  const at::Tensor tok = take(tokens, rows);
  const int64_t n = h.size(0);
  at::Tensor lp_v = at::empty({n}, opts), ent_v = at::empty({with_entropy ? n : 0}, opts), lse_v = at::empty({n}, opts);
  const int64_t* t_ptr = tok.const_data_ptr<int64_t>();
  // Low-precision inputs: bf16 products where the CPU has them (Bf16Tiles), else the GEMMs run in float32
  // (hidden and bias converted once, W a tile at a time).
  const bool bf16 = bf16_products(hidden, weight);
  const at::Tensor h_acc = bf16 ? h : h.to(in.acc);
  const std::optional<at::Tensor> b_acc = bias.has_value() ? std::optional<at::Tensor>(bias->to(in.acc)) : std::nullopt;

  AT_DISPATCH_FLOATING_TYPES(in.acc, "linear_token_logprobs_cpu", [&] {
    tiled_forward<scalar_t>(h_acc, weight, b_acc, t_ptr, temperature, with_entropy, chunk, lp_v.data_ptr<scalar_t>(),
                            with_entropy ? ent_v.data_ptr<scalar_t>() : nullptr, lse_v.data_ptr<scalar_t>(), bf16);
  });
  if (rows.has_value()) {
    logprobs.index_copy_(0, *rows, lp_v);
    lse.index_copy_(0, *rows, lse_v);
    if (with_entropy) entropy.index_copy_(0, *rows, ent_v);
    return {logprobs, entropy, lse};
  }
  return {lp_v, ent_v, lse_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& tokens,
    const std::optional<at::Tensor>& mask, const at::Tensor& logprobs, const at::Tensor& entropy,
    const at::Tensor& lse, double temperature, int64_t chunk, bool need_hidden, bool need_weight, bool need_bias,
    const std::optional<at::Tensor>& weight_grad_out) {
  const Inputs in = check_inputs(hidden, weight, bias, tokens, mask, temperature, chunk);
  const bool into_out = need_weight && weight_grad_out.has_value();
  if (into_out) {
    ALIGNFAST_CHECK_ARG(weight_grad_out->sizes() == weight.sizes() && weight_grad_out->scalar_type() ==
                            weight.scalar_type() && weight_grad_out->is_contiguous() &&
                            weight_grad_out->device() == weight.device(),
                        "weight_grad_out", "must be a contiguous ", weight.scalar_type(), " ", weight.sizes(),
                        " tensor on the weight's device, got ", weight_grad_out->scalar_type(), " ",
                        weight_grad_out->sizes());
  }
  need_bias = need_bias && bias.has_value();
  const bool with_entropy = grad_entropy.has_value();
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    ALIGNFAST_CHECK_ARG(t.scalar_type() == in.acc && t.dim() == 1 && t.size(0) == in.N, name, "must be ", in.acc,
                        " [", in.N, "], got ", t.scalar_type(), " ", t.sizes());
  };
  check_stat(grad_logprobs, "grad_logprobs");
  check_stat(logprobs, "logprobs");
  check_stat(lse, "lse");
  if (with_entropy) {
    check_stat(*grad_entropy, "grad_entropy");
    check_stat(entropy, "entropy");
  }
  const auto acc_opts = hidden.options().dtype(in.acc);
  const auto rows = valid_rows(mask);
  // float32 for low-precision inputs (GEMMs in float32), except on the bf16 products (Bf16Tiles)
  const bool bf16 = bf16_products(hidden, weight);
  const at::Tensor h = bf16 ? take(hidden, rows) : take(hidden, rows).to(in.acc);
  const std::optional<at::Tensor> b_acc = bias.has_value() ? std::optional<at::Tensor>(bias->to(in.acc)) : std::nullopt;
  const at::Tensor tok = take(tokens, rows);
  const at::Tensor g_lp = take(grad_logprobs.contiguous(), rows);
  const at::Tensor g_ent = with_entropy ? take(grad_entropy->contiguous(), rows) : at::Tensor();
  const at::Tensor lp = take(logprobs.contiguous(), rows);
  const at::Tensor ent = with_entropy ? take(entropy.contiguous(), rows) : at::Tensor();
  const at::Tensor ls = take(lse.contiguous(), rows);
  const int64_t n = h.size(0);

  // dW is written tile by tile (rows of W no valid row reaches stay 0 only when n = 0). dh and db are summed
  // in the accumulation type: into the gradient itself when it has that type and every row is valid.
  // weight_grad_out: dW is written into the caller's buffer (any contents, like at::empty's) and the op
  // returns an empty dW; a buffer reused across calls is not page-faulted in again (ops/weight_grad_buffer.py).
  at::Tensor d_weight = !need_weight ? at::empty({0}, weight.options())
                        : into_out   ? *weight_grad_out
                                     : at::empty({in.V, in.H}, weight.options());
  if (need_weight && n == 0) d_weight.zero_();
  const bool dh_direct = !rows.has_value() && hidden.scalar_type() == in.acc;
  at::Tensor d_hidden = need_hidden && dh_direct ? at::zeros({in.N, in.H}, hidden.options()) : at::Tensor();
  // The bf16 products write dh in rows padded to a multiple of 16 (Bf16Tiles: only the last row block is partial).
  const int64_t dh_store_rows = bf16 ? Bf16Tiles::padded(n) : n;
  at::Tensor dh_rows =
      need_hidden ? (dh_direct ? d_hidden : at::zeros({dh_store_rows, in.H}, acc_opts)) : at::Tensor();
  at::Tensor d_bias_acc = need_bias ? at::zeros({in.V}, acc_opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.acc, "linear_token_logprobs_backward_cpu", [&] {
    tiled_backward<scalar_t>(h, weight, b_acc, tok.const_data_ptr<int64_t>(), g_lp.const_data_ptr<scalar_t>(),
                             with_entropy ? g_ent.const_data_ptr<scalar_t>() : nullptr, lp.const_data_ptr<scalar_t>(),
                             with_entropy ? ent.const_data_ptr<scalar_t>() : nullptr, ls.const_data_ptr<scalar_t>(),
                             temperature, chunk, need_hidden ? &dh_rows : nullptr, need_weight ? &d_weight : nullptr,
                             need_bias ? &d_bias_acc : nullptr, bf16);
  });
  if (need_hidden && !dh_direct) {
    const at::Tensor dh = dh_rows.narrow(0, 0, n).to(hidden.scalar_type());
    if (rows.has_value()) {
      d_hidden = at::zeros({in.N, in.H}, hidden.options());
      d_hidden.index_copy_(0, *rows, dh);
    } else {
      d_hidden = dh;
    }
  }
  if (!need_hidden) d_hidden = at::empty({0}, hidden.options());
  at::Tensor d_bias = need_bias ? d_bias_acc.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  if (into_out) d_weight = at::empty({0}, weight.options());
  return {d_hidden, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("linear_token_logprobs", &linear_token_logprobs_cpu);
  m.impl("linear_token_logprobs_backward", &linear_token_logprobs_backward_cpu);
}

}  // namespace alignfast
