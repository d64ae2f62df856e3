"""Master weights (`master_weights=True` and "remainder", and "remainder" beside int8 states) of bf16 params under
FSDP2 with 2 gloo ranks on the CPU, and their DCP checkpoints loaded on 2 ranks and on 1 (tests/master_dist_worker.py
holds the scenarios):
- 10 AdamW steps on 2 ranks equal the 1-rank optimizer fed the same gradients, bit for bit (params, masters or
  remainders, states);
- a DCP round trip on 2 ranks resumes exactly like the uninterrupted run;
- the same checkpoint loaded on 1 rank (FSDP2 on one rank, and a plain model) holds the saved state and continues
  like the 2-rank run.
Two spawns (2 processes, then 1), every scenario in each.
"""

from __future__ import annotations

import gloo
import master_dist_worker
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return gloo.spawn_worlds(master_dist_worker.worker, str(tmp_path_factory.mktemp("master_dist")))  # 2 ranks, then 1


SCENARIOS = [(world, name) for world in (2, 1) for name, _ in master_dist_worker.scenarios(world, "")]


@pytest.mark.parametrize(("world", "scenario"), SCENARIOS, ids=[f"{w}ranks-{n}" for w, n in SCENARIOS])
def test_master_weights_distributed(results, world, scenario):
    gloo.assert_scenario_ok(results, world, scenario)


def test_every_scenario_ran(results):
    gloo.assert_every_scenario_ran(results, SCENARIOS)
