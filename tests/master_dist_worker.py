"""The body of tests/test_master_distributed.py: master weights (`master_weights=True` and "remainder",
docs/MASTER_WEIGHTS.md) of bf16 params sharded by FSDP2 on 2 gloo ranks, also beside int8 states, and their DCP
checkpoints loaded on 2 ranks and on 1. Each rank writes {scenario: "ok" | traceback} to <out>/<world>-<rank>.json.

The reference of a 2-rank run is the 1-rank optimizer fed the same full gradients (each step's sharded gradients
gathered). The step is elementwise, so every element's math is the same on a shard as on the whole tensor: params,
masters (or remainders) and states are compared bit for bit (int8 states on a model whose shards hold whole blocks
of 256: tests/lowbit_dist_worker.py).
"""

from __future__ import annotations

import os

import gloo
import torch

import fusedopt
from fusedopt.optim._base import ROUND_COUNTERS

STEPS = 10  # parity steps
SAVE_AT, RESUME_STEPS = 3, 3  # DCP: train 3 steps, save, 3 more (uninterrupted) vs 3 after loading
MODES = {  # the optimizer's mode keywords
    "fp32": {"master_weights": True},
    "remainder": {"master_weights": "remainder"},
    "int8-remainder": {"master_weights": "remainder", "state_dtype": "int8"},
}
# bf16 stochastic rounding, no master (the dcp-stochastic-round scenarios)
SR_MODES = {"sr": {"bf16_stochastic_round": True}, "sr-int8": {"bf16_stochastic_round": True, "state_dtype": "int8"}}
KW = {"lr": 1e-2, "weight_decay": 0.1}
MASTER_KEY = {True: "master_param", "remainder": "param_remainder"}
# Linear layers (in, out), bf16. Sharded along dim 0 (out rows): 45 rows split 23 / 22; the last layer's single
# row (and its 1-element bias) leaves rank 1 an empty shard. With int8 states: 64 rows split 32 / 32 (4096 elements
# each: whole blocks of 256) in place of the 45.
LAYERS = ((64, 128), (128, 45), (45, 4), (4, 1))
LAYERS_INT8 = ((64, 128), (128, 64), (64, 4), (4, 1))


def build(seed: int = 0, mode: str = "fp32") -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in LAYERS_INT8 if "state_dtype" in {**MODES, **SR_MODES}[mode] else LAYERS:
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(torch.bfloat16)


fsdp = gloo.shard_linears


full = gloo.full


def master_key(mode: str) -> str:
    return MASTER_KEY[MODES[mode]["master_weights"]]


def batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, LAYERS[0][0], generator=gen)
    y = torch.randn(8, LAYERS[-1][1], generator=gen)
    return x.to(torch.bfloat16), y.to(torch.bfloat16)


def forward_backward(model, opt, rank: int, step: int) -> list:
    """One backward on this rank's batch; returns the full (all-rank) gradients. Collective."""
    x, y = batch(rank, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
    return [full(p.grad) for p in model.parameters()]


full_state = gloo.optimizer_state


def _same(got, want, where: str) -> None:
    assert got.dtype == want.dtype, f"{where}: {got.dtype} != {want.dtype}"
    if not torch.equal(got, want):
        diff = (got != want).sum() if got.shape == want.shape else "shapes"
        raise AssertionError(f"{where}: differ ({diff} of {want.numel()}; got {got.flatten()[:4]}, want "
                             f"{want.flatten()[:4]})")


def check_equal_states(opt, params, ref, ref_params, where: str, mode: str) -> None:
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        at = f"{where} param {i} {list(p.shape)}"
        assert torch.equal(full(p.detach()), full(rp.detach())), f"{at}: params differ"
        got, want = full_state(opt, p), full_state(ref, rp)
        assert got.keys() == want.keys(), f"{at}: {sorted(got)} != {sorted(want)}"
        assert master_key(mode) in got, f"{at}: no {master_key(mode)}"
        for k, v in want.items():
            _same(got[k], v, f"{at} {k}")


def scenario_parity(mode: str, rank: int, mesh) -> None:
    """10 AdamW steps on 2 ranks against the 1-rank optimizer fed the same gradients: params, masters / remainders
    and states bit for bit; the master's state is a DTensor sharded as its param, the other states float32."""
    model = build(mode=mode)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    model = fsdp(model, mesh)
    opt = fusedopt.optim.AdamW(model.parameters(), **MODES[mode], **KW)
    ref = fusedopt.optim.AdamW(ref_params, **MODES[mode], **KW)
    for s in range(STEPS):
        for rp, g in zip(ref_params, forward_backward(model, opt, rank, s)):
            rp.grad = g
        opt.step()
        ref.step()
    check_equal_states(opt, list(model.parameters()), ref, ref_params, f"parity {mode}", mode)
    for p in model.parameters():
        st = opt.state[p]
        master = st[master_key(mode)]
        assert type(master).__name__ == "DTensor" and master.placements == p.placements, type(master)
        assert master.to_local().shape == p.to_local().shape
        quantized = "state_dtype" in MODES[mode] and p.numel() >= 4096
        assert ("exp_avg_codes" in st) == quantized, (mode, list(p.shape))
        assert quantized or (st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32)
    # the masters moved the params by updates a bf16 step alone would lose: not a vacuous comparison
    start = build(mode=mode)
    moved = [full(p.detach()) != q.detach() for p, q in zip(model.parameters(), start.parameters())]
    assert any(bool(m.any()) for m in moved)
    # the masters hold bits the bf16 params do not: a step that dropped them would not be bit-identical
    for p in model.parameters():
        m = full(opt.state[p][master_key(mode)])
        kept = m != full(p.detach()).float() if MODES[mode]["master_weights"] is True else m != 0
        assert bool(kept.any()) or p.numel() == 1, list(p.shape)
    if MODES[mode]["master_weights"] is True:  # the param is the master rounded to nearest
        for p in model.parameters():
            assert torch.equal(full(p.detach()), full(opt.state[p]["master_param"]).to(torch.bfloat16))


_dcp = gloo.dcp_modules
load_checkpoint = gloo.load_checkpoint


def _trained(mode: str, kwargs: dict, rank: int, mesh):
    """The FSDP2 model of `mode` and its AdamW (`kwargs`), after SAVE_AT steps."""
    model = fsdp(build(mode=mode), mesh)
    opt = fusedopt.optim.AdamW(model.parameters(), **kwargs, **KW)
    for s in range(SAVE_AT):
        forward_backward(model, opt, rank, s)
        opt.step()
    return model, opt


def scenario_dcp(mode: str, rank: int, mesh, ckpt_dir: str) -> None:
    """Model and optimizer (masters included) saved with DCP on 2 ranks after 3 steps, loaded on 2 ranks into a
    fresh model and optimizer: the next 3 steps equal the uninterrupted run's bit for bit (params, masters, states).
    Rank 0 keeps what the 1-rank load checks."""
    dcp, dsd = _dcp()
    path = os.path.join(ckpt_dir, f"master-{mode}")
    model, opt = _trained(mode, MODES[mode], rank, mesh)
    params = list(model.parameters())
    saved = {"params": [full(p.detach()).clone() for p in params], "state": [full_state(opt, p) for p in params]}
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)  # fmt: skip
    grads = []
    for s in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
        grads.append(forward_backward(model, opt, rank, s))
        opt.step()
    saved["grads"], saved["end"] = grads, [full(p.detach()) for p in params]
    saved["end_state"] = [full_state(opt, p) for p in params]
    fresh = fsdp(build(seed=1, mode=mode), mesh)  # other weights: the load must overwrite them
    fresh_opt = fusedopt.optim.AdamW(fresh.parameters(), **MODES[mode], **KW)
    load_checkpoint(fresh, fresh_opt, path)
    for i, p in enumerate(fresh.parameters()):
        assert torch.equal(full(p.detach()), saved["params"][i]), f"loaded param {i}"
        got = full_state(fresh_opt, p)
        assert got.keys() == saved["state"][i].keys(), f"loaded state {i}: {sorted(got)}"
        for k, v in saved["state"][i].items():
            _same(got[k], v, f"loaded state {i} {k}")
    for s in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
        forward_backward(fresh, fresh_opt, rank, s)
        fresh_opt.step()
    check_equal_states(fresh_opt, list(fresh.parameters()), opt, params, f"dcp {mode}", mode)
    if rank == 0:
        torch.save(saved, path + ".expected.pt")


def scenario_one_rank(mode: str, fsdp_on: bool, mesh, ckpt_dir: str) -> None:
    """The 2-rank checkpoint loaded on 1 rank (FSDP2 on a 1-rank mesh, or a plain model): params, masters and
    states as saved; fed the 2-rank run's next gradients, it ends where that run ended, bit for bit."""
    from torch.distributed.tensor import distribute_tensor

    path = os.path.join(ckpt_dir, f"master-{mode}")
    saved = torch.load(path + ".expected.pt")
    model = build(seed=1, mode=mode)
    if fsdp_on:
        model = fsdp(model, mesh)
    opt = fusedopt.optim.AdamW(model.parameters(), **MODES[mode], **KW)
    load_checkpoint(model, opt, path)
    params = list(model.parameters())
    for i, p in enumerate(params):
        assert torch.equal(full(p.detach()), saved["params"][i]), f"param {i}"
        got = full_state(opt, p)
        assert got.keys() == saved["state"][i].keys(), f"state {i}: {sorted(got)}"
        for k, v in saved["state"][i].items():
            _same(got[k], v, f"state {i} {k}")
    for grads in saved["grads"]:
        for p, g in zip(params, grads):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if fsdp_on else g
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(full(p.detach()), saved["end"][i]), f"end param {i}"
        got = full_state(opt, p)
        for k, v in saved["end_state"][i].items():
            _same(got[k], v, f"end state {i} {k}")


def scenario_dcp_stochastic_round(mode: str, flatten: bool, rank: int, mesh, ckpt_dir: str) -> None:
    """bf16 stochastic rounding under FSDP2, saved with DCP after 3 steps (the optimizer state_dict nested or
    flattened) and loaded on 2 ranks into a fresh model and optimizer: the loaded run draws the uninterrupted run's
    random bits, so its next 3 steps equal that run's bit for bit (counters restarted at 0 would round otherwise)."""
    _, dsd = _dcp()
    options = dsd.StateDictOptions(flatten_optimizer_state_dict=flatten)
    path = os.path.join(ckpt_dir, f"{mode}-{'flat' if flatten else 'nested'}")
    model, opt = _trained(mode, SR_MODES[mode], rank, mesh)
    gloo.save_checkpoint(model, opt, path, options)
    fresh = fsdp(build(seed=1, mode=mode), mesh)
    fresh_opt = fusedopt.optim.AdamW(fresh.parameters(), **SR_MODES[mode], **KW)
    load_checkpoint(fresh, fresh_opt, path, options)
    for s in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
        for m, o in ((model, opt), (fresh, fresh_opt)):
            forward_backward(m, o, rank, s)
            o.step()
    for i, (p, q) in enumerate(zip(fresh.parameters(), model.parameters())):
        _same(full(p.detach()), full(q.detach()), f"param {i}")
        got, want = full_state(fresh_opt, p), full_state(opt, q)
        assert got.keys() == want.keys(), f"state {i}: {sorted(got)} != {sorted(want)}"
        for k, v in want.items():
            _same(got[k], v, f"state {i} {k}")
    counters = [g[ROUND_COUNTERS] for g in opt.state_dict()["param_groups"]]
    assert counters and counters == [g[ROUND_COUNTERS] for g in fresh_opt.state_dict()["param_groups"]], counters


def scenarios(world: int, ckpt_dir: str) -> list:
    out = []
    if world == 2:
        for mode in SR_MODES:
            for flat in (False, True):
                fn = lambda r, m, mode=mode, flat=flat: scenario_dcp_stochastic_round(mode, flat, r, m, ckpt_dir)
                out.append((f"dcp-{mode}-{'flat' if flat else 'nested'}", fn))
    for mode in MODES:
        if world == 2:
            out.append((f"parity-{mode}", lambda r, m, mode=mode: scenario_parity(mode, r, m)))
            out.append((f"dcp-{mode}", lambda r, m, mode=mode: scenario_dcp(mode, r, m, ckpt_dir)))
        else:
            for on in (True, False):
                fn = lambda r, m, mode=mode, on=on: scenario_one_rank(mode, on, m, ckpt_dir)
                out.append((f"2to1-{'fsdp2' if on else 'plain'}-{mode}", fn))
    return out


def worker(rank: int, world: int, rendezvous_file: str, out_dir: str) -> None:
    gloo.run_mesh_worker(rank, world, rendezvous_file, out_dir, scenarios)
