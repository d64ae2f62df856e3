"""fusedopt MSE loss against torch.nn.functional.mse_loss in float64: forward, input and target gradients with a
non-unit grad_output, every reduction, weights, broadcasting, dtypes, NaN, bad inputs, on every CPU backend."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, assert_close, cpu_backends
from loss_parity import REDUCTIONS, SHAPES, check_parity, shapes_for

import fusedopt
from fusedopt.nn import functional as FF


def _pair(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, t


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_parity(backend, dtype, reduction):
    for shape in shapes_for(backend):
        x, t = _pair(shape, dtype)
        check_parity(lambda **kw: FF.mse_loss(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.mse_loss(**kw, reduction=reduction), {"input": x, "target": t},
                     grad_names=("input", "target"), where=f"{backend} {shape}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_weighted_parity(backend, dtype, reduction):
    for shape in [(0,), (), (7,), (3, 5, 7)] + ([] if backend == "triton" else [(4099,)]):
        x, t = _pair(shape, dtype, seed=1)
        w = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        check_parity(lambda **kw: FF.mse_loss(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.mse_loss(**kw, reduction=reduction), {"input": x, "target": t, "weight": w},
                     grad_names=("input", "target"), where=f"{backend} {shape}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_mse_broadcast_warns_like_torch(backend):
    x, t = _pair((3, 1), torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    for reduction in REDUCTIONS:
        with pytest.warns(UserWarning, match="different to the input size") as rec:
            check_parity(lambda r=reduction, **kw: FF.mse_loss(**kw, reduction=r, backend=backend),
                         lambda r=reduction, **kw: F.mse_loss(**kw, reduction=r), {"input": x, "target": t},
                         grad_names=("input", "target"))  # fmt: skip
        ours = [str(r.message) for r in rec if "different to the input size" in str(r.message)]
        with pytest.warns(UserWarning) as torch_rec:
            F.mse_loss(x, t, reduction=reduction)
        assert ours[0] == str(torch_rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FF.mse_loss(x, x.clone(), backend=backend)  # same sizes: no warning


@pytest.mark.parametrize("backend", cpu_backends())
def test_mse_mixed_dtypes_and_legacy_args(backend):
    x = torch.randn(5, 7, dtype=torch.bfloat16)
    t = torch.randn(5, 7, dtype=torch.float32)
    check_parity(lambda **kw: FF.mse_loss(**kw, backend=backend), F.mse_loss, {"input": x, "target": t},
                 grad_names=("input", "target"))  # fmt: skip
    for size_average, reduce in [(None, False), (False, None), (True, True), (False, True), (True, False)]:
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            out = FF.mse_loss(x.double(), t.double(), size_average, reduce, backend=backend)
        with pytest.warns(UserWarning):
            ref = F.mse_loss(x.double(), t.double(), size_average, reduce)
        assert_close(out, ref, torch.float64, f"size_average={size_average} reduce={reduce}")
    integer_target = torch.randint(0, 3, (5, 7))
    check_parity(lambda **kw: FF.mse_loss(**kw, backend=backend), F.mse_loss, {"input": x.float(),
                 "target": integer_target})  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_mse_nan_propagates(backend):
    x, t = _pair((1100,), torch.float32)
    x[17] = float("nan")
    t[900] = float("inf")
    x.requires_grad_(True)
    loss = FF.mse_loss(x, t, reduction="none", backend=backend)
    assert loss[17].isnan() and loss[900].isinf() and loss[:17].isfinite().all()
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert g[17].isnan() and g[900].isinf() and g[18:900].isfinite().all()
    for reduction in ("mean", "sum"):
        assert FF.mse_loss(x, t, reduction=reduction, backend=backend).isnan()


@pytest.mark.parametrize("backend", cpu_backends())
def test_mse_module(backend):
    x, t = _pair((4, 6), torch.float64)
    for reduction in REDUCTIONS:
        mod = fusedopt.MSELoss(reduction=reduction, backend=backend)
        assert isinstance(mod, torch.nn.MSELoss) and fusedopt.nn.MSELoss is fusedopt.MSELoss
        assert mod.state_dict().keys() == torch.nn.MSELoss().state_dict().keys()
        assert_close(mod(x, t), torch.nn.MSELoss(reduction=reduction)(x, t), torch.float64, reduction)
    with pytest.warns(UserWarning):
        assert fusedopt.MSELoss(size_average=False).reduction == "sum"


def test_mse_bad_inputs():
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match="must match the size"), pytest.warns(UserWarning):
        FF.mse_loss(x, torch.randn(2), backend="cpu")
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        FF.mse_loss(x, x, weight=torch.ones(1), backend="cpu")
    with pytest.raises(ValueError, match="Invalid reduction mode: foo"):
        FF.mse_loss(x, x, weight=torch.ones(3), reduction="foo", backend="cpu")
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        FF.mse_loss(x, x, reduction="foo", backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        FF.mse_loss(x, x, backend="nope")
    with pytest.raises(NotImplementedError):
        FF.mse_loss(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long), backend="cpu")


def test_mse_weight_requiring_grad_matches_torch():
    """torch differentiates the weight of its weighted MSE; fusedopt then runs torch's formula."""
    x, t = _pair((4, 5), torch.float64)
    w = torch.rand(4, 5, dtype=torch.float64)
    check_parity(lambda **kw: FF.mse_loss(**kw, backend="cpu"), F.mse_loss, {"input": x, "target": t, "weight": w},
                 grad_names=("input", "weight"))  # fmt: skip


def test_mse_backward_twice_and_double_backward_raise():
    x, t = _pair((5,), torch.float64)
    x.requires_grad_(True)
    loss = FF.mse_loss(x, t, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    loss = FF.mse_loss(x, t, backend="cpu")
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_mse_cpu_isa_paths(capability):
    """Each per-ISA copy of the CPU kernel, in a fresh process (the capability is chosen once per process)."""
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        "from fusedopt.nn import functional as FF\n"
        "x = torch.randn(4099, dtype=torch.float64, requires_grad=True); t = torch.randn(4099, dtype=torch.float64)\n"
        "w = torch.rand(4099, dtype=torch.float64)\n"
        "for kw in ({}, {'weight': w}):\n"
        "    a = FF.mse_loss(x, t, backend='cpu', **kw); b = F.mse_loss(x, t, **kw)\n"
        "    ga, = torch.autograd.grad(a, x); gb, = torch.autograd.grad(b, x)\n"
        "    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)\n"
        "    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)\n"
    )
    env = {**__import__("os").environ, "FUSEDOPT_CPU_CAPABILITY": capability}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_mse_custom_op_opcheck():
    x, t = _pair((37,), torch.float32)
    op = torch.ops.fusedopt.mse_loss_fwd.default
    for reduction, need_grad in [(0, True), (1, True), (2, False)]:
        torch.library.opcheck(op, (x, t, None, 1, 1.0 / 37, None, reduction, need_grad, torch.float32, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_parity_gpu(backend, dtype, reduction):
    for shape in SHAPES + [(1 << 20) + 3]:
        x, t = _pair(shape, dtype)
        w = torch.rand(shape, dtype=torch.float64).to(dtype).cuda()
        for extra in ({}, {"weight": w}):
            check_parity(lambda **kw: FF.mse_loss(**kw, reduction=reduction, backend=backend),
                         lambda **kw: F.mse_loss(**kw, reduction=reduction),
                         {"input": x.cuda(), "target": t.cuda(), **extra}, grad_names=("input", "target"),
                         where=f"{backend} {shape}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_mse_non_contiguous_auto_backend_and_elementwise_mean(backend):
    x = torch.randn(6, 10, dtype=torch.float64)[:, ::2].t()  # non-contiguous (5, 6)
    t = torch.randn(6, 5, dtype=torch.float64).t()
    check_parity(lambda **kw: FF.mse_loss(**kw, backend=backend), F.mse_loss, {"input": x, "target": t},
                 grad_names=("input", "target"))  # fmt: skip
    check_parity(lambda **kw: FF.mse_loss(**kw), F.mse_loss, {"input": x, "target": t})  # backend="auto"
    with pytest.warns(UserWarning, match="elementwise_mean"):
        out = FF.mse_loss(x, t, reduction="elementwise_mean", backend=backend)
    assert_close(out, F.mse_loss(x, t), torch.float64, reduction=True)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        out = fusedopt.MSELoss(reduction="elementwise_mean", backend=backend)(x, t)
    assert_close(out, F.mse_loss(x, t), torch.float64, reduction=True)
    with pytest.raises(ValueError, match="Invalid reduction mode: elementwise_mean"):  # torch's weighted MSE refuses it
        F.mse_loss(x, t, weight=torch.ones_like(x), reduction="elementwise_mean")
    with pytest.raises(ValueError, match="Invalid reduction mode: elementwise_mean"):
        FF.mse_loss(x, t, weight=torch.ones_like(x), reduction="elementwise_mean", backend=backend)


def test_mse_under_torch_compile():
    """torch.compile traces through the custom op (its fake impl) and matches eager torch."""
    x, t = _pair((16, 33), torch.float32)
    x.requires_grad_(True)
    compiled = torch.compile(lambda a, b: FF.mse_loss(a, b, backend="cpu"))
    out = compiled(x, t)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().double().requires_grad_(True)
    ref = F.mse_loss(xr, t.double())
    (rg,) = torch.autograd.grad(ref, xr)
    assert_close(out.detach(), ref.detach(), torch.float32, reduction=True)
    assert_close(g, rg, torch.float32)
