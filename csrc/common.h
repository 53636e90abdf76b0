// Shared argument checks for the C++/CUDA kernels. The Python layer (alignfast/ops) validates
// user input with friendly messages first; these checks guard direct torch.ops calls.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <limits>

#define ALIGNFAST_CHECK_ARG(cond, name, ...) TORCH_CHECK((cond), "alignfast: argument '", name, "': ", __VA_ARGS__)

namespace alignfast {

// A temperature the kernels can scale by: finite, > 0 (or 0 where it means greedy), and 1/temperature a finite
// float32 (the row kernels scale logits in float32; below ~2.94e-39 the reciprocal overflows to inf and the
// log-probs to NaN). The Python wrappers check the same first (alignfast.ops._checks.temperature).
inline bool usable_temperature(double temperature, bool zero_is_greedy = false) {
  if (zero_is_greedy && temperature == 0.0) return true;
  return std::isfinite(temperature) && temperature > 0 &&
         1.0 / temperature <= static_cast<double>(std::numeric_limits<float>::max());
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "alignfast: argument '", b_name, "' has shape ", b.sizes(),
              " but '", a_name, "' has shape ", a.sizes());
}

inline void check_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "alignfast: argument '", b_name, "' is on ", b.device(),
              " but '", a_name, "' is on ", a.device());
}

// Rows in parallel on a shared machine (bench/NOTES-threads.md). fn(begin, end) over [0, n); row_ns: the
// row's single-threaded cost in nanoseconds, roughly. Two rules, both about a worker thread that the OS has
// descheduled (a busy machine: every OpenMP region ends in a barrier that waits for it):
//   * threads only where each gets >= kParallelMinNs of work: below that a stalled wake-up costs more than
//     the work saves, so small calls run single-threaded on the caller;
//   * the rows are handed out in small chunks from a shared counter rather than split in equal halves up
//     front, so a running thread takes over the rows of a descheduled one instead of waiting for it.
// Rows are independent and each is done by one thread, so results do not depend on the schedule.
constexpr int64_t kParallelMinNs = 1000000;  // 1 ms of work per thread

template <typename Fn>
void parallel_rows(int64_t n, int64_t row_ns, Fn&& fn) {
  if (n <= 0) return;
  const int64_t total = n * std::max<int64_t>(row_ns, 1);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n,
                                             total / kParallelMinNs});
  if (threads <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (threads * 8));  // ~8 chunks per thread
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < n; begin = next.fetch_add(chunk)) {
      fn(begin, std::min(n, begin + chunk));
    }
  });
}

}  // namespace alignfast

