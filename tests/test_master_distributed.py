"""Master weights (`master_weights=True` and "remainder") of bf16 params under FSDP2 with 2 gloo ranks on the CPU,
and their DCP checkpoints loaded on 2 ranks and on 1 (tests/master_dist_worker.py holds the scenarios):
- 10 AdamW steps on 2 ranks equal the 1-rank optimizer fed the same gradients, bit for bit (params, masters or
  remainders, states);
- a DCP round trip on 2 ranks resumes exactly like the uninterrupted run;
- the same checkpoint loaded on 1 rank (FSDP2 on one rank, and a plain model) holds the saved state and continues
  like the 2-rank run.
Two spawns (2 processes, then 1), every scenario in each.
"""

from __future__ import annotations

import json
import os

import gloo
import master_dist_worker
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("master_dist")
    per_world = {}
    for world in (2, 1):  # the 1-rank run loads what the 2-rank run saved
        mp.spawn(master_dist_worker.worker, args=(world, gloo.free_port(), str(out)), nprocs=world, join=True)
        per_rank = []
        for rank in range(world):
            with open(os.path.join(out, f"{world}-{rank}.json")) as f:
                per_rank.append(json.load(f))
        per_world[world] = per_rank
    return per_world


SCENARIOS = [(world, name) for world in (2, 1) for name, _ in master_dist_worker.scenarios(world, "")]


@pytest.mark.parametrize(("world", "scenario"), SCENARIOS, ids=[f"{w}ranks-{n}" for w, n in SCENARIOS])
def test_master_weights_distributed(results, world, scenario):
    for rank, res in enumerate(results[world]):
        assert scenario in res, f"rank {rank} of {world} did not run {scenario}"
        assert res[scenario] == "ok", f"rank {rank} of {world}:\n{res[scenario]}"


def test_every_scenario_ran(results):
    for world, per_rank in results.items():
        names = {n for w, n in SCENARIOS if w == world}
        assert all(set(r) == names for r in per_rank), world
