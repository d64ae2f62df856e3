"""Optimizers on bad and edge input, against torch.optim on every backend that runs here: the boundary checks and
their messages, precision torch keeps (lerp with beta1 = 0, negative betas), NaN, repeated and resized params,
non-contiguous layouts, and GradScaler's unscaled .grad after the step."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cpu_backends
from parity_steps import compare

import fusedopt
from fusedopt.ops import optim_step

BACKENDS = cpu_backends()

# (fusedopt class, torch class, options): every stateful path of every optimizer.
OPTIMIZERS = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"amsgrad": True}),
    ("RMSprop", {"centered": True, "momentum": 0.9}),
    ("RMSprop", {}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {}),
]
OPT_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in OPTIMIZERS]


def _pair(name, kw, backend, fused_params, ref_params, lr=0.01):
    return getattr(fusedopt, name)(fused_params, lr=lr, backend=backend, **kw), getattr(torch.optim, name)(
        ref_params, lr=lr, **kw
    )


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fused = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in fused]
    return fused, ref


# --- the boundary: every backend raises the same error for the same bad lists ---------------------------------
def _adam_lists(**replace):
    """fusedopt::adam_step's lists for two float32 params of shape (4, 2) and (3,), with some replaced."""
    params = [torch.randn(4, 2), torch.randn(3)]
    lists = {
        "params": params,
        "grads": [torch.randn_like(p) for p in params],
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "steps": [torch.zeros(()) for _ in params],
    }
    for name, (i, tensor) in replace.items():
        lists[name] = list(lists[name])
        if tensor is None:
            del lists[name][i]
        else:
            lists[name][i] = tensor
    return lists


BAD_LISTS = {
    "grad_reshaped": ({"grads": (0, torch.randn(2, 4))}, "grads[0] has shape [2, 4], its param [4, 2]"),
    "grad_float64": ({"grads": (1, torch.randn(3, dtype=torch.float64))},
                     "grads[1] is torch.float64, its param torch.float32"),
    "grad_sparse": ({"grads": (1, torch.randn(3).to_sparse())}, "grads[1] is not a dense (strided) tensor"),
    "grad_missing": ({"grads": (1, None)}, "grads has 1 tensors, params has 2"),
    "state_larger": ({"exp_avgs": (1, torch.zeros(4096))}, "exp_avgs[1] has shape [4096], its param [3]"),
    "state_float64": ({"exp_avg_sqs": (0, torch.zeros(4, 2, dtype=torch.float64))},
                      "exp_avg_sqs[0] is torch.float64, its param torch.float32"),
    "state_other_device": ({"max_exp_avg_sqs": (1, torch.zeros(3, device="meta"))},
                           "max_exp_avg_sqs[1] is on meta, its param on cpu"),
    "step_int": ({"steps": (0, torch.tensor(1))},
                 "steps[0] must be a one-element torch.float32 tensor on its param's device"),
    "params_two_dtypes": ({"params": (1, torch.randn(3, dtype=torch.float64))},
                          "params[1] is torch.float64, params[0] torch.float32"),
    "params_int": ({"params": (0, torch.ones(4, 2, dtype=torch.int64))},
                   "params[1] is torch.float32, params[0] torch.int64"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_same_error_on_every_backend(case):
    replace, expected = BAD_LISTS[case]
    messages = {}
    for backend in BACKENDS:
        lists = _adam_lists(**replace)
        before = [t.clone() for t in lists["params"] if t.layout == torch.strided and t.device.type == "cpu"]
        with pytest.raises(RuntimeError) as info:
            optim_step.step(
                fusedopt.Adam.SPEC, lists["params"], lists["grads"],
                [lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"]], lists["steps"], lr=0.1,
                hyper={"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True,
                       "decoupled_weight_decay": False},
                maximize=False, backend=backend,
            )  # fmt: skip
        messages[backend] = str(info.value).replace(f"({backend})", "(BACKEND)")
        after = [t for t in lists["params"] if t.layout == torch.strided and t.device.type == "cpu"]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), f"{backend}: params written before raising"
    assert len(set(messages.values())) == 1, messages
    assert expected in next(iter(messages.values())), messages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_resized_param_raises_instead_of_reading_past_it(backend, name):
    kw = {"momentum": 0.9} if name == "SGD" else {}
    p = torch.nn.Parameter(torch.randn(4))
    opt = getattr(fusedopt, name)([p], backend=backend, **kw)
    p.grad = torch.randn(4)
    opt.step()
    p.data = torch.randn(4096)
    p.grad = torch.randn(4096)
    with pytest.raises(RuntimeError, match=r"has shape \[4\], its param \[4096\]"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_without_momentum_rejects_float64_grad(backend):
    """No state to catch it: the grad itself is checked (the triton backend used to read float64 as float32)."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fusedopt.SGD([p], lr=0.1, backend=backend)
    p.grad = torch.zeros(4)
    p.grad.data = torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is torch.float64, its param torch.float32"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))


# --- precision torch keeps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.0, 0.5), (0.3, 0.9)])
def test_lerp_keeps_grad_precision_when_scale_jumps(backend, name, betas):
    """exp_avg.lerp(grad, 1 - beta1): with beta1 = 0, `m + (g - m) * 1` rounds a small g away against a large m;
    torch's `g - (g - m) * 0` is exact. Grads jump by 1e3 between steps."""
    fused, ref = _params([(257,)])
    t32 = [torch.nn.Parameter(fused[0].detach().clone())]
    opt_f, opt_r = _pair(name, {"betas": betas}, backend, fused, ref)
    opt_32 = getattr(torch.optim, name)(t32, lr=0.01, betas=betas)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        scale = 1e3 if step % 2 == 0 else 1e-3
        g = (torch.randn(257, generator=gen, dtype=torch.float64) * scale).float()
        fused[0].grad, t32[0].grad, ref[0].grad = g.clone(), g.clone(), g.double()
        for o in (opt_f, opt_r, opt_32):
            o.step()
    # exp_avg is where the lerp form matters: at most twice torch float32's own error (0 with beta1 = 0; the other
    # form was about 100x). The rest within the float32 tolerance of the float64 run.
    exact = opt_r.state[ref[0]]["exp_avg"]
    err = (opt_f.state[fused[0]]["exp_avg"].double() - exact).abs().max().item()
    torch_err = (opt_32.state[t32[0]]["exp_avg"].double() - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-30, f"exp_avg: error {err:.3g}, torch float32's {torch_err:.3g}"
    compare(opt_f, opt_r, fused, ref, torch.float32, "after 20 steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_beta_set_after_construction(backend):
    """torch checks betas only at construction; a negative beta set later is used as given (pow, not exp-log)."""
    fused, ref = _params([(33,)], torch.float64)
    opt_f, opt_r = _pair("Adam", {}, backend, fused, ref)
    for o in (opt_f, opt_r):
        o.param_groups[0]["betas"] = (-0.5, 0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        g = torch.randn(33, generator=gen, dtype=torch.float64)
        fused[0].grad, ref[0].grad = g.clone(), g.clone()
        opt_f.step()
        opt_r.step()
    assert torch.isfinite(fused[0]).all()
    compare(opt_f, opt_r, fused, ref, torch.float64, "negative beta1")


# --- NaN and Inf ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_grads_propagate_as_in_torch(backend, spec, bad):
    name, kw = spec
    fused, ref = _params([(6,), (3, 2)], torch.float64)
    opt_f, opt_r = _pair(name, kw, backend, fused, ref)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        for f, r in zip(fused, ref):
            g = torch.randn(f.shape, generator=gen, dtype=torch.float64)
            if step == 1:
                g.view(-1)[1] = bad
            f.grad, r.grad = g.clone(), g.clone()
        opt_f.step()
        opt_r.step()
        for i, (f, r) in enumerate(zip(fused, ref)):
            tensors = [(f, r)] + [(opt_f.state[f][k], v) for k, v in opt_r.state[r].items() if k != "step"]
            for a, b in tensors:
                assert torch.equal(a.isnan(), b.isnan()), f"step {step} param {i}: NaN where torch has none or v.v."
                assert torch.equal(a.isinf(), b.isinf()), f"step {step} param {i}: Inf pattern differs"
                finite = b.isfinite()
                torch.testing.assert_close(a[finite], b[finite], rtol=1e-10, atol=1e-12)


# --- repeated, non-contiguous and channels_last params ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPT_IDS)
def test_param_listed_twice_is_stepped_twice_as_torch(backend, spec):
    name, kw = spec
    fused, ref = _params([(5,), (3,)], torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate, for both classes
        opt_f, opt_r = _pair(name, kw, backend, [fused[0], fused[1], fused[0]], [ref[0], ref[1], ref[0]], lr=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for f, r in zip(fused, ref):
            g = torch.randn(f.shape, generator=gen, dtype=torch.float64)
            f.grad, r.grad = g.clone(), g.clone()
        opt_f.step()
        opt_r.step()
    compare(opt_f, opt_r, fused, ref, torch.float64, "repeated param")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_non_contiguous_params_and_grads(backend, spec, layout):
    name, kw = spec
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    view = {
        "transposed": lambda t: t.transpose(1, 3),
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "sliced": lambda t: t[:, :, ::2],
    }[layout]
    fused = [torch.nn.Parameter(view(base.clone()))]
    ref = [torch.nn.Parameter(view(base.clone()).contiguous())]
    opt_f, opt_r = _pair(name, kw, backend, fused, ref)
    for _ in range(3):
        g = torch.randn(base.shape, generator=gen, dtype=torch.float64)
        fused[0].grad, ref[0].grad = view(g.clone()), view(g.clone()).contiguous()
        opt_f.step()
        opt_r.step()
    assert not fused[0].is_contiguous()
    compare(opt_f, opt_r, fused, ref, torch.float64, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_with_missing_grads_and_several_dtypes(backend):
    """Two (dtype) buckets in one group while some grads are None: each bucket gets its own params' grads."""
    fused = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),
             torch.nn.Parameter(torch.randn(5))]  # fmt: skip
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in fused]
    opt_f, opt_r = _pair("Adam", {}, backend, fused, ref)
    for step in range(3):
        for i, (f, r) in enumerate(zip(fused, ref)):
            if i == 0 and step == 1:
                f.grad, r.grad = None, None
                continue
            g = torch.randn(f.shape, dtype=torch.float64)
            f.grad, r.grad = g.to(f.dtype), g.to(f.dtype).double()
        opt_f.step()
        opt_r.step()
    compare(opt_f, opt_r, fused, ref, torch.float32, "mixed buckets")


# --- GradScaler: .grad is unscaled after the step, as torch's fused optimizers leave it ------------------------
class _Scaler:
    """What GradScaler does around a fused optimizer's step: sets grad_scale and found_inf, calls step()."""

    @staticmethod
    def step(opt, scale, found_inf=0.0):
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(found_inf)
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_grad_scaler_leaves_grads_unscaled(backend, spec, max_grad_norm):
    name, kw = spec
    p = torch.nn.Parameter(torch.ones(4))
    opt = getattr(fusedopt, name)([p], lr=0.1, backend=backend, max_grad_norm=max_grad_norm, **kw)
    p.grad = torch.tensor([0.0, 1024.0, 2048.0, 3072.0])
    _Scaler.step(opt, 1024.0)
    expected = torch.tensor([0.0, 1.0, 2.0, 3.0])
    if max_grad_norm is not None:  # as unscale_ + clip_grad_norm_ + step would leave it
        expected = expected * (max_grad_norm / (expected.norm() + 1e-6))
    torch.testing.assert_close(p.grad, expected)
    # A skipped step (found_inf) leaves everything, the grad included, untouched, as torch's fused kernels do.
    before = p.detach().clone()
    p.grad = torch.tensor([0.0, 1024.0, float("inf"), 3072.0])
    _Scaler.step(opt, 1024.0, found_inf=1.0)
    assert torch.equal(p.grad, torch.tensor([0.0, 1024.0, float("inf"), 3072.0]))
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_without_grad_scaler_grads_are_not_written(backend, name):
    """The non-AMP path, folded clipping included, moves no extra bytes: .grad keeps its values."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = getattr(fusedopt, name)([p], lr=0.1, backend=backend, max_grad_norm=0.5)
    p.grad = torch.tensor([0.0, 10.0, 20.0, 30.0])
    opt.step()
    assert torch.equal(p.grad, torch.tensor([0.0, 10.0, 20.0, 30.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_grad_scaler_end_to_end(backend):
    """torch.amp.GradScaler on CPU with fusedopt and torch's fused Adam: same params and same .grad afterwards."""
    torch.manual_seed(0)
    model_f = torch.nn.Linear(8, 3)
    model_t = torch.nn.Linear(8, 3)
    model_t.load_state_dict(model_f.state_dict())
    opt_f = fusedopt.Adam(model_f.parameters(), lr=0.01, backend=backend)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=0.01, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt, scaler in ((model_f, opt_f, scalers[0]), (model_t, opt_t, scalers[1])):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
    for pf, pt in zip(model_f.parameters(), model_t.parameters()):
        torch.testing.assert_close(pf, pt, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pf.grad, pt.grad, rtol=1e-6, atol=1e-7)
