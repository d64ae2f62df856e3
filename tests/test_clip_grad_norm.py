"""fusedopt.nn.utils.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (float64 reference), the grad_norm /
scale_grads ops on every backend, and clipping folded into the optimizers' step (max_grad_norm=)."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_DTYPES, assert_close, cpu_backends, tol

import fusedopt
from fusedopt.nn.utils import clip_grad_norm_
from fusedopt.ops.grad_norm import grad_norm, scale_grads

BACKENDS = cpu_backends()
NORM_TYPES = [1.0, 2.0, 3.5, 0.5, float("inf")]
INF = float("inf")


def _grad_set(kind: str, dtypes, gen, sizes=(7, 0, 1500, 1, 33)):
    """Params with grads: random, with an empty grad, some None; 'nan'/'inf' put one non-finite value in."""
    params = []
    for i, n in enumerate(sizes):
        dt = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(n, dtype=dt))
        if i == 3:
            p.grad = None  # no grad: skipped, as torch does
        else:
            p.grad = (torch.randn(n, generator=gen, dtype=torch.float64) * (i + 1)).to(dt)
        params.append(p)
    if kind in ("nan", "inf", "-inf"):
        params[2].grad[11] = float(kind)
    return params


def _reference(params, max_norm, norm_type, out_dtype):
    """torch's clip_grad_norm_ semantics with float64 arithmetic: the total norm of the float64 grads, rounded to the
    result dtype as torch's is, and the coefficient computed from that rounded norm in that dtype (so an fp16 norm
    that overflows zeroes the grads, as in torch). Norm order inf skips empty grads: torch's _foreach_norm refuses an
    inf norm of an empty tensor, while fusedopt counts it as contributing nothing."""
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([g for g in grads if norm_type != INF or g.numel() > 0], norm_type)
    total = total.to(out_dtype)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, [None if p.grad is None else p.grad.detach().double() * coef.double() for p in params]


@pytest.mark.parametrize("dtypes", [[d] for d in ALL_DTYPES] + [[torch.float32, torch.bfloat16]], ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
def test_clip_parity(dtypes, norm_type, kind):
    gen = torch.Generator().manual_seed(hash((str(dtypes), norm_type, kind)) % 2**31)
    for max_norm in (0.5, 1e6):  # clipping, and a coefficient clamped at 1
        params = _grad_set(kind, dtypes, gen)
        # torch's total norm: dtype promoted over the grads, on the first grad's device.
        dt = torch.float32 if len(dtypes) > 1 else dtypes[0]
        expected_total, ref = _reference(params, max_norm, norm_type, dt)
        total = clip_grad_norm_(params, max_norm, norm_type)
        assert total.dtype == dt and total.device == params[0].grad.device
        if kind != "finite":
            assert not torch.isfinite(total) and torch.isnan(total) == torch.isnan(expected_total)
        torch.testing.assert_close(total.double(), expected_total.double(), **tol(dt, reduction=True), equal_nan=True)
        for p, r in zip(params, ref):
            if p.grad is not None:
                torch.testing.assert_close(p.grad.double(), r, **tol(p.dtype), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_parity_named_backend(backend, norm_type):
    """clip_grad_norm_(..., backend=b): the keyword-only extra picks the kernel; the result is torch's."""
    gen = torch.Generator().manual_seed(11)
    params = _grad_set("finite", [torch.float32], gen)
    expected_total, ref = _reference(params, 0.5, norm_type, torch.float32)
    total = clip_grad_norm_(params, 0.5, norm_type, backend=backend)
    torch.testing.assert_close(total.double(), expected_total.double(), **tol(torch.float32, reduction=True))
    for p, r in zip(params, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), r, **tol(p.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_grad_norm_op_backends(backend, dtype, norm_type):
    gen = torch.Generator().manual_seed(5)
    sizes = (3, 0, 70000, 129) if backend != "triton" else (3, 0, 700, 129)
    ts = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype) for n in sizes]
    expected = torch.linalg.vector_norm(torch.cat([t.double() for t in ts]), norm_type)
    out = grad_norm(ts, norm_type, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # 16-bit inputs accumulate in float32: the float32 reduction tolerance applies.
    assert_close(out, expected, torch.float64 if dtype == torch.float64 else torch.float32, "norm", reduction=True)
    for bad in (float("inf"), float("nan")):  # non-finite values propagate as in torch
        ts[2][17] = bad
        expected = torch.linalg.vector_norm(torch.cat([t.double() for t in ts]), norm_type)
        torch.testing.assert_close(grad_norm(ts, norm_type, backend=backend).double(), expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_scale_grads_op_backends(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    ts = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in (5, 0, 3000, 64)]
    expected = [t.double() * 0.3 for t in ts]
    scale_grads(ts, torch.tensor(0.3, dtype=torch.float64 if dtype == torch.float64 else torch.float32), backend)
    for t, e in zip(ts, expected):
        assert_close(t, e, dtype, "scaled")


def test_non_contiguous_grads():
    base = torch.randn(40, 30, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(30, 40, dtype=torch.float64))
    p.grad = base.t()  # a non-contiguous view
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = base.t().clone()
    total = clip_grad_norm_([p], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert_close(total, expected, torch.float64, "norm", reduction=True)
    assert_close(p.grad, q.grad, torch.float64, "grad")


def test_empty_and_no_grads():
    total = clip_grad_norm_([], 1.0)
    assert total.dtype == torch.float32 and total.device.type == "cpu" and float(total) == 0.0
    p = torch.nn.Parameter(torch.ones(3))
    assert float(clip_grad_norm_([p], 1.0)) == 0.0  # no grad at all
    with pytest.warns(UserWarning, match="empty generator"):
        clip_grad_norm_((x for x in []), 1.0)


def test_single_tensor_argument():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 2.0)
    assert float(clip_grad_norm_(p, 1.0)) == 4.0
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5 * 4.0 / (4.0 + 1e-6)))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_error_if_nonfinite(value):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, value, 2.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert p.grad[0] == 1.0, "grads must be untouched when it raises"


def test_bad_norm_type_in_op():
    with pytest.raises(ValueError, match="norm_type"):
        grad_norm([torch.ones(2)], -1.0)
    with pytest.raises(ValueError, match="at least one"):
        grad_norm([], 2.0)


def test_unusual_norm_types_delegate_to_torch():
    """Orders 0 and -inf are not fused: the result is torch's own."""
    for norm_type in (0.0, -INF):
        ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(4)]
        for p, g in zip(ps, ([0.0, -3.0, 2.0, 0.5], [1.0, 1.0, 0.0, 0.0])):
            p.grad = torch.tensor(g)
        ours = clip_grad_norm_(ps[:2], 0.1, norm_type=norm_type)
        for p in ps[2:]:
            p.grad = torch.tensor([0.0, -3.0, 2.0, 0.5]) if p is ps[2] else torch.tensor([1.0, 1.0, 0.0, 0.0])
        theirs = torch.nn.utils.clip_grad_norm_(ps[2:], 0.1, norm_type=norm_type)
        assert torch.equal(ours, theirs)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps[:2], ps[2:]))


# --- the custom-op door and DTensor ------------------------------------------------------------------------------


def _op_cases():
    gen = torch.Generator().manual_seed(21)
    ps = lambda: [torch.randn(n, generator=gen) for n in (5, 300)]
    return {
        "grad_norm": (ps(), 2.0, "cpu"),
        "scale_grads": (ps(), torch.tensor(0.5), "cpu"),
    }


# The optimizer ops' opchecks are in test_optim_registry.py and test_compile.py.
@pytest.mark.parametrize("name", ["grad_norm", "scale_grads"])
def test_custom_op_schema_and_fake(name):
    """torch.library.opcheck: the schema's mutation annotations, the fake impl and the registration are consistent
    (what torch.compile relies on)."""
    op = getattr(torch.ops.fusedopt, name).default
    torch.library.opcheck(op, _op_cases()[name], test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["grad_norm", "scale_grads"])
def test_custom_op_matches_eager_path(name):
    """torch.ops.fusedopt.<name> (what torch.compile sees) and the eager fast path give the same results."""
    import fusedopt.ops as ops

    impls = {
        "grad_norm": (ops.grad_norm.grad_norm_op, ops.grad_norm._norm_impl),
        "scale_grads": (ops.grad_norm.scale_grads_op, ops.grad_norm._scale_impl),
    }[name]
    outs = []
    for fn in impls:
        args = _op_cases()[name]  # same seed: identical inputs
        out = fn(*args)
        outs.append([out] if out is not None else [t for a in args if isinstance(a, list) for t in a])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_dtensor_grads_global_norm():
    """DTensor grads (one-process gloo mesh): the norm, the clipped grads and folded clipping match torch's."""
    import gloo
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{gloo.rendezvous()}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(8, 6, generator=gen), torch.randn(10, generator=gen)]
        placements = [[Shard(0)], [Replicate()]]
        for norm_type in (2.0, 1.0, INF):
            grads = [torch.randn(t.shape, generator=gen) for t in full]
            ours = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(full, placements)]
            theirs = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(full, placements)]
            for p, q, g, pl in zip(ours, theirs, grads, placements):
                p.grad = distribute_tensor(g.clone(), mesh, pl)
                q.grad = distribute_tensor(g.clone(), mesh, pl)
            total = clip_grad_norm_(ours, 0.5, norm_type)
            expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
            expected = expected.full_tensor() if hasattr(expected, "full_tensor") else expected
            assert_close(total, expected, torch.float32, f"dtensor norm {norm_type}", reduction=True)
            for p, q in zip(ours, theirs):
                assert_close(p.grad.to_local(), q.grad.to_local(), torch.float32, "dtensor clipped grad")
        # Folded clipping over DTensor params.
        ps = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        qs = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        opt_a = fusedopt.SGD(ps, lr=0.1, momentum=0.9, max_grad_norm=0.5)
        opt_b = fusedopt.SGD(qs, lr=0.1, momentum=0.9)
        for _ in range(3):
            for p, q in zip(ps, qs):
                g = torch.randn(p.shape, generator=gen)
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            clip_grad_norm_(qs, 0.5)
            opt_b.step()
            opt_a.step()
            for p, q in zip(ps, qs):
                assert_close(p.to_local(), q.to_local(), torch.float32, "dtensor folded clip")
    finally:
        dist.destroy_process_group()


# --- GPU (skipped without one; scripts/gpu_check.sh runs these) ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_grad_norm_and_scale_gpu(backend, dtype, norm_type):
    gen = torch.Generator().manual_seed(5)
    sizes = (3, 0, 70001, 129, 3 * 65537)
    ts = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype).cuda() for n in sizes]
    expected = torch.linalg.vector_norm(torch.cat([t.double() for t in ts]), norm_type)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grad_norm(ts, norm_type, backend=backend)
        scale_grads(ts, torch.tensor(0.25, device="cuda"), backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda"
    assert_close(out, expected, torch.float64 if dtype == torch.float64 else torch.float32, "norm", reduction=True)
    ts[2][5] = float("nan")
    assert torch.isnan(grad_norm(ts, norm_type, backend=backend))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_cpu_isa_path(capability):
    """The per-ISA CPU kernel copies of RMSprop, SGD, grad_norm and scale_grads: a lower ISA forced in a subprocess."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, fusedopt, sys; sys.path.insert(0, 'tests')\n"
        "from parity_steps import run_parity\n"
        "from fusedopt.ops.grad_norm import grad_norm, scale_grads\n"
        "assert fusedopt._backend.cpu_extension()[0].cpu_capability() == sys.argv[1]\n"
        "for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):\n"
        "    run_parity(fusedopt.RMSprop, torch.optim.RMSprop, {'lr': 0.01, 'momentum': 0.9, 'centered': True,\n"
        "               'weight_decay': 0.1}, dt, 'cpu')\n"
        "    run_parity(fusedopt.SGD, torch.optim.SGD, {'lr': 0.01, 'momentum': 0.9, 'dampening': 0.2}, dt, 'cpu')\n"
        "    ts = [torch.randn(n, dtype=torch.float64).to(dt) for n in (3, 0, 5000)]\n"
        "    for p in (1.0, 2.0, 3.5, float('inf')):\n"
        "        want = torch.linalg.vector_norm(torch.cat([t.double() for t in ts]), p)\n"
        "        torch.testing.assert_close(grad_norm(ts, p, 'cpu').double(), want, rtol=1e-5, atol=0)\n"
        "    want = [t.double() * 0.5 for t in ts]\n"
        "    scale_grads(ts, torch.tensor(0.5), 'cpu')\n"
        "    for t, w in zip(ts, want):\n"
        "        torch.testing.assert_close(t.double(), w, rtol=1e-3, atol=1e-7)  # fp16 subnormals round\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEDOPT_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", script, capability], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
