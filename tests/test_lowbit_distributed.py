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
import torch
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


@pytest.mark.parametrize("state_dtype", ["int4", "int8", "fp8"])
def test_one_element_shard_keeps_its_format(state_dtype):
    """A shard of one element has one byte of codes in int8 and in int4 alike: the state conversion that
    load_state_dict runs (_convert_states) must tell them apart by the codes' kind (int4's are plain tensors), not
    read int4's packed byte as an int8 code and requantize it (it did: the absmax moved by 20%). One process on a
    fake 4100-rank group: rank 0 holds one row of a (4100, 1) param, quantized by its global size. The fake
    group's collectives carry no data, so only this conversion, which has none, is checked here."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fusedopt
    from fusedopt.optim._base import local_tensor

    world = 4100
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        row = lambda: DTensor.from_local(torch.randn(1, 1, generator=gen), mesh, [Shard(0)],
                                         shape=torch.Size([world, 1]), stride=(1, 1))  # fmt: skip
        p = torch.nn.Parameter(row())
        opt = fusedopt.AdamW([p], lr=0.1, state_dtype=state_dtype)
        for _ in range(3):
            p.grad = row()
            opt.step()
        state = opt.state[p]
        assert isinstance(state["exp_avg_codes"], DTensor) == (state_dtype != "int4")
        before = {k: local_tensor(v).clone() for k, v in state.items()}
        opt._convert_states()
        for k, v in before.items():
            assert torch.equal(local_tensor(state[k]), v), k
    finally:
        dist.destroy_process_group()
