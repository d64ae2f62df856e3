"""A param group's state_dtype, master_weights or backend set between steps (torch.optim users change group keys
in place): the next step converts the states already made, exactly as loading the state_dict into an optimizer of
the new format, mode or backend does (docs/LOW_BIT_STATES.md, docs/MASTER_WEIGHTS.md). Before, for state_dtype the
C++-held buckets went on stepping the old format (the cpu backend), the torch backend's kernel refused the old
codes, and a switch to None was an "Invalid state_dtype" error; master_weights=True or False set in a group was a
KeyError at the step, and "fp32" -> "remainder" dropped the master's low bits; a new backend was ignored (the
buckets were cached). Optimizers without a low-bit path refuse state_dtype in a group, as their constructors refuse
the keyword (Muon made a quantized buffer beside the full-precision one it stepped). A load keeps the optimizer's
own backend, as it keeps its state_dtype and master_weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_steps, cpu_backends
from test_lowbit_fast_path import _params, _set_grads

import fusedopt

SWITCHES = [("int8", "int4"), ("int4", "int8"), ("int8", "fp8"), ("fp8", "int4"), ("int8", None), (None, "int8"),
            (None, "int4")]  # fmt: skip
OPTIMIZERS = [(fusedopt.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
              (fusedopt.SGD, {"lr": 0.01, "momentum": 0.9, "dampening": 0.3})]  # fmt: skip
STATE_DTYPE_OPTIMIZERS = [*OPTIMIZERS, (fusedopt.optim.Muon, {"lr": 0.02})]
BACKENDS = [b for b in cpu_backends() if b != "triton"]  # the interpreted Triton backend: too slow for 12 steps here


def _steps(opt, params, first, count):
    for s in range(first, first + count):
        _set_grads(params, s)
        opt.step()


def _matrices(dtype):
    """Muon's params: quantized matrices (whole blocks; a tail) and a small one."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(80, 64), (70, 61), (7, 9)]]


def _switch_and_load(cls, kw, option, old, new, dtype=torch.float32):
    """3 steps with group option `old`, then 3 with `new` set in the group; beside them, the state_dict after the
    first 3 loaded into an optimizer made with `new`, and 3 steps. Params and every state must agree bit for bit."""
    switched_params = _matrices(dtype) if cls is fusedopt.optim.Muon else _params(dtype)
    switched = cls(switched_params, **{**kw, option: old})
    _steps(switched, switched_params, 0, 3)
    loaded_params = [p.detach().clone().requires_grad_() for p in switched_params]
    loaded = cls(loaded_params, **{**kw, option: new})
    loaded.load_state_dict(copy.deepcopy(switched.state_dict()))
    switched.param_groups[0][option] = new
    _steps(switched, switched_params, 3, 3)
    _steps(loaded, loaded_params, 3, 3)
    assert_same_steps(switched, switched_params, loaded, loaded_params, f"{option} {old} -> {new}")
    return switched, switched_params[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cls", "kw"), STATE_DTYPE_OPTIMIZERS, ids=[c.__name__ for c, _ in STATE_DTYPE_OPTIMIZERS])
@pytest.mark.parametrize(("old", "new"), SWITCHES, ids=[f"{a}-to-{b}" for a, b in SWITCHES])
def test_state_dtype_switch_equals_loading_into_the_new_format(old, new, cls, kw, backend):
    opt, p = _switch_and_load(cls, {"backend": backend, **kw}, "state_dtype", old, new)
    big = opt.state[p]
    key = "exp_avg" if cls is fusedopt.AdamW else "momentum_buffer"
    if new is None:
        assert key in big and f"{key}_codes" not in big
    else:
        fmt = fusedopt.lowbit.FORMATS[new]
        assert key not in big and big[f"{key}_codes"].dtype == fmt.codes_dtype
        assert big[f"{key}_codes"].numel() == fmt.codes_numel(p.numel())


MASTER_SWITCHES = [(False, True), (True, False), (True, "remainder"), ("remainder", True), ("remainder", False),
                   (False, "remainder")]  # fmt: skip
MASTER_KEY = {True: "master_param", "remainder": "param_remainder", False: None}


@pytest.mark.parametrize("state_dtype", [None, "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cls", "kw"), OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
@pytest.mark.parametrize(("old", "new"), MASTER_SWITCHES, ids=[f"{a}-to-{b}" for a, b in MASTER_SWITCHES])
def test_master_weights_switch_equals_loading_into_the_new_mode(old, new, cls, kw, backend, state_dtype):
    opt, p = _switch_and_load(cls, {"backend": backend, "state_dtype": state_dtype, **kw}, "master_weights", old, new,
                              torch.bfloat16)  # fmt: skip
    big = opt.state[p]
    assert {k for k in big if k in ("master_param", "param_remainder")} == {MASTER_KEY[new]} - {None}


BACKEND_SWITCHES = [(a, b) for a in BACKENDS for b in BACKENDS if a != b]


@pytest.mark.parametrize("state_dtype", [None, "int8"])
@pytest.mark.parametrize(("old", "new"), BACKEND_SWITCHES, ids=[f"{a}-to-{b}" for a, b in BACKEND_SWITCHES])
def test_backend_switch_equals_loading_into_the_new_backend(old, new, state_dtype):
    """The group's backend set between steps takes effect at the next step (the cached buckets ignored it)."""
    opt, _ = _switch_and_load(fusedopt.AdamW, {"state_dtype": state_dtype}, "backend", old, new)
    assert {b.backend for b in opt._buckets(0, opt.param_groups[0], range(3))} == {new}


def test_load_keeps_the_optimizers_backend():
    """torch's load_state_dict sets each group's keys to the checkpoint's: a backend="cuda" checkpoint loaded on a
    CPU machine would fail its first step. The optimizer's own backend wins."""
    params = _params()
    saved = fusedopt.AdamW(params, backend="cpu")
    _steps(saved, params, 0, 1)
    sd = copy.deepcopy(saved.state_dict())
    sd["param_groups"][0]["backend"] = "cuda"  # as saved on a GPU machine
    fresh = fusedopt.AdamW([p.detach().clone().requires_grad_() for p in params], backend="torch")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["backend"] == "torch"
    _steps(fresh, fresh.param_groups[0]["params"], 1, 1)  # cuda would refuse these CPU tensors


def test_bad_switches_are_refused():
    params = _params()
    opt = fusedopt.AdamW(params, backend="cpu", state_dtype="int8")
    _steps(opt, params, 0, 1)
    opt.param_groups[0]["state_dtype"] = "int2"
    with pytest.raises(ValueError, match="Invalid state_dtype: 'int2'"):
        opt.step()
    opt.param_groups[0]["state_dtype"] = "int8"
    opt.param_groups[0]["backend"] = "bogus"
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        opt.step()
    wide = [torch.randn(5000, dtype=torch.float64, requires_grad=True)]
    opt = fusedopt.AdamW(wide, backend="cpu")
    _steps(opt, wide, 0, 1)
    opt.param_groups[0]["state_dtype"] = "int8"
    with pytest.raises(ValueError, match="does not support float64 params"):
        opt.step()
    halves = _params(torch.float16)
    opt = fusedopt.AdamW(halves, backend="cpu", master_weights=True)
    _steps(opt, halves, 0, 1)
    opt.param_groups[0]["master_weights"] = "bogus"
    with pytest.raises(ValueError, match="Invalid master_weights value: 'bogus'"):
        opt.step()
    opt.param_groups[0]["master_weights"] = "remainder"
    with pytest.raises(ValueError, match="master_weights='remainder' needs bfloat16 params"):
        opt.step()


REFUSING = [(fusedopt.LAMB, _params), (fusedopt.Adafactor, _params)]


@pytest.mark.parametrize(("cls", "make"), REFUSING, ids=[c.__name__ for c, _ in REFUSING])
def test_optimizers_without_low_bit_states_refuse_a_group_state_dtype(cls, make):
    params = make()
    opt = cls(params, backend="cpu")
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support state_dtype='int8'"):
        opt.add_param_group({"params": make(), "state_dtype": "int8"})
    _steps(opt, params, 0, 1)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["state_dtype"] = "int4"
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support state_dtype='int4'"):
        _steps(opt, params, 1, 1)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "refused, yet stepped"
