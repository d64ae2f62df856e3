"""The body of tests/test_distributed.py: run in each of 2 spawned processes (gloo on 127.0.0.1). Every scenario
trains the same model twice, once with fusedopt (optimizer, clip_grad_norm_ or max_grad_norm, loss) and once with
torch's, and compares; each rank writes {scenario: "ok" | traceback} to <out>/<rank>.json."""

from __future__ import annotations

import itertools
import os

import gloo
import torch
import torch.distributed as dist
from conftest import assert_close
from optim_db import OPTIM_DB

import fusedopt

WORLD = 2
STEPS = 4
MAX_NORM = 0.3

# name -> (fusedopt class, reference class, kwargs): every optimizer of the registry (tests/optim_db.py)
OPTIMIZERS = {
    i.name: (i.fused, i.reference, i.cases_for("distributed")[0]) for i in OPTIM_DB if i.cases_for("distributed")
}
NOT_APPLICABLE = {i.name: i.not_applicable for i in OPTIM_DB}  # name -> {family or kind: reason}
# 2-D-only optimizers (Muon): a bias-free model, and under FSDP2 the reference is the unsharded (DDP) run with
# torch's class: the step orthogonalizes whole matrices, so the sharded step must equal the unsharded one.
MATRICES_ONLY = {i.name for i in OPTIM_DB if i.matrices_only}


# name -> (fusedopt's loss, torch's loss, target kind): each optimizer scenario trains with one of them.
LOSSES = {
    "ce": (fusedopt.nn.functional.cross_entropy, torch.nn.functional.cross_entropy, "classes"),
    "bce_logits": (fusedopt.nn.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(), "probs"),
    "mse": (fusedopt.nn.MSELoss(), torch.nn.MSELoss(), "probs"),
}
LOSS_OF = {"Adam": "ce", "AdamW": "bce_logits", "RMSprop": "mse", "SGD": "ce", "Adagrad": "bce_logits", "Lion": "mse",
           "Muon": "mse", "LAMB": "mse", "Adafactor": "ce"}  # fmt: skip


def _losses(name):
    """(fusedopt's loss, torch's loss) for optimizer scenario `name`."""
    ours, theirs, _ = LOSSES[LOSS_OF[name]]
    return ours, theirs


def _model(seed=0, name="AdamW"):
    torch.manual_seed(seed)
    if name in MATRICES_ONLY:  # weights only: [24, 10] and [5, 24] shard unevenly, two [24, 24] share a shape
        dims = (10, 24, 24, 24, 5)
        layers = [m for a, b in itertools.pairwise(dims) for m in (torch.nn.Linear(a, b, bias=False), torch.nn.Tanh())]
        return torch.nn.Sequential(*layers[:-1]).double()
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5)).double()


def _batch(rank, step, name="AdamW"):
    """Each rank its own data; class targets (one ignored row) or probabilities, per the scenario's loss."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    if LOSSES[LOSS_OF[name]][2] == "classes":
        y = torch.randint(0, 5, (6,), generator=gen)
        y[step % 6] = -100
        return x, y
    return x, torch.rand(6, 5, generator=gen, dtype=torch.float64)


def _train(model, opt, loss_fn, clip, rank, steps, first_step=0, name="AdamW"):
    """Forward, loss, backward, optional clip, step; returns the norms clip returned."""
    norms = []
    for s in range(first_step, first_step + steps):
        x, y = _batch(rank, s, name)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if clip is not None:
            norms.append(clip(model.parameters(), MAX_NORM))
        opt.step()
    return norms


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare_models(a, b, dtype, where):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(_full(p.detach()), _full(q.detach()), dtype, f"{where} {name}")


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _wrap(kind, model, mesh):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return _fsdp(model, mesh)


def scenario_parity(kind, name, folded, rank, mesh):
    """DDP / FSDP2 with fusedopt's optimizer, loss and clipping (clip_grad_norm_, or max_grad_norm folded into
    the step) against torch's optimizer, loss and clip_grad_norm_."""
    cls, ref_cls, kwargs = OPTIMIZERS[name]
    matrices = name in MATRICES_ONLY
    ours = _wrap(kind, _model(name=name), mesh)
    theirs = _wrap("ddp" if matrices else kind, _model(name=name), mesh)  # Muon: the unsharded result
    fused_loss, torch_loss = _losses(name)
    opt = cls(ours.parameters(), max_grad_norm=MAX_NORM if folded else None, **kwargs)
    ref = ref_cls(theirs.parameters(), **({} if matrices else {"foreach": False}), **kwargs)
    for s in range(STEPS):
        x, y = _batch(rank, s, name)
        for model, o, loss_fn in ((ours, opt, fused_loss), (theirs, ref, torch_loss)):
            o.zero_grad()
            loss_fn(model(x), y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), MAX_NORM)
        norm = None if folded else fusedopt.nn.utils.clip_grad_norm_(ours.parameters(), MAX_NORM)
        opt.step()
        ref.step()
        got = opt.last_grad_norm if folded else norm
        assert type(got) is torch.Tensor, f"the norm should be a plain tensor, got {type(got)}"
        # The folded clip coefficient travels as float32 (like GradScaler's scale): float32 tolerances there.
        dtype = torch.float32 if folded else torch.float64
        assert_close(got, _full(ref_norm), dtype, f"step {s} global grad norm", reduction=True)
        _compare_models(ours, theirs, dtype, f"step {s}")
    if kind == "fsdp2":
        assert type(opt.state[next(iter(ours.parameters()))][opt.STATE_KEYS[0]]).__name__ == "DTensor"


def scenario_refused(name, rank, mesh):
    """An optimizer the registry marks not applicable to FSDP2 raises NotImplementedError on its DTensor params."""
    cls, _, kwargs = OPTIMIZERS[name]
    model = _fsdp(_model(), mesh)
    opt = cls(model.parameters(), **kwargs)
    x, y = _batch(rank, 0, name)
    _losses(name)[1](model(x), y).backward()
    try:
        opt.step()
    except NotImplementedError:
        return
    raise AssertionError(f"{name} stepped DTensor params the registry says it cannot handle")


def scenario_global_norm(rank, mesh):
    """fusedopt.nn.utils.clip_grad_norm_ on FSDP2's sharded DTensor grads is the norm of the FULL gradient (every
    rank's shard), for the 2-, 1- and inf-norm, the same on both ranks, and torch's DTensor-aware value."""
    model = _fsdp(_model(), mesh)
    x, y = _batch(rank, 0)
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    full_grads = [_full(p.grad) for p in model.parameters()]
    local_only = [p.grad.to_local() for p in model.parameters()]
    for norm_type in (2.0, 1.0, float("inf")):
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full_grads]), norm_type)
        got = fusedopt.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
        assert_close(got, expected, torch.float64, f"norm {norm_type}", reduction=True)
        theirs = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
        assert_close(got, _full(theirs), torch.float64, f"torch norm {norm_type}", reduction=True)
        both = [torch.zeros((), dtype=got.dtype) for _ in range(WORLD)]
        dist.all_gather(both, got)
        assert torch.equal(both[0], both[1]), f"ranks disagree on the {norm_type}-norm: {both}"
        if norm_type != float("inf"):  # (one rank holds the max entry: its shard's inf-norm is the total)
            shard_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in local_only]), norm_type)
            assert not torch.allclose(shard_norm, expected), "test data too weak: a shard's norm is the total"


def scenario_dcp_roundtrip(name, rank, mesh, ckpt_dir):
    """FSDP2 + a fusedopt optimizer: model and optimizer state saved with torch.distributed.checkpoint (through
    get_optimizer_state_dict) and loaded into fresh ones (set_optimizer_state_dict) continue exactly like the
    uninterrupted run; the same checkpoint loaded into torch.optim continues like it too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cls, ref_cls, kwargs = OPTIMIZERS[name]
    fused_loss, torch_loss = _losses(name)
    path = os.path.join(ckpt_dir, name)
    model = _fsdp(_model(), mesh)
    opt = cls(model.parameters(), max_grad_norm=MAX_NORM, **kwargs)
    _train(model, opt, fused_loss, None, rank, 2, name=name)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    _train(model, opt, fused_loss, None, rank, 3, first_step=2, name=name)

    for resumed_cls, loss_fn, extra in ((cls, fused_loss, {"max_grad_norm": MAX_NORM}), (ref_cls, torch_loss, {})):
        fresh = _fsdp(_model(seed=1), mesh)  # other weights: the load must overwrite them
        fresh_opt = resumed_cls(fresh.parameters(), **extra, **kwargs)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        clip = None if resumed_cls is cls else torch.nn.utils.clip_grad_norm_
        _train(fresh, fresh_opt, loss_fn, clip, rank, 3, first_step=2, name=name)
        # Same kernels from the same state: identical. torch.optim + torch's clip: the folded float32 coefficient.
        dtype = torch.float64 if resumed_cls is cls else torch.float32
        _compare_models(fresh, model, dtype, f"resumed with {resumed_cls.__module__}.{resumed_cls.__name__}")
        for p, q in zip(fresh.parameters(), model.parameters()):
            for key, value in opt.state[q].items():
                assert_close(_full(fresh_opt.state[p][key]), _full(value), dtype, f"resumed state {key}")


def scenarios(ckpt_dir):
    out = []
    for kind in ("ddp", "fsdp2"):
        for name in OPTIMIZERS:
            if kind in NOT_APPLICABLE[name]:  # the registry's reason; the optimizer must refuse, not run wrong
                out.append((f"{kind}-{name}-refused", lambda rank, mesh, n=name: scenario_refused(n, rank, mesh)))
                continue
            out.append((f"{kind}-{name}", lambda rank, mesh, k=kind, n=name: scenario_parity(k, n, False, rank, mesh)))
        for name in ("AdamW", "SGD", "Muon"):
            folded = lambda rank, mesh, k=kind, n=name: scenario_parity(k, n, True, rank, mesh)
            out.append((f"{kind}-{name}-folded", folded))
    out.append(("fsdp2-global-norm", scenario_global_norm))
    for name in ("AdamW", "SGD", "Adagrad", "Lion"):
        out.append((f"fsdp2-dcp-{name}", lambda rank, mesh, n=name: scenario_dcp_roundtrip(n, rank, mesh, ckpt_dir)))
    return out


def worker(rank, rendezvous_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    gloo.init(rank, WORLD, rendezvous_file)
    mesh = init_device_mesh("cpu", (WORLD,))
    gloo.run_scenarios(scenarios(os.path.join(out_dir, "ckpt")), (rank, mesh), os.path.join(out_dir, f"{rank}.json"))
