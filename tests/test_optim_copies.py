"""Copies of an optimizer, as torch.optim users make them: copy.deepcopy(optimizer) and pickling
(torch.save(optimizer) / torch.load). torch's Optimizer.__getstate__ keeps defaults, state and param_groups only, so
a copy of a fusedopt optimizer had lost every fusedopt attribute and failed its first step (AttributeError).

The property: 2 steps, copy, then 3 steps on the copy leave the original untouched (no shared tensor, no cached
C++ list pointing at the original's), and the same 3 steps on the original give the copy's params and states bit
for bit. Every optimizer, full precision and each storage mode it takes (int8 states, bf16 stochastic rounding with
its counters, master weights), on the cpu and torch backends; and MuonWithAdamW, whose two optimizers a copy must
keep sharing their group and state dicts with it.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_same_steps
from optim_db import OPTIM_DB
from parity_steps import make_params
from test_lowbit_fast_path import SHAPES, run_steps

import fusedopt

MODES = {  # mode -> (the optimizer's keywords, the param dtype, the OPTIM_DB family whose absence it needs)
    "fp32": ({}, torch.float32, None),
    "int8": ({"state_dtype": "int8"}, torch.float32, "int8"),
    "sr-bf16": ({"bf16_stochastic_round": True, "stochastic_round_seed": 3}, torch.bfloat16, "stochastic_round"),
    "remainder-bf16": ({"master_weights": "remainder"}, torch.bfloat16, None),
}


CASES = [
    pytest.param(info, mode, backend, how, id=f"{info.name}-{mode}-{backend}-{how}")
    for info in OPTIM_DB
    for mode, (kwargs, _, family) in MODES.items()
    if info.takes(*kwargs) and family not in info.not_applicable
    for backend in ("cpu", "torch")
    for how in ("deepcopy", "pickle")
]


def _copy(opt, how: str):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _snapshot(opt, params) -> list:
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


@pytest.mark.parametrize(("info", "mode", "backend", "how"), CASES)
def test_copy_steps_alone_and_like_the_original(info, mode, backend, how):
    kwargs, dtype, _ = MODES[mode]
    params, _ = make_params(info.shapes(SHAPES, small=True), dtype)
    opt = info.fused(params, backend=backend, **info.cases[0], **kwargs)
    run_steps(opt, params, 0, 2)
    twin = _copy(opt, how)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(params, twin_params))
    before = _snapshot(opt, params)
    run_steps(twin, twin_params, 2, 3)
    for (p, state), q in zip(before, params):
        assert torch.equal(p, q) and all(torch.equal(v, opt.state[q][k]) for k, v in state.items())
    run_steps(opt, params, 2, 3)
    assert_same_steps(opt, params, twin, twin_params, f"{info.name} {mode}")
    assert not torch.equal(before[0][0], params[0].detach())  # the steps moved the params


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_muon_with_adamw_copy_keeps_its_optimizers_shared(how):
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4))
    opt = fusedopt.optim.MuonWithAdamW(
        {"muon": [model[0].weight], "adamw": [model[0].bias, model[2].weight, model[2].bias]}, backend="cpu"
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    run_steps(opt, params, 0, 2)
    twin = _copy(opt, how)
    assert twin.param_groups[0] is twin.muon.param_groups[0] and twin.param_groups[1] is twin.adamw.param_groups[0]
    assert twin.state.maps[0] is twin.muon.state and twin._step_supports_amp_scaling
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for g in twin.param_groups:
        g["lr"] = 0.5 * g["lr"]  # a scheduler on the copy drives both of its optimizers, not the original's
    for g in opt.param_groups:
        g["lr"] = 0.5 * g["lr"]
    run_steps(twin, twin_params, 2, 3)
    run_steps(opt, params, 2, 3)
    assert_same_steps(opt, params, twin, twin_params, how)
