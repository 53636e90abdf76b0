// CPU kernels of alignfast::linear_token_logprobs and its backward: token_logprobs(hidden @ W.T + b)
// without ever holding the [N, V] logits.
//
// Rows are processed in chunks of `chunk` valid rows (masked rows are dropped before any matmul):
//   forward   z = hidden[chunk] @ W.T + b   ([chunk, V], float32 - float64 for float64 inputs)
//             the row kernels of logprobs_rows.h reduce z to logprob, entropy and lse per row.
//   backward  z is recomputed, turned into dz in place by the row kernels (from the saved stats), then
//             dhidden[chunk] = dz @ W,  dW += dz.T @ hidden[chunk],  db += sum_rows dz.
// The matmuls are at::mm (MKL/oneDNN). Low-precision inputs never produce low-precision partials:
// W is converted to float32 one tile of rows at a time (a tile is small next to the chunk's logits) and
// the products and dW accumulate in float32, rounded once at the end.
// Forward: threads take whole sub-chunks (chunk / threads rows each) with single-threaded GEMMs. Backward:
// chunks in order with multithreaded GEMMs, so that dW and db are summed in a fixed order (reproducible).
// Peak extra memory: [chunk, V] float32 logits in all (+ a float32 W tile per thread, and for bf16/fp16
// weights a float32 dW).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/logprobs_rows.h"

namespace alignfast {
namespace {

using logprobs::RowStats;

constexpr int64_t kWeightTileBytes = int64_t(8) << 20;  // float32 copy of a tile of W rows

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
  ALIGNFAST_CHECK_ARG(std::isfinite(temperature) && temperature > 0, "temperature", "must be finite and > 0, got ",
                      temperature);
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

int64_t weight_tile_rows(int64_t V, int64_t H) {
  return std::min<int64_t>(V, std::max<int64_t>(64, kWeightTileBytes / (4 * std::max<int64_t>(H, 1))));
}

// Apply fn(v0, rows, W tile in the accumulation type) over tiles of W's rows; one tile for float32/64 weights.
template <typename Fn>
void for_weight_tiles(const at::Tensor& weight, at::ScalarType acc, Fn&& fn) {
  const int64_t V = weight.size(0);
  if (weight.scalar_type() == acc) {
    fn(0, V, weight);
    return;
  }
  const int64_t tile = weight_tile_rows(V, weight.size(1));
  for (int64_t v0 = 0; v0 < V; v0 += tile) {
    const int64_t rows = std::min(tile, V - v0);
    fn(v0, rows, weight.narrow(0, v0, rows).to(acc));
  }
}

// fn(r0, rows) over chunks of rows. Threads take whole chunks (each runs its GEMM single-threaded, inside
// the parallel region) rather than sharing each small GEMM: a multithreaded GEMM of few rows ends in a
// barrier per call, which costs more than it parallelises (bench/NOTES-logprobs.md). A chunk of `chunk`
// rows is split over the threads, so at most `chunk` rows of logits are live at once, as documented.
template <typename Fn>
void for_row_chunks(int64_t n, int64_t chunk, Fn&& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t sub = std::max<int64_t>(1, (chunk + threads - 1) / threads);
  const int64_t tasks = (n + sub - 1) / sub;
  // The tasks call ATen ops: give the worker threads this thread's dispatch state (below autograd, as the
  // kernel is), or they would route the tensors that require grad back through autograd.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * sub;
      fn(r0, std::min(sub, n - r0));
    }
  });
}

// z = h @ W.T + b for one chunk of rows, [rows, V] in the accumulation type.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::ScalarType acc) {
  if (weight.scalar_type() == acc) {
    return bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
  }
  at::Tensor z = at::empty({h.size(0), weight.size(0)}, h.options().dtype(acc));
  const at::Tensor h_acc = h.to(acc);
  for_weight_tiles(weight, acc, [&](int64_t v0, int64_t rows, const at::Tensor& w) {
    at::Tensor out = z.narrow(1, v0, rows);
    at::mm_out(out, h_acc, w.t());
  });
  if (bias.has_value()) z.add_(bias->to(acc));
  return z;
}

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

  AT_DISPATCH_FLOATING_TYPES(in.acc, "linear_token_logprobs_cpu", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    for_row_chunks(n, chunk, [&](int64_t r0, int64_t c) {
      const at::Tensor z = chunk_logits(h.narrow(0, r0, c), weight, bias, in.acc);
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < c; ++i) {
        const int64_t t = t_ptr[r0 + i];
        TORCH_CHECK(t >= 0 && t < in.V, "alignfast: argument 'tokens' holds token id ", t, " outside [0, ", in.V,
                    ") at a valid position");
        const RowStats<scalar_t> st = logprobs::forward_row<scalar_t, scalar_t>(zp + i * in.V, in.V, t, inv_temp,
                                                                                  with_entropy);
        lp_v.data_ptr<scalar_t>()[r0 + i] = st.logprob;
        lse_v.data_ptr<scalar_t>()[r0 + i] = st.lse;
        if (with_entropy) ent_v.data_ptr<scalar_t>()[r0 + i] = st.entropy;
      }
    });
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
    const at::Tensor& lse, double temperature, int64_t chunk, bool need_hidden, bool need_weight, bool need_bias) {
  const Inputs in = check_inputs(hidden, weight, bias, tokens, mask, temperature, chunk);
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
  const bool weight_is_acc = weight.scalar_type() == in.acc;
  at::Tensor d_hidden = need_hidden ? at::zeros({in.N, in.H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor d_weight_acc = need_weight ? at::zeros({in.V, in.H}, acc_opts) : at::Tensor();
  at::Tensor d_bias_acc = need_bias ? at::zeros({in.V}, acc_opts) : at::Tensor();

  const auto rows = valid_rows(mask);
  const at::Tensor h = take(hidden, rows);
  const at::Tensor tok = take(tokens, rows);
  const at::Tensor g_lp = take(grad_logprobs.contiguous(), rows);
  const at::Tensor g_ent = with_entropy ? take(grad_entropy->contiguous(), rows) : at::Tensor();
  const at::Tensor lp = take(logprobs.contiguous(), rows);
  const at::Tensor ent = with_entropy ? take(entropy.contiguous(), rows) : at::Tensor();
  const at::Tensor ls = take(lse.contiguous(), rows);
  const int64_t n = h.size(0);

  AT_DISPATCH_FLOATING_TYPES(in.acc, "linear_token_logprobs_backward_cpu", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    const int64_t* t_ptr = tok.const_data_ptr<int64_t>();
    // Chunks one after the other, each GEMM multithreaded: dW and db are sums over chunks, and a fixed
    // order keeps the gradients bitwise reproducible (threads racing for a lock would not).
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t c = std::min(chunk, n - r0);
      const at::Tensor h_c = h.narrow(0, r0, c);
      at::Tensor dz = chunk_logits(h_c, weight, bias, in.acc);  // becomes dL/dz in place
      scalar_t* zp = dz.data_ptr<scalar_t>();
      parallel_rows(c, 2 * in.V, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t r = r0 + i;
          const RowStats<scalar_t> st{lp.const_data_ptr<scalar_t>()[r],
                                      with_entropy ? ent.const_data_ptr<scalar_t>()[r] : scalar_t(0),
                                      ls.const_data_ptr<scalar_t>()[r]};
          const scalar_t ge = with_entropy ? g_ent.const_data_ptr<scalar_t>()[r] : scalar_t(0);
          // In place: each element is read before it is written, the target last.
          logprobs::backward_row<scalar_t, scalar_t, scalar_t>(zp + i * in.V, in.V, t_ptr[r], inv_temp, st,
                                                               g_lp.const_data_ptr<scalar_t>()[r], ge,
                                                               zp + i * in.V);
        }
      });
      if (need_bias) d_bias_acc.add_(dz.sum(0));
      if (!need_hidden && !need_weight) continue;
      const at::Tensor h_acc = h_c.to(in.acc);
      at::Tensor dh_c = need_hidden ? (weight_is_acc ? at::Tensor() : at::zeros({c, in.H}, acc_opts)) : at::Tensor();
      for_weight_tiles(weight, in.acc, [&](int64_t v0, int64_t vrows, const at::Tensor& w) {
        const at::Tensor dz_tile = weight_is_acc ? dz : dz.narrow(1, v0, vrows);
        if (need_hidden) {
          if (weight_is_acc) {
            dh_c = at::mm(dz_tile, w);
          } else {
            dh_c.addmm_(dz_tile, w);
          }
        }
        if (need_weight) d_weight_acc.narrow(0, v0, vrows).addmm_(dz_tile.t(), h_acc);
      });
      if (need_hidden) {
        const at::Tensor dh_out = dh_c.to(hidden.scalar_type());
        if (rows.has_value()) {
          d_hidden.index_copy_(0, rows->narrow(0, r0, c), dh_out);
        } else {
          d_hidden.narrow(0, r0, c).copy_(dh_out);
        }
      }
    }
  });
  at::Tensor d_weight = need_weight ? d_weight_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor d_bias = need_bias ? d_bias_acc.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  return {d_hidden, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("linear_token_logprobs", &linear_token_logprobs_cpu);
  m.impl("linear_token_logprobs_backward", &linear_token_logprobs_backward_cpu);
}

}  // namespace alignfast
