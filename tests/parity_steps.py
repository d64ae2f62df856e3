"""Fused-vs-reference optimizer parity: the one harness of every optimizer test (test_adam.py, test_rmsprop.py,
test_sgd.py, test_optim_registry.py, ...). run_parity takes classes and kwargs, run_parity_with two factories.

The reference is the torch.optim class in float64. fp32/fp64 runs compare the whole trajectory (>= 20 steps);
16-bit runs compare one step at a time from identical inputs: the fused optimizer's params and state are copied
into the float64 reference before each step, so each comparison measures one step's rounding.

An optimizer whose update has its own, lower precision (Muon's bfloat16 Newton-Schulz) passes `update_noise`: its
float32 runs also compare one step at a time, with that precision added to the params' tolerance (run_parity).

float32 trajectories use conftest's float32 tolerance, widened only where torch's own float32 optimizer, run on the
same grads, is already further than that from float64 (momentum RMSprop accumulates grad / sqrt(avg), which
amplifies rounding): then the fused result may be at most twice as far as torch's own float32 run.

On CUDA every fused step runs under torch's sync debug mode "error": a host sync inside step() fails the test.
"""

from __future__ import annotations

import torch
from conftest import tol

SHAPES = [(), (0,), (3,), (33, 17), (1100,), (1,)]
SHAPES_GPU = [(), (0,), (3,), (33, 17), (70001,), (3, 65537)]  # several chunks, unaligned tails
SMALL_SHAPES = [(), (0,), (3,), (9, 7), (130,)]  # for the Triton interpreter


def make_params(shapes, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    fused = [torch.nn.Parameter(b.to(dtype).to(device)) for b in base]
    ref = [torch.nn.Parameter(f.detach().double().clone()) for f in fused]
    return fused, ref


def set_grads(fused, ref, gen, step, none_every=4, scale=1.0):
    """Fresh random grads, identical in both (the reference gets the fused dtype's values); some grads None."""
    for i, (f, r) in enumerate(zip(fused, ref)):
        if none_every and (step + i) % none_every == 0 and i != 1:
            f.grad, r.grad = None, None
            continue
        g = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f.dtype).to(f.device)
        f.grad = g * scale if scale != 1.0 else g
        r.grad = f.grad.detach().double().clone()


def _assert_close(actual, expected, dtype, msg, widen=1.0, extra_atol=0.0):
    rtol, atol = tol(dtype)["rtol"] * widen, tol(dtype)["atol"] * widen + extra_atol
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def excess(opt_a, opt_r, params_a, ref, dtype) -> float:
    """max |a - ref| / (atol + rtol |ref|) over params and state: 1.0 means exactly at the tolerance."""
    t = tol(dtype)
    worst = 0.0
    for a, r in zip(params_a, ref):
        pairs = [(a, r)] + [(opt_a.state[a][k], v) for k, v in opt_r.state.get(r, {}).items() if k != "step"]
        for x, y in pairs:
            y = y.detach().double()
            if y.numel() == 0:
                continue
            worst = max(worst, ((x.detach().double() - y).abs() / (t["atol"] + t["rtol"] * y.abs())).max().item())
    return worst


def compare(opt_f, opt_r, fused, ref, dtype, msg, widen=1.0, skipped_first=False, param_atol=None):
    """Params and every state tensor. skipped_first: a GradScaler-skipped first step, where torch made no state
    and the fused optimizer (which cannot know on the host) made zero state that must be untouched. param_atol:
    per param, an absolute tolerance added for the param only (an update with its own precision: Muon's)."""
    for i, (f, r) in enumerate(zip(fused, ref)):
        extra = param_atol[i] if param_atol else 0.0
        _assert_close(f.detach(), r.detach(), dtype, f"{msg}: param {i}", widen, extra)
        st_f, st_r = opt_f.state.get(f, {}), opt_r.state.get(r, {})
        if skipped_first and not st_r:
            for k, v in st_f.items():
                assert not v.any(), f"{msg}: param {i} state {k} moved on a skipped step"
            continue
        assert set(st_f) == set(st_r), f"{msg}: param {i} state keys {sorted(st_f)} vs torch {sorted(st_r)}"
        for k, v in st_r.items():
            if not isinstance(v, torch.Tensor):
                assert st_f[k] == v, f"{msg}: param {i} state {k}: {st_f[k]} vs {v}"
            elif k == "step":
                assert float(st_f[k]) == float(v), f"{msg}: param {i} step {float(st_f[k])} vs {float(v)}"
            else:
                assert st_f[k].dtype == f.dtype, f"{msg}: param {i} state {k} is {st_f[k].dtype}, param {f.dtype}"
                _assert_close(st_f[k], v, dtype, f"{msg}: param {i} state {k}", widen)


def sync_into_reference(opt_f, opt_r, fused, ref):
    """Copies the fused params and state into the float64 reference (16-bit one-step comparisons)."""
    with torch.no_grad():
        for f, r in zip(fused, ref):
            r.copy_(f.double())
            for k, v in opt_f.state.get(f, {}).items():
                have = opt_r.state[r].get(k)
                if isinstance(have, torch.Tensor) and have.shape == v.shape:
                    have.copy_(v)  # in place: a reference that caches its state tensors (a fusedopt one) sees it
                elif k == "step":
                    opt_r.state[r][k] = v.detach().clone().cpu()
                else:
                    opt_r.state[r][k] = v.detach().double().clone()


def _step_without_sync(opt, device):
    """On CUDA, any host sync inside step() raises (torch's sync debug mode)."""
    if torch.device(device).type != "cuda":
        return opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_parity(fused_cls, torch_cls, kwargs, dtype, backend, steps=20, shapes=SHAPES, seed=0, device="cpu",
               update_noise=None):  # fmt: skip
    """Runs `steps` steps of both optimizers on the same grads and asserts params and every state tensor match.
    update_noise(kwargs, shape): the absolute precision of one step's update of a param of that shape, for an
    optimizer whose update is computed in lower precision than the param (Muon: bfloat16 Newton-Schulz); then
    float32 runs also compare one step at a time, and each step's param tolerance grows by that much (float64 runs
    keep whole trajectories: their bfloat16 inputs round as the reference's)."""
    kw_f = {**kwargs, "lr": _lr_like(kwargs.get("lr"), device)} if "lr" in kwargs else kwargs
    noise = None
    if update_noise is not None and dtype != torch.float64:
        noise = [update_noise(kwargs, s) for s in shapes]
    return run_parity_with(lambda ps: fused_cls(ps, backend=backend, **kw_f), lambda ps: torch_cls(ps, **kwargs),
                           dtype, steps, shapes, seed, device, param_atol=noise)  # fmt: skip


def run_parity_with(make_fused, make_ref, dtype, steps=20, shapes=SHAPES, seed=0, device="cpu", param_atol=None):
    """run_parity with factories: make_fused(params) and make_ref(params) build the optimizers (make_ref also the
    float32 twin that measures float32's own drift). param_atol: per param, the update's own precision (see
    run_parity); set, every dtype but float64 compares one step at a time. Returns (fused opt, reference opt,
    fused params, ref params)."""
    fused, ref = make_params(shapes, dtype, seed, device)
    opt_f = make_fused(fused)
    opt_r = make_ref(ref)
    gen = torch.Generator().manual_seed(seed + 1)
    one_step = dtype in (torch.bfloat16, torch.float16) or param_atol is not None
    # float32: torch's own float32 optimizer on the same grads, to measure how far float32 itself drifts.
    t32 = [torch.nn.Parameter(f.detach().clone()) for f in fused] if dtype == torch.float32 and not one_step else None
    opt_t32 = make_ref(t32) if t32 is not None else None
    for s in range(steps):
        set_grads(fused, ref, gen, s)
        if t32 is not None:
            for a, f in zip(t32, fused):
                a.grad = None if f.grad is None else f.grad.clone()
            opt_t32.step()
        if one_step:
            sync_into_reference(opt_f, opt_r, fused, ref)
        _step_without_sync(opt_f, device)
        opt_r.step()
        if one_step:
            compare(opt_f, opt_r, fused, ref, dtype, f"step {s}", param_atol=param_atol)
    widen = 1.0 if t32 is None else max(1.0, 2.0 * excess(opt_t32, opt_r, t32, ref, dtype))
    compare(opt_f, opt_r, fused, ref, dtype, f"after {steps} steps (tolerance x{widen:.2f})", widen,
            param_atol=param_atol)  # fmt: skip
    return opt_f, opt_r, fused, ref


def _lr_like(lr, device="cpu"):
    return lr.clone().to(device) if isinstance(lr, torch.Tensor) else lr
