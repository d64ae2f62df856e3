"""torch.optim's state_dict hooks on fusedopt optimizers (fusedopt/optim/_hooks.py): a load pre-hook sees the
state_dict as passed (low-bit codes, masters and all), its return value is what loads, a load post-hook sees the
optimizer with its states as the next step uses them, each hook runs once per call, a failed load keeps them
registered; MuonWithAdamW runs the hooks registered on it. Checked against torch.optim's own behaviour where both
apply."""

from __future__ import annotations

import copy

import pytest
import torch
from gloo import same

import fusedopt
from fusedopt.optim.muon_adamw import MuonWithAdamW

MODES = {  # fusedopt keyword arguments -> the state keys a param of shape (80, 64) has in a state_dict
    "fp32": ({}, {"step", "exp_avg", "exp_avg_sq"}),
    "int8": ({"state_dtype": "int8"}, {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                        "exp_avg_sq_absmax"}),
    "int4 + master": ({"state_dtype": "int4", "master_weights": True},
                      {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax",
                       "master_param"}),
    "remainder": ({"master_weights": "remainder"}, {"step", "exp_avg", "exp_avg_sq", "param_remainder"}),
}  # fmt: skip


def _stepped(kw, steps=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(80, 64, generator=g).to(dtype).requires_grad_()]
    opt = fusedopt.AdamW(params, lr=1e-2, backend="cpu", **kw)
    for s in range(steps):
        params[0].grad = torch.randn(80, 64, generator=g).to(dtype) * (1 + s)
        opt.step()
    return params, opt


def _dtype(name):
    return torch.bfloat16 if "master" in name or "remainder" in name else torch.float32


@pytest.mark.parametrize("mode", list(MODES))
def test_load_hooks_see_what_torch_shows_them(mode):
    """The pre-hook gets the state_dict as passed, the post-hook the optimizer in its own format (what
    state_dict() now returns), once each."""
    kw, keys = MODES[mode]
    _, source = _stepped(kw, steps=3, seed=1, dtype=_dtype(mode))
    saved = source.state_dict()
    assert set(saved["state"][0]) == keys
    _, opt = _stepped(kw, dtype=_dtype(mode))
    seen_before, seen_after = [], []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen_before.append(copy.deepcopy(sd)))
    opt.register_load_state_dict_post_hook(lambda o: seen_after.append(copy.deepcopy(o.state_dict())))
    opt.load_state_dict(saved)
    (before,), (after,) = seen_before, seen_after
    assert set(before["state"][0]) == keys
    for k in keys:
        assert same(before["state"][0][k], saved["state"][0][k]), k
    final = opt.state_dict()
    assert set(after["state"][0]) == keys == set(final["state"][0])
    for k in keys:
        assert same(after["state"][0][k], final["state"][0][k]), k
        assert same(final["state"][0][k], saved["state"][0][k]), k  # and the load is the checkpoint


def test_load_hooks_as_torch_optim_runs_them():
    """Full precision, where torch.optim.AdamW has the same state_dict: the same hook calls, in the same order,
    seeing the same things; the caller's dict is not edited through the hook's (torch hands hooks a copy)."""
    params, ours = _stepped({})
    theirs = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    saved = copy.deepcopy(ours.state_dict())
    logs = []

    def rebuild(opt, state_dict):  # edits the dict it is given and returns a new one: the caller's must stay as it was
        return {"state": state_dict["state"], "param_groups": state_dict.pop("param_groups")}

    def first_param_keys(opt):
        return sorted(opt.state[opt.param_groups[0]["params"][0]])

    for opt in (ours, theirs):
        log = []
        opt.register_load_state_dict_pre_hook(rebuild)
        opt.register_load_state_dict_pre_hook(lambda o, sd, log=log: log.append(("pre", sorted(sd["state"][0]))))
        opt.register_load_state_dict_post_hook(lambda o, log=log: log.append(("post", first_param_keys(o))))
        given = copy.copy(saved)
        opt.load_state_dict(given)
        assert set(given) == {"state", "param_groups"}  # the hook popped its copy's key
        logs.append(log)
    assert logs[0] == logs[1] == [("pre", ["exp_avg", "exp_avg_sq", "step"]), ("post", ["exp_avg", "exp_avg_sq",
                                                                                         "step"])]  # fmt: skip


def test_a_pre_hook_returns_what_loads():
    """A pre-hook's return value replaces the state_dict (here: int8 codes of another run), for the low-bit keys too."""
    _, other = _stepped({"state_dtype": "int8"}, steps=4, seed=3)
    replacement = other.state_dict()
    _, opt = _stepped({"state_dtype": "int8"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: replacement)
    opt.load_state_dict(_stepped({"state_dtype": "int8"}, seed=5)[1].state_dict())
    for k, v in replacement["state"][0].items():
        assert same(opt.state_dict()["state"][0][k], v), k


def test_a_failed_load_keeps_the_hooks():
    """A state_dict that torch refuses raises as torch's does, and the hooks stay registered (the registries are
    emptied only during the load), running once at the next load."""
    _, opt = _stepped({"state_dtype": "int8"})
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    bad = opt.state_dict()
    bad = {**bad, "param_groups": bad["param_groups"] * 2}
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(bad)
    assert calls == ["pre"]
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "pre", "post"]


def _muon_adamw(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = MuonWithAdamW(model, backend="cpu", muon={"state_dtype": "int8"})
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def test_muon_with_adamw_runs_its_own_hooks():
    """MuonWithAdamW builds its state_dict from its two optimizers: the hooks registered on it run (they did not:
    its state_dict and load_state_dict bypassed torch's), once each, with torch's arguments and return rules."""
    opt, source = _muon_adamw(), _muon_adamw(seed=1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd post", sorted(sd))))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load pre", sorted(sd))))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o is opt)))
    saved = opt.state_dict()
    assert sorted(saved) == ["adamw", "extra", "muon"]
    opt.load_state_dict({**source.state_dict(), "extra": 1})
    assert calls == [("sd pre", True), ("sd post", ["adamw", "muon"]), ("load pre", ["adamw", "muon"]),
                     ("load post", True)]  # fmt: skip
    for key in ("muon", "adamw"):
        for ours, theirs in zip(opt.optimizers[key].state.values(), source.optimizers[key].state.values()):
            for k in theirs:
                assert same(ours[k], theirs[k]), (key, k)
