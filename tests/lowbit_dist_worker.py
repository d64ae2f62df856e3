"""The body of tests/test_lowbit_distributed.py: int8, fp8 and int4 states under FSDP2 on 2 gloo ranks,
and the DCP checkpoint they save loaded on 1 rank. Each rank writes {scenario: "ok" | traceback} to
<out>/<world>-<rank>.json.

The reference of a 2-rank run is the 1-rank optimizer fed the same full gradients (each step's sharded gradients
gathered): the optimizer alone is compared, so "equal" means bit for bit.
"""

from __future__ import annotations

import copy
import math
import os

import gloo
import torch
import torch.distributed as dist

import fusedopt
from fusedopt import lowbit
from fusedopt.optim import to_full_precision_state_dict
from fusedopt.optim._lowbit_shards import flat_range

STEPS = 20  # parity steps
SAVE_AT, RESUME_STEPS = 3, 3  # DCP: train 3 steps, save, 3 more (uninterrupted) vs 3 after loading
OPTIMIZERS = {  # name: (class, hyperparameters, state_dtype)
    "AdamW": (fusedopt.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, "int8"),
    "SGD": (fusedopt.optim.SGD, {"lr": 0.05, "momentum": 0.9}, "int8"),
    "AdamW-fp8": (fusedopt.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, "fp8"),
    "AdamW-int4": (fusedopt.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, "int4"),
    "Muon": (fusedopt.optim.Muon, {"lr": 2e-2}, "int8"),
}
# Muon steps 2-D weights only (a bias-free model) and orthogonalizes each whole matrix, which one process stepping
# each shard as a matrix of its own does not: no shard-split run for it. Where its blocks straddle the 1-rank
# blocks, its params part from the 1-rank run's: Newton-Schulz raises every singular value of the momentum toward
# 1, so the requantization noise in the directions that low-rank grads leave empty becomes a full-size part of the
# update (measured: 91% of the distance moved after 20 steps, parity; int8 against float32 momentum in one
# process, rank-4 grads: 29%). Its momentum, fed the same grads, stays within STATE_REL (measured 4.1%).
BIAS_FREE = {"Muon"}
WHOLE_MATRIX = {"Muon"}
KINDS_OF = {"Muon": ("aligned", "misaligned")}
# The model kinds of each format: fp8 shares int8's block layout (two kinds cover it); int4's blocks of 128 make
# "misaligned" aligned (its rows are 128 elements), so it takes "odd" (shards of odd size, starting mid-block).
KINDS = {"int8": ("aligned", "misaligned", "one-row"), "fp8": ("aligned", "misaligned"), "int4": ("aligned", "odd")}
# Where a shard's blocks straddle the 1-rank blocks, the two runs requantize differently: each requantization errs
# by up to half a gap of the map times the block's absmax (0.7% of it for first moments, 0.35% for second), and a
# state carries these errors on, decaying by its beta per step. The bounds below: states within 5% of the tensor's
# largest value, params within 6% of the largest distance they moved. Measured with these seeded data: states 3.0%
# (AdamW exp_avg after 20 steps), params 3.8% (parity, AdamW), 3.2% (DCP resume), 2.7% (2 -> 1 rank).
# fp8's top gap is 5x int8's (32 / 448 against 0.9 / 64); measured where blocks straddle (parity, misaligned):
# states 10.9% (exp_avg), params 8.1%.
# int4 has no such bound: its second moments' floor of absmax / 16 depends on the block, so where blocks differ the
# trajectories part (params 64% of the distance moved, measured); it is checked against the shard-split run instead.
STATE_REL = {"int8": 0.05, "fp8": 0.15}
PARAM_REL = {"int8": 0.06, "fp8": 0.12}
# One requantization errs by at most half the map's widest gap times the block's absmax: int8 0.9 / 64 / 2 (the
# absmax at most the tensor's largest |value| / 0.993), fp8 (448 - 416) / 448 / 2, int4 0.225 / 2 (its signed map's
# gap from -0.8875 to -0.6625, and from -1 to its lowest code -0.8875).
HALF_GAP = {"int8": 0.5 * 0.9 / 64 / 0.993, "fp8": 16 / 448, "int4": 0.1125 * 1.001}


def trajectories_part(name: str, state_dtype: str) -> bool:
    """Where the blocks differ, whether the 2-rank and 1-rank params part (int4; Muon, above): no PARAM_REL bound."""
    return state_dtype == "int4" or name in WHOLE_MATRIX


# Linear layers (in, out). Weights shard along dim 0 (out rows): rank 0 holds ceil(out / 2) rows, so its shard
# ends at a multiple of 256 elements (blocks coincide with the 1-rank ones) iff ceil(out / 2) * in is one.
MODELS = {
    # 128x64: 4096 elements, 2 x 4096 per shard (aligned); 32x128: 4096, shards of 2048 (under the 4096 threshold
    # locally: still 8-bit, the decision is global); 4x32 and the biases: full precision.
    "aligned": ((64, 128), (128, 32), (32, 4)),
    # 45x128: 5760, shards of 23 and 22 rows = 2944 + 2816 elements: rank 1 starts 128 elements into a block.
    "misaligned": ((64, 128), (128, 45), (45, 4)),
    # 1x4608: rank 0 holds the one row, rank 1 an empty shard (and the 1-element bias: rank 1 none of it either)
    "one-row": ((4608, 1), (1, 4)),
    # 135x63: 8505, shards of 68 and 67 rows = 4284 + 4221 elements: rank 1 starts 60 into an int4 block, and its
    # shard has an odd size (a half-filled last byte of packed codes)
    "odd": ((63, 135), (135, 4)),
}


def build(kind: str, seed: int = 0, name: str = "") -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in MODELS[kind]:
        layers += [torch.nn.Linear(a, b, bias=name not in BIAS_FREE), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def aligned(p, world: int, state_dtype: str) -> bool:
    """Whether every shard of p (sharded along dim 0 over `world` ranks) has the 1-rank blocks."""
    row = math.prod(p.shape[1:])
    return (math.ceil(p.shape[0] / world) * row) % lowbit.quant_format(state_dtype).block == 0


def local_codes(codes, p, state_dtype: str):
    """This rank's codes as the step keeps them, cut from the 1-rank optimizer's codes (int4: packed bytes)."""
    if state_dtype != "int4":
        return codes
    offset, n, numel = flat_range(p)
    return lowbit.pack4(lowbit.unpack4(codes, numel)[offset : offset + n])


def batch(model, rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, model[0].in_features, generator=gen), torch.randn(8, model[-1].out_features, generator=gen)


fsdp = gloo.shard_linears


full = gloo.full


same = gloo.same


def forward_backward(model, opt, rank: int, step: int) -> list:
    """One backward on this rank's batch; returns the full (all-rank) gradients. Collective."""
    x, y = batch(model, rank, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [full(p.grad) for p in model.parameters()]


def is_q8(state: dict) -> bool:
    return any(k.endswith("_codes") for k in state)


def check_close_state(got: dict, want: dict, where: str, rel: float) -> None:
    """Dequantized states: |got - want| <= rel * max |want| of the tensor, key by key."""
    assert got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
    for k, v in want.items():
        if isinstance(v, torch.Tensor) and k != "step":
            bound = rel * float(v.abs().max())
            err = float((full(got[k]) - v).abs().max())
            assert err <= bound, f"{where} {k}: max error {err:.3g} > {bound:.3g}"


def shard_split(params, world: int, state_dtype: str) -> dict:
    """{i: the param's rows cut as FSDP2 shards them (torch.chunk), each a param}, for the params whose shards'
    blocks straddle the 1-rank blocks and whose every shard is quantized on its own size too: one process stepping
    those pieces has the 2-rank run's blocks."""
    pieces = {}
    for i, p in enumerate(params):
        chunks = p.detach().chunk(world, dim=0)
        quantized = p.numel() >= lowbit.MIN_QUANT_NUMEL and all(c.numel() >= lowbit.MIN_QUANT_NUMEL for c in chunks)
        if quantized and not aligned(p, world, state_dtype):
            pieces[i] = [torch.nn.Parameter(c.clone()) for c in chunks]
    return pieces


def requantization_errors(opt, p, want: dict, state_dtype: str) -> dict:
    """{key: (max error over the ranks, bound)} of each quantized state of p as `opt` runs it (dequantized, this
    rank's shard) against `want` (the whole float32 tensors): one requantization errs by at most half the map's
    widest gap times the tensor's largest |value|. Collective."""
    signed = {s.key: s.signed for s in type(opt).SPEC.states}
    offset, n, _ = flat_range(p)
    st, out = opt.state[p], {}
    for key, value in want.items():
        if key == "step":
            continue
        value = full(value)
        codes = st[f"{key}_codes"]
        got = lowbit.dequantize(getattr(codes, "_local_tensor", codes), st[f"{key}_absmax"],
                                lowbit.qmap(signed[key], "cpu", state_dtype), state_dtype=state_dtype,
                                shape=(n,)).reshape(-1)  # fmt: skip
        diff = (got - value.reshape(-1)[offset : offset + n]).abs()
        # the largest |value| of either side (a block's absmax is that of the values before requantizing)
        largest = lambda t: torch.cat([t, torch.zeros(1)]).max()
        err_and_top = torch.stack([largest(diff), largest(got.abs())])
        dist.all_reduce(err_and_top, op=dist.ReduceOp.MAX)  # an empty shard: 0 and 0
        top = max(float(err_and_top[1]), float(value.abs().max()))
        out[key] = (float(err_and_top[0]), HALF_GAP[state_dtype] * top)
    return out


def scenario_parity(name: str, kind: str, rank: int, mesh) -> None:
    """20 steps on 2 ranks against the 1-rank optimizer fed the same gradients: the same precision decision for
    every param; where the blocks coincide, identical params, codes, absmax and dequantized states; where they do
    not, identical to one process stepping each shard as a param of its own (where every shard is quantized), and
    int8 / fp8 within STATE_REL and PARAM_REL of the 1-rank run (int4's block-dependent rounding of small second
    moments up to absmax / 16 lets the two trajectories part: measured 64% of the distance moved)."""
    cls, kw, state_dtype = OPTIMIZERS[name]
    model = build(kind, name=name)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    world = dist.get_world_size()
    split = {} if name in WHOLE_MATRIX else shard_split(ref_params, world, state_dtype)
    model = fsdp(model, mesh)
    opt = cls(model.parameters(), state_dtype=state_dtype, **kw)
    ref = cls(ref_params, state_dtype=state_dtype, **kw)
    split_opt = cls([q for qs in split.values() for q in qs], state_dtype=state_dtype, **kw) if split else None
    start = [p.detach().clone() for p in ref_params]
    for s in range(STEPS):
        grads = forward_backward(model, opt, rank, s)
        for rp, g in zip(ref_params, grads):
            rp.grad = g
        for i, qs in split.items():
            for q, g in zip(qs, grads[i].chunk(world, dim=0)):
                q.grad = g.clone()
        opt.step()
        ref.step()
        if split_opt is not None:
            split_opt.step()
    ours, theirs = to_full_precision_state_dict(opt)["state"], to_full_precision_state_dict(ref)["state"]
    names = [n for n, _ in model.named_parameters()]
    for i, (p, rp) in enumerate(zip(model.parameters(), ref_params)):
        where = f"{names[i]} {list(p.shape)}"
        st, rst = opt.state[p], ref.state[rp]
        assert st.keys() == rst.keys(), f"{where}: precision differs: {sorted(st)} vs {sorted(rst)}"
        assert is_q8(rst) == (p.numel() >= lowbit.MIN_QUANT_NUMEL), where
        if aligned(p, dist.get_world_size(), state_dtype) or not is_q8(st):
            assert same(full(p.detach()), rp.detach()), f"{where}: params differ"
            block = lowbit.quant_format(state_dtype).block
            for k, v in rst.items():
                if k.endswith("_absmax"):  # this rank's blocks: a slice of the 1-rank ones
                    first = flat_range(p)[0]
                    want = v[first // block : first // block + st[k].numel()]
                    assert same(st[k], want), f"{where} {k}"
                elif k.endswith("_codes"):
                    assert same(full(st[k]), local_codes(v, p, state_dtype)), f"{where} {k}"
                else:
                    assert same(full(st[k]), v), f"{where} {k}"
            for k, v in theirs[i].items():
                assert same(full(ours[i][k]), v) if isinstance(v, torch.Tensor) else True, f"{where} {k}"
        else:
            if i in split:  # the run-time state of this rank's shard is that of its piece, bit for bit
                piece = split[i][rank]
                assert same(full(p.detach()), torch.cat([q.detach() for q in split[i]])), f"{where}: params differ"
                assert st.keys() == split_opt.state[piece].keys(), where
                for k, v in split_opt.state[piece].items():
                    assert same(getattr(st[k], "_local_tensor", st[k]).reshape(-1), v.reshape(-1)), f"{where} {k}"
            if state_dtype == "int4":
                assert i in split, f"{where}: int4 is checked against the shard-split run only"
                continue
            if name in WHOLE_MATRIX:  # the params part (see WHOLE_MATRIX); the momentum does not
                check_close_state(ours[i], theirs[i], where, rel=STATE_REL[state_dtype])
                continue
            moved = float((rp.detach() - start[i]).abs().max())
            err = float((full(p.detach()) - rp.detach()).abs().max())
            assert err <= PARAM_REL[state_dtype] * moved, f"{where}: params off by {err:.3g}, moved {moved:.3g}"
            check_close_state(ours[i], theirs[i], where, rel=STATE_REL[state_dtype])
            assert ours[i].get("step") == theirs[i].get("step")
    # 1 -> 2 ranks: the 1-rank optimizer's state_dict (plain tensors) loaded into a fresh FSDP2 optimizer holds the
    # same values: bit for bit where the blocks coincide, else within one requantization: half the map's widest
    # gap (0.9 / 64) times the block's absmax, which is at most the tensor's largest |value| / 0.993
    fresh = cls(model.parameters(), state_dtype=state_dtype, **kw)
    fresh.load_state_dict(ref.state_dict())
    for i, p in enumerate(model.parameters()):
        if aligned(p, dist.get_world_size(), state_dtype) or not is_q8(fresh.state[p]):
            assert all(same(full(fresh.state[p][k]), full(v)) for k, v in opt.state[p].items()), names[i]
            continue
        for key, (err, bound) in requantization_errors(fresh, p, theirs[i], state_dtype).items():
            # rank 0's blocks lie inside the 1-rank ones: exact there
            assert 0 < err <= bound, f"1 -> 2 ranks {names[i]} {key}: {err:.3g} > {bound:.3g} (or 0: test too weak)"
    # 2 -> 1 in this process: the FSDP2 state_dict loaded into a plain optimizer holds the same values (its 8-bit
    # states as plain tensors; full-precision ones stay DTensors, as torch.optim leaves them)
    plain_params = [torch.nn.Parameter(full(p.detach())) for p in model.parameters()]
    plain = cls(plain_params, state_dtype=state_dtype, **kw)
    plain.load_state_dict(opt.state_dict())
    for i, (got, want) in enumerate(zip(to_full_precision_state_dict(plain)["state"].values(), ours.values())):
        assert got.keys() == want.keys(), names[i]
        assert all(same(full(v), full(want[k])) for k, v in got.items()), f"2 -> 1 in process {names[i]}"
        q8 = [v for k, v in plain.state[plain_params[i]].items() if k.endswith(("_codes", "_absmax"))]
        assert not any(hasattr(v, "full_tensor") for v in q8), names[i]
    # to_full_precision_state_dict gives DTensors torch.optim loads
    torch_opt = getattr(torch.optim, cls.__name__)(model.parameters(), **kw)
    torch_opt.load_state_dict(to_full_precision_state_dict(opt))
    for i, p in enumerate(model.parameters()):
        for k, v in ours[i].items():
            if k != "step":
                assert type(torch_opt.state[p][k]).__name__ == "DTensor", f"{names[i]} {k}"
                assert same(full(torch_opt.state[p][k]), full(v)), f"{names[i]} {k}"


_dcp = gloo.dcp_modules
load_checkpoint = gloo.load_checkpoint


runtime_state = gloo.optimizer_state  # p's state as the step keeps it, whole tensors


def scenario_dcp(name: str, kind: str, rank: int, mesh, ckpt_dir: str) -> None:
    """Model and low-bit optimizer state saved with DCP on 2 ranks, loaded on 2 ranks into a fresh model and
    optimizer: the next steps equal the uninterrupted run's, bit for bit when every shard's blocks coincide with
    the 1-rank blocks; a misaligned shard is requantized at save and at load, each within one requantization, and
    its params stay within PARAM_REL (int8, fp8). The same through full (gathered) state_dicts, which resume like
    the DCP load bit for bit. Rank 0 keeps what the 1-rank load checks."""
    dcp, dsd = _dcp()
    cls, kw, state_dtype = OPTIMIZERS[name]
    path = os.path.join(ckpt_dir, f"{name}-{kind}")
    model = fsdp(build(kind, name=name), mesh)
    opt = cls(model.parameters(), state_dtype=state_dtype, **kw)
    for s in range(SAVE_AT):
        forward_backward(model, opt, rank, s)
        opt.step()
    saved_state = to_full_precision_state_dict(opt)
    saved = {
        "params": [full(p.detach()).clone() for p in model.parameters()],
        "state": {pid: {k: full(v).clone() for k, v in st.items()} for pid, st in saved_state["state"].items()},
    }
    quantized = [(i, p) for i, p in enumerate(model.parameters()) if is_q8(opt.state[p])]
    for i, p in quantized:  # the checkpoint's form: within one requantization of the run-time state
        for key, (err, bound) in requantization_errors(opt, p, saved["state"][i], state_dtype).items():
            assert err <= bound, f"save {kind} param {i} {key}: {err:.3g} > {bound:.3g}"
    whole = dsd.StateDictOptions(full_state_dict=True)
    full_model = dsd.get_model_state_dict(model, options=whole)
    if state_dtype != "fp8":  # (see below)
        full_optim = copy.deepcopy(dsd.get_optimizer_state_dict(model, opt, options=whole))  # steps run in place
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)  # fmt: skip
    start = [full(p.detach()) for p in model.parameters()]
    grads = []
    for s in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
        grads.append(forward_backward(model, opt, rank, s))
        opt.step()
    saved["grads"], saved["end"] = grads, [full(p.detach()) for p in model.parameters()]
    exact = all(aligned(p, dist.get_world_size(), state_dtype) for p in model.parameters()
                if p.numel() >= lowbit.MIN_QUANT_NUMEL)  # fmt: skip
    # DCP's full_state_dict gathers every DTensor, and gloo has no float8 collectives: fp8 saves and loads sharded
    resumed = {}
    for how in ("dcp", "full_state_dict") if state_dtype != "fp8" else ("dcp",):
        fresh = fsdp(build(kind, seed=1, name=name), mesh)  # other weights: the load must overwrite them
        fresh_opt = cls(fresh.parameters(), state_dtype=state_dtype, **kw)
        if how == "dcp":
            load_checkpoint(fresh, fresh_opt, path)
        else:
            dsd.set_model_state_dict(fresh, full_model, options=whole)
            dsd.set_optimizer_state_dict(fresh, fresh_opt, copy.deepcopy(full_optim), options=whole)
        fresh_params = list(fresh.parameters())
        for i, _ in quantized:  # the loaded state: within one requantization of the checkpoint's
            errors = requantization_errors(fresh_opt, fresh_params[i], saved["state"][i], state_dtype)
            for key, (err, bound) in errors.items():
                assert err <= bound, f"{how} load {kind} param {i} {key}: {err:.3g} > {bound:.3g}"
        for s in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
            forward_backward(fresh, fresh_opt, rank, s)
            fresh_opt.step()
        for i, (p, q) in enumerate(zip(fresh.parameters(), model.parameters())):
            where = f"{how} {kind} param {i} {list(p.shape)}"
            if exact:
                assert same(full(p.detach()), full(q.detach())), where
                got, want = runtime_state(fresh_opt, p), runtime_state(opt, q)
                assert got.keys() == want.keys(), where
                for k in want:
                    assert same(got[k], want[k]), f"{where} {k}"
            elif not trajectories_part(name, state_dtype):  # (see scenario_parity)
                moved = float((full(q.detach()) - start[i]).abs().max())
                err = float((full(p.detach()) - full(q.detach())).abs().max())
                assert err <= PARAM_REL[state_dtype] * moved, f"{where}: off by {err:.3g}, moved {moved:.3g}"
        resumed[how] = [full(p.detach()) for p in fresh.parameters()]
    # the two ways of loading make the same run-time state: the same next steps, bit for bit
    assert all(same(a, b) for a, b in zip(*resumed.values())) if len(resumed) == 2 else True
    if rank == 0:
        torch.save(saved, path + ".expected.pt")


def scenario_one_rank(name: str, kind: str, fsdp_on: bool, mesh, ckpt_dir: str) -> None:
    """The 2-rank checkpoint loaded on 1 rank (FSDP2 on a 1-rank mesh, or a plain model): the params and the
    dequantized states bit for bit as saved (the checkpoint holds the 1-rank blocks); fed the 2-rank run's next
    gradients, it ends where that run ended: bit for bit when the 2-rank shards were aligned (the same blocks),
    else (int8, fp8) within PARAM_REL (the 2-rank run went on with its own blocks, the checkpoint was requantized at
    save)."""
    from torch.distributed.tensor import distribute_tensor

    cls, kw, state_dtype = OPTIMIZERS[name]
    path = os.path.join(ckpt_dir, f"{name}-{kind}")
    saved = torch.load(path + ".expected.pt")
    model = build(kind, seed=1, name=name)
    if fsdp_on:
        model = fsdp(model, mesh)
    opt = cls(model.parameters(), state_dtype=state_dtype, **kw)
    load_checkpoint(model, opt, path)
    exact = all(aligned(p, 2, state_dtype) for p in model.parameters() if p.numel() >= lowbit.MIN_QUANT_NUMEL)
    for p, v in zip(model.parameters(), saved["params"]):
        assert same(full(p.detach()), v)
    got = to_full_precision_state_dict(opt)["state"]
    for pid, want in saved["state"].items():  # the checkpoint's 1-rank form: loaded as it is
        assert got[pid].keys() == want.keys(), f"param {pid}"
        assert all(same(full(got[pid][k]), v) for k, v in want.items()), f"param {pid}"
    start = [full(p.detach()).clone() for p in model.parameters()]
    for grads in saved["grads"]:
        for p, g in zip(model.parameters(), grads):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if fsdp_on else g
        opt.step()
    for i, (p, want) in enumerate(zip(model.parameters(), saved["end"])):
        if exact:
            assert same(full(p.detach()), want), f"param {i}"
        elif not trajectories_part(name, state_dtype):  # (see scenario_parity)
            moved, err = float((want - start[i]).abs().max()), float((full(p.detach()) - want).abs().max())
            assert err <= PARAM_REL[state_dtype] * moved, f"param {i}: off by {err:.3g}, moved {moved:.3g}"


def scenario_column_shards_refused(rank: int, mesh) -> None:
    """A param sharded along dim 1 (tensor parallel) steps with 8-bit state, but its state_dict, whose 1-rank form
    needs each shard to be one flat range of the param, raises NotImplementedError (on every rank, before any
    collective)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 128), mesh, [Shard(1)]))
    opt = fusedopt.optim.AdamW([p], state_dtype="int8")
    p.grad = distribute_tensor(torch.randn(64, 128), mesh, [Shard(1)])
    opt.step()
    assert "exp_avg_codes" in opt.state[p]
    try:
        opt.state_dict()
    except NotImplementedError as e:
        assert "shards along dim 0" in str(e)
        return
    raise AssertionError("state_dict() of a Shard(1) param with 8-bit state did not refuse")


def scenarios(world: int, ckpt_dir: str) -> list:
    out = []
    for name in OPTIMIZERS:
        for kind in KINDS_OF.get(name, KINDS[OPTIMIZERS[name][2]]):
            if world == 2:
                out.append((f"parity-{name}-{kind}", lambda r, m, n=name, k=kind: scenario_parity(n, k, r, m)))
                out.append((f"dcp-{name}-{kind}", lambda r, m, n=name, k=kind: scenario_dcp(n, k, r, m, ckpt_dir)))
            else:
                for on in (True, False):
                    tag = "fsdp2" if on else "plain"
                    fn = lambda r, m, n=name, k=kind, on=on: scenario_one_rank(n, k, on, m, ckpt_dir)
                    out.append((f"2to1-{tag}-{name}-{kind}", fn))
    if world == 2:
        out.append(("column-shards-refused", scenario_column_shards_refused))
    return out


def worker(rank: int, world: int, rendezvous_file: str, out_dir: str) -> None:
    gloo.run_mesh_worker(rank, world, rendezvous_file, out_dir, scenarios)
