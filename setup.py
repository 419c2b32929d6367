"""Builds the torchrec_tt._C extension (metadata lives in pyproject.toml).

CPU build (always): csrc/ops.cpp (schemas) + csrc/cpu/*.cpp (CPU kernels), C++ with -O3 and OpenMP
(at::parallel_for). CUDA build: when torch has CUDA (torch.version.cuda), csrc/cuda/*.cu (+
csrc/cuda/*.cpp) are added, compiled with nvcc, and TORCHREC_TT_WITH_CUDA is defined. A CUDA torch
without a CUDA toolkit (CUDA_HOME) is an error, not a silent CPU-only build: install the toolkit
(nvcc) matching torch.version.cuda, or set TORCHREC_TT_FORCE_CPU=1 to build the CPU ops only.
Without TORCH_CUDA_ARCH_LIST and without a visible GPU (build machines), the kernels are built for
sm_80 and sm_90 (+ PTX for newer GPUs) instead of whatever torch would guess.

Install with `pip install --no-build-isolation -e .` (an isolated build would fetch another torch).
The C++ standard is left to torch.utils.cpp_extension (c++17 with torch 2.11, c++20 with 2.13,
whose headers require it); the project's sources are C++17.
"""

import glob
import os
import platform
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import (
    BuildExtension,
    CppExtension,
    CUDA_HOME,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# Default GPU architectures when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (A100, H100;
# PTX lets newer GPUs JIT the sm_90 code).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _with_cuda() -> bool:
    if os.environ.get("TORCHREC_TT_FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    if CUDA_HOME is None:
        raise RuntimeError(
            f"torchrec_tt: torch {torch.__version__} was built with CUDA {torch.version.cuda}, but no "
            "CUDA toolkit was found (CUDA_HOME is unset and nvcc is not on PATH), so the CUDA ops "
            "cannot be built. Install the CUDA toolkit matching torch.version.cuda and set "
            "CUDA_HOME, or set TORCHREC_TT_FORCE_CPU=1 to build the CPU ops only."
        )
    return True


def _set_default_cuda_arch_list() -> None:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return  # torch builds for the visible GPUs
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


def _cpu_arch_flags() -> list:
    """Vector ISA of the CPU kernels (csrc/cpu/micro_gemm.h keeps tiles in vector registers).

    ``pip install -e .`` builds on the machine that runs the kernels, so the default is that
    machine's ISA (``-march=native``: AVX2+FMA on the project's CPU machines). Set
    ``TORCHREC_TT_CPU_ARCH`` to another ``-march`` value (e.g. ``x86-64-v3``) for a wheel that
    runs elsewhere, or to ``none`` for the compiler's default.
    """
    arch = os.environ.get("TORCHREC_TT_CPU_ARCH", "native")
    flags = ["-ffp-contract=fast"]  # ISO C++ modes default to off: no FMA from a * b + c
    if arch != "none" and platform.machine().lower() in ("x86_64", "amd64", "i686"):
        flags.append(f"-march={arch}")
    elif arch != "none" and platform.machine().lower() in ("aarch64", "arm64"):
        flags.append(f"-mcpu={arch}")
    return flags


def _extension():
    sources = ["csrc/ops.cpp", "csrc/tt_embedding_bag_autograd.cpp"] + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3"] + _cpu_arch_flags()
    link_args = []
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
        link_args += ["-fopenmp"]
    if _with_cuda():
        _set_default_cuda_arch_list()
        cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        if cuda_sources:
            return CUDAExtension(
                name="torchrec_tt._C",
                sources=sources + cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": cxx_flags + ["-DTORCHREC_TT_WITH_CUDA"],
                    "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DTORCHREC_TT_WITH_CUDA"],
                },
                extra_link_args=link_args,
            )
    return CppExtension(
        name="torchrec_tt._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
