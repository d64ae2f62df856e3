"""The memory promise of linear_cross_entropy on the CPU: at N=4096, H=1024, V=32000, one forward + backward in a
fresh process peaks at most 128 MiB above its inputs and the gradients it returns, in float32 and bfloat16 (mode
"auto": row-chunked in float32, vocab-blocked in bfloat16). The measurement is bench/linear_ce_memory.py's."""

from __future__ import annotations

import os

import pytest

from bench.linear_ce_memory import measure

BUDGET = 128 * 2**20

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's RSS high-water mark")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peak_memory_beyond_inputs_and_grads(dtype):
    row = measure("fusedopt auto", 4096, 1024, 32000, dtype, reps=0)
    assert "error" not in row, row
    assert row["grad_bytes"] == (4096 + 32000) * 1024 * (4 if dtype == "fp32" else 2)
    assert 0 < row["extra_bytes"] <= BUDGET, f"{row['extra_bytes'] / 2**20:.0f} MiB beyond inputs and grads"
