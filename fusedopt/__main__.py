"""`python -m fusedopt info`: versions, CPU SIMD capability, and each backend's state (built, usable, why not)."""

from __future__ import annotations

import platform
import sys

import torch

from fusedopt import _backend


def info() -> str:
    lines = [
        f"fusedopt {__import__('fusedopt').__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"GPU available: {torch.cuda.is_available()})",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu      {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    triton, _ = _backend.triton_module()
    lines.append(f"triton   {triton.__version__ if triton else 'not installed'}")
    cpu_mod, _ = _backend.cpu_extension()
    simd = cpu_mod.cpu_capability() if cpu_mod else "n/a (fusedopt._C not built)"
    torch_simd = torch.backends.cpu.get_cpu_capability()
    lines.append(f"cpu simd {simd}  (torch: {torch_simd}; threads: {torch.get_num_threads()})")
    lines.append("")
    lines.append(f"{'backend':8} {'built':6} {'cpu':6} {'cuda':6} note")
    for name in ("cpu", "cuda", "triton", "torch"):
        st = _backend.status(name)
        lines.append(f"{name:8} {st.built!s:6} {st.usable_cpu!s:6} {st.usable_cuda!s:6} {st.reason}")
    lines.append("")
    lines.append(f"auto order: {dict(_backend.AUTO_ORDER)}; FUSEDOPT_BACKEND overrides it for the process")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[1:2] in ([], ["info"]):
        print(info())
        return 0
    print("usage: python -m fusedopt info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
