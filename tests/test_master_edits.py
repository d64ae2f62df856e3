"""16-bit params changed outside the optimizer under master weights (docs/MASTER_WEIGHTS.md, "A param changed outside
the optimizer"): zeroed or masked in place (pruning), clamped (weight clipping), or overwritten by a model load.

- `master_weights=True`: the step starts from the changed param, not the stale master (before, the next step
  restored the master and the change was lost): where a param is no longer its master rounded, the master is the
  param. The reference: the same optimizer loaded with each changed element's master set to the new param (found
  by comparing the params before and after the change), stepped alike, bit for bit; every optimizer that takes the
  keyword, float32 and int8 states, each backend that runs here.
- `master_weights="remainder"`: the bf16 param joined with its stale remainder is the new param within half a bf16
  spacing, except where no split gives the pair: a zero param beside a negative remainder wrapped around to a NaN
  master (before: a zeroed weight became NaN at the next step); such a param is now its master alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_steps, cpu_backends
from optim_db import OPTIM_DB
from parity_steps import make_params
from test_lowbit_fast_path import run_steps

import fusedopt
from fusedopt import master_weights

_TAKES = [i for i in OPTIM_DB if i.takes("master_weights")]
SHAPES = [(80, 64), (1100,), (7, 9)]  # the first quantized under int8


def _edit(params) -> None:
    """Three edits users make between steps, in place (the load brings an inf and a NaN)."""
    with torch.no_grad():
        params[0].view(-1)[::3] = 0.0  # a pruning mask
        params[1].clamp_(-0.5, 0.5)  # weight clipping
        params[2].copy_(torch.randn(params[2].shape, generator=torch.Generator().manual_seed(5)))  # a model load
        params[2].view(-1)[:2] = torch.tensor([float("inf"), float("nan")])  # non-finite values in what it loads


CASES = [
    pytest.param(info, state_dtype, backend, id=f"{info.name}-{state_dtype or 'fp32'}-{backend}")
    for info in _TAKES
    for state_dtype in (None, "int8")
    if state_dtype is None or "int8" not in info.not_applicable
    for backend in cpu_backends()
]


@pytest.mark.parametrize(("info", "state_dtype", "backend"), CASES)
def test_a_changed_param_is_where_the_float32_master_restarts(info, state_dtype, backend):
    kwargs = {"backend": backend, "master_weights": True, **info.cases[0]}
    if state_dtype:
        kwargs["state_dtype"] = state_dtype
    params, _ = make_params(SHAPES, torch.bfloat16)
    opt = info.fused(params, **kwargs)
    run_steps(opt, params, 0, 3)
    before = [p.detach().clone() for p in params]
    _edit(params)
    saved = copy.deepcopy(opt.state_dict())
    changed = []
    for i, (p, b) in enumerate(zip(params, before)):
        mask = p.detach().view(torch.int16) != b.view(torch.int16)
        changed.append(int(mask.sum()))
        master = saved["state"][i]["master_param"]
        saved["state"][i]["master_param"] = torch.where(mask, p.detach().float(), master)
    assert all(changed), changed  # each edit changed some elements
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, **kwargs)
    ref.load_state_dict(saved)
    run_steps(opt, params, 3, 3)
    run_steps(ref, ref_params, 3, 3)
    assert_same_steps(opt, params, ref, ref_params, "after the edit")


def test_join_takes_a_param_no_split_makes_alone():
    """+-0 beside a negative remainder and +-inf beside a positive one (NaN masters by wrap-around): the param alone;
    the pairs splits make (a positive remainder at 0, a negative one at inf: +-3.4e38 rounded up) as before."""
    bits = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x0000, 0x7F80, 0xFF80, 0x3F80], dtype=torch.int32)
    params = (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)
    remainders = torch.tensor([-5, -0x8000, 3, 1, 7, -1, -3, -5], dtype=torch.int16)
    joined = master_weights.join(params, remainders).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    want = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x00000007, 0x7F7FFFFF, 0xFF7FFFFD, 0x3F7FFFFB]
    assert [hex(v) for v in joined.tolist()] == [hex(v) for v in want]


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_zeroed_param_beside_negative_remainders_stays_zero(backend):
    """AdamW with remainders, 3 steps, the param zeroed (about half its remainders negative), then a step with
    lr=0: the params stay 0 (before: NaN wherever the remainder was negative), and those remainders become 0."""
    params, _ = make_params([(33, 17)], torch.bfloat16)
    opt = fusedopt.optim.AdamW(params, lr=1e-2, backend=backend, master_weights="remainder")
    run_steps(opt, params, 0, 3)
    negative = opt.state[params[0]]["param_remainder"] < 0
    assert negative.sum() > 100
    with torch.no_grad():
        params[0].zero_()
    opt.param_groups[0]["lr"] = 0.0
    run_steps(opt, params, 3, 1)
    assert params[0].view(torch.int16).eq(0).all()
    assert opt.state[params[0]]["param_remainder"][negative].eq(0).all()
