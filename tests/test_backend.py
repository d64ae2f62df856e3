"""Backend selection, the info command, the custom-op door and DTensor params."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gloo
import pytest
import torch
from parity_steps import compare

import fusedopt
from fusedopt import _backend


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fusedopt", "info"], capture_output=True, text=True, check=True)
    for word in ("torch", "triton", "cpu simd", "python"):
        assert word in out.stdout
    for name in ("cpu", "cuda", "triton", "torch"):
        assert any(line.startswith(name + " ") for line in out.stdout.splitlines()), out.stdout


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert _backend.resolve("auto", torch.device("cpu"), "adam") == "cpu"


def test_env_var_sets_the_process_default(monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch")
    assert _backend.resolve(None, torch.device("cpu"), "adam") == "torch"
    monkeypatch.setenv("FUSEDOPT_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve(None, torch.device("cpu"), "adam")


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "usable", lambda name, dev: name == "torch")
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _backend.resolve("auto", torch.device("cpu"), "adam") == "torch"
    assert len([w for w in caught if "plain torch" in str(w.message)]) == 1


def test_named_triton_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve("triton", torch.device("cpu"), "adam")


def test_custom_op_matches_eager_path():
    """torch.ops.fusedopt.adam_step (what torch.compile sees) and the eager fast path give the same update."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen) for n in (5, 300)]
    grads = [torch.randn(n, generator=gen) for n in (5, 300)]
    results = []
    for use_op in (True, False):
        ps = [p.clone() for p in params]
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        steps = [torch.zeros(()) for _ in ps]
        args = (ps, grads, m, v, [], steps, 0.1, None, 0.9, 0.99, 1e-8, 0.01, False, True, False, None, None, False,
                None, [], "cpu")
        op = fusedopt.ops.optim_step.op_for(fusedopt.Adam.SPEC)
        (op.op if use_op else op.impl)(*args)
        results.append((ps, m, v, steps))
    for a, b in zip(*results):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert float(results[0][3][0]) == 1.0


def test_dtensor_params_update_local_shards():
    """FSDP2-style DTensor params (one-process gloo mesh): the fused step updates the local shards like torch."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{gloo.rendezvous()}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(8, 6, generator=gen), torch.randn(10, generator=gen)]
        fused_params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        ref_params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        fused = fusedopt.AdamW(fused_params, lr=0.05, amsgrad=True)
        ref = torch.optim.AdamW(ref_params, lr=0.05, amsgrad=True, foreach=False)
        for _ in range(20):
            for p, q in zip(fused_params, ref_params):
                g = torch.randn(p.shape, generator=gen)
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            fused.step()
            ref.step()
        assert type(fused.state[fused_params[0]]["exp_avg"]).__name__ == "DTensor"
        local = lambda ps: [p.to_local() for p in ps]
        for p, q in zip(local(fused_params), local(ref_params)):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        compare(fused, ref, fused_params, ref_params, torch.float32, "dtensor")
    finally:
        dist.destroy_process_group()
