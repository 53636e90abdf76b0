// The Python module alignfast._C. Importing it runs the static initialisers of every
// TORCH_LIBRARY_IMPL block in csrc/cpu and csrc/cuda, which register the kernels for the
// schemas that alignfast/ops defines in Python. The module itself exposes build facts and the process-wide
// choice of CPU GEMM library (csrc/cpu/gemm.h), which alignfast/ops/gemm.py sets.
#include <Python.h>

#include <cstdint>

extern "C" int alignfast_cpu_gemm_backend(int backend);
extern "C" int alignfast_onednn_available();
extern "C" int64_t alignfast_onednn_min_macs(int64_t per_thread);
extern "C" int alignfast_bf16_gemm_available();
extern "C" int64_t alignfast_onednn_shapes();
extern "C" int64_t alignfast_onednn_exact_rows(int64_t limit);
extern "C" int64_t alignfast_bf16_gemm_shapes();

namespace {

PyObject* cpu_gemm_backend(PyObject*, PyObject* args) {
  int backend = -1;
  if (!PyArg_ParseTuple(args, "|i", &backend)) return nullptr;
  return PyLong_FromLong(alignfast_cpu_gemm_backend(backend));
}

PyObject* onednn_available(PyObject*, PyObject*) { return PyBool_FromLong(alignfast_onednn_available()); }

PyObject* onednn_min_macs(PyObject*, PyObject* args) {
  long long per_thread = -1;
  if (!PyArg_ParseTuple(args, "|L", &per_thread)) return nullptr;
  return PyLong_FromLongLong(alignfast_onednn_min_macs(per_thread));
}

PyObject* bf16_gemm_available(PyObject*, PyObject*) { return PyBool_FromLong(alignfast_bf16_gemm_available()); }

PyObject* onednn_exact_rows(PyObject*, PyObject* args) {
  long long limit = -1;
  if (!PyArg_ParseTuple(args, "|L", &limit)) return nullptr;
  return PyLong_FromLongLong(alignfast_onednn_exact_rows(limit));
}

PyObject* onednn_shapes(PyObject*, PyObject*) { return PyLong_FromLongLong(alignfast_onednn_shapes()); }

PyObject* bf16_gemm_shapes(PyObject*, PyObject*) { return PyLong_FromLongLong(alignfast_bf16_gemm_shapes()); }

PyMethodDef methods[] = {
    {"cpu_gemm_backend", cpu_gemm_backend, METH_VARARGS,
     "cpu_gemm_backend([backend]) -> previous: 0 = ATen (MKL), 1 = oneDNN for float32 CPU GEMMs; no argument reads it"},
    {"onednn_available", onednn_available, METH_NOARGS,
     "whether this libtorch exports oneDNN's matmul entry point (at::native::mkldnn_matmul)"},
    {"onednn_min_macs", onednn_min_macs, METH_VARARGS,
     "onednn_min_macs([per_thread]) -> previous: the smallest float32 GEMM (multiply-adds per thread) sent to oneDNN"},
    {"bf16_gemm_available", bf16_gemm_available, METH_NOARGS,
     "whether bf16 x bf16 -> float32 CPU GEMMs run on oneDNN's brgemm now (oneDNN chosen, AVX512_BF16, probe passed)"},
    {"onednn_exact_rows", onednn_exact_rows, METH_VARARGS,
     "onednn_exact_rows([limit]) -> previous: distinct row counts per GEMM shape family sent to oneDNN as they are"},
    {"onednn_shapes", onednn_shapes, METH_NOARGS,
     "distinct GEMM shapes sent to oneDNN's matmul so far (each a primitive oneDNN compiles and keeps)"},
    {"bf16_gemm_shapes", bf16_gemm_shapes, METH_NOARGS,
     "distinct shapes handed to oneDNN's brgemm by the bf16 products so far (each a kernel per thread)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "alignfast's compiled kernels (registered with torch.library under the 'alignfast' namespace)",
    -1,
    methods,
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
