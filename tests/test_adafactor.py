"""fusedopt.optim.Adafactor against torch.optim.Adafactor's for-loop in float64: the option grid (20 steps, params
and every state tensor), torch's state shapes (row_var / col_var with keepdim, `variance` for 0-d and 1-d params),
state_dict both ways, GradScaler, non-contiguous and batched (3-d) params, NaN/Inf grads, empty params (torch
raises ZeroDivisionError, so does fusedopt), wrong dtypes and the boundary messages of every backend. The
cross-cutting families (compile, AMP, max_grad_norm, DDP) run its cases from tests/optim_db.py."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_DTYPES, cpu_backends
from optim_db import _grid
from parity_steps import compare, make_params, run_parity, set_grads

import fusedopt
from fusedopt.ops import adafactor as adafactor_op

BACKENDS = cpu_backends()  # cpu, torch, and triton where it runs (interpreted); cuda in test_parity_gpu
FAST = [b for b in BACKENDS if b != "triton"]
SHAPES = [(), (3,), (33, 17), (2, 5, 7), (1100,), (1,), (1, 9), (40, 1)]  # no empty param: torch raises on one
SMALL_SHAPES = [(), (3,), (9, 7), (2, 3, 5), (130,), (1, 9), (40, 1)]  # for the Triton interpreter
ROOT = Path(__file__).resolve().parent.parent
GRID = _grid(
    {"weight_decay": [0.0, 0.1], "maximize": [False, True], "eps": [(None, 1e-3), (1e-30, 1e-2)]},
    [{"lr": 1e-2}, {"lr": 0.5, "beta2_decay": -0.5, "d": 2.0}, {"lr": 3e-2, "beta2_decay": -1.0, "d": 1.0}],
)
IDS = ["-".join(f"{k}={v}" for k, v in kw.items()) for kw in GRID]
# 16-bit: the new row/col factors and variances are stored in the param dtype (torch's layout) and the update is
# computed from the stored values, which a float64 reference cannot reproduce: one 16-bit rounding of a factor moves
# u by ~eps/2, and with lr = 0.5 (p moves by about its own size) that is several % of the result. Smaller lr only.
GRID_16BIT = [kw for kw in GRID if kw["lr"] < 0.1]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kwargs", GRID, ids=IDS)
def test_grid_float64_float32(kwargs, backend):
    for dtype in (torch.float64, torch.float32):
        run_parity(fusedopt.Adafactor, torch.optim.Adafactor, {**kwargs, "foreach": False}, dtype, backend, 20,
                   shapes=SHAPES)  # fmt: skip


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", GRID_16BIT[::2])
def test_grid_16bit_one_step(kwargs, dtype, backend):
    # eps1 = None means finfo(param dtype).eps to torch and fusedopt alike: the float64 reference would take float64's
    # (the clamp at eps1^2 binds for |g| < 16-bit's eps), so both get the 16-bit eps by value here.
    eps = (torch.finfo(dtype).eps if kwargs["eps"][0] is None else kwargs["eps"][0], kwargs["eps"][1])
    run_parity(fusedopt.Adafactor, torch.optim.Adafactor, {**kwargs, "eps": eps, "foreach": False}, dtype, backend,
               20, shapes=SHAPES)  # fmt: skip


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_triton_small(dtype):
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable on CPU tensors here")
    grid = GRID_16BIT if dtype in (torch.bfloat16, torch.float16) else GRID
    for kwargs in (grid[0], grid[-1]):
        eps = (kwargs["eps"][0] or torch.finfo(dtype).eps, kwargs["eps"][1])
        run_parity(fusedopt.Adafactor, torch.optim.Adafactor, {**kwargs, "eps": eps}, dtype, "triton", 20,
                   shapes=SMALL_SHAPES)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_foreach_and_tensor_lr(backend):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    run_parity(fusedopt.Adafactor, torch.optim.Adafactor, {"lr": 2e-2, "weight_decay": 0.05, "foreach": True},
               torch.float64, backend, 20, shapes=shapes)  # fmt: skip
    kw = {"lr": torch.tensor(0.02, dtype=torch.float64), "foreach": False}
    run_parity(fusedopt.Adafactor, torch.optim.Adafactor, kw, torch.float64, backend, 20, shapes=shapes)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
def test_state_dict_round_trip(direction, backend):
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    opt_f, opt_r, fused, ref = run_parity(fusedopt.Adafactor, torch.optim.Adafactor, kwargs, torch.float64,
                                          backend, 10, shapes=SHAPES)  # fmt: skip
    if direction == "fused_to_torch":
        new_r = torch.optim.Adafactor(ref, **kwargs)
        new_r.load_state_dict(copy.deepcopy(opt_f.state_dict()))
        opt_r, new_f = new_r, opt_f
    else:
        new_f = fusedopt.Adafactor(fused, backend=backend, **kwargs)
        new_f.load_state_dict(copy.deepcopy(opt_r.state_dict()))
    gen = torch.Generator().manual_seed(7)
    for s in range(10):
        set_grads(fused, ref, gen, s)
        new_f.step()
        opt_r.step()
    compare(new_f, opt_r, fused, ref, torch.float64, f"after state_dict {direction}")


def test_state_shapes_are_torchs():
    fused, ref = make_params([(), (4,), (3, 5), (2, 3, 4)], torch.float32)
    opt_f, opt_r = fusedopt.Adafactor(fused, backend="cpu"), torch.optim.Adafactor(ref)
    for f, r in zip(fused, ref):
        f.grad = torch.ones_like(f)
        r.grad = torch.ones_like(r)
    opt_f.step()
    opt_r.step()
    for f, r in zip(fused, ref):
        assert {k: tuple(v.shape) for k, v in opt_f.state[f].items()} == {
            k: tuple(v.shape) for k, v in opt_r.state[r].items()
        }


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_inf_skip(backend):
    """GradScaler: unscale and inf-skip in the kernel match torch's unscale_ + skipped step; .grad is unscaled."""
    fused, ref = make_params([(5,), (30, 7)], torch.float64)
    opt_f = fusedopt.Adafactor(fused, backend=backend, lr=1e-2, weight_decay=0.1)
    opt_r = torch.optim.Adafactor(ref, lr=1e-2, weight_decay=0.1)
    sc_f, sc_r = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for s in range(12):
        set_grads(fused, ref, gen, s, none_every=0, scale=sc_f.get_scale())
        for r, f in zip(ref, fused):
            r.grad = f.grad.detach().clone()
        if s in (0, 4):
            fused[1].grad[2, 3] = ref[1].grad[2, 3] = float("inf") if s else float("nan")
        for sc in (sc_f, sc_r):
            sc.scale(torch.ones(()))
        sc_f.step(opt_f)
        sc_r.step(opt_r)
        sc_f.update()
        sc_r.update()
        assert sc_f.get_scale() == sc_r.get_scale()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"scaler step {s}", skipped_first=True)
        if s not in (0, 4):
            for f, r in zip(fused, ref):
                torch.testing.assert_close(f.grad, r.grad, msg=f"step {s}: .grad not unscaled as torch's")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params(backend):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    fused = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(torch.randn(4, 3, 5, dtype=torch.float64)[:, 1])]
    ref = [torch.nn.Parameter(f.detach().clone()) for f in fused]
    opt_f = fusedopt.Adafactor(fused, backend=backend, weight_decay=0.1)
    opt_r = torch.optim.Adafactor(ref, weight_decay=0.1, foreach=False)
    for s in range(6):
        set_grads(fused, ref, gen, s, none_every=0)
        opt_f.step()
        opt_r.step()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"step {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_grads_like_torch(backend):
    """A NaN/inf grad element: torch's Python max() treats a NaN RMS as below eps2 / 1, so only the factors' NaN
    spreads (a matrix's whole estimate, a vector's one element); fusedopt gives the same values."""
    fused, ref = make_params([(4, 6), (7,)], torch.float64)
    opt_f, opt_r = fusedopt.Adafactor(fused, backend=backend), torch.optim.Adafactor(ref, foreach=False)
    for s, bad in enumerate((float("nan"), float("inf"), 1.0)):
        for f, r in zip(fused, ref):
            f.grad = torch.full(f.shape, 0.5, dtype=torch.float64)
            r.grad = f.grad.clone()
        fused[1].grad[2] = ref[1].grad[2] = bad
        if s == 1:
            fused[0].grad[1, 1] = ref[0].grad[1, 1] = bad
        opt_f.step()
        opt_r.step()
        for f, r in zip(fused, ref):
            torch.testing.assert_close(f, r, equal_nan=True, rtol=1e-12, atol=1e-14, msg=f"step {s}")
            for k, v in opt_r.state[r].items():
                torch.testing.assert_close(opt_f.state[f][k].double(), v.double(), equal_nan=True)
    assert fused[1].isnan().sum() == 1 and not fused[1][0].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0)])
def test_empty_param_raises_like_torch(shape, backend):
    for opt_cls, kw in ((torch.optim.Adafactor, {}), (fusedopt.Adafactor, {"backend": backend})):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = opt_cls([p, torch.nn.Parameter(torch.ones(3))], **kw)
        p.grad = torch.zeros(shape)
        with pytest.raises(ZeroDivisionError):
            opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype_and_state_shape_messages(backend):
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    opt = fusedopt.Adafactor([p], backend=backend)
    p.grad = torch.ones(3, 4, dtype=torch.float64)
    p.data = p.data.float()  # a grad of another dtype is reachable through .data only
    with pytest.raises(RuntimeError, match=r"grads\[0\] is torch.float64, its param torch.float32"):
        opt.step()
    params, grads = [torch.ones(3, 4), torch.ones(5)], [torch.ones(3, 4), torch.ones(5)]
    steps = [torch.zeros(()), torch.zeros(())]
    bad_row = [torch.zeros(3, 4)]
    hyper = {"beta2_decay": -0.8, "eps1": 1e-30, "eps2": 1e-3, "d": 1.0, "weight_decay": 0.0}
    with pytest.raises(RuntimeError) as err:
        adafactor_op.adafactor_step(params, grads, bad_row, [torch.zeros(1, 4)], [torch.zeros(5)], steps, lr=0.1,
                                    hyper=hyper, maximize=False, backend=backend)  # fmt: skip
    expected = (f"fusedopt adafactor_step ({backend}): row_vars[0] must be a torch.float32 tensor of shape [3, 1] on "
                "cpu for its param of shape [3, 4], got torch.float32 [3, 4] on cpu")  # fmt: skip
    assert expected in str(err.value)


def test_op_passes_opcheck():
    gen = torch.Generator().manual_seed(21)
    params = [torch.randn(4, 6, generator=gen), torch.randn(5, generator=gen)]
    args = (params, [torch.randn_like(p) for p in params], [torch.rand(4, 1)], [torch.rand(1, 6)], [torch.rand(5)],
            [torch.zeros(()), torch.zeros(())], 0.01, None, -0.8, 1e-30, 1e-3, 1.0, 0.1, True, torch.tensor(2.0),
            torch.tensor(0.0), True, "cpu")  # fmt: skip
    result = torch.library.opcheck(torch.ops.fusedopt.adafactor_step.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_lower_isa_parity(capability):
    code = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "from parity_steps import run_parity\n"
        "from test_adafactor import GRID, GRID_16BIT, SHAPES\n"
        "import fusedopt\n"
        "from fusedopt import _backend\n"
        f"assert _backend.cpu_extension()[0].cpu_capability() == {capability!r}\n"
        "for dtype in (torch.float32, torch.float64, torch.bfloat16):\n"
        "    for kw in (GRID_16BIT if dtype == torch.bfloat16 else GRID)[::4]:\n"
        "        kw = {**kw, 'eps': (kw['eps'][0] or torch.finfo(dtype).eps, kw['eps'][1])}\n"
        "        run_parity(fusedopt.Adafactor, torch.optim.Adafactor, kw, dtype, 'cpu', 20, shapes=SHAPES)\n"
    )
    env = {**os.environ, "FUSEDOPT_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [GRID_16BIT[0], GRID_16BIT[-1]])
def test_parity_gpu(kwargs, dtype, backend):
    """Several tasks per matrix, batched matrices, a vector over several chunks; no host sync inside step()."""
    eps = (kwargs["eps"][0] or torch.finfo(dtype).eps, kwargs["eps"][1])
    shapes = [(), (3,), (33, 17), (70001,), (3, 65537), (2, 40, 300), (1000, 1)]
    run_parity(fusedopt.Adafactor, torch.optim.Adafactor, {**kwargs, "eps": eps}, dtype, backend, 20, shapes=shapes,
               device="cuda")  # fmt: skip
