// CPU kernels of alignfast::token_logprobs and alignfast::token_logprobs_backward.
// The math and the numerics are in logprobs_rows.h; this file walks rows in parallel.
//
// logits [B, T, V] with stride(-1) == 1 (any strides over B and T, e.g. logits[:, :-1]),
// tokens [B, T] int64, mask [B, T] bool or none. Outputs float32 (float64 for float64 logits):
// logprobs [B, T], entropy [B, T] (or [0] when not requested), lse [B, T] (saved for backward).
// Masked positions are skipped: 0 in every output and a zero gradient row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/logprobs_rows.h"

namespace alignfast {
namespace {

using logprobs::RowStats;

// Nanoseconds per row, single-threaded (bench/NOTES-threads.md): ~1 ns per logit forward (AVX-512, fp32),
// ~2 ns forward + backward (the gradient row is written and first-touched).
int64_t forward_row_ns(int64_t V) { return V; }
int64_t backward_row_ns(int64_t V) { return 2 * V; }

struct RowLayout {
  int64_t B, T, V, stride_b, stride_t;
  int64_t offset(int64_t row) const { return (row / T) * stride_b + (row % T) * stride_t; }
};

RowLayout check_inputs(const at::Tensor& logits, const at::Tensor& tokens, const std::optional<at::Tensor>& mask,
                       double temperature) {
  ALIGNFAST_CHECK_ARG(logits.dim() == 3, "logits", "the op takes [B, T, V] logits, got shape ", logits.sizes());
  ALIGNFAST_CHECK_ARG(logits.size(2) >= 1, "logits", "needs a vocabulary of at least one entry");
  ALIGNFAST_CHECK_ARG(logits.size(2) == 1 || logits.stride(2) == 1, "logits", "must have unit stride over the vocabulary");
  ALIGNFAST_CHECK_ARG(tokens.scalar_type() == at::kLong, "tokens", "must be int64, got ", tokens.scalar_type());
  ALIGNFAST_CHECK_ARG(tokens.is_contiguous(), "tokens", "must be contiguous");
  ALIGNFAST_CHECK_ARG(tokens.sizes() == logits.sizes().slice(0, 2), "tokens", "has shape ", tokens.sizes(),
                      " but logits are ", logits.sizes());
  check_device(logits, "logits", tokens, "tokens");
  if (mask.has_value()) {
    ALIGNFAST_CHECK_ARG(mask->scalar_type() == at::kBool && mask->is_contiguous(), "mask", "must be a contiguous bool tensor");
    ALIGNFAST_CHECK_ARG(mask->sizes() == tokens.sizes(), "mask", "has shape ", mask->sizes(), " but tokens are ", tokens.sizes());
    check_device(logits, "logits", *mask, "mask");
  }
  ALIGNFAST_CHECK_ARG(usable_temperature(temperature), "temperature",
                      "must be finite and > 0 with 1/temperature a finite float32, got ", temperature);
  return {logits.size(0), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)};
}

at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t checked_token(const int64_t* tok, int64_t row, int64_t V) {
  const int64_t t = tok[row];
  TORCH_CHECK(t >= 0 && t < V, "alignfast: argument 'tokens' holds token id ", t, " outside [0, ", V,
              ") at a valid position (flat row ", row, ")");
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  double temperature, bool with_entropy) {
  const RowLayout L = check_inputs(logits, tokens, mask, temperature);
  const auto opts = logits.options().dtype(stats_dtype(logits));
  at::Tensor logprobs = at::empty({L.B, L.T}, opts);
  at::Tensor entropy = at::empty({with_entropy ? L.B : 0, with_entropy ? L.T : 0}, opts);
  at::Tensor lse = at::empty({L.B, L.T}, opts);
  const int64_t N = L.B * L.T;
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const bool* valid = mask.has_value() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* out_lp = logprobs.data_ptr<acc_t>();
    acc_t* out_ent = with_entropy ? entropy.data_ptr<acc_t>() : nullptr;
    acc_t* out_lse = lse.data_ptr<acc_t>();
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    parallel_rows(N, forward_row_ns(L.V), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        if (valid != nullptr && !valid[row]) {
          out_lp[row] = 0;
          out_lse[row] = 0;
          if (out_ent) out_ent[row] = 0;
          continue;
        }
        const int64_t t = checked_token(tok, row, L.V);
        const RowStats<acc_t> st = logprobs::forward_row<scalar_t, acc_t>(x + L.offset(row), L.V, t, inv_temp, with_entropy);
        out_lp[row] = st.logprob;
        out_lse[row] = st.lse;
        if (out_ent) out_ent[row] = st.entropy;
      }
    });
  });
  return {logprobs, entropy, lse};
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& tokens,
                                       const std::optional<at::Tensor>& mask, const at::Tensor& logprobs,
                                       const at::Tensor& entropy, const at::Tensor& lse, double temperature,
                                       std::optional<at::ScalarType> grad_dtype) {
  const RowLayout L = check_inputs(logits, tokens, mask, temperature);
  const at::ScalarType acc_type = stats_dtype(logits);
  const int64_t N = L.B * L.T;
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    ALIGNFAST_CHECK_ARG(t.scalar_type() == acc_type && t.is_contiguous() && t.numel() == N, name,
                        "must be a contiguous ", acc_type, " tensor of ", N, " elements, got ", t.scalar_type(), " ",
                        t.sizes());
  };
  check_stat(grad_logprobs, "grad_logprobs");
  check_stat(logprobs, "logprobs");
  check_stat(lse, "lse");
  const bool with_entropy_grad = grad_entropy.has_value();
  if (with_entropy_grad) {
    check_stat(*grad_entropy, "grad_entropy");
    check_stat(entropy, "entropy");
  }
  const at::ScalarType out_type = grad_dtype.value_or(logits.scalar_type());
  at::Tensor grad = at::empty({L.B, L.T, L.V}, logits.options().dtype(out_type));
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const bool* valid = mask.has_value() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_backward_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const in_t* x = logits.const_data_ptr<in_t>();
    const acc_t* g_lp = grad_logprobs.const_data_ptr<acc_t>();
    const acc_t* g_ent = with_entropy_grad ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* lp = logprobs.const_data_ptr<acc_t>();
    const acc_t* ent = with_entropy_grad ? entropy.const_data_ptr<acc_t>() : nullptr;
    const acc_t* ls = lse.const_data_ptr<acc_t>();
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, "token_logprobs_backward_cpu_out", [&] {
      using out_t = scalar_t;
      out_t* out = grad.data_ptr<out_t>();
      parallel_rows(N, backward_row_ns(L.V), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          out_t* o = out + row * L.V;
          if (valid != nullptr && !valid[row]) {
            std::fill(o, o + L.V, out_t(0));
            continue;
          }
          const int64_t t = checked_token(tok, row, L.V);
          const RowStats<acc_t> st{lp[row], ent ? ent[row] : acc_t(0), ls[row]};
          logprobs::backward_row<in_t, acc_t, out_t>(x + L.offset(row), L.V, t, inv_temp, st, g_lp[row],
                                                     g_ent ? g_ent[row] : acc_t(0), o);
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
}

}  // namespace alignfast
