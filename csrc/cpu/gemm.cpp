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
#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <set>

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
  // hasMKLDNN: a torch built without it still exports mkldnn_matmul, as a stub that throws.
  return g_backend.load(std::memory_order_relaxed) == 1 && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn();
}

namespace {

void aten_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  at::Tensor o = out;  // at::mm_out / addmm_ take a non-const reference
  if (accumulate) {
    o.addmm_(a, b);
  } else {
    at::mm_out(o, a, b);
  }
}

// oneDNN compiles and caches a primitive per GEMM shape, ~1-3 MiB each with the heap it pins, for up to 1024
// shapes: before the rules below, routing the linear layers of 200 micro-batches of distinct token counts through
// oneDNN grew the process by 2.2 GiB (bench/NOTES-gemm.md, "memory"). So the dimension that varies from call to
// call only takes sizes from fixed sets:
//   rows (row-major a): the first 8 (g_exact_limit) distinct row counts of each shape family (everything but M) go as
//     they are, one call each: a run whose micro-batches come in a few sizes keeps one call per GEMM. Any
//     other count goes as at most two calls whose row counts are on a grid of 2^k and 3 * 2^(k-1), >= 16 (two
//     per octave): the largest grid size <= M from row 0, then the smallest grid size covering the rest,
//     ending at row M (it overlaps the first; rows computed twice are written by the second call). The second
//     call re-reads W: grid-only cost the LoRA step 1.71x -> 1.60-1.67x, and power-of-two blocks 1.53x.
//   K (transposed a): the first 8 distinct K of each family as they are; later ones in blocks of these sizes,
//     largest first, summed into out, and a remainder under 64 on ATen.
constexpr int64_t kKBlocks[] = {4096, 2048, 1024, 512, 256, 128, 64};
constexpr int64_t kMinGridRows = 16;
// How many distinct row counts per shape family go to oneDNN as they are (settable for tests:
// alignfast_onednn_exact_rows).
std::atomic<int64_t> g_exact_limit{8};

// The sizes of the varying dimension admitted as they are, per shape family: the other two sizes, which of M or
// K varies, a's and b's strides, accumulate.
std::mutex g_exact_mutex;
std::map<std::array<int64_t, 8>, std::set<int64_t>> g_exact_sizes;

bool exact_size(const at::Tensor& a, const at::Tensor& b, bool accumulate, bool split_k) {
  const int64_t fixed = split_k ? a.size(0) : a.size(1), varying = split_k ? a.size(1) : a.size(0);
  const std::array<int64_t, 8> family{fixed, b.size(1), split_k ? 1 : 0, a.stride(0), a.stride(1), b.stride(0),
                                      b.stride(1), accumulate ? 1 : 0};
  std::lock_guard<std::mutex> lock(g_exact_mutex);
  std::set<int64_t>& sizes = g_exact_sizes[family];
  if (sizes.count(varying) > 0) return true;
  if (static_cast<int64_t>(sizes.size()) >= g_exact_limit.load(std::memory_order_relaxed)) return false;
  sizes.insert(varying);
  return true;
}

// The largest grid size <= m (m >= kMinGridRows), and the smallest >= m.
int64_t grid_floor(int64_t m) {
  int64_t p = kMinGridRows;
  while (p * 2 <= m) p *= 2;
  return p * 3 / 2 <= m ? p * 3 / 2 : p;
}
int64_t grid_ceil(int64_t m) {
  if (m <= kMinGridRows) return kMinGridRows;
  const int64_t f = grid_floor(m);
  if (f == m) return m;
  // the next grid size after f: 2^k -> 3 * 2^(k-1), 3 * 2^(k-1) -> 2^(k+1)
  return (f & (f - 1)) == 0 ? f * 3 / 2 : f / 3 * 4;
}

// The distinct shapes (sizes, strides, accumulation) sent to oneDNN so far: what its primitive cache holds, for
// the tests of the rule above (alignfast_onednn_shapes). A set lookup per call, next to a >= 15 us call.
std::mutex g_shapes_mutex;
std::set<std::array<int64_t, 8>> g_shapes;

void onednn_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate) {
  const std::array<int64_t, 8> shape{a.size(0), a.size(1), b.size(1), a.stride(0), a.stride(1), b.stride(0),
                                     b.stride(1), accumulate ? 1 : 0};
  static thread_local std::set<std::array<int64_t, 8>> seen;  // the shared set's lock once per shape and thread
  if (seen.insert(shape).second) {
    std::lock_guard<std::mutex> lock(g_shapes_mutex);
    g_shapes.insert(shape);
  }
  mkldnn_matmul()(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
}

}  // namespace

// Which dimension varies: for a row-major `a` (activations x W^T, dz @ W) its rows, the tokens; for a transposed
// `a` (dW = dy^T x, dz^T h) the summed dimension K, split into K blocks summed into `out` (a K-slice of a
// transposed view is still one oneDNN reads in place; a row block of it is not).
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool split_k = !a.is_contiguous();
  if (!use_onednn(out, a, b) || (split_k && !b.is_contiguous())) {
    aten_gemm(out, a, b, accumulate);
    return;
  }
  if (!split_k) {
    const int64_t M = a.size(0);
    if (M < kMinGridRows) {
      aten_gemm(out, a, b, accumulate);
      return;
    }
    const int64_t first = grid_floor(M);
    if (first == M || exact_size(a, b, accumulate, /*split_k=*/false)) {
      onednn_matmul(a, b, out, accumulate);
      return;
    }
    // second <= first (equal only for M in 17..23, both 16), and start > 0
    const int64_t second = grid_ceil(M - first), start = M - second;
    // With accumulate the overlap rows must get out's old rows plus one product: keep their old contents, and
    // put them back between the calls.
    const at::Tensor overlap = accumulate ? out.narrow(0, start, first - start).clone() : at::Tensor();
    onednn_matmul(a.narrow(0, 0, first), b, out.narrow(0, 0, first), accumulate);
    if (accumulate) out.narrow(0, start, first - start).copy_(overlap);
    onednn_matmul(a.narrow(0, start, second), b, out.narrow(0, start, second), accumulate);
    return;
  }
  if (exact_size(a, b, accumulate, /*split_k=*/true)) {
    onednn_matmul(a, b, out, accumulate);
    return;
  }
  const int64_t total = a.size(1), per_unit = a.size(0) * b.size(1);  // multiply-adds per unit of K
  const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_macs = g_min_macs_per_thread.load(std::memory_order_relaxed);
  int64_t done = 0;
  for (const int64_t blk : kKBlocks) {
    if (blk * per_unit / threads < min_macs) break;  // smaller blocks are smaller still: the rest to ATen
    for (; total - done >= blk; done += blk) {
      onednn_matmul(a.narrow(1, done, blk), b.narrow(0, done, blk), out, accumulate || done > 0);
    }
  }
  if (done < total) {
    aten_gemm(out, a.narrow(1, done, total - done), b.narrow(0, done, total - done), accumulate || done > 0);
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

extern "C" int64_t alignfast_onednn_exact_rows(int64_t limit) {
  if (limit < 0) return alignfast::cpu::g_exact_limit.load();
  return alignfast::cpu::g_exact_limit.exchange(limit);
}

extern "C" int64_t alignfast_onednn_shapes() {
  std::lock_guard<std::mutex> lock(alignfast::cpu::g_shapes_mutex);
  return static_cast<int64_t>(alignfast::cpu::g_shapes.size());
}

extern "C" int alignfast_onednn_available() {
  return at::hasMKLDNN() && alignfast::cpu::mkldnn_matmul() != nullptr ? 1 : 0;
}

extern "C" int alignfast_cpu_gemm_backend(int backend) {
  if (backend < 0) return alignfast::cpu::g_backend.load();
  const int wanted = backend == 1 && alignfast_onednn_available() ? 1 : 0;
  return alignfast::cpu::g_backend.exchange(wanted);
}
