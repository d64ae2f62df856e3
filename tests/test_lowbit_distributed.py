"""Low-bit optimizer states (int8, fp8, int4) under FSDP2 with 2 gloo ranks on the CPU, and their DCP checkpoints
loaded on 2 ranks and on 1 (tests/lowbit_dist_worker.py holds the scenarios):
- the 2-rank state equals the 1-rank state (same precision decision always; bit for bit where the shards' blocks
  coincide with the 1-rank blocks; where they do not, bit for bit with one process stepping each shard as a param,
  and close to the 1-rank run for int8 and fp8), for AdamW and SGD with momentum;
- a DCP (and a full state_dict) round trip on 2 ranks resumes exactly like the uninterrupted run;
- the same checkpoint loaded on 1 rank (FSDP2 on one rank, and a plain model) holds the saved state and continues
  like the 2-rank run.
Two spawns (2 processes, then 1), every scenario in each: a spawn costs seconds of imports.
"""

from __future__ import annotations

import gloo
import lowbit_dist_worker
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return gloo.spawn_worlds(lowbit_dist_worker.worker, str(tmp_path_factory.mktemp("lowbit_dist")))  # 2 ranks, then 1


SCENARIOS = [(world, name) for world in (2, 1) for name, _ in lowbit_dist_worker.scenarios(world, "")]


@pytest.mark.parametrize(("world", "scenario"), SCENARIOS, ids=[f"{w}ranks-{n}" for w, n in SCENARIOS])
def test_lowbit_distributed(results, world, scenario):
    gloo.assert_scenario_ok(results, world, scenario)


def test_every_scenario_ran(results):
    gloo.assert_every_scenario_ran(results, SCENARIOS)
