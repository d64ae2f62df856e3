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

import contextlib

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


@contextlib.contextmanager
def one_element_shard_optimizer(state_dtype):
    """AdamW with `state_dtype` states after 3 steps on rank 0's shard of a (4100, 1) param, on a fake 4100-rank
    group: the shard holds one element (one row), the param is quantized by its global size. One process; the fake
    group's collectives carry no data, so only code without collectives can be checked on it."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fusedopt

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
        yield opt, p
    finally:
        dist.destroy_process_group()


def _assert_codes_kind(state, key, state_dtype):
    """int8 and fp8 codes follow the DTensor param's placement; int4's are its shard's packed bytes, plain."""
    from torch.distributed.tensor import DTensor

    assert isinstance(state[key], DTensor) == (state_dtype != "int4"), key


@pytest.mark.parametrize("state_dtype", ["int4", "int8", "fp8"])
def test_one_element_shard_keeps_its_format(state_dtype):
    """A shard of one element has one byte of codes in int8 and in int4 alike: the state conversion that
    load_state_dict runs (_convert_states) must tell them apart by the codes' kind (int4's are plain tensors), not
    read int4's packed byte as an int8 code and requantize it (it did: the absmax moved by 20%)."""
    from fusedopt.optim._base import local_tensor

    with one_element_shard_optimizer(state_dtype) as (opt, p):
        state = opt.state[p]
        _assert_codes_kind(state, "exp_avg_codes", state_dtype)
        before = {k: local_tensor(v).clone() for k, v in state.items()}
        opt._convert_states()
        for k, v in before.items():
            assert torch.equal(local_tensor(state[k]), v), k


SWITCHES = [("int4", "int8"), ("int8", "int4"), ("int4", "fp8"), ("fp8", "int4"), ("int8", "fp8")]


@pytest.mark.parametrize(("old", "new"), SWITCHES, ids=[f"{a}-to-{b}" for a, b in SWITCHES])
def test_one_element_shard_switches_format(old, new):
    """A group's state_dtype changed (as a load into an optimizer of another format does): each one-element state is
    read in its old format (_dequantize_from) and requantized in the new one. The result must be the old values, as
    the old format's definition reads them, quantized by the new format's definition, bit for bit; the step count and
    every other state are kept."""
    from fusedopt import lowbit
    from fusedopt.optim._base import local_tensor

    with one_element_shard_optimizer(old) as (opt, p):
        state = opt.state[p]
        shape = local_tensor(p).shape
        expected = {}
        for spec in opt.SPEC.states:
            ck, ak = lowbit.codes_key(spec.key), lowbit.absmax_key(spec.key)
            if ck not in state:  # max_exp_avg_sq without amsgrad
                continue
            values = lowbit.dequantize(local_tensor(state[ck]), state[ak], lowbit.qmap(spec.signed, "cpu", old),
                                       torch.float32, old, shape)  # fmt: skip
            assert values.abs().min() > 0, "a zero state would read the same in every format"
            expected[ck], expected[ak] = lowbit.quantize(values, lowbit.qmap(spec.signed, "cpu", new), new)
        step = state["step"].clone()
        opt.param_groups[0]["state_dtype"] = new
        opt._convert_states()
        assert torch.equal(state["step"], step)
        assert set(state) == set(expected) | {"step"}
        for k, want in expected.items():
            got = local_tensor(state[k])
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got.view(torch.uint8) if k.endswith("_codes") else got,
                               want.view(torch.uint8) if k.endswith("_codes") else want), k  # fmt: skip
        _assert_codes_kind(state, "exp_avg_codes", new)


# Global shapes over a fake 3-rank group and rank 0's shard (ceil(rows / 3) rows): 2048 elements (whole blocks),
# 4545 (odd, ending mid-block), 1367 (odd, one row per element).
SHARDED_SHAPES = [(768, 8), (303, 45), (4100, 1)]


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
def test_new_shard_state_equals_the_quantized_constant_buffer(state_dtype, monkeypatch):
    """A DTensor param's new low-bit state is made from one quantized constant block, repeated over its local shard
    (until 2026-12-04 it quantized the whole full-precision shard by the plain-torch search): it equals _quantize_into
    of the constant buffer bit for bit, in the same kind (int8 and fp8 codes DTensors in the param's placement,
    int4's plain), for AdamW's zeros and Adagrad's initial value, float32 and bfloat16 params."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fusedopt
    from fusedopt import lowbit
    from fusedopt.optim._base import local_tensor

    quantized_sizes = []
    quantize = lowbit.quantize
    monkeypatch.setattr(lowbit, "quantize", lambda x, *a: quantized_sizes.append(x.numel()) or quantize(x, *a))
    block = lowbit.quant_format(state_dtype).block
    world = 3
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for rows, cols in SHARDED_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                local = torch.randn(-(-rows // world), cols).to(dtype)
                p = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size([rows, cols]),
                                                          stride=(cols, 1)))  # fmt: skip
                for cls, kw in [(fusedopt.AdamW, {}), (fusedopt.Adagrad, {"initial_accumulator_value": 0.37})]:
                    opt = cls([p], state_dtype=state_dtype, **kw)
                    group = opt.param_groups[0]
                    for spec in opt.SPEC.states:
                        fast, slow = {}, {}
                        quantized_sizes.clear()
                        opt._new_q8_state(group, p, spec, fast)
                        assert quantized_sizes == [block], "a new state quantizes one block, not the shard"
                        opt._quantize_into(p, slow, spec, opt._new_state_buffer(group, p, spec), state_dtype)
                        assert fast.keys() == slow.keys() and len(fast) == 2
                        for k in slow:
                            where = (rows, cols, dtype, cls.__name__, k)
                            assert type(fast[k]) is type(slow[k]), where
                            got, want = local_tensor(fast[k]), local_tensor(slow[k])
                            assert got.dtype == want.dtype and got.shape == want.shape, where
                            assert gloo.same(got, want), where
                        assert isinstance(fast[lowbit.codes_key(spec.key)], DTensor) == (state_dtype != "int4")
    finally:
        dist.destroy_process_group()
