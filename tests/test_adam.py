"""fusedopt.optim.Adam / AdamW against torch.optim in float64: the option grid on every backend that runs here."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import ALL_DTYPES, assert_close, cpu_backends
from parity_steps import SHAPES, SHAPES_GPU, SMALL_SHAPES, compare, run_parity_with

import fusedopt

OPTIONS = [
    dict(weight_decay=wd, amsgrad=ams, maximize=mx)
    for wd, ams, mx in itertools.product([0.0, 0.1], [False, True], [False, True])
]
CLASSES = [
    ("Adam", fusedopt.optim.Adam, torch.optim.Adam, {}),
    ("AdamW", fusedopt.optim.AdamW, torch.optim.AdamW, {}),
    ("Adam-decoupled", fusedopt.optim.Adam, torch.optim.Adam, {"decoupled_weight_decay": True}),
]


def _lr(kind: str):
    return torch.tensor(0.01, dtype=torch.float64) if kind == "tensor" else 0.02


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c[0])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_adam_parity_grid(backend, dtype, cls, opts, lr_kind):
    _, fused_cls, torch_cls, extra = cls
    run_parity_with(
        lambda ps: fused_cls(ps, lr=_lr(lr_kind), backend=backend, **opts, **extra),
        lambda ps: torch_cls(ps, lr=_lr(lr_kind), foreach=False, **opts, **extra),
        dtype,
    )


@pytest.mark.skipif("triton" not in cpu_backends(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", CLASSES[:2], ids=lambda c: c[0])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_adam_parity_triton(dtype, cls, opts):
    _, fused_cls, torch_cls, _ = cls
    lr = torch.tensor(0.01, dtype=torch.float64) if opts["amsgrad"] else 0.02
    run_parity_with(
        lambda ps: fused_cls(ps, lr=lr, backend="triton", **opts),
        lambda ps: torch_cls(ps, lr=lr, foreach=False, **opts),
        dtype,
        shapes=SMALL_SHAPES,
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("betas,eps", [((0.5, 0.9), 1e-3), ((0.0, 0.5), 1e-6), ((0.99, 0.9999), 0.0)])
def test_adam_betas_eps(backend, betas, eps):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    run_parity_with(
        lambda ps: fusedopt.Adam(ps, lr=0.01, betas=betas, eps=eps, backend=backend),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=betas, eps=eps, foreach=False),
        torch.float32,
        shapes=shapes,
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_param_groups_and_add_param_group(backend):
    def build(cls, ps, **kw):
        opt = cls([{"params": ps[:2], "lr": 0.05, "weight_decay": 0.2}, {"params": ps[2:4], "amsgrad": True}],
                  lr=0.01, **kw)  # fmt: skip
        opt.add_param_group({"params": ps[4:], "betas": (0.8, 0.95), "maximize": True})
        return opt

    run_parity_with(lambda ps: build(fusedopt.Adam, ps, backend=backend),
                    lambda ps: build(torch.optim.Adam, ps, foreach=False), torch.float32)  # fmt: skip


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
@pytest.mark.parametrize("cls", CLASSES[:2], ids=lambda c: c[0])
def test_state_dict_round_trip_mid_run(direction, cls):
    """Save after 10 steps from one implementation, load into the other, continue 10 steps: same trajectory."""
    _, fused_cls, torch_cls, _ = cls
    kw = dict(lr=0.02, weight_decay=0.1, amsgrad=True)
    first, second = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in SHAPES]
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt_a, ref = first(params, **kw), torch_cls(twin, foreach=False, **kw)
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES] for _ in range(20)]
    for step in range(20):
        if step == 10:
            saved = opt_a.state_dict()
            opt_a = second(params, **kw)
            opt_a.load_state_dict(saved)
        for p, q, g in zip(params, twin, grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        ref.step()
    compare(opt_a, ref, params, twin, torch.float64, direction)


@pytest.mark.parametrize("backend", cpu_backends())
def test_grad_scaler_unscale_and_inf_skip(backend):
    """torch.amp.GradScaler drives the fused unscale + inf skip; torch.optim.Adam with the same scaler agrees."""
    results = []
    for cls, kw in ((fusedopt.Adam, {"backend": backend}), (torch.optim.Adam, {"foreach": False})):
        torch.manual_seed(0)
        w = torch.randn(64, 5, requires_grad=True)
        b = torch.zeros(5, requires_grad=True)
        opt = cls([w, b], lr=0.01, weight_decay=0.01, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
        x = torch.randn(20, 8, 64)
        for step in range(20):
            opt.zero_grad()
            loss = (x[step] @ w + b).pow(2).mean()
            scaler.scale(loss).backward()
            if step in (4, 11):
                w.grad[3, 2] = float("inf") if step == 4 else float("nan")
            scaler.step(opt)
            scaler.update()
        results.append((w.detach(), b.detach(), opt.state[w], scaler.get_scale()))
    (fw, fb, fs, fscale), (tw, tb, ts, tscale) = results
    assert fscale == tscale
    assert float(fs["step"]) == float(ts["step"]) == 18.0
    assert_close(fw, tw, torch.float32, "w")
    assert_close(fb, tb, torch.float32, "b")
    assert_close(fs["exp_avg_sq"], ts["exp_avg_sq"], torch.float32, "exp_avg_sq")


def test_none_grads_are_skipped():
    ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
    before = ps[1].detach().clone()
    opt = fusedopt.Adam(ps, lr=0.1)
    ps[0].grad, ps[2].grad = torch.ones(5), torch.ones(5)
    opt.step()
    assert torch.equal(ps[1].detach(), before)
    assert ps[1] not in opt.state
    assert float(opt.state[ps[0]]["step"]) == 1.0


def test_non_contiguous_param_and_grad():
    base = torch.randn(9, 6, dtype=torch.float64)
    p = base.t().requires_grad_()  # a transposed leaf: non-contiguous
    q = base.t().clone().requires_grad_()
    fused, ref = fusedopt.Adam([p], lr=0.1, backend="cpu"), torch.optim.Adam([q], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(9, 6, dtype=torch.float64).t()
        p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    compare(fused, ref, [p], [q], torch.float64, "non-contiguous")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_cpu_isa_path(capability):
    """The per-ISA kernel copies: force a lower ISA in a subprocess and check parity there too."""
    script = (
        "import torch, fusedopt, sys; sys.path.insert(0, 'tests');\n"
        "from parity_steps import run_parity_with\n"
        "assert fusedopt._backend.cpu_extension()[0].cpu_capability() == sys.argv[1]\n"
        "for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):\n"
        "    run_parity_with(lambda ps: fusedopt.Adam(ps, lr=0.02, amsgrad=True, weight_decay=0.1, backend='cpu'),\n"
        "                    lambda ps: torch.optim.Adam(ps, lr=0.02, amsgrad=True, weight_decay=0.1, foreach=False),\n"
        "                    dt)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEDOPT_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", script, capability], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# --- bad input -------------------------------------------------------------------------------------------------
def test_sparse_grad_raises():
    p = torch.randn(4, 3, requires_grad=True)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.Adam([p]).step()


def test_differentiable_raises():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fusedopt.Adam([torch.randn(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1.0), "Invalid epsilon"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ],
)
@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW])
def test_torch_value_errors_kept(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.randn(2, requires_grad=True)], **kwargs)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedopt.Adam([torch.randn(2, requires_grad=True)], backend="tpu")


def test_missing_backend_says_why_and_how():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run adam on cpu tensors.*To get it"):
        fusedopt.Adam([p], backend="cuda").step()


def test_complex_params_rejected():
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        fusedopt.Adam([p]).step()


def test_kernel_rejects_mismatched_lists():
    p = [torch.randn(4), torch.randn(5)]
    with pytest.raises(RuntimeError, match="has 1 tensors"):
        fusedopt.ops.adam.adam_step(
            p, [torch.randn(4)], [torch.zeros(4)] * 2, [torch.zeros(4)] * 2, [], [torch.zeros(())] * 2,
            lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
            decoupled_weight_decay=False, backend="cpu",
        )


# --- GPU (skipped without one; scripts/gpu_check.sh runs these) ----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_adam_parity_gpu(backend, dtype, opts):
    """The parity harness on CUDA: several chunks, unaligned tails, a device lr tensor, no host sync in step()."""
    run_parity_with(
        lambda ps: fusedopt.Adam(ps, lr=torch.tensor(0.01, device="cuda"), backend=backend, **opts),
        lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False, **opts),
        dtype,
        shapes=SHAPES_GPU,
        device="cuda",
    )
