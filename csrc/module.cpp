// The Python module alignfast._C. Importing it runs the static initialisers of every
// TORCH_LIBRARY_IMPL block in csrc/cpu and csrc/cuda, which register the kernels for the
// schemas that alignfast/ops defines in Python. The module itself exposes only build facts.
#include <Python.h>

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "alignfast's compiled kernels (registered with torch.library under the 'alignfast' namespace)",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef ALIGNFAST_WITH_CUDA
  PyModule_AddIntConstant(module, "cuda_compiled", 1);
#else
  PyModule_AddIntConstant(module, "cuda_compiled", 0);
#endif
  return module;
}
