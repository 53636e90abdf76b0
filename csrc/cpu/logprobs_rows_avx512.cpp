// logprobs_rows_vec.h compiled for AVX-512 (16 floats per vector), chosen at run time (cpu_isa()) where the CPU
// has AVX512F/BW/VL/DQ. Same construction as logprobs_rows_avx2.cpp (read it first): the vec headers under
// CPU_CAPABILITY=AVX512 live in the inline namespace at::vec::AVX512.
#include "cpu/logprobs_rows.h"

#if defined(ALIGNFAST_LOGPROBS_VEC)
#ifdef CPU_CAPABILITY
#error "this file must be the only place that sets CPU_CAPABILITY in its translation unit"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#if !defined(__AVX512F__)
#define ALIGNFAST_DEFINED_AVX_MACROS 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef ALIGNFAST_DEFINED_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__
#endif

#define ALIGNFAST_VEC_NS avx512
#include "cpu/logprobs_rows_vec.h"
static_assert(alignfast::logprobs::avx512::kW == 16, "expected the AVX-512 build of at::vec");
ALIGNFAST_DEFINE_VEC_ROWS()

#pragma GCC pop_options
#endif
