"""Optimizer state reset, replaced and params swapped between steps, as torch.optim users do it:
`opt.state.clear()`, `opt.state = defaultdict(dict)`, `del opt.state[p]`, `opt.state[p][key] = t`,
`opt.state[p] = {...}`, `opt.param_groups[0]["params"][0] = new_param`. The cached buckets hold the params and
state tensors; before, they went on stepping the old ones (a reset did nothing to the trajectory and the new state
never moved, AdamW 3e-2 off torch after 2 steps; a replaced entry was ignored; a swapped-in param was never
stepped, and the old one took its grads).

The reference is the same optimizer, over the params as they are after the change, loaded from the state_dict
before it edited as the change edits the state (a load rebuilds every bucket): the steps after the change equal its
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


def _first_entry(state: dict) -> str:
    """The first state key of a param's state other than `step` (a zero step would divide by zero)."""
    return next(k for k in state if k != "step")


def _replace_entry(opt, params) -> list:
    state = opt.state[params[0]]
    key = _first_entry(state)
    state[key] = torch.zeros_like(state[key])
    return params


def _replace_state_dict(opt, params) -> list:
    state = opt.state[params[0]]
    key = _first_entry(state)
    opt.state[params[0]] = {**state, key: torch.zeros_like(state[key])}  # same keys, same mapping size
    return params


def _zero_first_entry(saved_state: dict) -> None:
    state = saved_state[0]
    key = _first_entry(state)
    state[key] = torch.zeros_like(state[key])


def _swap_first_param(opt, params) -> list:
    new = torch.nn.Parameter(torch.randn(params[0].shape, generator=torch.Generator().manual_seed(7)))
    opt.param_groups[0]["params"][0] = new
    return [new, *params[1:]]


def _drop_all(saved_state: dict) -> None:
    saved_state.clear()


def _drop_first(saved_state: dict) -> None:
    del saved_state[0]


RESETS = {  # name -> (the change, returning the params after it; the same edit of the state_dict's "state")
    "clear": (_clear, _drop_all),
    "new mapping": (_new_mapping, _drop_all),
    "del one": (_del_first, _drop_first),
    "entry replaced": (_replace_entry, _zero_first_entry),
    "state dict replaced": (_replace_state_dict, _zero_first_entry),
    "param swapped": (_swap_first_param, _drop_first),
}
CASES = [
    pytest.param(info, state_dtype, backend, reset, id=f"{info.name}-{state_dtype or 'fp32'}-{backend}-{reset}")
    for info in OPTIM_DB
    for state_dtype in (None, "int8")
    if state_dtype is None or (info.takes("state_dtype") and "int8" not in info.not_applicable)
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
    do_reset, edit_saved = RESETS[reset]
    edit_saved(saved["state"])
    params = do_reset(opt, params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, **kwargs)
    ref.load_state_dict(saved)
    run_steps(opt, params, 2, 2)
    run_steps(ref, ref_params, 2, 2)
    assert_same_steps(opt, params, ref, ref_params, reset)


STEADY_MODES = {  # name -> (the keywords it adds, the params' dtype, its key in OptimInfo.not_applicable)
    "fp32": ({}, torch.float32, None),
    "int8": ({"state_dtype": "int8"}, torch.float32, "int8"),
    "bf16 master": ({"master_weights": True}, torch.bfloat16, "master_weights"),
    "bf16 stochastic round": ({"bf16_stochastic_round": True}, torch.bfloat16, "stochastic_round"),
}
STEADY_CASES = [
    pytest.param(info, mode, backend, id=f"{info.name}-{mode}-{backend}")
    for info in OPTIM_DB
    for mode, (extra, _, family) in STEADY_MODES.items()
    if info.takes(*extra) and family not in info.not_applicable
    for backend in ("cpu", "torch")
]


@pytest.mark.parametrize(("info", "mode", "backend"), STEADY_CASES)
def test_steps_alone_do_not_rebuild_the_buckets(info, mode, backend):
    """The check above must not see a step's own work as a user's write: two optimizers stepped in turn, each
    builds its buckets on its first step only (a rebuild at every step would cost a first step's work each time)."""
    extra, dtype, _ = STEADY_MODES[mode]
    kwargs = {"backend": backend, **info.cases[0], **extra}
    runs = []
    for seed in (0, 1):
        params, _ = make_params(info.shapes(SHAPES, small=True), dtype, seed=seed)
        runs.append((info.fused(params, **kwargs), params))
    built = []
    for step in range(5):
        for opt, params in runs:
            run_steps(opt, params, step, 1)
        built.append([opt._buckets_built for opt, _ in runs])
    assert built[0][0] >= 1 and built == built[:1] * 5


@pytest.mark.parametrize("built", [True, False], ids=["fusedopt._C", "identity only"])
def test_state_snapshot_sees_the_writes_it_watches(built):
    """The record under the check: every kind of write between two refreshes is seen (the C++ record), or the
    mapping-level ones (the fallback where fusedopt._C is not built); a refresh with nothing written is not."""
    from fusedopt.optim import _base

    snapshot = _base._new_state_snapshot() if built else _base._IdentitySnapshot()
    assert type(snapshot).__name__ == ("StateSnapshot" if built else "_IdentitySnapshot")
    params = [torch.zeros(2) for _ in range(3)]
    state = collections.defaultdict(dict)
    for p in params:
        state[p].update(step=torch.zeros(()), exp_avg=torch.zeros(2))
    writes = {  # name -> (the write, whether the identity-only record sees it)
        "entry replaced": (lambda st: st[params[0]].__setitem__("exp_avg", torch.zeros(2)), False),
        "entry renamed": (lambda st: st[params[2]].__setitem__("exp_avg2", st[params[2]].pop("exp_avg")), False),
        "state dict replaced": (lambda st: st.__setitem__(params[1], dict(st[params[1]])), False),
        "entry added": (lambda st: st[params[0]].__setitem__("extra", 1.0), False),
        "param state deleted": (lambda st: st.pop(params[0]), True),
        "param state added": (lambda st: st[torch.zeros(1)], True),  # a defaultdict read adds an empty state
        "cleared": (lambda st: st.clear(), True),
    }
    assert snapshot.refresh(state)  # the first refresh records
    for name, (write, mapping_level) in writes.items():
        assert not snapshot.refresh(state), name
        write(state)
        assert snapshot.refresh(state) == (mapping_level or built), name
    assert not snapshot.refresh(state)
    assert snapshot.refresh(collections.defaultdict(dict)), "a new mapping"
