"""Optimizer state reset between steps, as torch.optim users do it: `opt.state.clear()`, `opt.state =
defaultdict(dict)`, `del opt.state[p]`. The cached buckets hold the state tensors; before, they went on stepping the
old ones, so a reset did nothing to the params' trajectory and the new state never moved (AdamW: 3e-2 off torch
after 2 steps).

The reference is the same optimizer loaded from the pre-reset state_dict with that state removed (a load rebuilds
every bucket): the steps after the reset equal its steps bit for bit, params and every state. Every optimizer, full
precision and int8 states, cpu and torch backends.
"""

from __future__ import annotations

import collections
import copy
import inspect

import pytest
import torch
from conftest import assert_same_steps
from optim_db import OPTIM_DB
from parity_steps import make_params
from test_lowbit_fast_path import _set_grads

SHAPES = [(80, 64), (5000,), (7, 9)]
MATRICES = [(80, 64), (40, 33), (7, 9)]
RESETS = {  # name -> (the reset, the positions of the params whose state it removes; None: all)
    "clear": (lambda opt, params: opt.state.clear(), None),
    "new mapping": (lambda opt, params: setattr(opt, "state", collections.defaultdict(dict)), None),
    "del one": (lambda opt, params: opt.state.pop(params[0]), (0,)),
}
CASES = [
    pytest.param(info, state_dtype, backend, reset, id=f"{info.name}-{state_dtype or 'fp32'}-{backend}-{reset}")
    for info in OPTIM_DB
    for state_dtype in (None, "int8")
    if state_dtype is None
    or ("state_dtype" in inspect.signature(info.fused.__init__).parameters and "int8" not in info.not_applicable)
    for backend in ("cpu", "torch")
    for reset in RESETS
]


def _steps(opt, params, first: int, count: int) -> None:
    for s in range(first, first + count):
        _set_grads(params, s)
        opt.step()


@pytest.mark.parametrize(("info", "state_dtype", "backend", "reset"), CASES)
def test_steps_after_a_state_reset_use_the_new_state(info, state_dtype, backend, reset):
    kwargs = {"backend": backend, **info.cases[0], **({"state_dtype": state_dtype} if state_dtype else {})}
    params, _ = make_params(MATRICES if info.matrices_only else SHAPES, torch.float32)
    opt = info.fused(params, **kwargs)
    _steps(opt, params, 0, 2)
    saved = copy.deepcopy(opt.state_dict())
    do_reset, removed = RESETS[reset]
    saved["state"] = {i: s for i, s in saved["state"].items() if removed is not None and i not in removed}
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, **kwargs)
    ref.load_state_dict(saved)
    do_reset(opt, params)
    _steps(opt, params, 2, 2)
    _steps(ref, ref_params, 2, 2)
    assert_same_steps(opt, params, ref, ref_params, reset)
