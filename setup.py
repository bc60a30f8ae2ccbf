"""Builds the optional CUDA extension ``agdo_kernels._agdo_cuda`` from csrc/ (metadata: pyproject.toml).

``AGDO_BUILD_CUDA=1`` forces the extension (the install fails without nvcc), ``=0`` skips it; unset, it is
built when nvcc is found (``CUDA_HOME``/``CUDA_PATH``, ``PATH``, ``/usr/local/cuda``) and skipped with a
message otherwise. Without it the package still works: the torch and Triton backends need no compiler.

The .cu file is compiled by nvcc; the pybind11 bindings by the C++ compiler. The CUDA runtime is linked
statically, and its symbols are kept local to the module (``--exclude-libs``) so they cannot clash with
the runtime torch loads. This file must not import torch (build isolation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/greedy_order.cu", "csrc/attention_stats.cu"]
# Ampere and Hopper binaries, plus Hopper PTX that newer GPUs compile at load time.
NVCC_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
# ptxas' per-kernel report (registers, spill bytes, barriers) goes to the build log: `pip install -v .`.
# tests/test_cuda_compile.py fails on spills from the same report.
NVCC_PTXAS_FLAGS = ["-Xptxas", "-v"]


def _say(message: str) -> None:
    print(f"agdo setup: {message}", file=sys.stderr, flush=True)


def _find_cuda_home() -> Path | None:
    """The CUDA toolkit holding nvcc, the runtime headers and libcudart_static.a."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(str(Path(nvcc_on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime_api.h").is_file():
            return home
    return None


def _cuda_library_dir(home: Path) -> Path:
    for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
        if (home / sub / "libcudart_static.a").is_file():
            return home / sub
    raise RuntimeError(f"agdo setup: no libcudart_static.a under {home}")


class CudaExtension(Pybind11Extension):
    """A pybind11 extension with extra ``.cu`` sources compiled by nvcc."""

    def __init__(self, name, sources, *, cuda_sources, cuda_home: Path, **kwargs):
        super().__init__(
            name,
            sources,
            include_dirs=[str(cuda_home / "include"), "csrc"],
            library_dirs=[str(_cuda_library_dir(cuda_home))],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_link_args=["-Wl,--exclude-libs,ALL"],
            cxx_std=17,
            **kwargs,
        )
        self.cuda_sources = cuda_sources
        self.nvcc = cuda_home / "bin" / "nvcc"


class BuildExtWithNvcc(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CudaExtension):
            # One nvcc per .cu file, side by side (each is single-threaded; the CI runner has 2 cores).
            workers = max(1, min(len(ext.cuda_sources), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                ext.extra_objects = list(pool.map(lambda source: self._nvcc_compile(ext, source), ext.cuda_sources))
        super().build_extension(ext)

    def _nvcc_compile(self, ext: CudaExtension, source: str) -> str:
        output = Path(self.build_temp).resolve() / (Path(source).stem + ".cu.o")
        output.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(ext.nvcc),
            "-c",
            source,
            "-o",
            str(output),
            "-O3",
            "-std=c++17",
            "-Icsrc",
            "-Xcompiler",
            "-fPIC,-fvisibility=hidden",
            *NVCC_ARCH_FLAGS,
            *NVCC_PTXAS_FLAGS,
        ]
        _say(" ".join(command))
        subprocess.run(command, check=True, cwd=ROOT)
        return str(output)


def _extensions():
    choice = os.environ.get("AGDO_BUILD_CUDA", "").strip()
    if choice == "0":
        _say("AGDO_BUILD_CUDA=0: skipping the CUDA extension")
        return []
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        if choice == "1":
            raise RuntimeError(
                "agdo setup: AGDO_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
            )
        _say(
            "nvcc not found: skipping the CUDA extension agdo_kernels._agdo_cuda "
            "(backend='cuda' will be unavailable; the torch and Triton backends still work)"
        )
        return []
    _say(f"building the CUDA extension with {cuda_home / 'bin' / 'nvcc'}")
    return [
        CudaExtension(
            "agdo_kernels._agdo_cuda",
            ["csrc/bindings.cpp"],
            cuda_sources=CUDA_SOURCES,
            cuda_home=cuda_home,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtWithNvcc})
