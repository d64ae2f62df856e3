"""`pip install --no-build-isolation .` (the README's install command) on a CPU-only setup: the CPU extension is
built, the Triton kernels and the C++ sources ship inside the package, and an optimizer step runs from the install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_cpu_only(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, FUSEDOPT_SKIP_CUDA="1")
    # In-tree build: ninja reuses the objects of `make build`, so this costs a link, not a recompile.
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--target",
           str(target), str(ROOT)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((target / "fusedopt").glob("_C*.so")), "the CPU extension was not built"
    assert (target / "fusedopt" / "triton_kernels" / "adam.py").exists()
    assert (target / "fusedopt" / "csrc" / "cuda" / "multi_tensor_apply.cuh").exists()  # for the JIT fallback
    script = (
        f"import torch, fusedopt; assert fusedopt.__file__.startswith({str(target)!r}), fusedopt.__file__\n"
        "p = torch.nn.Parameter(torch.ones(5)); p.grad = torch.ones(5)\n"
        "opt = fusedopt.Adam([p], lr=0.1); opt.step()\n"
        "assert opt.param_groups[0]['lr'] == 0.1 and abs(p[0].item() - 0.9) < 1e-6, p\n"
        "import fusedopt.triton_kernels.adam\n"
        "print('ok', fusedopt._backend.status('cpu'))\n"
    )
    run_env = dict(env, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
