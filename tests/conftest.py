"""Shared test setup: the tolerance table, backend lists, and device selection.

The reference is always float64 PyTorch. Tolerances live here, per dtype, in one table.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a kernel is
# decorated, so it must be set before fusedopt's Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedopt import _backend

# (rtol, atol) per dtype, for comparing a fused result with the float64 reference.
# fp32/fp64: whole trajectories. bf16/fp16: one step from identical inputs, so about one rounding of the result.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-4),
    torch.float16: (2e-3, 2e-5),
}

# Looser tolerances for results that are long reductions (loss values over many rows).
REDUCTION_TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (5e-3, 1e-4),
}

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tol(dtype: torch.dtype, reduction: bool = False) -> dict:
    rtol, atol = (REDUCTION_TOLERANCES if reduction else TOLERANCES)[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "", reduction=False):
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype, reduction), msg=lambda m: f"{msg}: {m}")


def assert_same_steps(opt_a, params_a, opt_b, params_b, where: str = "") -> None:
    """Two optimizers' params and every state tensor equal bit for bit (compared as bytes: NaN payloads and float8
    codes too), with the same state keys and dtypes."""
    bits = lambda t: t.detach().reshape(-1).view(torch.uint8)
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        assert p.dtype == q.dtype and torch.equal(bits(p), bits(q)), f"{where}: param {i}"
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys(), f"{where}: param {i} state keys"
        for k, v in state_b.items():
            if isinstance(v, torch.Tensor):
                assert state_a[k].dtype == v.dtype and torch.equal(bits(state_a[k]), bits(v)), f"{where}: param {i} {k}"


def cpu_backends() -> list:
    """Backends that run on CPU tensors in this process: cpu and torch always, triton under TRITON_INTERPRET=1."""
    return [name for name in ("cpu", "torch", "triton") if _backend.usable(name, "cpu")]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; scripts/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name in ("cpu", "cuda", "triton"):
        st = _backend.status(name)
        lines.append(f"fusedopt backend {name}: built={st.built} cpu={st.usable_cpu} cuda={st.usable_cuda} {st.reason}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    return lines
