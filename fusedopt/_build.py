"""Source lists and compiler flags, shared by setup.py and the JIT fallback in _backend.py.

Kept free of torch imports at module level so setup.py can load it by path before anything is built.
"""

import os
import shutil
from pathlib import Path

CPU_SOURCES = [
    "bindings_cpu.cpp",
    "cpu/dispatch.cpp",
    "cpu/grad_buffer.cpp",
    # Each capability TU compiles every CPU kernel for one ISA (see csrc/cpu/capability/all_kernels.inc).
    "cpu/capability/default.cpp",
    "cpu/capability/avx2.cpp",
    "cpu/capability/avx512.cpp",
]
CUDA_SOURCES = [
    "bindings_cuda.cpp",
    "cuda/adam.cu",
    "cuda/rmsprop.cu",
    "cuda/sgd.cu",
    "cuda/grad_norm.cu",
    "cuda/mse_loss.cu",
    "cuda/bce_loss.cu",
    "cuda/cross_entropy.cu",
]

CPU_FLAGS = ["-O3", "-fopenmp", "-std=c++20", "-Wno-psabi"]
CUDA_HOST_FLAGS = ["-O3", "-std=c++20"]


def torch_version_define() -> str:
    """Compiled into _cuda so the loader can tell a build made against another torch."""
    import torch

    return f'-DFUSEDOPT_TORCH_VERSION="{torch.__version__}"'


def csrc_dir() -> Path:
    """csrc/ of a source checkout, else the copy shipped inside the installed package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "csrc"):
        if (cand / "bindings_cpu.cpp").exists():
            return cand
    raise FileNotFoundError("fusedopt C++ sources (csrc/) not found next to the package")


def cuda_arch_flags() -> list:
    archs = os.environ.get("FUSEDOPT_CUDA_ARCHS", "8.0;9.0")
    arch_list = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = []
    for i, arch in enumerate(arch_list):
        ptx = arch.endswith("+PTX") or i == len(arch_list) - 1  # PTX of the newest arch for forward compat
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_nvcc_flags() -> list:
    return ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", *cuda_arch_flags()]


def cuda_library_include_dirs() -> list:
    """Headers of the CUDA libraries torch's headers include (cuSPARSE, cuBLAS, ...): a bare nvcc toolkit may lack
    them, and pip's CUDA builds of torch ship them under site-packages/nvidia/*/include."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(p) for p in site.glob("*/include") if (p / "cusparse.h").exists())


def set_default_cuda_home() -> None:
    """torch's cpp_extension guesses CUDA_HOME from `which nvcc`; with nvcc in /usr/local/bin that guess (/usr/local)
    has no lib64/libcudart. Prefer a real toolkit folder. Call before importing torch.utils.cpp_extension."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ("/usr/local/cuda",):
        if Path(cand, "bin", "nvcc").exists() or Path(cand, "lib64").exists():
            os.environ["CUDA_HOME"] = cand
            return


def nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or bool(home and Path(home, "bin", "nvcc").exists())
