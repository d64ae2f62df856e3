"""Vocab-parallel (tensor-parallel) cross-entropy: logits sharded along the class dim over 2 and 3 gloo processes on
the CPU (3 makes torch.chunk's split uneven and the padded vocabulary's padding span more than one column), against
the single-process results: torch in float64 and fusedopt on the whole logits.

One torch.multiprocessing.spawn per world size runs every scenario of tests/vocab_parallel_worker.py and
tests/vocab_parallel_cases.py in-process; each test below checks one scenario's result on every rank."""

from __future__ import annotations

import json
import os

import gloo
import pytest
import torch.distributed as dist
import vocab_parallel_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLDS = (2, 3)
SCENARIOS = [name for name, _ in vocab_parallel_worker.scenarios()]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    per_world = {}
    for world in WORLDS:
        out = tmp_path_factory.mktemp(f"vocab-parallel-{world}")
        mp.spawn(vocab_parallel_worker.worker, args=(world, gloo.rendezvous(), str(out)), nprocs=world, join=True)
        per_world[world] = []
        for rank in range(world):
            with open(os.path.join(out, f"{world}-{rank}.json")) as f:
                per_world[world].append(json.load(f))
    return per_world


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_vocab_parallel(results, world, scenario):
    for rank, res in enumerate(results[world]):
        assert scenario in res, f"rank {rank} of {world} did not run {scenario}"
        assert res[scenario] == "ok", f"rank {rank} of {world}:\n{res[scenario]}"


def test_every_scenario_ran(results):
    for world in WORLDS:
        assert len(results[world]) == world
        assert all(set(r) == set(SCENARIOS) for r in results[world])


def test_bench_row_reports_the_bytes_of_the_collective():
    """bench/vocab_parallel.py on tiny sizes: every row timed, one collective per call on the 2 ranks, and the bytes
    measured at the collective are those the docs give."""
    from bench import vocab_parallel as bench

    result = bench.run(16, 64, "float32", reps=2)
    assert [r["ms"] > 0 for r in result["rows"]] == [True] * 4
    tp = result["rows"][-1]
    assert tp["collectives_per_call"] == 1
    assert tp["bytes_per_row"] == result["expected_bytes_per_row"] == 12
    assert "| fusedopt vocab-parallel, 2 gloo ranks x 1 thread |" in bench.markdown(result)
