"""The harness of the multi-process gloo tests (test_distributed.py, test_vocab_parallel.py,
test_lowbit_distributed.py, test_master_distributed.py): a file for the rendezvous, the process group, each
worker's loop over its scenarios, which writes one JSON of {scenario: "ok" or the traceback} per rank, the spawn
that collects them, and the FSDP2 helpers the workers share."""

from __future__ import annotations

import atexit
import datetime
import json
import os
import tempfile
import traceback
import uuid

import torch
import torch.distributed as dist


def rendezvous() -> str:
    """A new file for one process group's rendezvous (a FileStore). Not a TCP port: a port found free and released
    could be taken by the next spawn of the other pytest-xdist worker before rank 0 bound it (a CI run lost a
    spawn to "terminate called without an active exception" so, 2026-12-04)."""
    path = os.path.join(tempfile.gettempdir(), f"fusedopt-rendezvous-{uuid.uuid4().hex}")
    atexit.register(lambda: os.path.exists(path) and os.remove(path))  # the FileStore leaves it behind
    return path


def init(rank: int, world: int, rendezvous_file: str, timeout_s: int = 60) -> None:
    torch.set_num_threads(1)  # several processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def run_scenarios(scenarios, args: tuple, result_path: str) -> None:
    """Runs fn(*args) for each (name, fn), records the outcome, and ends the process group."""
    results = {}
    try:
        for name, fn in scenarios:
            try:
                fn(*args)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()  # keep the ranks in step even when one scenario failed on one rank
    finally:
        with open(result_path, "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def spawn_worlds(worker, out_dir: str, worlds=(2, 1)) -> dict:
    """worker(rank, world, rendezvous_file, out_dir) on each world size in turn (a later world may load what an
    earlier one saved); returns {world: [each rank's {scenario: outcome}]}."""
    import torch.multiprocessing as mp

    per_world = {}
    for world in worlds:
        mp.spawn(worker, args=(world, rendezvous(), out_dir), nprocs=world, join=True)
        per_rank = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{world}-{rank}.json")) as f:
                per_rank.append(json.load(f))
        per_world[world] = per_rank
    return per_world


def shard_linears(model, mesh):
    """FSDP2 (fully_shard) on each Linear of a Sequential, then on the whole."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(t):
    """The whole tensor of a DTensor (collective); a plain tensor as it is. gloo gathers neither int16 nor float8:
    an int16 goes as int32, a float8 as its bytes."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.dtype == torch.int16:
        return t.to(torch.int32).full_tensor().to(torch.int16)
    if t.dtype == torch.float8_e4m3fn:
        from torch.distributed.tensor import DTensor

        as_bytes = DTensor.from_local(t._local_tensor.view(torch.uint8), t.device_mesh, t.placements, shape=t.shape,
                                      stride=t.stride(), run_check=False)  # fmt: skip
        return as_bytes.full_tensor().view(t.dtype)
    return t.full_tensor()


def optimizer_state(opt, p) -> dict:
    """p's optimizer state as whole tensors, copies (collective for DTensors); a low-bit state's absmax, one per
    block of the local shard (a plain tensor on each rank), is gathered in rank order."""
    out = {}
    for k, v in opt.state[p].items():
        if k.endswith("_absmax") and hasattr(p, "full_tensor"):
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, v)
            v = torch.cat(parts)
        out[k] = full(v).clone()
    return out


def dcp_modules():
    """(torch.distributed.checkpoint, its state_dict helpers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    return dcp, dsd


def save_checkpoint(model, opt, path: str, options=None) -> None:
    """This model's and optimizer's state saved with DCP (`options`: dsd.StateDictOptions, e.g. flattened)."""
    dcp, dsd = dcp_modules()
    optim = dsd.get_optimizer_state_dict(model, opt, options=options)
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": optim}, checkpoint_id=path)


def load_checkpoint(model, opt, path: str, options=None) -> None:
    """A DCP checkpoint's model and optimizer state loaded into this (sharded or plain) model and optimizer."""
    dcp, dsd = dcp_modules()
    optim = dsd.get_optimizer_state_dict(model, opt, options=options)
    state = {"model": dsd.get_model_state_dict(model), "optim": optim}
    dcp.load(state, checkpoint_id=path)
    dsd.set_model_state_dict(model, state["model"])
    dsd.set_optimizer_state_dict(model, opt, state["optim"], options=options)


def assert_scenario_ok(results: dict, world: int, scenario: str) -> None:
    for rank, res in enumerate(results[world]):
        assert scenario in res, f"rank {rank} of {world} did not run {scenario}"
        assert res[scenario] == "ok", f"rank {rank} of {world}:\n{res[scenario]}"


def assert_every_scenario_ran(results: dict, scenarios: list) -> None:
    for world, per_rank in results.items():
        names = {n for w, n in scenarios if w == world}
        assert all(set(r) == names for r in per_rank), world


def run_mesh_worker(rank: int, world: int, rendezvous_file: str, out_dir: str, scenarios) -> None:
    """A checkpointing worker's body: the process group, a 1-D CPU mesh over `world` ranks, and
    scenarios(world, checkpoint dir) run as fn(rank, mesh), each rank's outcomes to <out_dir>/<world>-<rank>.json."""
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, rendezvous_file, timeout_s=120)
    mesh = init_device_mesh("cpu", (world,))
    run_scenarios(scenarios(world, os.path.join(out_dir, "ckpt")), (rank, mesh),
                  os.path.join(out_dir, f"{world}-{rank}.json"))  # fmt: skip


def same(a, b) -> bool:
    """torch.equal, also for float8 codes (bit for bit; torch.equal takes no float8)."""
    if a.dtype == torch.float8_e4m3fn and b.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)
