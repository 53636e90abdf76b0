// Which vectorised row kernels run on this CPU (logprobs_rows.h): decided once per process.
#include <cstdlib>
#include <cstring>

#include "cpu/logprobs_rows.h"

namespace alignfast::logprobs {

namespace {
Isa detect() {
#ifdef ALIGNFAST_LOGPROBS_VEC
  const char* cap = std::getenv("ALIGNFAST_CPU_ISA");
  const bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0 || *cap == '\0';
  const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
  __builtin_cpu_init();
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kScalar;
}
}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

}  // namespace alignfast::logprobs
