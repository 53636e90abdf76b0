"""Triton kernels, installed as the subpackage alignfast.kernels.

Each module holds kernel(s) -> launcher -> the function registered as an op's CUDA kernel. Under
TRITON_INTERPRET=1 (set before triton is imported) the launchers also run on CPU tensors: that is how
they are tested on machines without a GPU. Nothing here is imported by `import alignfast`.
"""
