// Shared argument checks for the C++/CUDA kernels. The Python layer (alignfast/ops) validates
// user input with friendly messages first; these checks guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define ALIGNFAST_CHECK_ARG(cond, name, ...) TORCH_CHECK((cond), "alignfast: argument '", name, "': ", __VA_ARGS__)

namespace alignfast {

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "alignfast: argument '", b_name, "' has shape ", b.sizes(),
              " but '", a_name, "' has shape ", a.sizes());
}

inline void check_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "alignfast: argument '", b_name, "' is on ", b.device(),
              " but '", a_name, "' is on ", a.device());
}

}  // namespace alignfast
