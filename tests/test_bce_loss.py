"""fusedopt BCE and BCE-with-logits losses against torch.nn.functional in float64: forward and gradients with a
non-unit grad_output, every reduction, weight and pos_weight broadcasting, dtypes, the log clamp, NaN, bad inputs,
on every CPU backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, assert_close, cpu_backends
from loss_parity import REDUCTIONS, SHAPES, check_parity, shapes_for

import fusedopt
from fusedopt.nn import functional as FF

# Weight shapes against a (3, 5, 7) input: per class, suffix, scalar, a middle-dim broadcast (materialised), full.
WEIGHT_SHAPES = [(7,), (5, 7), (), (1, 5, 1), (3, 1, 7), (3, 5, 7)]


def _probs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.96 + 0.02).to(dtype)
    t = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, t


def _logits(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, t


def _weight(shape, dtype, seed=3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5).to(dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_parity(backend, dtype, reduction):
    for shape in shapes_for(backend):
        x, t = _probs(shape, dtype)
        check_parity(lambda **kw: FF.binary_cross_entropy(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.binary_cross_entropy(**kw, reduction=reduction), {"input": x, "target": t},
                     where=f"{backend} {shape}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_parity(backend, dtype, reduction):
    for shape in shapes_for(backend):
        x, t = _logits(shape, dtype)
        check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
                     {"input": x, "target": t}, where=f"{backend} {shape}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_weight_broadcasting(backend, dtype, reduction):
    x, t = _probs((3, 5, 7), dtype)
    for ws in WEIGHT_SHAPES:
        w = _weight(ws, dtype)
        check_parity(lambda **kw: FF.binary_cross_entropy(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.binary_cross_entropy(**kw, reduction=reduction),
                     {"input": x, "target": t, "weight": w}, where=f"{backend} weight {ws}")  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_weight_and_pos_weight(backend, dtype, reduction):
    x, t = _logits((3, 5, 7), dtype)
    pos_shapes = [(7,), (5, 1), (), (3, 5, 7)]
    for ws, ps in zip(WEIGHT_SHAPES, pos_shapes + pos_shapes[:2]):
        w, p = _weight(ws, dtype), _weight(ps, dtype, seed=4) * 2
        for extra in ({"weight": w}, {"pos_weight": p}, {"weight": w, "pos_weight": p}):
            check_parity(
                lambda **kw: FF.binary_cross_entropy_with_logits(**kw, reduction=reduction, backend=backend),
                lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
                {"input": x, "target": t, **extra}, where=f"{backend} weight {ws} pos_weight {ps} {sorted(extra)}",
            )  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_large_weighted_period(backend):
    """A per-class weight over many rows: the CPU kernel walks weight periods across chunk boundaries."""
    if backend == "triton":
        pytest.skip("the interpreter is slow on 70K elements; small weighted shapes run above")
    x, t = _logits((70001, 3), torch.float32)
    w, p = _weight((3,), torch.float32), _weight((70001, 1), torch.float32)
    check_parity(
        lambda **kw: FF.binary_cross_entropy_with_logits(**kw, backend=backend),
        F.binary_cross_entropy_with_logits,
        {"input": x, "target": t, "weight": w, "pos_weight": p},
    )
    xp, tp = _probs((1000, 37), torch.float64)
    wp = _weight((37,), torch.float64)
    check_parity(
        lambda **kw: FF.binary_cross_entropy(**kw, reduction="none", backend=backend),
        lambda **kw: F.binary_cross_entropy(**kw, reduction="none"),
        {"input": xp, "target": tp, "weight": wp},
    )


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_log_clamp_and_saturated_gradient(backend):
    """torch clamps both logs at -100 and divides the gradient by max(x (1 - x), 1e-12)."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-30, 1e-17, 0.5, 1 - 1e-16], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0, 0.25], dtype=torch.float64)
    for reduction in REDUCTIONS:
        check_parity(
            lambda r=reduction, **kw: FF.binary_cross_entropy(**kw, reduction=r, backend=backend),
            lambda r=reduction, **kw: F.binary_cross_entropy(**kw, reduction=r),
            {"input": x, "target": t},
        )


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_with_logits_extremes_and_nan(backend):
    x = torch.tensor([-800.0, -40.0, -1e-3, 0.0, 1e-3, 40.0, 800.0, float("nan")], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.5, 0.3, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    p = torch.tensor([3.0], dtype=torch.float64)
    for pos_weight in (None, p):
        ours = FF.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pos_weight, backend=backend)
        ref = F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pos_weight)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
        assert ours[7].isnan() and ours[:7].isfinite().all()
        assert FF.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, backend=backend).isnan()
        xg = x.clone().requires_grad_(True)
        out = FF.binary_cross_entropy_with_logits(xg, t, reduction="sum", pos_weight=pos_weight, backend=backend)
        (g,) = torch.autograd.grad(out, xg)
        xr = x.clone().requires_grad_(True)
        (rg,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(xr, t, reduction="sum", pos_weight=pos_weight),
                                    xr)  # fmt: skip
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("where", ["input", "target"])
@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_bce_out_of_range_raises_like_torch(backend, where, bad):
    x, t = _probs((1100,), torch.float32)
    (x if where == "input" else t)[613] = bad
    msg = f"all elements of {where} should be between 0 and 1"
    with pytest.raises(RuntimeError, match=msg):
        F.binary_cross_entropy(x, t)
    for reduction in REDUCTIONS:
        with pytest.raises(RuntimeError, match=msg):
            FF.binary_cross_entropy(x, t, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_result_dtypes_and_target_grad(backend):
    # BCE with logits returns the target's dtype (torch computes into a target-typed buffer).
    x, t = _logits((4, 6), torch.float32)
    check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, backend=backend),
                 F.binary_cross_entropy_with_logits, {"input": x, "target": t.double()})  # fmt: skip
    check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, reduction="none", backend=backend),
                 lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction="none"),
                 {"input": x.double(), "target": t})  # fmt: skip
    # torch differentiates both losses with respect to the target; fusedopt matches (torch's own function runs).
    xp, tp = _probs((4, 6), torch.float64)
    check_parity(lambda **kw: FF.binary_cross_entropy(**kw, backend=backend), F.binary_cross_entropy,
                 {"input": xp, "target": tp}, grad_names=("input", "target"))  # fmt: skip
    p = _weight((6,), torch.float64)
    check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, backend=backend),
                 F.binary_cross_entropy_with_logits, {"input": x.double(), "target": t.double(), "pos_weight": p},
                 grad_names=("input", "target"))  # fmt: skip


def test_bce_legacy_args_and_modules():
    x, t = _probs((4, 6), torch.float64)
    w = _weight((6,), torch.float64)
    for size_average, reduce in [(None, False), (False, None), (True, True)]:
        with pytest.warns(UserWarning, match="size_average and reduce"):
            ours = FF.binary_cross_entropy(x, t, w, size_average, reduce, backend="cpu")
        with pytest.warns(UserWarning):
            ref = F.binary_cross_entropy(x, t, w, size_average, reduce)
        assert_close(ours, ref, torch.float64)
        with pytest.warns(UserWarning, match="size_average and reduce"):
            ours = FF.binary_cross_entropy_with_logits(x, t, w, size_average, reduce, pos_weight=w, backend="cpu")
        with pytest.warns(UserWarning):
            ref = F.binary_cross_entropy_with_logits(x, t, w, size_average, reduce, pos_weight=w)
        assert_close(ours, ref, torch.float64)
    for reduction in REDUCTIONS:
        mod = fusedopt.BCELoss(weight=w, reduction=reduction, backend="cpu")
        assert isinstance(mod, torch.nn.BCELoss)
        assert mod.state_dict().keys() == torch.nn.BCELoss(weight=w).state_dict().keys()
        assert_close(mod(x, t), torch.nn.BCELoss(weight=w, reduction=reduction)(x, t), torch.float64)
        mod = fusedopt.BCEWithLogitsLoss(weight=w, pos_weight=w, reduction=reduction, backend="cpu")
        assert isinstance(mod, torch.nn.BCEWithLogitsLoss)
        ref_mod = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=w, reduction=reduction)
        assert mod.state_dict().keys() == ref_mod.state_dict().keys()
        assert_close(mod(x, t), ref_mod(x, t), torch.float64)


def test_bce_bad_inputs():
    x, t = _probs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="Using a target size"):
        FF.binary_cross_entropy(x, t[:, :1], backend="cpu")
    with pytest.raises(ValueError, match=r"Target size .* must be the same as input size"):
        FF.binary_cross_entropy_with_logits(x, t[:, :1], backend="cpu")
    with pytest.raises(RuntimeError, match="Found dtype Double but expected Float"):
        FF.binary_cross_entropy(x, t.double(), backend="cpu")
    with pytest.raises(RuntimeError, match="Attempting to broadcast a dimension"):
        FF.binary_cross_entropy(x, t, weight=torch.ones(3), backend="cpu")
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        FF.binary_cross_entropy(x, t, weight=torch.ones(2, 3, 4), backend="cpu")
    with pytest.raises(RuntimeError, match="must match the size"):
        FF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(3), backend="cpu")
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        FF.binary_cross_entropy_with_logits(x, t, weight=torch.ones(2, 3, 4), backend="cpu")
    with pytest.raises(RuntimeError, match="can't be cast to the desired output type Long"):
        FF.binary_cross_entropy_with_logits(x, t.long(), backend="cpu")
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        FF.binary_cross_entropy(x.requires_grad_(), t, weight=torch.ones(4, requires_grad=True), backend="cpu")
    for fn in (FF.binary_cross_entropy, FF.binary_cross_entropy_with_logits):
        with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
            fn(x, t, reduction="foo", backend="cpu")
        with pytest.raises(ValueError, match="unknown backend"):
            fn(x, t, backend="nope")


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_elementwise_mean_is_mean_with_torchs_warning(backend):
    x, t = _probs((4, 6), torch.float64)
    w = _weight((6,), torch.float64)
    cases = [
        (lambda **kw: FF.binary_cross_entropy(x, t, w, **kw, backend=backend),
         lambda **kw: F.binary_cross_entropy(x, t, w, **kw)),
        (lambda **kw: FF.binary_cross_entropy_with_logits(x, t, w, pos_weight=w, **kw, backend=backend),
         lambda **kw: F.binary_cross_entropy_with_logits(x, t, w, pos_weight=w, **kw)),
        (lambda **kw: fusedopt.BCELoss(w, **kw, backend=backend)(x, t), lambda **kw: torch.nn.BCELoss(w, **kw)(x, t)),
        (lambda **kw: fusedopt.BCEWithLogitsLoss(w, **kw, backend=backend)(x, t),
         lambda **kw: torch.nn.BCEWithLogitsLoss(w, **kw)(x, t)),
    ]  # fmt: skip
    for ours, theirs in cases:
        with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
            got = ours(reduction="elementwise_mean")
        with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
            want = theirs(reduction="elementwise_mean")
        assert_close(got, want, torch.float64, reduction=True)
        assert_close(got, theirs(reduction="mean"), torch.float64, reduction=True)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_bce_cpu_isa_paths(capability):
    """Each per-ISA copy of the CPU kernels, in a fresh process (the capability is chosen once per process)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        "from fusedopt.nn import functional as FF\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    x = torch.rand(4099, 3, dtype=torch.float64).mul(0.9).add(0.05).to(dt).requires_grad_()\n"
        "    t = torch.rand(4099, 3, dtype=torch.float64).to(dt); w = torch.rand(3, dtype=torch.float64).to(dt)\n"
        "    tol = dict(rtol=1e-10, atol=1e-12) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-5)\n"
        "    for ours, ref, kw in ((FF.binary_cross_entropy, F.binary_cross_entropy, {'weight': w}),\n"
        "                          (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,\n"
        "                           {'weight': w, 'pos_weight': w * 2})):\n"
        "        for red in ('none', 'mean'):\n"
        "            a = ours(x, t, reduction=red, backend='cpu', **kw); b = ref(x, t, reduction=red, **kw)\n"
        "            ga, = torch.autograd.grad(a.sum(), x); gb, = torch.autograd.grad(b.sum(), x)\n"
        "            torch.testing.assert_close(a, b, **tol); torch.testing.assert_close(ga, gb, **tol)\n"
    )
    env = {**os.environ, "FUSEDOPT_CPU_CAPABILITY": capability}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bce_custom_ops_opcheck():
    x, t = _probs((37,), torch.float32)
    w = _weight((37,), torch.float32)
    bce = torch.ops.fusedopt.bce_loss_fwd.default
    logits = torch.ops.fusedopt.bce_with_logits_fwd.default
    for reduction, need_grad in [(0, True), (1, True), (2, False)]:
        torch.library.opcheck(bce, (x, t, w, 37, 1.0, reduction, need_grad, torch.float32, "cpu"))
        torch.library.opcheck(logits, (x, t, w, 37, w, 37, 1.0, reduction, need_grad, torch.float32, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_parity_gpu(backend, dtype, reduction):
    for shape in SHAPES + [(1 << 20) + 3]:
        x, t = _probs(shape, dtype)
        xl, tl = _logits(shape, dtype)
        check_parity(lambda **kw: FF.binary_cross_entropy(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.binary_cross_entropy(**kw, reduction=reduction),
                     {"input": x.cuda(), "target": t.cuda()}, where=f"{backend} {shape}")  # fmt: skip
        check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, reduction=reduction, backend=backend),
                     lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
                     {"input": xl.cuda(), "target": tl.cuda()}, where=f"{backend} {shape}")  # fmt: skip
    x, t = _logits((33, 5, 129), dtype)
    w, p = _weight((129,), dtype).cuda(), _weight((5, 1), dtype).cuda()
    check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, reduction=reduction, backend=backend),
                 lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
                 {"input": x.cuda(), "target": t.cuda(), "weight": w, "pos_weight": p})  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_bce_non_contiguous_and_auto_backend(backend):
    x, t = _probs((7, 12), torch.float64)
    xl, tl = _logits((7, 12), torch.float64)
    w = _weight((6,), torch.float64)
    sl = (slice(None), slice(None, None, 2))
    check_parity(lambda **kw: FF.binary_cross_entropy(**kw, backend=backend), F.binary_cross_entropy,
                 {"input": x[sl], "target": t[sl], "weight": w})  # fmt: skip
    check_parity(lambda **kw: FF.binary_cross_entropy_with_logits(**kw, backend=backend),
                 F.binary_cross_entropy_with_logits, {"input": xl[sl], "target": tl[sl], "pos_weight": w})  # fmt: skip
    check_parity(FF.binary_cross_entropy, F.binary_cross_entropy, {"input": x, "target": t})  # backend="auto"


@pytest.mark.parametrize("backend", cpu_backends())
def test_losses_under_autocast_match_torch(backend):
    """autocast runs mse_loss and binary_cross_entropy_with_logits in float32 (and BCE per its own device rule)."""
    x, t = _logits((6, 5), torch.bfloat16)
    xp, tp = _probs((6, 5), torch.bfloat16)
    w = _weight((5,), torch.bfloat16)
    cases = [
        (FF.mse_loss, F.mse_loss, {"input": x, "target": t}),
        (FF.mse_loss, F.mse_loss, {"input": x, "target": t, "weight": _weight((6, 5), torch.bfloat16)}),
        (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
         {"input": x, "target": t, "weight": w, "pos_weight": w}),
        (FF.binary_cross_entropy, F.binary_cross_entropy, {"input": xp, "target": tp, "weight": w}),
    ]  # fmt: skip
    for ours, ref, tensors in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(**tensors, backend=backend)
            expected = ref(**tensors)
        assert out.dtype == expected.dtype, ours.__name__
        assert_close(out, expected, out.dtype, ours.__name__, reduction=True)
        assert out.dtype == torch.float32 or ("weight" in tensors and ours is FF.mse_loss)  # CPU weighted MSE: bf16


def test_bce_with_logits_under_torch_compile():
    """torch.compile traces through the custom op (its fake impl) and matches eager torch."""
    x, t = _logits((16, 33), torch.float32)
    p = _weight((33,), torch.float32)
    x.requires_grad_(True)
    compiled = torch.compile(lambda a, b: FF.binary_cross_entropy_with_logits(a, b, pos_weight=p, backend="cpu"))
    out = compiled(x, t)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().double().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(xr, t.double(), pos_weight=p.double())
    (rg,) = torch.autograd.grad(ref, xr)
    assert_close(out.detach(), ref.detach(), torch.float32, reduction=True)
    assert_close(g, rg, torch.float32)
