"""The low-bit bench (bench/optim_lowbit.py, bench/lowbit_modes.py): each mode's state layout against the state its
library really holds, the memory table, and the step-time case with the peers beside fusedopt's int8 AdamW."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import harness, lowbit_modes, optim_lowbit, runner

# Below the 4096-element threshold; above it but not whole blocks of 128 or 256; whole blocks of 128 only; of 256.
SHAPES = [(64,), (4095,), (4097,), (33, 128), (64, 96), (1000,)]


@pytest.fixture(scope="module")
def modes():
    return lowbit_modes.adamw_modes()


@pytest.fixture
def env():
    e = harness.Env(torch.device("cpu"), quick=True, budget_s=0.01, min_reps=3, max_reps=3)
    e.copy_gbps = 1.0
    return e


def test_every_mode_is_listed_with_the_peers(modes):
    names = [m.name for m in modes]
    assert names[:2] == ["fusedopt fp32", "fusedopt int8"]
    assert {"torchao AdamW8bit", "torchao AdamW4bit", "torchao AdamWFp8", "bitsandbytes AdamW8bit"} <= set(names)
    assert len(set(names)) == len(names)
    for m in modes:
        assert m.make is not None or m.note, f"{m.name}: unavailable without a reason"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_rule_equals_the_state_the_library_holds(modes, dtype):
    """The Llama-2-7B row is computed from each library's layout rule: here the rule is checked against the
    storages an optimizer of each mode holds after a step, on sizes at each edge of the rule."""
    checked = 0
    for mode in modes:
        if mode.param_dtype not in (None, dtype):  # a mode for bf16 params only (master weights)
            continue
        if mode.make is None:
            assert "not installed" in mode.note or "import failed" in mode.note or "has no" in mode.note
            continue
        mode = dataclasses.replace(mode, param_dtype=dtype)
        got = optim_lowbit.measure_mode(mode, SHAPES)
        assert got == mode.layout.state_bytes(SHAPES, dtype), mode.name
        checked += 1
    assert checked >= 2  # fusedopt's two modes at least


def test_state_bytes_counts_each_storage_once():
    params = [torch.nn.Parameter(torch.zeros(8)) for _ in range(2)]
    opt = torch.optim.SGD(params, lr=0.1)
    shared = torch.zeros(100)  # e.g. a map two params' states point to
    opt.state[params[0]] = {"step": torch.zeros(()), "buf": torch.zeros(8), "map": shared}
    opt.state[params[1]] = {"buf": torch.zeros(8, dtype=torch.uint8), "map": shared, "count": 3}
    assert lowbit_modes.state_bytes(opt) == 8 * 4 + 100 * 4 + 8


def test_layout_rules_by_hand():
    """The rules written out for two sizes: one quantized, one kept in full precision."""
    big, small = (4096,), (100,)
    int8 = lowbit_modes.StateLayout(8)
    assert int8.state_bytes([big, small], torch.float32) == 2 * (4096 + 4 * 16) + 2 * 4 * 100
    assert int8.state_bytes([big, small], torch.bfloat16) == 2 * (4096 + 4 * 16) + 2 * 2 * 100
    torchao4 = lowbit_modes.StateLayout(4, block=128, whole_blocks=True, map_bytes_per_state=64)
    assert torchao4.state_bytes([big], torch.float32) == 2 * (2048 + 4 * 32 + 64)
    assert torchao4.state_bytes([(4100,)], torch.bfloat16) == 2 * 2 * 4100  # not whole blocks: full precision
    bnb = lowbit_modes.StateLayout(8, fallback_itemsize=4, map_bytes_shared=2048)
    assert bnb.state_bytes([big, small], torch.bfloat16) == 2 * (4096 + 4 * 16) + 2 * 4 * 100 + 2048
    assert bnb.state_bytes([small], torch.float32) == 2 * 4 * 100  # no quantized state, no map
    assert lowbit_modes.FULL_PRECISION.state_bytes([big], torch.float32) == 8 * 4096
    master = lowbit_modes.StateLayout(32, extra_bytes_per_elt=4)  # bf16 params, bf16 moments, an fp32 master copy
    assert master.state_bytes([small], torch.bfloat16) == 2 * 2 * 100 + 4 * 100


def test_a_mode_for_one_param_dtype_is_timed_on_that_dtype_only(env, monkeypatch):
    """A later mode (e.g. bf16 params + an fp32 master) is one more entry of adamw_modes()."""
    bf16_only = lowbit_modes.fusedopt_mode("bf16-only", lowbit_modes.StateLayout(8), param_dtype=torch.bfloat16,
                                           state_dtype="int8")  # fmt: skip
    base = lowbit_modes.adamw_modes()
    monkeypatch.setattr(optim_lowbit, "adamw_modes", lambda: [*base, bf16_only])
    for dtype, listed in ((torch.float32, False), (torch.bfloat16, True)):
        (case,) = optim_lowbit.cases(env, [(4096,)], dtype)
        names = [i.name for i in case.impls]
        assert ("fusedopt bf16-only (cpu)" in names) == listed and "fusedopt int8 (cpu)" in names


def test_llama_7b_state_per_param(modes):
    """TARGETS.md: int8 <= 2.1 B per param (fp32: 8), and the peers' 8-bit about 2, torchao's 4-bit about 1."""
    shapes = optim_lowbit.llama2_7b_shapes()
    n = optim_lowbit.numel(shapes)
    per_param = {m.name: m.layout.state_bytes(shapes, torch.float32) / n for m in modes}
    assert n == pytest.approx(6.74e9, rel=0.001)
    assert per_param["fusedopt fp32"] == 8.0
    assert 2.0 < per_param["fusedopt int8"] <= 2.1
    assert per_param["torchao AdamW8bit"] == pytest.approx(2.031, abs=0.001)
    assert per_param["bitsandbytes AdamW8bit"] == pytest.approx(2.031, abs=0.001)
    assert per_param["torchao AdamW4bit"] == pytest.approx(1.063, abs=0.001)
    assert per_param["fusedopt int4"] == pytest.approx(1.062, abs=0.001)  # no map copies, unlike torchao's
    assert per_param["fusedopt fp8"] == per_param["fusedopt int8"]  # a code byte per value, a scale per 256
    assert per_param["fusedopt fp8"] <= per_param["torchao AdamWFp8"]


def test_memory_table_measures_available_modes_and_lists_the_rest(modes):
    gone = lowbit_modes.peer_mode("nolib AdamW8bit", "no_such_lowbit_lib.optim", "AdamW8bit", "no-such-lowbit-lib",
                                  lowbit_modes.StateLayout(8))  # fmt: skip
    assert gone.make is None and gone.note == "not installed here (pip install no-such-lowbit-lib)"
    table = optim_lowbit.memory_table([modes[0], modes[1], gone], big=SHAPES, small=SHAPES)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    n = optim_lowbit.numel(SHAPES)
    fp32, int8, missing = (line.split(" | ") for line in lines[2:])
    assert fp32[0] == "| fusedopt fp32" and float(fp32[2]) == 8.0 and float(fp32[4]) == 8.0
    assert float(int8[4]) == pytest.approx(modes[1].layout.state_bytes(SHAPES, torch.float32) / n, abs=5e-4)
    assert "the shapes' rule gives" not in table  # measured and computed agree
    assert missing[3] == "unavailable" and "not installed here" in missing[5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_case_times_the_peers_beside_int8(env, modes, dtype):
    shapes = [(4096,), (64, 96), (100,)]
    (case,) = optim_lowbit.cases(env, shapes, dtype)
    n = optim_lowbit.numel(shapes)
    assert case.tag == {torch.float32: "adamw-int8", torch.bfloat16: "adamw-int8-bf16"}[dtype]
    assert case.nbytes == int(n * {torch.float32: 16.0625, torch.bfloat16: 10.0625}[dtype])
    names = [i.name for i in case.impls]
    full = {torch.float32: "fusedopt fp32 (cpu)", torch.bfloat16: "fusedopt bf16 (cpu)"}[dtype]
    assert names[0] == "fusedopt int8 (cpu)" and full in names and "torch fused" in names
    for m in modes:
        if m.kind == "peer":
            impl = next(i for i in case.impls if i.name == m.name)
            if m.compiles:  # --quick: compiling on a small CPU takes minutes
                assert impl.build is None and "skipped in --quick" in impl.note
            else:
                assert (impl.build is None) == (m.make is None)
    optim_lowbit.FIRST_STEPS.clear()
    rows, targets, _ = runner.run_cases([case], env, progress=False)
    table = optim_lowbit.step_table(rows, n).splitlines()
    ours = next(line for line in table if line.startswith("| fusedopt int8 (cpu) |")).split(" | ")
    assert ours[2] == "1.00" and float(ours[4]) == pytest.approx(modes[1].layout.state_bytes(shapes, dtype) / n,
                                                                 abs=5e-4)  # fmt: skip
    for r in rows:
        assert r.ms is not None or r.note
        if r.ms is not None:
            first_s, held = optim_lowbit.FIRST_STEPS[r.impl]
            assert first_s > 0 and held > 0
    assert targets[0]["target"] == f">= 0.666667x {full}" and targets[0]["value"] > 0
