// CPU float32 GEMMs through the faster of two libraries that ship inside libtorch (bench/NOTES-gemm.md).
// ATen's fp32 mm calls MKL's sgemm, which on non-Intel x86 CPUs runs its AVX2 kernel: on the AMD Zen 5 (AVX-512)
// of our CI machine it reaches 92 GFLOP/s on one core where oneDNN's AVX-512 JIT kernel, also linked into
// libtorch (at::native::mkldnn_matmul), reaches 164-244. Which library runs is a process-wide setting that the
// Python layer chooses (alignfast/ops/gemm.py: ALIGNFAST_CPU_GEMM=auto|aten|onednn); the two round differently
// (sums in another order), never by more than float32 rounding.
#pragma once
#include <ATen/core/Tensor.h>

namespace alignfast {
namespace cpu {

// out = a @ b, or out += a @ b with accumulate. out: contiguous [M, N]; a: [M, K]; b: [K, N]; a and b each
// contiguous or the transpose of a contiguous matrix (views such as w.t() are not copied). oneDNN only for float32
// GEMMs of at least alignfast_onednn_min_macs() multiply-adds per thread, in blocks of fixed sizes along the
// dimension that varies between calls (rows of a row-major a, K of a transposed one), the rest on ATen: oneDNN
// keeps a compiled primitive per shape (gemm.cpp, bench/NOTES-gemm.md "memory").
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether the process chose oneDNN (ALIGNFAST_CPU_GEMM) and torch has oneDNN enabled: the condition, besides
// the size rule, for gemm_into above and for the bf16 GEMMs of cpu/bf16_gemm.h.
bool onednn_chosen();

}  // namespace cpu
}  // namespace alignfast

// The process-wide choice, set from Python (alignfast._C.cpu_gemm_backend): 0 = ATen, 1 = oneDNN. Returns the
// previous value; a negative argument only reads it. Setting 1 where oneDNN's entry point is missing leaves 0.
extern "C" int alignfast_cpu_gemm_backend(int backend);
// How many distinct row counts per shape family gemm_into hands to oneDNN as they are before it uses its grid
// (default 8). Returns the previous value; a negative argument only reads it. Counts already admitted stay.
extern "C" int64_t alignfast_onednn_exact_rows(int64_t limit);
// How many distinct GEMM shapes (sizes, strides, accumulation) this process has sent to oneDNN's matmul: each is a
// primitive oneDNN compiles and keeps, so a run's varying row counts must not add to it (gemm_into's blocks).
extern "C" int64_t alignfast_onednn_shapes();
// Whether this libtorch exports oneDNN's matmul entry point (at::native::mkldnn_matmul).
extern "C" int alignfast_onednn_available();
// The smallest GEMM, in multiply-adds per thread, that goes to oneDNN (smaller ones stay on ATen). Returns the
// previous value; a negative argument only reads it.
extern "C" int64_t alignfast_onednn_min_macs(int64_t per_thread);
