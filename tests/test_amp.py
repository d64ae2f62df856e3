"""AMP: GradScaler (scale, unscale_, inf/NaN skip, update) with every fusedopt optimizer matches torch.optim under
the same scaler, with an autocast forward; and fusedopt's losses under torch.autocast give the dtype and value of
torch's losses under the same autocast."""

from __future__ import annotations

import optim_db
import pytest
import torch
from conftest import assert_close, cpu_backends
from loss_cases import CASES, cast_module, make_inputs

import fusedopt

OPTIMIZERS = optim_db.cases("amp")  # every optimizer of the registry (tests/optim_db.py), every case
STEPS = 10
BAD_STEPS = {0: float("inf"), 3: float("inf"), 7: float("nan")}  # a skipped FIRST step too (no state yet in torch)


_opt_id = optim_db.case_id


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 6)).to(device)


def run_scaled_training(cls, ref_cls, kwargs, mode, device, amp_dtype, backend):
    """Fused and torch optimizers side by side, each with its own GradScaler, an autocast forward, and grads
    poisoned on BAD_STEPS. mode: "plain" (scaler.step), "unscale_clip" (unscale_, clip_grad_norm_, step) or
    "folded_clip" (fusedopt's max_grad_norm= against torch's unscale_ + clip_grad_norm_)."""
    models = [_model(device), _model(device)]
    fused_kw = {"max_grad_norm": 0.5} if mode == "folded_clip" else {}
    opts = [cls(models[0].parameters(), backend=backend, **fused_kw, **kwargs),
            ref_cls(models[1].parameters(), foreach=False, **kwargs)]  # fmt: skip
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**14, growth_interval=3) for _ in range(2)]
    clips = [fusedopt.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_norm_]
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, y = torch.randn(16, 24, generator=gen).to(device), torch.randn(16, 6, generator=gen).to(device)
        for k, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
            opt.zero_grad()
            with torch.autocast(device, dtype=amp_dtype):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if step in BAD_STEPS:
                model[0].weight.grad[1, 2] = BAD_STEPS[step]
            if mode == "unscale_clip" or (mode == "folded_clip" and k == 1):
                scaler.unscale_(opt)
                clips[k](model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"step {step}: scale"
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert_close(p, q, torch.float32, f"step {step} {name}")
            ours, theirs = opts[0].state.get(p, {}), opts[1].state.get(q, {})
            for key, value in theirs.items():
                if key == "step":
                    assert float(ours[key]) == float(value), f"step {step} {name}: step count"
                elif isinstance(value, torch.Tensor):
                    assert_close(ours[key], value, torch.float32, f"step {step} {name} {key}")
    assert scalers[0].get_scale() < 2.0**14, "the poisoned steps lowered the scale"


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
@pytest.mark.parametrize("mode", ["plain", "unscale_clip", "folded_clip"])
def test_grad_scaler_cpu(cls, ref_cls, kwargs, mode):
    run_scaled_training(cls, ref_cls, kwargs, mode, "cpu", torch.bfloat16, "cpu")


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpu"])
@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), optim_db.one_case_per_op("amp"), ids=_opt_id)
def test_grad_scaler_cpu_other_backends(cls, ref_cls, kwargs, backend):
    run_scaled_training(cls, ref_cls, kwargs, "unscale_clip", "cpu", torch.bfloat16, backend)


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
@pytest.mark.parametrize("mode", ["plain", "unscale_clip", "folded_clip"])
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_cuda(cls, ref_cls, kwargs, mode, amp_dtype, backend):
    run_scaled_training(cls, ref_cls, kwargs, mode, "cuda", amp_dtype, backend)


# --- losses under autocast ---------------------------------------------------------------------------------------


def _head_and_targets(kind, gen, device):
    """A Linear head (float32 weights: autocast runs it in 16 bits) and the targets for a loss kind."""
    classes = 11 if kind == "ce" else 5
    torch.manual_seed(int(torch.randint(0, 10**6, (), generator=gen)))
    head = torch.nn.Linear(8, classes).to(device)
    _, target = make_inputs(kind, torch.float32, gen)
    return head, target.to(device)


def run_loss_under_autocast(name, kind, ours, theirs, device, amp_dtype):
    """Logits from a Linear under autocast (16-bit), then the loss: fusedopt's loss has torch's output dtype and
    value, and the head's float32 weight gets torch's gradient."""
    gen = torch.Generator().manual_seed(4)
    ours, theirs = cast_module(ours, torch.float32, device), cast_module(theirs, torch.float32, device)
    head, target = _head_and_targets(kind, gen, device)
    x = torch.randn(6, 8, generator=gen).to(device)
    results = []
    for loss_fn in (ours, theirs):
        head.zero_grad()
        with torch.autocast(device, dtype=amp_dtype):
            out = head(x)
            if kind == "bce":
                out = torch.sigmoid(out)
            loss = loss_fn(out, target)
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), head.weight.grad.clone()))
    (loss, grad), (ref, ref_grad) = results
    assert loss.dtype == ref.dtype, f"{name}: loss dtype {loss.dtype}, torch's {ref.dtype}"
    assert loss.shape == ref.shape
    assert_close(loss, ref, loss.dtype, f"{name} loss", reduction=True)
    assert grad.dtype == ref_grad.dtype == torch.float32
    assert_close(grad, ref_grad, amp_dtype, f"{name} head weight grad", reduction=True)


@pytest.mark.parametrize(("name", "kind", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
def test_losses_under_cpu_autocast(name, kind, ours, theirs):
    run_loss_under_autocast(name, kind, ours, theirs, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "kind", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_losses_under_cuda_autocast(name, kind, ours, theirs, amp_dtype):
    if kind == "bce":  # torch refuses BCE on probabilities under CUDA autocast: so must fusedopt, with its message
        for fn in (theirs, ours):
            with pytest.raises(RuntimeError, match="unsafe to autocast"):
                run_loss_under_autocast(name, kind, fn, fn, "cuda", amp_dtype)
        return
    run_loss_under_autocast(name, kind, ours, theirs, "cuda", amp_dtype)


def _autocast_linear_ce(fn, device, amp_dtype, params_dtype, mode, **kw):
    """fn under autocast on (B, T, H) hidden states and params of params_dtype: the loss, and the grads of the
    hidden states, weight and bias (each in its own dtype)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 16, generator=gen).to(device, params_dtype).requires_grad_()
    w = (torch.randn(300, 16, generator=gen) / 4).to(device, params_dtype).requires_grad_()
    b = torch.randn(300, generator=gen).to(device, params_dtype).requires_grad_()
    t = torch.randint(0, 300, (2, 9), generator=gen).to(device)
    t[0, :3] = -100
    with torch.autocast(device, dtype=amp_dtype):
        loss = fn(x, w, b, t, mode, **kw)
    return loss, torch.autograd.grad(loss, (x, w, b))


def _torch_linear_ce(x, w, b, t, mode, **kw):
    logits = torch.nn.functional.linear(x, w, b)
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), t.flatten(), **kw)


def _fused_linear_ce(x, w, b, t, mode, **kw):
    return fusedopt.nn.functional.linear_cross_entropy(x, w, t, linear_bias=b, mode=mode, chunk_size=5,
                                                       vocab_block_size=128, **kw)  # fmt: skip


def run_linear_ce_under_autocast(device, amp_dtype, tol_dtype):
    """linear_cross_entropy under autocast is F.linear (matmuls in the autocast dtype) + F.cross_entropy (rows in
    float32): the loss in float32, every grad in its param's dtype. tol_dtype: float32 on the CPU, where both run the
    same 16-bit GEMMs (ignoring autocast, i.e. float32 matmuls, is off by ~5e-3 and fails); the autocast dtype on
    CUDA, where cuBLAS may pick another kernel for a chunk and round a logit the other way."""
    for mode in ("row_chunked", "vocab_blocked"):
        for params_dtype, kw in [(torch.float32, {}), (torch.float32, {"label_smoothing": 0.1}),
                                 (amp_dtype, {"reduction": "sum"})]:  # fmt: skip
            loss, grads = _autocast_linear_ce(_fused_linear_ce, device, amp_dtype, params_dtype, mode, **kw)
            ref, ref_grads = _autocast_linear_ce(_torch_linear_ce, device, amp_dtype, params_dtype, mode, **kw)
            assert loss.dtype == ref.dtype == torch.float32
            assert_close(loss, ref, tol_dtype, f"{mode} {params_dtype} {kw} loss", reduction=True)
            for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
                assert g.dtype == r.dtype == params_dtype, name
                assert_close(g, r, tol_dtype, f"{mode} {params_dtype} {kw} grad {name}", reduction=True)


def test_linear_cross_entropy_under_cpu_autocast():
    run_linear_ce_under_autocast("cpu", torch.bfloat16, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_cross_entropy_under_cuda_autocast(amp_dtype):
    run_linear_ce_under_autocast("cuda", amp_dtype, amp_dtype)
