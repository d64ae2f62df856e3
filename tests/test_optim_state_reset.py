"""Optimizer state reset and params swapped between steps, as torch.optim users do it: `opt.state.clear()`,
`opt.state = defaultdict(dict)`, `del opt.state[p]`, `opt.param_groups[0]["params"][0] = new_param`. The cached
buckets hold the params and state tensors; before, they went on stepping the old ones (a reset did nothing to the
trajectory and the new state never moved, AdamW 3e-2 off torch after 2 steps; a swapped-in param was never
stepped, and the old one took its grads).

The reference is the same optimizer, over the params as they are after the change, loaded from the state_dict
before it with the removed state left out (a load rebuilds every bucket): the steps after the change equal its
steps bit for bit, params and every state. Every optimizer, full precision and int8 states, cpu and torch backends.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import assert_same_steps
from optim_db import OPTIM_DB
from parity_steps import make_params
from test_lowbit_fast_path import SHAPES, run_steps


def _clear(opt, params) -> list:
    opt.state.clear()
    return params


def _new_mapping(opt, params) -> list:
    opt.state = collections.defaultdict(dict)
    return params


def _del_first(opt, params) -> list:
    del opt.state[params[0]]
    return params


def _swap_first_param(opt, params) -> list:
    new = torch.nn.Parameter(torch.randn(params[0].shape, generator=torch.Generator().manual_seed(7)))
    opt.param_groups[0]["params"][0] = new
    return [new, *params[1:]]


RESETS = {  # name -> (the change, returning the params after it; the positions whose state it removes, None: all)
    "clear": (_clear, None),
    "new mapping": (_new_mapping, None),
    "del one": (_del_first, (0,)),
    "param swapped": (_swap_first_param, (0,)),
}
CASES = [
    pytest.param(info, state_dtype, backend, reset, id=f"{info.name}-{state_dtype or 'fp32'}-{backend}-{reset}")
    for info in OPTIM_DB
    for state_dtype in (None, "int8")
    if state_dtype is None
    or (info.takes("state_dtype") and "int8" not in info.not_applicable)
    for backend in ("cpu", "torch")
    for reset in RESETS
]


@pytest.mark.parametrize(("info", "state_dtype", "backend", "reset"), CASES)
def test_steps_after_a_state_reset_use_the_new_state(info, state_dtype, backend, reset):
    kwargs = {"backend": backend, **info.cases[0], **({"state_dtype": state_dtype} if state_dtype else {})}
    params, _ = make_params(info.shapes(SHAPES, small=True), torch.float32)
    opt = info.fused(params, **kwargs)
    run_steps(opt, params, 0, 2)
    saved = copy.deepcopy(opt.state_dict())
    do_reset, removed = RESETS[reset]
    saved["state"] = {i: s for i, s in saved["state"].items() if removed is not None and i not in removed}
    params = do_reset(opt, params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, **kwargs)
    ref.load_state_dict(saved)
    run_steps(opt, params, 2, 2)
    run_steps(ref, ref_params, 2, 2)
    assert_same_steps(opt, params, ref, ref_params, reset)
