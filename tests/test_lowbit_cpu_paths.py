"""The CPU low-bit kernels' fast paths (csrc/cpu/quant_avx512.h), against the definition in fusedopt/lowbit.py, bit
for bit:
- the int8 encoder takes x = v / d as v * (1 / d) and redoes with the true division only next to a threshold: here
  every midpoint of both maps is approached from 3 ulps on each side, under absmax values that switch the
  reciprocal on and off (subnormal, 2^-126, 2^126, near the float32 maximum);
- each ISA copy of the engine (default, AVX2, AVX-512 without and with the VBMI byte permutes), forced in a
  subprocess, quantizes and steps like the definition.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lowbit_states import Q8_BACKENDS

import fusedopt
from fusedopt import lowbit
from fusedopt.ops import optim_step

ROOT = Path(__file__).resolve().parents[1]
ABSMAX = [1.0, 3.7, 1e-3, 2.0**-126, 2.0**-127, 1.5e-40, 2.0**126, 2.0**127, 3.0e38]


def _near_midpoints(signed: bool, absmax: float) -> torch.Tensor:
    """Blocks of 256 values v whose quotient v / absmax lies within a few ulps of a midpoint of the int8 map (each
    midpoint's 7 nearest float32s), each block led by `absmax` itself so that it is the block's absmax."""
    table = lowbit.qmap(signed, "cpu", "int8")
    mid = table[256:511]  # the 255 midpoints (table[511] is a NaN)
    near = (mid.view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)).reshape(-1).view(torch.float32)
    near = near[near.abs() < 1]  # |v| <= absmax
    v = (near.double() * absmax).float()
    per_block = 255
    blocks = -(-v.numel() // per_block)
    out = torch.zeros(blocks, 256)
    out[:, 0] = absmax
    out[:, 1:].reshape(-1)[: v.numel()] = v
    return out.reshape(-1)


def _one_step(spec, p, grad, state, scalars, hyper, backend):
    codes, absmax = state
    optim_step.step_q8(spec, [p], [grad], [[codes]], [[absmax]], scalars, lr=0.0, hyper=hyper, maximize=False,
                       backend=backend, state_dtype="int8")  # fmt: skip


def _zero_state(signed: bool, n: int):
    """int8 codes of all zeros (the map's exact 0) and an absmax of ones."""
    table = lowbit.qmap(signed, "cpu", "int8")
    zero = int((table[:256] == 0).nonzero()[0])
    return torch.full((n,), zero, dtype=torch.uint8), torch.ones(lowbit.num_blocks(n, "int8"))


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("absmax", ABSMAX)
def test_signed_quotients_next_to_every_midpoint(absmax, backend):
    """SGD, momentum 1, dampening 0, lr 0, from a zero state: the momentum buffer becomes the grad exactly, and its
    codes must be lowbit.quantize's."""
    v = _near_midpoints(True, absmax)
    state = _zero_state(True, v.numel())
    hyper = {"momentum": 1.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    _one_step(fusedopt.optim.sgd.SPEC, torch.zeros_like(v), v.clone(), state, [], hyper, backend)
    want = lowbit.quantize(v, lowbit.qmap(True, "cpu", "int8"))
    assert torch.equal(state[0], want[0]), int((state[0] != want[0]).sum())
    assert torch.equal(state[1], want[1])


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("absmax", ABSMAX)
def test_unsigned_quotients_next_to_every_midpoint(absmax, backend):
    """Adagrad, lr 0, from a zero sum: the sum becomes grad * grad (one rounding), and its codes must be
    lowbit.quantize's. The grads are square roots of near-midpoint values, so the squares land next to them."""
    target = _near_midpoints(False, absmax)
    g = target.double().sqrt().float()
    state = _zero_state(False, g.numel())
    hyper = {"lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0}
    _one_step(fusedopt.optim.adagrad.SPEC, torch.zeros_like(g), g, state, [torch.zeros(())], hyper, backend)
    want = lowbit.quantize(g * g, lowbit.qmap(False, "cpu", "int8"))
    assert torch.equal(state[0], want[0]), int((state[0] != want[0]).sum())
    assert torch.equal(state[1], want[1])


_ISA_CHECK = """
import sys, torch
sys.path.insert(0, 'tests')
from fusedopt import _backend
from test_lowbit_cpu_paths import check_isa
assert _backend.cpu_extension()[0].cpu_capability() == sys.argv[1], _backend.cpu_extension()[0].cpu_capability()
check_isa()
"""


def check_isa():
    """Run in the forced ISA: each format's kernel quantizer against the definition (bit for bit), the near-midpoint
    quotients, and AdamW's fused trajectory against the torch backend's."""
    from test_lowbit_quantizer import _check_kernel_quantizer
    from test_lowbit_states import CASES, test_fused_trajectory_matches_plain_torch

    adamw = [(info, kw) for info, kw in CASES if info.name == "AdamW"][:2]
    assert adamw
    for state_dtype in ("int8", "int4", "fp8"):
        _check_kernel_quantizer("cpu", state_dtype, "cpu")
        for info, kw in adamw:
            test_fused_trajectory_matches_plain_torch(state_dtype, "cpu", info, kw)
    for absmax in ABSMAX:
        test_signed_quotients_next_to_every_midpoint(absmax, "cpu")
        test_unsigned_quotients_next_to_every_midpoint(absmax, "cpu")


def _isas() -> list:
    ext = fusedopt._backend.cpu_extension()[0]
    best = ext.cpu_capability() if ext is not None else "default"
    order = ["default", "avx2", "avx512", "avx512_vbmi"]
    return order[: order.index(best) + 1] if best in order else ["default"]


@pytest.mark.parametrize("isa", _isas())
def test_every_isa_quantizes_as_defined(isa):
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_CPU_CAPABILITY"}
    if isa != "avx512_vbmi":  # the best: nothing to lower
        env["FUSEDOPT_CPU_CAPABILITY"] = isa
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK, isa], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]

