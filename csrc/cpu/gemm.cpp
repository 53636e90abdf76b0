// CPU float32 GEMM dispatch (see gemm.h) and the alignfast::mm op built on it.
//
// oneDNN is reached through at::native::mkldnn_matmul, which libtorch_cpu exports but does not declare in its
// installed headers. It is looked up by name at run time rather than linked: a torch release that renames it
// then loses the faster GEMM (ATen is used) instead of failing to load the whole extension.
#include "cpu/gemm.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>

#include "common.h"

namespace alignfast {
namespace cpu {
namespace {

// at::native::mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
// float alpha): result = beta * result + alpha * mat1 @ mat2 (fpmath mode: torch's float32 matmul precision
// for mkldnn, "ieee" by default, i.e. plain float32).
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);
constexpr const char* kMkldnnMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

MkldnnMatmul find_mkldnn_matmul() {
  // libtorch_cpu is loaded (this extension links it) but not necessarily into the global scope.
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* sym = lib != nullptr ? dlsym(lib, kMkldnnMatmulSymbol) : nullptr;
  if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, kMkldnnMatmulSymbol);
  return reinterpret_cast<MkldnnMatmul>(sym);
}

MkldnnMatmul mkldnn_matmul() {
  static const MkldnnMatmul fn = find_mkldnn_matmul();
  return fn;
}

std::atomic<int> g_backend{0};

// Below this many multiply-adds per thread a GEMM stays on ATen: oneDNN's call costs ~15 us of fixed overhead
// (primitive-cache lookup, memory descriptors), which a small GEMM does not earn back. Measured on the Zen 5
// (bench/NOTES-gemm.md, "small GEMMs"): 240x64x64 ran 0.85x ATen at one thread and 0.59x at two; 240x64x128
// 1.18x and 0.87x; 960x64x128 1.81x and 1.50x. Settable for tests (alignfast_onednn_min_macs).
std::atomic<int64_t> g_min_macs_per_thread{int64_t(1) << 21};

// oneDNN reads a matrix in place when it is contiguous or the transpose of a contiguous matrix.
bool plain_or_transposed(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  return t.stride(0) == 1 && t.stride(1) == t.size(0);
}

bool large_enough(const at::Tensor& a, const at::Tensor& b) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  // Per thread, by division: a huge threshold (a test's "never") must not overflow into "always".
  return a.size(0) * a.size(1) * b.size(1) / threads >= g_min_macs_per_thread.load(std::memory_order_relaxed);
}

bool use_onednn(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // torch.backends.mkldnn.flags(enabled=False) turns oneDNN off for ATen; it does here too.
  return onednn_chosen() && large_enough(a, b) && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
         out.is_contiguous() && plain_or_transposed(a) && plain_or_transposed(b) && !a.is_conj() && !b.is_conj();
}

}  // namespace

bool onednn_chosen() {
  return g_backend.load(std::memory_order_relaxed) == 1 && at::globalContext().userEnabledMkldnn();
}

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (use_onednn(out, a, b)) {
    mkldnn_matmul()(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
  at::Tensor o = out;  // at::mm_out / addmm_ take a non-const reference
  if (accumulate) {
    o.addmm_(a, b);
  } else {
    at::mm_out(o, a, b);
  }
}

}  // namespace cpu

namespace {

// alignfast::mm(a, b, bias): a @ b (+ bias on every row), a: [M, K], b: [K, N], bias: [N].
at::Tensor mm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  ALIGNFAST_CHECK_ARG(a.dim() == 2, "a", "must be 2-D, got ", a.sizes());
  ALIGNFAST_CHECK_ARG(b.dim() == 2 && b.size(0) == a.size(1), "b", "must be [", a.size(1), ", N], got ", b.sizes());
  ALIGNFAST_CHECK_ARG(b.scalar_type() == a.scalar_type(), "b", "has dtype ", b.scalar_type(), " but a has ",
                      a.scalar_type());
  check_device(a, "a", b, "b");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  if (bias.has_value()) {
    ALIGNFAST_CHECK_ARG(bias->dim() == 1 && bias->size(0) == b.size(1), "bias", "must be [", b.size(1), "], got ",
                        bias->sizes());
    ALIGNFAST_CHECK_ARG(bias->scalar_type() == a.scalar_type(), "bias", "has dtype ", bias->scalar_type(),
                        " but a has ", a.scalar_type());
    check_device(a, "a", *bias, "bias");
    out.copy_(bias->unsqueeze(0).expand_as(out));
  }
  cpu::gemm_into(out, a, b, /*accumulate=*/bias.has_value());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(alignfast, CPU, m) { m.impl("mm", &mm_cpu); }

}  // namespace alignfast

extern "C" int64_t alignfast_onednn_min_macs(int64_t per_thread) {
  if (per_thread < 0) return alignfast::cpu::g_min_macs_per_thread.load();
  return alignfast::cpu::g_min_macs_per_thread.exchange(per_thread);
}

extern "C" int alignfast_onednn_available() { return alignfast::cpu::mkldnn_matmul() != nullptr ? 1 : 0; }

extern "C" int alignfast_cpu_gemm_backend(int backend) {
  if (backend < 0) return alignfast::cpu::g_backend.load();
  const int wanted = backend == 1 && alignfast_onednn_available() ? 1 : 0;
  return alignfast::cpu::g_backend.exchange(wanted);
}
