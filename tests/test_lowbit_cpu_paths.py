"""The CPU low-bit kernels' fast paths (csrc/cpu/quant_avx512.h), against the definition in fusedopt/lowbit.py, bit
for bit:
- the int8 encoder takes x = v / d as v * (1 / d) and redoes with the true division only next to a threshold: here
  every midpoint of both maps is approached from 3 ulps on each side, under absmax values that switch the
  reciprocal on and off (subnormal, 2^-126, 2^126, near the float32 maximum);
- each ISA copy of the engine (default, AVX2, AVX-512 without and with the VBMI byte permutes), forced in a
  subprocess, quantizes and steps like the definition (with VBMI whole groups of 64 take the register lookup,
  quantize_vbmi, and the near-midpoint blocks test it; without, the gathers and the reciprocal);
- the register lookup's tables, emulated in torch, give the definition's codes on any CPU.
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
    """Blocks of 256 values v whose quotient v / absmax lies next to a midpoint of the int8 map (each midpoint's 7
    nearest float32s, and those 4 to 512 ulps away: the register lookup's neighbouring positions, where it decides
    without the float comparison), each block led by `absmax` itself so that it is the block's absmax."""
    table = lowbit.qmap(signed, "cpu", "int8")
    mid = table[256:511]  # the 255 midpoints (table[511] is a NaN)
    powers = torch.tensor([2**k for k in range(2, 10)], dtype=torch.int32)
    offsets = torch.cat([torch.arange(-3, 4, dtype=torch.int32), powers, -powers])
    near = (mid.view(torch.int32)[:, None] + offsets).reshape(-1).view(torch.float32)
    near = near[near.abs() < 1]  # |v| <= absmax
    v = (near.double() * absmax).float()
    per_block = 255
    blocks = -(-v.numel() // per_block)
    body = torch.zeros(blocks * per_block)
    body[: v.numel()] = v
    out = torch.cat([torch.full((blocks, 1), absmax), body.view(blocks, per_block)], dim=1).reshape(-1)
    # (until 2026-12-03 the values went into a copy, out[:, 1:].reshape(-1), and every block was absmax and zeros)
    assert int((out != 0).sum()) == blocks + int((v != 0).sum()), "the near-midpoint values are not all in place"
    return out


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


def _register_lookup(x: torch.Tensor, table: torch.Tensor) -> tuple:
    """csrc/cpu/quant_avx512.h quantize_vbmi's arithmetic on x (float32), in torch: the slot from x's sign, clamped
    exponent and top 7 mantissa bits, its code c and thresholds t1, t2, and x's 15-bit position p in the slot; code
    c + (p > t1) + (p > t2), or where p ties a threshold the exact path's c + (x >= mid[c]) + (x >= mid[c + 1])
    (codes_by_midpoints, c taken as at most 254). Returns the codes and where p tied."""
    words = table[-lowbit.SLOT_WORDS :].view(torch.uint8).long()
    base, shift, slot_code = words[:64], words[64:128], words[128:384]
    t1_low, t1_high, t2_low, t2_high = words[384:].view(4, 256)
    mid = table[256:512]
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    top = bits >> 16
    octave = ((top >> 7) & 0xFF).clamp(127 - 31, 127) - (127 - 31)
    index = octave | ((top >> 10) & 32)
    slot = base[index] + ((top & 0x7F) >> (shift[index] - 16))
    c = slot_code[slot]
    position = ((bits >> (shift[index] - 15)) & 0x7FFF) ^ torch.where(bits >= 2**31, 0x7FFF, 0)
    t1, t2 = t1_low[slot] | (t1_high[slot] << 8), t2_low[slot] | (t2_high[slot] << 8)
    tie = (position == t1) | (position == t2)
    fast = c + (position > t1).long() + (position > t2).long()
    exact_c = c.clamp(max=254)
    exact = exact_c + (x >= mid[exact_c]).long() + (x >= mid[exact_c + 1]).long()
    return torch.where(tie, exact, fast), tie


@pytest.mark.parametrize("signed", [True, False])
def test_register_lookup_tables_give_the_definition(signed):
    """The int8 register lookup's tables (fusedopt/lowbit.py _slot_tables) give lowbit's codes, whatever the CPU:
    at every midpoint and 3 ulps each side, at both ends of every slot (the floats in [-1, 1] whose low 12 mantissa
    bits are all 0 or all 1: every slot boundary is one), at 0, -0, +-1, beyond +-1, subnormals, and on 2M values
    spread over the map's 7 decades."""
    table = lowbit.qmap(signed, "cpu", "int8")
    mid = table[256:511]
    near = (mid.view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)).reshape(-1).view(torch.float32)
    prefixes = torch.arange(0, (0x3F800000 >> 12) + 1, dtype=torch.int64) << 12
    edges = torch.cat([prefixes, prefixes | 0xFFF]).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    spread = (torch.rand(2_000_000, generator=gen) * 2 - 1) * 10 ** (-7 * torch.rand(2_000_000, generator=gen))
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -3.0, 1e-45, -1e-45, 1e-38, -1e-38, 0.5, -0.5])
    x = torch.cat([near, edges, -edges, spread, special])
    codes, tie = _register_lookup(x, table)
    assert torch.equal(codes, lowbit._search(x, table[256:512]))
    # both paths are tested: every midpoint ties some float near it; spread values rarely tie
    spread_ties = int(tie[-spread.numel() - special.numel() : -special.numel()].sum())
    assert bool(tie[: near.numel()].any()) and 0 < spread_ties < 1000
