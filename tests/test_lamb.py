"""LAMB's own edges (the registry runs its parity grid, GradScaler, state_dict, non-contiguous and repeated params,
boundary messages, opcheck, ISAs, compile, AMP, clipping and DDP): the trust ratio's zero-norm cases, apex's "no
trust ratio without weight decay", the default global clip over every group, NaN grads, zero_grad's
set_grad_none, and the arguments apex refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from optim_db import PaperLAMB
from parity_steps import compare

import fusedopt

BACKENDS = cpu_backends()


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_is_one_when_a_norm_is_zero(backend):
    """||p|| = 0: the step is lr * u. ||u|| = 0 (L2 mode, g = -wd * p, so m = v = 0): p does not move, no NaN."""
    lr, wd = 0.1, 0.5
    zero_p, still = _param([0.0, 0.0, 0.0]), _param([1.0, -2.0, 4.0])
    opt = fusedopt.LAMB([zero_p, still], lr=lr, weight_decay=wd, adam_w_mode=False, max_grad_norm=None,
                        backend=backend)  # fmt: skip
    zero_p.grad = torch.tensor([3.0, -0.5, 0.0], dtype=torch.float64)
    still.grad = -wd * still.detach().clone()
    opt.step()
    u = zero_p.grad / (zero_p.grad.abs() + 1e-6)  # step 1: m / bc1 = g, sqrt(v / bc2) = |g|
    torch.testing.assert_close(zero_p.detach(), -lr * u, rtol=1e-14, atol=0)
    torch.testing.assert_close(still.detach(), torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_nvlamb", [False, True])
def test_no_trust_ratio_without_weight_decay_unless_nvlamb(backend, use_nvlamb):
    """apex: without weight decay the step is lr * u (Adam's), unless use_nvlamb applies the ratio to every param."""
    p = _param([1.0, -2.0, 4.0, 0.25])
    g = torch.tensor([0.5, -1.0, 2.0, -4.0], dtype=torch.float64)
    opt = fusedopt.LAMB([p], lr=0.1, weight_decay=0.0, use_nvlamb=use_nvlamb, max_grad_norm=None, backend=backend)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    u = g / (g.abs() + 1e-6)
    ratio = before.norm() / u.norm() if use_nvlamb else 1.0
    torch.testing.assert_close(p.detach(), before - 0.1 * ratio * u, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_clip_is_global_over_every_group(backend):
    """max_grad_norm=1.0 (apex's default) clips by the norm of every grad of every group: the same as
    clip_grad_norm_ over all params, then LAMB without clipping (float32: the folded coefficient is a float32)."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((7,), (5, 3), (40,))]
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    plain = [torch.nn.Parameter(b.clone()) for b in base]
    opt_a = fusedopt.LAMB([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.02}], lr=0.01, backend=backend)
    opt_b = fusedopt.LAMB([{"params": plain[:2]}, {"params": plain[2:], "lr": 0.02}], lr=0.01, max_grad_norm=None,
                          backend=backend)  # fmt: skip
    for s in range(5):
        for a, b in zip(ours, plain):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64) * 3
            b.grad = a.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(plain, 1.0)
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(opt_a.last_grad_norm, norm, rtol=1e-12, atol=0)
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"step {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_grads_match_the_paper_loop(backend):
    """A NaN grad makes the global norm NaN: every grad, and so every param, turns NaN, as in the reference loop.
    Without clipping an inf grad element makes its own param NaN (inf / inf) and leaves the others finite."""
    for clip, bad in ((1.0, float("nan")), (None, float("inf"))):
        ours = [_param([1.0, 2.0, 3.0]), _param([0.5, -0.5])]
        ref = [_param([1.0, 2.0, 3.0]), _param([0.5, -0.5])]
        opt_a = fusedopt.LAMB(ours, lr=0.1, max_grad_norm=clip, backend=backend)
        opt_b = PaperLAMB(ref, lr=0.1, max_grad_norm=clip)
        for s in range(2):
            for a, b in zip(ours, ref):
                a.grad = torch.tensor([0.3, -0.2, 0.1][: a.numel()], dtype=torch.float64)
                b.grad = a.grad.clone()
            if s == 1:
                ours[0].grad[1] = ref[0].grad[1] = bad
            opt_a.step()
            opt_b.step()
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-12, atol=0)
        assert ours[0].isnan().all()
        assert ours[1].isnan().all() == (clip is not None)


def test_state_keys_and_state_dict_with_the_paper_loop():
    p = _param([1.0, 2.0])
    opt = fusedopt.LAMB([p], backend="cpu")
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 1.0


@pytest.mark.parametrize("set_grad_none", [True, False])
def test_zero_grad_follows_set_grad_none(set_grad_none):
    p = _param([1.0, 2.0])
    opt = fusedopt.LAMB([p], set_grad_none=set_grad_none, backend="cpu")
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.zero_grad()
    assert (p.grad is None) == set_grad_none
    if not set_grad_none:
        assert torch.equal(p.grad, torch.zeros(2, dtype=torch.float64))


def test_amsgrad_is_refused():
    with pytest.raises(RuntimeError, match="AMSGrad"):
        fusedopt.LAMB([_param([1.0])], amsgrad=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -1.0}, "Invalid learning rate"), ({"betas": (0.9, 1.0)}, "Invalid betas"),
     ({"eps": -1e-6}, "Invalid epsilon"), ({"weight_decay": -0.1}, "Invalid weight_decay"),
     ({"lr": torch.tensor([0.1, 0.2])}, "1-element"), ({"max_grad_norm": -1.0}, "max_grad_norm"),
     ({"backend": "nope"}, "unknown backend")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.LAMB([_param([1.0])], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_grad_dtype_is_refused_on_every_backend(backend):
    """A grad of another dtype (reachable through .data) is an error with the engine's message, never a misread."""
    p = _param([1.0, 2.0])
    opt = fusedopt.LAMB([p], backend=backend)
    p.grad = torch.ones(2, dtype=torch.float64)
    p.data = p.data.float()
    with pytest.raises(RuntimeError, match=r"grads\[0\] is torch.float64, its param torch.float32"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_paper_loop_with_two_groups(backend):
    """Two groups with their own lr and weight decay (one without: no trust ratio there), default clip on."""
    gen = torch.Generator().manual_seed(9)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((6,), (4, 5), (3,))]
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.0}, {"params": ps[2:], "lr": 0.05}]
    opt_a = fusedopt.LAMB(groups(ours), lr=0.01, weight_decay=0.1, backend=backend)
    opt_b = PaperLAMB(groups(ref), lr=0.01, weight_decay=0.1)
    for s in range(20):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
        compare(opt_a, opt_b, ours, ref, torch.float64, f"step {s}")
