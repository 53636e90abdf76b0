// logprobs_rows_vec.h compiled for AVX2 + FMA (8 floats per vector), chosen at run time (cpu_isa()).
//
// The extension builds without -mavx2, so the target is set for this file's vector code only: torch's headers
// that everything uses are included first (without the target), then at::vec under `#pragma GCC target` with
// CPU_CAPABILITY=AVX2, which puts its code in the inline namespace at::vec::AVX2 (no clash with another
// instruction set's copy). sleef.h and the vec headers test the feature macros while preprocessing, which the
// pragma does not define, so they are defined around those includes only.
#include "cpu/logprobs_rows.h"

#if defined(ALIGNFAST_LOGPROBS_VEC)
#ifdef CPU_CAPABILITY
#error "this file must be the only place that sets CPU_CAPABILITY in its translation unit"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#if !defined(__AVX2__)
#define ALIGNFAST_DEFINED_AVX_MACROS 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef ALIGNFAST_DEFINED_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#endif

#define ALIGNFAST_VEC_NS avx2
#include "cpu/logprobs_rows_vec.h"
static_assert(alignfast::logprobs::avx2::kW == 8, "expected the AVX2 build of at::vec");
ALIGNFAST_DEFINE_VEC_ROWS()

#pragma GCC pop_options
#endif
