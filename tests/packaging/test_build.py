"""The build's switches do what setup.py promises, checked on a copy of the source tree so the
checkout's own build directory is never touched.

- ALIGNFAST_BUILD_EXT=0: a pure-Python wheel, Triton kernels packaged as alignfast.kernels (never a
  top-level `kernels` package: that name is taken on PyPI), the toy world's assets included.
- A C++ compiler that cannot build: one clear line, and the install goes on without the extension
  (unless ALIGNFAST_REQUIRE_EXT=1, which makes it fail).
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                               "outputs", ".benchmarks")


def _source_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    return src


def _build_wheel(src: Path, out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(out), str(src)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=900)


def test_pure_python_wheel_layout(tmp_path):
    src = _source_copy(tmp_path)
    done = _build_wheel(src, tmp_path / "dist", ALIGNFAST_BUILD_EXT="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ALIGNFAST_BUILD_EXT=0, building no extension" in done.stdout + done.stderr
    wheel = next((tmp_path / "dist").glob("alignfast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "alignfast/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "Triton kernels must not install as top-level 'kernels'"
    assert not any(n.startswith("alignfast/_C") for n in names)
    assert "alignfast/ops/_library.py" in names
    # The demo's world ships inside the package: one folder per model, as from_pretrained wants.
    for model in ("prompter", "target"):
        for leaf in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert f"alignfast/toy/assets/{model}/{leaf}" in names, (model, leaf)


def test_broken_compiler_is_one_line_and_install_continues(tmp_path):
    src = _source_copy(tmp_path)
    env = dict(CXX="/bin/false", ALIGNFAST_BUILD_CUDA="0", ALIGNFAST_REQUIRE_EXT="0")
    done = _build_wheel(src, tmp_path / "dist", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    notes = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if "alignfast: extension not built" in ln]
    assert len(notes) == 1, notes
    assert "installing the pure-Python package" in notes[0]

    env["ALIGNFAST_REQUIRE_EXT"] = "1"
    failed = _build_wheel(src, tmp_path / "dist2", **env)
    assert failed.returncode != 0


def test_cpu_only_build_needs_no_cuda_toolkit(tmp_path):
    """A CUDA build of torch (what `pip install torch` gives) on a machine without nvcc or a toolkit: the
    C++ CPU kernels must still build and register (torch's own CMake package would refuse here)."""
    src = _source_copy(tmp_path)
    venv_bin = str(Path(sys.executable).parent)
    env = dict(ALIGNFAST_BUILD_CUDA="0", ALIGNFAST_REQUIRE_EXT="1", CUDA_HOME="/nonexistent", CUDA_PATH="",
               PATH=f"{venv_bin}:/usr/bin:/bin", MAX_JOBS="2")
    done = _build_wheel(src, tmp_path / "dist", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "building the extension (C++ CPU only)" in done.stdout + done.stderr
    wheel = next((tmp_path / "dist").glob("alignfast-*.whl"))
    module = next(n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("alignfast/_C"))
    so = tmp_path / Path(module).name
    so.write_bytes(zipfile.ZipFile(wheel).read(module))
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, torch, alignfast.ops as o; torch.ops.load_library(sys.argv[1]);"
         "print(all(torch._C._dispatch_has_kernel_for_dispatch_key('alignfast::' + n, 'CPU')"
         " for n in ('compute_advantages', 'ppo_loss', 'token_logprobs')))", str(so)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ALIGNFAST_DISABLE_EXT": "1"})
    assert probe.returncode == 0 and probe.stdout.strip() == "True", probe.stdout + probe.stderr
