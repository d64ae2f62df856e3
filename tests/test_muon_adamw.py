"""muon_param_groups (which params go to Muon) and MuonWithAdamW (both optimizers as one) against torch.optim.Muon +
torch.optim.AdamW stepped side by side, with an LR scheduler, GradScaler and a state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close

import fusedopt
from fusedopt.optim import MuonWithAdamW, muon_param_groups


class TinyLlama(torch.nn.Module):
    def __init__(self, vocab=32, d=8, layers=2, tie=False):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.ModuleDict({name: torch.nn.Linear(d, d, bias=False) for name in ("q", "k", "v", "o")})
            block["up"] = torch.nn.Linear(d, 4 * d, bias=False)
            block["down"] = torch.nn.Linear(4 * d, d, bias=True)
            block["norm"] = torch.nn.RMSNorm(d)
            self.layers.append(block)
        self.norm = torch.nn.RMSNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for b in self.layers:
            x = b["norm"](h)
            h = h + b["o"](torch.tanh(b["q"](x) * b["k"](x)) * b["v"](x))
            h = h + b["down"](torch.nn.functional.silu(b["up"](h)))
        return self.lm_head(self.norm(h))


def _model(seed=0, tie=False):
    torch.manual_seed(seed)
    return TinyLlama(tie=tie).double()


@pytest.mark.parametrize("tie", [False, True])
def test_muon_param_groups_rule(tie):
    model = _model(tie=tie)
    groups = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    adamw = {names[id(p)] for p in groups["adamw"]}
    expected_muon = {f"layers.{i}.{k}.weight" for i in range(2) for k in ("q", "k", "v", "o", "up", "down")}
    assert muon == expected_muon
    expected_adamw = {"embed_tokens.weight", "norm.weight"} | {f"layers.{i}.{k}" for i in range(2)
                                                               for k in ("down.bias", "norm.weight")}  # fmt: skip
    if not tie:
        expected_adamw.add("lm_head.weight")
    assert adamw == expected_adamw
    assert len(groups["muon"]) + len(groups["adamw"]) == len(list(model.parameters()))


def _batch(gen):
    return torch.randint(0, 32, (3, 5), generator=gen), torch.randint(0, 32, (3, 5), generator=gen)


def _loss(model, ids, target):
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_combined_step_with_scheduler_equals_torch_pair(backend):
    """One MuonWithAdamW with a LambdaLR scheduler == torch.optim.Muon + torch.optim.AdamW, each with the same
    scheduler, on the same split."""
    muon_kw, adamw_kw = {"lr": 0.02, "weight_decay": 0.05}, {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}
    ours, theirs = _model(), _model()
    opt = MuonWithAdamW(ours, muon=muon_kw, adamw=adamw_kw, backend=backend)
    split = muon_param_groups(theirs)
    ref = [torch.optim.Muon(split["muon"], **muon_kw), torch.optim.AdamW(split["adamw"], **adamw_kw)]
    warmup = lambda step: min(1.0, (step + 1) / 3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    ref_sched = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in ref]
    gen = torch.Generator().manual_seed(0)
    for s in range(8):
        ids, target = _batch(gen)
        opt.zero_grad()
        _loss(ours, ids, target).backward()
        opt.step()
        sched.step()
        for o in ref:
            o.zero_grad()
        _loss(theirs, ids, target).backward()
        for o, sc in zip(ref, ref_sched):
            o.step()
            sc.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p, q, torch.float64, f"step {s} {name}")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for o in ref for g in o.param_groups]
    assert all(p.grad is not None for p in ours.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in ours.parameters())


def test_state_dict_round_trip_and_torch_loads_the_halves():
    """state_dict() = {"muon", "adamw"}: loaded into a fresh MuonWithAdamW it continues exactly; each half loads
    into torch.optim.Muon / torch.optim.AdamW."""
    ours = _model()
    opt = MuonWithAdamW(ours, muon={"lr": 0.02}, adamw={"lr": 1e-3})
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids, target = _batch(gen)
        opt.zero_grad()
        _loss(ours, ids, target).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"muon", "adamw"}
    assert all(set(st) == {"momentum_buffer"} for st in saved["muon"]["state"].values())
    twin = copy.deepcopy(ours)
    resumed = MuonWithAdamW(twin, muon={"lr": 0.02}, adamw={"lr": 1e-3})
    resumed.load_state_dict(saved)
    split = muon_param_groups(twin)
    torch.optim.Muon(split["muon"]).load_state_dict(copy.deepcopy(saved["muon"]))
    torch.optim.AdamW(split["adamw"]).load_state_dict(copy.deepcopy(saved["adamw"]))
    for _ in range(3):
        ids, target = _batch(gen)
        for m, o in ((ours, opt), (twin, resumed)):
            o.zero_grad()
            _loss(m, ids, target).backward()
            o.step()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"muon": saved["muon"]})


def test_grad_scaler_skips_both_halves():
    """GradScaler sets grad_scale / found_inf on the combined optimizer: both halves unscale in their kernels, and
    an inf anywhere skips both halves (one optimizer, one skip: GradScaler with the torch pair would skip only the
    optimizer that holds the inf)."""
    ours, theirs = _model(), _model()
    opt = MuonWithAdamW(ours, muon={"lr": 0.02}, adamw={"lr": 1e-3}, backend="cpu")
    split = muon_param_groups(theirs)
    ref = [torch.optim.Muon(split["muon"], lr=0.02), torch.optim.AdamW(split["adamw"], lr=1e-3)]
    sc, ref_sc = (torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=2) for _ in range(2))
    gen = torch.Generator().manual_seed(2)
    for s in range(6):
        ids, target = _batch(gen)
        opt.zero_grad()
        sc.scale(_loss(ours, ids, target)).backward()
        for o in ref:
            o.zero_grad()
        ref_sc.scale(_loss(theirs, ids, target)).backward()
        if s == 2:
            ours.norm.weight.grad[0] = theirs.norm.weight.grad[0] = float("inf")
        sc.step(opt)
        for o in ref:
            ref_sc.unscale_(o)
        if s != 2:  # torch's pair would skip only the optimizer holding the inf; the combined one skips as one
            for o in ref:
                ref_sc.step(o)
        sc.update()
        ref_sc.update()
        assert sc.get_scale() == ref_sc.get_scale()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p, q, torch.float64, f"step {s} {name}")


def test_exported():
    assert fusedopt.optim.MuonWithAdamW is MuonWithAdamW and fusedopt.optim.muon_param_groups is muon_param_groups
