"""Compiling the project's C++ kernels (csrc/) into one library in the cache folder, keyed by their source, the
compiler flags and the torch version, so a changed source or another torch builds afresh and an unchanged one is
found again. utils/runtime/nf4_kernel.py loads and registers what this builds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from utils.core.profiles import REPO_ROOT

SOURCES = (
    REPO_ROOT / "csrc" / "nf4_gemm.cpp",
    REPO_ROOT / "csrc" / "nf4_gemm_avx512.cpp",
    REPO_ROOT / "csrc" / "decode_layer.cpp",
    REPO_ROOT / "csrc" / "decode_math.cpp",
    REPO_ROOT / "csrc" / "lens_scores.cpp",
)
HEADERS = (REPO_ROOT / "csrc" / "nf4_gemm.h", REPO_ROOT / "csrc" / "decode_math.h")
# -ffp-contract=off: a multiply and an add written apart stay two roundings, as torch's separate operations do
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]


def library_path(cache_dir: Path) -> Path:
    """Where the built library lives: keyed by the source, the compiler flags and the torch version."""
    import torch

    sources = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]
    return Path(cache_dir) / "kernels" / f"nf4_gemm-{key}.so"


def build(cache_dir: Path) -> Path:
    """Compile SOURCES into one library in the cache (atomically) and return its path; RuntimeError with the
    compiler's message when it fails."""
    import torch
    from torch.utils.cpp_extension import include_paths

    target = library_path(cache_dir)
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [
            compiler,
            *FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{p}" for p in include_paths()],
            *[str(path) for path in SOURCES],
            "-o",
            str(partial),
            # torch's own libgomp, so the kernel shares torch's OpenMP threads instead of starting a second pool
            f"-L{torch_lib}",
            f"-Wl,-rpath,{torch_lib}",
            "-lc10",
            "-ltorch_cpu",
            "-lgomp",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {(done.stderr or done.stdout).strip()[-600:]}")
        os.replace(partial, target)
    return target
