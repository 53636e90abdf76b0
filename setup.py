"""Build script: a thin driver for CMake, which owns how csrc/ compiles into alignfast._C.

Environment switches (read at build time):
  ALIGNFAST_BUILD_EXT=0        pure-Python install: no extension; ops use Triton (GPU) or the reference.
  ALIGNFAST_REQUIRE_EXT=1      a failed extension build fails the install (CI sets it) instead of
                               printing one line and continuing without the extension.
  ALIGNFAST_BUILD_CUDA=0|1     force the CUDA sources off/on (default: on when nvcc is found).
  ALIGNFAST_CUDA_ARCHS="8.0;9.0"  TORCH_CUDA_ARCH_LIST for the CUDA sources (default "8.0;9.0").
  MAX_JOBS=N                   parallel compile jobs (default: min(cores, free RAM / 3 GiB)).
  CUDA_HOME                    toolkit root (default: the parent of the nvcc on PATH, else /usr/local/cuda).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc", Path(cuda_home)
    on_path = shutil.which("nvcc")
    if on_path:
        nvcc = Path(on_path).resolve()
        root = nvcc.parent.parent
        # A minimal toolkit may put nvcc in /usr/local/bin and the libraries in /usr/local/cuda.
        if not (root / "include" / "cuda_runtime.h").exists() and Path("/usr/local/cuda/include/cuda_runtime.h").exists():
            root = Path("/usr/local/cuda")
        return nvcc, root
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda/bin/nvcc"), Path("/usr/local/cuda")
    return None, None


def _default_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / 2**20
        # nvcc with torch headers peaks near 3 GiB per job.
        return max(1, min(cores, int(avail_gib // 3)))
    except (OSError, KeyError, ValueError):
        return cores


def _tool(name: str):
    """The PyPI build of cmake/ninja when installed (Debian's cmake 3.25 lacks the CUDA20 dialect), else PATH."""
    try:
        module = __import__(name)
        candidate = Path(getattr(module, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR")) / name
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake, then copy the module to where setuptools expects it."""

    def run(self):
        if _env_flag("ALIGNFAST_BUILD_EXT", "1") in ("0", "false", "no", "off"):
            print("alignfast: ALIGNFAST_BUILD_EXT=0, building no extension (pure-Python install)")
            return
        try:
            for ext in self.extensions:
                self._build_one(ext)
        except Exception as err:  # noqa: BLE001 - report once, clearly, and continue (unless required)
            if _env_flag("ALIGNFAST_REQUIRE_EXT", "0") in ("1", "true", "yes", "on"):
                raise
            print(f"alignfast: extension not built ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                  "installing the pure-Python package, ops fall back to Triton/reference", file=sys.stderr)

    def _build_one(self, ext: Extension):
        import torch  # build dependency: its CMake package and headers

        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            raise RuntimeError("no C++ compiler found (install g++)")

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A stable build directory (not setuptools' per-run temp dir) so that re-running the install,
        # as scripts/setup.sh does, recompiles only what changed. Keyed by interpreter and torch so two
        # environments sharing a checkout don't reuse each other's CMake cache.
        tag = f"{sys.implementation.cache_tag}-torch{torch.__version__.split('+')[0]}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        want_cuda = _env_flag("ALIGNFAST_BUILD_CUDA", "auto")
        nvcc, cuda_home = _find_nvcc()
        use_cuda = want_cuda in ("1", "true", "on", "yes") or (want_cuda == "auto" and nvcc is not None)
        if use_cuda and torch.version.cuda is None:
            print("alignfast: torch is a CPU build; compiling no CUDA sources")
            use_cuda = False
        if use_cuda and nvcc is None:
            raise RuntimeError("ALIGNFAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")

        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DALIGNFAST_OUTPUT={out_path}",
            f"-DALIGNFAST_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        ninja = _tool("ninja")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        env = dict(os.environ)
        if use_cuda:
            env["CUDA_HOME"] = str(cuda_home)
            env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("ALIGNFAST_CUDA_ARCHS", "8.0;9.0")
            site = Path(torch.__file__).resolve().parent.parent
            nvrtc = sorted(site.glob("nvidia/cu*/lib/libnvrtc.so*")) + sorted(site.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
            extra_inc = sorted(p for p in site.glob("nvidia/cu*/include") if p.is_dir())
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
            ]
            # A minimal toolkit lacks libnvrtc and some headers torch's CMake asks for: use the pip wheels'.
            if nvrtc and not list(Path(cuda_home).glob("lib*/libnvrtc.so*")):
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
            if extra_inc:
                args.append(f"-DALIGNFAST_EXTRA_CUDA_INCLUDES={';'.join(map(str, extra_inc))}")
        print(f"alignfast: building the extension ({'C++ CPU + CUDA' if use_cuda else 'C++ CPU only'})")
        subprocess.run([cmake, *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(_default_jobs())
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)
        if not out_path.exists():
            raise RuntimeError(f"CMake did not produce {out_path}")


setup(
    packages=find_packages(include=["alignfast", "alignfast.*"]) + ["alignfast.kernels"],
    # Triton kernels live in kernels/ at the top level but install as alignfast.kernels
    # (a top-level 'kernels' package would collide with the PyPI project of that name).
    package_dir={"alignfast.kernels": "kernels"},
    # The toy world ships one folder per model (assets/target/, assets/prompter/) beside build.json.
    package_data={"alignfast.toy": ["assets/*", "assets/*/*"]},
    ext_modules=[CMakeExtension("alignfast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
