"""Which backends exist, which can run on a device, and which one an op uses.

Backends: "cuda" (fusedopt._cuda, CUDA C++), "triton" (fusedopt.triton_kernels), "cpu" (fusedopt._C, C++ SIMD +
threads) and "torch" (plain PyTorch, fusedopt/reference.py). "auto" takes the first usable entry of AUTO_ORDER for the
tensor's device type; the order is the bench's verdict (bench/results/) and lives here as a table.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Fastest first, per device type, as measured by `make bench`. An op may override its own row.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
AUTO_ORDER_PER_OP: dict[tuple[str, str], tuple[str, ...]] = {}

HOW_TO_BUILD = {
    "cpu": "reinstall with `pip install .` (or `make build` in a checkout); it needs a C++17 compiler",
    "cuda": "install on a machine with nvcc and a CUDA build of torch, or set FUSEDOPT_FORCE_CUDA=1 when building; "
    "with a GPU present the extension is also built just in time on first use",
    "triton": "`pip install triton`; on CPU tensors it runs only under TRITON_INTERPRET=1",
    "torch": "always available",
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    built: bool
    usable_cpu: bool
    usable_cuda: bool
    reason: str  # empty when usable everywhere it can be


def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or an undefined symbol from another torch build
        return None, f"{type(exc).__name__}: {exc}"


@functools.cache
def cpu_extension() -> tuple[ModuleType | None, str]:
    mod, err = _import("fusedopt._C")
    return mod, "" if mod else f"fusedopt._C is not built ({err})"


@functools.cache
def cuda_extension() -> tuple[ModuleType | None, str]:
    """The prebuilt fusedopt._cuda, else (with a GPU present) a just-in-time build, cached on disk."""
    if os.environ.get("FUSEDOPT_SKIP_CUDA") == "1":
        return None, "FUSEDOPT_SKIP_CUDA=1"
    mod, err = _import("fusedopt._cuda")
    if mod is not None and getattr(mod, "torch_version", lambda: "")() == torch.__version__:
        return mod, ""
    if mod is not None:
        err = f"fusedopt._cuda was built against torch {mod.torch_version()}, this is {torch.__version__}"
    if not torch.cuda.is_available():
        return None, f"no usable prebuilt fusedopt._cuda ({err}) and no GPU to build it just in time"
    try:
        return _jit_build_cuda(), ""
    except Exception as exc:
        return None, f"prebuilt fusedopt._cuda unusable ({err}); JIT build failed: {exc}"


def _jit_build_cuda() -> ModuleType:
    from fusedopt import _build

    _build.set_default_cuda_home()
    from torch.utils.cpp_extension import load

    src = _build.csrc_dir()
    tag = f"torch{torch.__version__}".replace("+", "_").replace(".", "_")
    build_dir = os.path.join(os.path.expanduser("~/.cache/fusedopt"), tag)
    os.makedirs(build_dir, exist_ok=True)
    warnings.warn(f"fusedopt: building the CUDA extension just in time in {build_dir} (once)", stacklevel=3)
    return load(
        name="fusedopt_cuda_jit",
        sources=[str(src / s) for s in _build.CUDA_SOURCES],
        extra_include_paths=[str(src), *_build.cuda_library_include_dirs()],
        extra_cflags=[*_build.CUDA_HOST_FLAGS, _build.torch_version_define()],
        extra_cuda_cflags=_build.cuda_nvcc_flags(),
        build_directory=build_dir,
    )


@functools.cache
def triton_module() -> tuple[ModuleType | None, str]:
    mod, err = _import("triton")
    return mod, "" if mod else f"triton is not installed ({err})"


def kernels(backend: str, triton_module: str) -> ModuleType:
    """The module holding a resolved backend's kernels for one op: fusedopt._C, fusedopt._cuda,
    fusedopt.triton_kernels.<triton_module>, or fusedopt.reference (the plain-torch backend). Ops whose kernels take
    the same arguments on every backend call `kernels(backend, name).<entry>(...)`."""
    if backend == "cpu":
        return cpu_extension()[0]
    if backend == "cuda":
        return cuda_extension()[0]
    if backend == "triton":
        return importlib.import_module(f"fusedopt.triton_kernels.{triton_module}")
    if backend == "torch":
        return importlib.import_module("fusedopt.reference")
    raise ValueError(f"fusedopt: unknown backend {backend!r}")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, True, True, "")
    if name == "cpu":
        mod, why = cpu_extension()
        return BackendStatus("cpu", mod is not None, mod is not None, False, why or "CPU tensors only")
    if name == "cuda":
        mod, why = cuda_extension()
        gpu = torch.cuda.is_available()
        reason = why or ("CUDA tensors only" if gpu else "built, but no GPU present")
        return BackendStatus("cuda", mod is not None, False, mod is not None and gpu, reason)
    if name == "triton":
        mod, why = triton_module()
        on_gpu = mod is not None and torch.cuda.is_available()
        on_cpu = mod is not None and triton_interpret()
        if mod is None:
            reason = why
        elif not on_cpu:
            reason = "CPU tensors need TRITON_INTERPRET=1" + ("" if on_gpu else "; no GPU present")
        else:
            reason = ""
        return BackendStatus("triton", mod is not None, on_cpu, on_gpu, reason)
    raise ValueError(f"unknown fusedopt backend {name!r}; choose one of {BACKENDS}")


def usable(name: str, device_type: str) -> bool:
    st = status(name)
    return st.usable_cuda if device_type == "cuda" else st.usable_cpu if device_type == "cpu" else name == "torch"


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("FUSEDOPT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"fusedopt: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_warned_fallback: set = set()


# torch.compile: the answer depends only on the process (extensions, env), so Dynamo calls it at trace time and
# bakes the name into the graph instead of tracing imports and caches (graph breaks).
@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The concrete backend for `op` on `device`. Raises if a named backend cannot run there."""
    name = requested_backend(backend)
    dev = device.type
    if name != "auto":
        if not usable(name, dev):
            st = status(name)
            raise RuntimeError(
                f"fusedopt: backend {name!r} cannot run {op} on {dev} tensors: {st.reason or 'unsupported device'}. "
                f"To get it: {HOW_TO_BUILD[name]}."
            )
        return name
    order = AUTO_ORDER_PER_OP.get((op, dev), AUTO_ORDER.get(dev, ("torch",)))
    for cand in order:
        if cand != "torch" and usable(cand, dev):
            return cand
    if (op, dev) not in _warned_fallback and dev in AUTO_ORDER:
        _warned_fallback.add((op, dev))
        why = "; ".join(f"{c}: {status(c).reason}" for c in order if c != "torch")
        warnings.warn(f"fusedopt: no fused backend for {op} on {dev} ({why}); using plain torch", stacklevel=3)
    return "torch"
