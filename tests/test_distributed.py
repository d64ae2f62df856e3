"""fusedopt under DDP and FSDP2 (fully_shard: DTensor params, grads and state), 2 processes on CPU with gloo.

One torch.multiprocessing.spawn runs every scenario of tests/dist_worker.py (a spawn costs seconds of imports);
each test below checks one scenario's result on both ranks:
- DDP / FSDP2 training with fusedopt's optimizers, loss and clip_grad_norm_ (or max_grad_norm folded into the step)
  gives the parameters of the same run with torch's;
- the grad norm of sharded grads is the global one (all ranks), as torch's DTensor-aware clip_grad_norm_ computes;
- optimizer state_dict round trip through torch.distributed.checkpoint under FSDP2 (into fusedopt and torch.optim).
"""

from __future__ import annotations

import json
import os

import dist_worker
import gloo
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    mp.spawn(dist_worker.worker, args=(gloo.rendezvous(), str(out)), nprocs=dist_worker.WORLD, join=True)
    per_rank = []
    for rank in range(dist_worker.WORLD):
        with open(os.path.join(out, f"{rank}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


SCENARIOS = [name for name, _ in dist_worker.scenarios("")]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distributed(results, scenario):
    for rank, res in enumerate(results):
        assert scenario in res, f"rank {rank} did not run {scenario}"
        assert res[scenario] == "ok", f"rank {rank}:\n{res[scenario]}"


def test_every_scenario_ran(results):
    assert all(set(r) == set(SCENARIOS) for r in results)
    assert torch.distributed.is_available()
