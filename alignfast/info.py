"""`python -m alignfast.info`: which implementation each op uses on each device, and why.

Never initialises CUDA unless a device is present and asked about; safe on a machine with no GPU.
"""

from __future__ import annotations

import os
import platform
import sys


def report() -> str:
    import torch

    import alignfast
    import alignfast.ops  # noqa: F401  - defines every op's schema, so OPS lists them all
    from alignfast import _ext
    from alignfast.ops import _checks, _library

    lines = [
        f"alignfast {alignfast.__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f" (CUDA {torch.version.cuda or 'none'})",
        f"extension alignfast._C: {'loaded' if _ext.available() else 'not loaded: ' + str(_ext.reason())}"
        + (f", CUDA sources compiled: {'yes' if _ext.cuda_compiled() else 'no'}" if _ext.available() else ""),
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    has_gpu = torch.cuda.is_available()
    lines.append(f"CUDA device: {torch.cuda.get_device_name(0) if has_gpu else 'none'}")
    lines.append(f"backend: {_library.current_backend()}")
    from alignfast.ops import cpu_gemm

    try:
        gemm = cpu_gemm.current()
    except _checks.AlignfastArgumentError as err:
        gemm = f"aten, because {str(err).removeprefix('alignfast: ')}"
    lines.append(f"float32 CPU GEMMs (linear_token_logprobs, the fast trainer's linears): {gemm} "
                 f"(ALIGNFAST_CPU_GEMM={os.environ.get('ALIGNFAST_CPU_GEMM', 'auto')}; CPU vendor "
                 f"{cpu_gemm.cpu_vendor() or 'unknown'}, capability {torch.backends.cpu.get_cpu_capability()})")
    lines.append("bfloat16 linear_token_logprobs on CPU: " +
                 ("bf16 x bf16 -> float32 products (oneDNN brgemm, AVX512_BF16)" if cpu_gemm.bf16_products()
                  else "float32 GEMMs of the converted operands"))
    lines.append("")
    rows = [("op", "cpu", "cuda")]
    for name, info in sorted(_library.OPS.items()):
        if not info.public:
            continue
        cells = []
        for dev in ("cpu", "cuda"):
            impl, why = _library.describe(name, dev)
            if dev == "cuda" and not has_gpu and impl != "reference":
                why += "; no CUDA device here"
            cells.append(f"{impl} ({why})")
        rows.append((name, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
