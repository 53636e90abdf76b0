// CPU kernel of alignfast::propose_token, the fused step of Proxy-RLHF decoding.
// The math is alignfast/reference/proposal.py; per row, with no [V] scratch buffer:
//   pass 1      max of the finite logits m (and, for top_p < 1, Z = sum exp((l - m) / tau)); a NaN logit, or a +inf
//               one when T > 0, ends the row here: token -1, logprob NaN, num_allowed 0 (the spec's non-finite rule)
//   bisection   (top_p < 1 only) on the ordered bit patterns of the logits: the smallest key t with
//               sum_{key(l_j) > t} exp((l_j - m) / tau) < top_p * Z; the nucleus is {key(l) >= t}
//   pass 2      over the allowed set A = nucleus minus excluded: count, max m_A, W = sum exp((l - m_A) / T)
//   pass 3      inverse CDF in index order: the first k in A whose running sum exceeds min(u W, W^-)
// Exponentials in float (double for double logits), their sums in double. Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace alignfast {
namespace {

// Ordered integer key of a float: a < b  <=>  key(a) < key(b), and a == b  <=>  key(a) == key(b), for non-NaN values.
// -0 is keyed as +0: its bits would sort one step below, and the spec compares values (a -0 and a +0 logit are tied,
// in or out of the nucleus together, and the smallest finite logit's threshold must admit both).
template <typename acc_t>
using key_t = std::conditional_t<std::is_same_v<acc_t, double>, int64_t, int32_t>;

template <typename acc_t>
key_t<acc_t> order_key(acc_t x) {
  using K = key_t<acc_t>;
  if (x == acc_t(0)) x = acc_t(0);  // -0 -> +0
  K bits;
  std::memcpy(&bits, &x, sizeof(K));
  return bits >= 0 ? bits : static_cast<K>(bits ^ std::numeric_limits<K>::max());
}

template <typename in_t, typename acc_t>
void propose_row(const in_t* x, const bool* ex, int64_t V, acc_t u, acc_t inv_tau, bool greedy, double top_p,
                 int64_t* tok_out, acc_t* lp_out, int64_t* n_out) {
  using K = key_t<acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  acc_t m = neg_inf, lo_val = pos_inf;
  bool has_nan = false;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t l = static_cast<acc_t>(x[v]);
    if (l > neg_inf) {
      m = std::max(m, l);
      lo_val = std::min(lo_val, l);
    } else if (std::isnan(l)) {
      has_nan = true;
    }
  }
  if (has_nan || (!greedy && m == pos_inf)) {  // no distribution (NaN softmax): not an empty allowed set
    *tok_out = -1;
    *lp_out = std::numeric_limits<acc_t>::quiet_NaN();
    *n_out = 0;
    return;
  }
  if (!(m > neg_inf)) {  // no finite logit: nothing to propose
    *tok_out = -1;
    *lp_out = neg_inf;
    *n_out = 0;
    return;
  }
  // threshold key: a token is in the nucleus iff it is finite and key(l) >= thr
  K thr = order_key(lo_val);
  if (top_p < 1.0 && m == pos_inf) {
    thr = order_key(m);  // greedy with +inf logits: they carry the softmax's whole mass, the nucleus is them
  } else if (top_p < 1.0) {
    double Z = 0;  // sums in double: a sequential float sum over 150k terms drifts by ~1e-4
    for (int64_t v = 0; v < V; ++v) {
      const acc_t l = static_cast<acc_t>(x[v]);
      if (l > neg_inf) Z += std::exp((l - m) * inv_tau);
    }
    const double limit = top_p * Z;
    // invariant: mass_above(hi) < limit (hi = key(m): nothing is above the max); lo: mass_above(lo) >= limit
    // or lo lies below every finite key.
    int64_t lo = static_cast<int64_t>(order_key(lo_val)) - 1, hi = order_key(m);
    // the span of double keys can exceed INT64_MAX: measure it unsigned
    while (static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) > 1) {
      const int64_t mid = lo + static_cast<int64_t>((static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo)) / 2);
      double above = 0;
      for (int64_t v = 0; v < V; ++v) {
        const acc_t l = static_cast<acc_t>(x[v]);
        if (l > neg_inf && static_cast<int64_t>(order_key(l)) > mid) above += std::exp((l - m) * inv_tau);
      }
      if (above < limit) hi = mid; else lo = mid;
    }
    thr = static_cast<K>(hi);
  }
  auto allowed = [&](int64_t v, acc_t l) { return l > neg_inf && !ex[v] && order_key(l) >= thr; };
  int64_t n = 0, arg = -1;
  acc_t m_a = neg_inf;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t l = static_cast<acc_t>(x[v]);
    if (allowed(v, l)) {
      ++n;
      if (l > m_a) {
        m_a = l;
        arg = v;
      }
    }
  }
  *n_out = n;
  if (n == 0) {
    *tok_out = -1;
    *lp_out = neg_inf;
    return;
  }
  if (greedy) {
    *tok_out = arg;
    *lp_out = 0;
    return;
  }
  double W = 0;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t l = static_cast<acc_t>(x[v]);
    if (allowed(v, l)) W += std::exp((l - m_a) * inv_tau);
  }
  const double target = std::min(static_cast<double>(u) * W, std::nextafter(W, 0.0));
  double cum = 0;
  int64_t chosen = -1, last = arg;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t l = static_cast<acc_t>(x[v]);
    if (!allowed(v, l)) continue;
    const acc_t w = std::exp((l - m_a) * inv_tau);
    if (w > 0) last = v;
    cum += w;
    if (cum > target) {
      chosen = v;
      break;
    }
  }
  if (chosen < 0) chosen = last;  // the running sum fell short of the target by rounding
  *tok_out = chosen;
  *lp_out = static_cast<acc_t>((static_cast<acc_t>(x[chosen]) - m_a) * inv_tau - std::log(W));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propose_token_cpu(const at::Tensor& logits, const at::Tensor& excluded,
                                                                 const at::Tensor& uniforms, double temperature,
                                                                 double top_p) {
  ALIGNFAST_CHECK_ARG(logits.dim() == 2 && logits.size(1) >= 1, "logits", "must be [B, V] with V >= 1, got ",
                      logits.sizes());
  ALIGNFAST_CHECK_ARG(logits.size(1) == 1 || logits.stride(1) == 1, "logits", "must have unit stride over the vocabulary");
  ALIGNFAST_CHECK_ARG(excluded.scalar_type() == at::kBool && excluded.is_contiguous(), "excluded",
                      "must be a contiguous bool tensor");
  check_same_shape(logits, "logits", excluded, "excluded");
  // The uniforms come in the accumulation type: float64 logits are sampled with the caller's float64 uniform, as
  // the spec does (a float32 one moves u = 1 - 1e-12 to 1.0 and picks another token).
  const at::ScalarType acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  ALIGNFAST_CHECK_ARG(uniforms.scalar_type() == acc_type && uniforms.is_contiguous() && uniforms.dim() == 1 &&
                          uniforms.size(0) == logits.size(0),
                      "uniforms", "must be a contiguous [B] tensor of ",
                      acc_type == at::kDouble ? "float64" : "float32", " (float64 for float64 logits), got ",
                      uniforms.scalar_type(), " ", uniforms.sizes());
  check_device(logits, "logits", excluded, "excluded");
  check_device(logits, "logits", uniforms, "uniforms");
  ALIGNFAST_CHECK_ARG(usable_temperature(temperature, /*zero_is_greedy=*/true), "temperature",
                      "must be 0 (greedy), or finite and > 0 with 1/temperature a finite float32, got ", temperature);
  ALIGNFAST_CHECK_ARG(top_p > 0 && top_p <= 1, "top_p", "must be in (0, 1], got ", top_p);
  const int64_t B = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(acc_type));
  at::Tensor num_allowed = at::empty({B}, logits.options().dtype(at::kLong));
  const bool greedy = temperature == 0.0;
  const double inv_tau = 1.0 / (greedy ? 1.0 : temperature);
  const bool* ex = excluded.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "propose_token_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const in_t* x = logits.const_data_ptr<in_t>();
    const acc_t* u = uniforms.const_data_ptr<acc_t>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    acc_t* lp = logprobs.data_ptr<acc_t>();
    int64_t* n = num_allowed.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        propose_row<in_t, acc_t>(x + b * row_stride, ex + b * V, V, u[b], static_cast<acc_t>(inv_tau),
                                 greedy, top_p, tok + b, lp + b, n + b);
      }
    });
  });
  return {tokens, logprobs, num_allowed};
}

}  // namespace

TORCH_LIBRARY_IMPL(alignfast, CPU, m) { m.impl("propose_token", &propose_token_cpu); }

}  // namespace alignfast
