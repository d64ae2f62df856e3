"""Build fusedopt: the CPU extension always, the CUDA extension when nvcc and a CUDA torch exist.

Environment:
  FUSEDOPT_FORCE_CUDA=1   build fusedopt._cuda even if the torch/nvcc checks say no
  FUSEDOPT_SKIP_CUDA=1    never build fusedopt._cuda
  FUSEDOPT_CUDA_ARCHS     e.g. "8.0;9.0" (the default); PTX of the last one is embedded too
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja builder)
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_fusedopt_build", ROOT / "fusedopt" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
build.set_default_cuda_home()
build.write_all_kernels_inc()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    if os.environ.get("FUSEDOPT_SKIP_CUDA") == "1":
        return False
    if os.environ.get("FUSEDOPT_FORCE_CUDA") == "1":
        return True
    import torch

    return torch.version.cuda is not None and build.nvcc_found()


def rel(sources):
    return [f"csrc/{s}" for s in sources]


ext_modules = [
    CppExtension(
        "fusedopt._C",
        rel(build.CPU_SOURCES),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": build.CPU_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]
if want_cuda():
    ext_modules.append(
        CUDAExtension(
            "fusedopt._cuda",
            rel(build.CUDA_SOURCES),
            include_dirs=[str(ROOT / "csrc"), *build.cuda_library_include_dirs()],
            extra_compile_args={
                "cxx": [*build.CUDA_HOST_FLAGS, build.torch_version_define()],
                "nvcc": build.cuda_nvcc_flags(),
            },
        )
    )

csrc_files = [str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*") if p.is_file()]

setup(
    packages=["fusedopt", "fusedopt.optim", "fusedopt.nn", "fusedopt.ops", "fusedopt.triton_kernels", "fusedopt.csrc"],
    package_dir={"fusedopt.triton_kernels": "triton_kernels", "fusedopt.csrc": "csrc"},
    # The sources ship inside the wheel so the JIT fallback can build _cuda on a GPU machine.
    package_data={"fusedopt.csrc": csrc_files},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
