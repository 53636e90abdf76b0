"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' Python, not the compiler: a loop-carried value that changes type, an
unsupported op for a dtype, or a block shape the backend rejects only shows when Triton lowers the kernel
to PTX and ptxas assembles it. triton.compile does both ahead of time with no device (ptxas ships with
Triton), in a subprocess because tests/conftest.py has set TRITON_INTERPRET=1 in this one. The
specialisations mirror what the launchers pass at run time: 16-byte aligned pointers and strides
divisible by 16 (V = 151936), a 64-bit batch stride, V = 1 (a constexpr), each dtype's accumulator, and
1/temperature typed as the kernels annotate it (a bare Python float would be passed as float32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from alignfast.kernels import logprobs as K

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, dt, acc, stride_b):
    types = {}
    annotated = {p.name: p.annotation_type for p in fn.params}
    for name in fn.arg_names:
        if name in ("HAS_MASK", "WITH_ENTROPY", "BLOCK", "ACC"):
            types[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            types[name] = "*" + dt
        elif name == "tokens_ptr":
            types[name] = "*i64"
        elif name == "mask_ptr":
            types[name] = "*i1"
        elif name.endswith("_ptr"):
            types[name] = "*" + acc
        elif name == "inv_temp":
            types[name] = annotated[name] or "fp32"  # what the JIT makes of a Python float
        else:
            types[name] = stride_b if name == "stride_b" else "i32"
    return types


def build(fn, dt, block, has_mask, entropy, *, stride_b="i32", v_is_one=False):
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = signature(fn, dt, acc, stride_b)
    consts = {"HAS_MASK": has_mask, "WITH_ENTROPY": entropy, "BLOCK": block,
              "ACC": tl.float64 if acc == "fp64" else tl.float32}
    if v_is_one:  # the JIT turns integer arguments equal to 1 into constants
        for name in ("V", "T", "stride_t"):
            sig[name] = "constexpr"
            consts[name] = 1
    names = list(sig)
    aligned = [n for n in names if sig[n].startswith("*") or (not v_is_one and n in ("V", "stride_t", "stride_b"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": 8 if block >= 2048 else 4})
    ptx = kernel.asm["ptx"]
    assert ".entry" in ptx and kernel.asm["cubin"]
    if acc == "fp64":  # float64 logits are scaled by 1/temperature as a double, not a float32 rounding of it
        assert ".param .f64" in ptx, "inv_temp reaches the float64 kernel as float32"


for fn in (K._forward_kernel, K._backward_kernel):
    build(fn, "bf16", 4096, True, True, stride_b="i64")
    build(fn, "fp16", 128, False, False)
    build(fn, "fp64", 4096, True, True)
    build(fn, "fp32", 1, True, True, v_is_one=True)
print("compiled")
"""


def test_logprob_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
