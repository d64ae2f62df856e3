"""fusedopt.optim.RMSprop against torch.optim.RMSprop in float64: every option, every backend that runs here,
every dtype; state_dict both ways; GradScaler; bad inputs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import ALL_DTYPES, cpu_backends
from parity_steps import SHAPES, SHAPES_GPU, SMALL_SHAPES, compare, make_params, run_parity, set_grads

import fusedopt

BACKENDS = cpu_backends()
FAST = [b for b in BACKENDS if b != "triton"]

# momentum, centered, weight_decay, maximize: the full grid, with alpha/eps/lr varied along it.
GRID = [
    {"lr": lr, "alpha": alpha, "eps": eps, "momentum": m, "centered": c, "weight_decay": wd, "maximize": mx}
    for (m, c, wd, mx), (lr, alpha, eps) in zip(
        itertools.product([0.0, 0.9], [False, True], [0.0, 0.05], [False, True]),
        itertools.cycle([(1e-2, 0.99, 1e-8), (3e-3, 0.9, 1e-6), (2e-2, 0.95, 1e-3)]),
    )
]


def _id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items() if k in ("momentum", "centered", "weight_decay", "maximize"))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kwargs", GRID, ids=_id)
def test_grid_float64_float32(backend, kwargs):
    for dtype in (torch.float64, torch.float32):
        run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, dtype, backend, steps=20)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", GRID[::3] + [GRID[-1]], ids=_id)
def test_grid_16bit_one_step(backend, dtype, kwargs):
    run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, dtype, backend, steps=20)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kwargs", [GRID[0], GRID[-1], GRID[10]], ids=_id)
def test_triton_small(dtype, kwargs):
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable on CPU tensors here")
    run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, dtype, "triton", steps=20, shapes=SMALL_SHAPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr(backend):
    kwargs = {"lr": torch.tensor(0.01), "momentum": 0.5, "centered": True}
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, torch.float64, backend, steps=20, shapes=shapes)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
def test_state_dict_round_trip(backend, direction):
    kwargs = {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}
    opt_f, opt_r, fused, ref = run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, torch.float64, backend, 10)
    # Fresh optimizers on the same params, loaded from the other library's state_dict mid-run.
    if direction == "fused_to_torch":
        new_r = torch.optim.RMSprop(ref, **kwargs)
        new_r.load_state_dict(copy.deepcopy(opt_f.state_dict()))  # as torch.save/load would
        opt_r, new_f = new_r, opt_f
    else:
        new_f = fusedopt.RMSprop(fused, backend=backend, **kwargs)
        new_f.load_state_dict(copy.deepcopy(opt_r.state_dict()))
    gen = torch.Generator().manual_seed(7)
    for s in range(10):
        set_grads(fused, ref, gen, s)
        new_f.step()
        opt_r.step()
    compare(new_f, opt_r, fused, ref, torch.float64, f"after state_dict {direction}")


@pytest.mark.parametrize("backend", FAST)
def test_grad_scaler_inf_skip(backend):
    """GradScaler: unscale and inf-skip in the kernel match torch's unscale_ + skipped step."""
    kwargs = {"lr": 0.01, "momentum": 0.9, "centered": True}
    fused, ref = make_params([(5,), (300,)], torch.float64)
    opt_f = fusedopt.RMSprop(fused, backend=backend, **kwargs)
    opt_r = torch.optim.RMSprop(ref, **kwargs)
    sc_f, sc_r = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for s in range(20):
        set_grads(fused, ref, gen, s, none_every=0, scale=sc_f.get_scale())
        for r, f in zip(ref, fused):
            r.grad = f.grad.detach().clone()
        if s in (0, 4, 5):  # the first step too: no state may move, 'step' included
            fused[1].grad[7] = float("inf") if s != 5 else float("nan")
            ref[1].grad[7] = fused[1].grad[7]
        for sc in (sc_f, sc_r):
            sc.scale(torch.ones(()))
        sc_f.step(opt_f)
        sc_r.step(opt_r)
        sc_f.update()
        sc_r.update()
        assert sc_f.get_scale() == sc_r.get_scale()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"scaler step {s}", skipped_first=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [*GRID[::3], GRID[-1], {"lr": torch.tensor(0.01), "momentum": 0.5}], ids=_id)
def test_parity_gpu(backend, dtype, kwargs):
    shapes = [*SHAPES_GPU]
    run_parity(fusedopt.RMSprop, torch.optim.RMSprop, kwargs, dtype, backend, steps=20, shapes=shapes, device="cuda")


def test_differentiable_not_implemented():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fusedopt.RMSprop([torch.nn.Parameter(torch.ones(2))], differentiable=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"eps": -1.0}, "Invalid epsilon"),
        ({"momentum": -0.1}, "Invalid momentum"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
        ({"alpha": -0.1}, "Invalid alpha"),
        ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
        ({"backend": "nope"}, "unknown backend"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.RMSprop([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_grad_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.RMSprop([p], backend="cpu").step()


def test_unusable_backend_error_says_why():
    if torch.cuda.is_available():
        pytest.skip("checks the message for CUDA kernels asked for on CPU tensors")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="cannot run rmsprop on cpu"):
        fusedopt.RMSprop([p], backend="cuda").step()


@pytest.mark.parametrize("backend", FAST)
def test_momentum_switched_on_later(backend):
    """momentum/centered turned on after the state exists: the missing buffers start at zero (torch would KeyError)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = fusedopt.RMSprop([p], backend=backend, lr=0.1)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["centered"] = True
    opt.step()
    assert set(opt.state[p]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert float(opt.state[p]["step"]) == 2.0
