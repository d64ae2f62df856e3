"""Low-bit states together with bf16 stochastic rounding (`state_dtype=` and `bf16_stochastic_round=True`), the
combination torchao's AdamW8bit offers: the q8 kernels store bf16 params by the same stochastic rounding as the
full-precision engines (csrc/common/stochastic_round.h), so
- every fused backend matches the torch backend (dequantize, the reference step with stochastic rounding,
  quantize): params bit for bit but for values on a float32 rounding edge, codes as tests/test_lowbit_states.py
  compares them;
- runs are reproducible and follow the seed;
- updates below half a bf16 ulp move the params as in float32 (and not without the mode);
- the tiny GPT fine-tune with int8 states and bf16 params tracks the float32 run.
"""

from __future__ import annotations

import pytest
import torch
from test_lowbit_states import FORMATS, Q8, Q8_BACKENDS, _compare, _grads

import fusedopt
from fusedopt import lowbit
from fusedopt.ops import optim_step

SR_Q8 = [pytest.param(i, id=i.name) for i in Q8
         if i.takes("bf16_stochastic_round") and "stochastic_round" not in i.not_applicable]  # fmt: skip
SHAPES = [(80, 64), (5000,), (7, 9)]  # two quantized params (one with a tail block), one full precision


def _run(info, backend, state_dtype, seed=5, steps=6, device="cpu"):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).bfloat16().to(device).requires_grad_() for s in SHAPES]
    opt = info.fused(params, backend=backend, state_dtype=state_dtype, bf16_stochastic_round=True,
                     stochastic_round_seed=seed, **info.cases[0])  # fmt: skip
    for s in range(steps):
        for p, grad in zip(params, _grads(params, s)):
            p.grad = grad.to(device)
        opt.step()
    return params, opt


def _assert_same_rounding(params, ref_params):
    """The quantized params: bit-equal bf16 values but for a few on a float32 rounding edge (or next to a state
    whose code differed by one there: centered RMSprop turns that into two bf16 steps at most). Round-to-nearest on
    one side and stochastic rounding on the other would differ in about half of them. (The small param keeps bf16
    full-precision state, whose roundings compound: `_compare` holds it to bf16's tolerance, as
    tests/test_lowbit_states.py does.)"""
    quantized = [(p, r) for p, r in zip(params, ref_params) if p.numel() >= lowbit.MIN_QUANT_NUMEL]
    assert len(quantized) == 2
    for p, r in quantized:
        a, b = p.detach().view(torch.int16).int(), r.detach().view(torch.int16).int()
        assert (a - b).abs().max() <= 2
        assert (a != b).float().mean() < 2e-3, float((a != b).float().mean())


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", SR_Q8)
def test_fused_matches_the_torch_backend(info, state_dtype, backend):
    steps = 6 if backend == "cpu" else 1  # Triton's interpreter truncates the small param's bf16 state: one step
    ref_params, ref = _run(info, "torch", state_dtype, steps=steps)
    params, opt = _run(info, backend, state_dtype, steps=steps)
    _assert_same_rounding(params, ref_params)
    _compare(opt, ref, params, ref_params, torch.bfloat16, state_dtype=state_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", SR_Q8)
def test_gpu_matches_the_torch_backend(info, state_dtype, backend):
    """The same on a GPU (scripts/gpu_check.sh runs the gpu tests): the CUDA q8 functor and Triton's store_param."""
    ref_params, ref = _run(info, "torch", state_dtype, device="cuda")
    params, opt = _run(info, backend, state_dtype, device="cuda")
    _assert_same_rounding([p.cpu() for p in params], [p.cpu() for p in ref_params])
    _compare(opt, ref, params, ref_params, torch.bfloat16, state_dtype=state_dtype)


def test_reproducible_and_seeded():
    info = next(i for i in Q8 if i.name == "AdamW")
    a, b, c = (_run(info, "cpu", "int8", seed=s)[0] for s in (5, 5, 6))
    bits = lambda t: t.detach().view(torch.int16)
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))
    assert not all(torch.equal(bits(x), bits(y)) for x, y in zip(a, c)), "the seed does not change the rounding"


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("state_dtype", FORMATS)
def test_small_updates_move_bf16_params_only_with_stochastic_rounding(state_dtype, backend):
    """Updates of 1e-3 on params at 1 (bf16 spacing 2^-8 below 1) with low-bit states: a constant block's state is
    exact, so Adam's update is lr. Round-to-nearest drops every update, stochastic rounding tracks float32.
    (Triton's interpreter converts float32 to bf16 by truncation, not to nearest: its plain run is not checked.)"""
    steps = 150 if backend == "cpu" else 30
    runs = {}
    for name, dtype, sr in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                            ("sr", torch.bfloat16, True)):  # fmt: skip
        p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
        opt = fusedopt.AdamW([p], lr=1e-3, weight_decay=0.0, backend=backend, state_dtype=state_dtype,
                             bf16_stochastic_round=sr)  # fmt: skip
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        assert "exp_avg_codes" in opt.state[p]
        runs[name] = p.detach().float().mean().item()
    moved = 1.0 - runs["fp32"]
    assert abs(moved - steps * 1e-3) < 1e-4, runs
    if backend != "triton":
        assert runs["bf16"] == 1.0, runs
    assert abs(runs["sr"] - runs["fp32"]) < 0.05 * moved, runs


def test_gpt_finetune_int8_bf16_tracks_fp32():
    """examples/finetune_gpt.py's tiny GPT (150 + 50 steps, fine-tuning at lr 3e-4) with bf16 params and int8
    AdamW states: with stochastic rounding the loss follows the float32 run (within 1% over the last 10 steps);
    plain bf16 stalls visibly above it (tests/test_stochastic_round.py measures 7% for full-precision states)."""
    import gpt_quality

    last10 = lambda losses: sum(losses[-10:]) / 10
    fp32 = last10(gpt_quality.train(lr=3e-4)[0])
    plain = last10(gpt_quality.train({"state_dtype": "int8"}, torch.bfloat16, lr=3e-4)[0])
    sr, opt = gpt_quality.train({"state_dtype": "int8", "bf16_stochastic_round": True}, torch.bfloat16, lr=3e-4)
    assert sum("exp_avg_codes" in opt.state[p] for p in opt.param_groups[0]["params"]) == 4
    assert abs(last10(sr) - fp32) <= 0.01 * fp32, (last10(sr), fp32)
    assert plain >= 1.04 * fp32, f"plain bf16 was expected to fall visibly behind: {plain} vs {fp32}"


@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_the_q8_op_refuses_bad_rounding_input(backend):
    """float32 params with a rounding state, and a rounding state that is not int64 [seed, counter]: the same
    messages as the full-precision op's, on every backend."""
    spec = fusedopt.SGD.SPEC
    hyper = {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    codes, absmax = torch.zeros(300, dtype=torch.uint8), torch.ones(2)
    step = lambda p, state: optim_step.step_q8(spec, [p], [torch.ones_like(p)], [[codes]], [[absmax]], [], lr=0.1,
                                               hyper=hyper, maximize=False, stochastic_round=state, backend=backend)
    with pytest.raises(RuntimeError, match=rf"fusedopt sgd_step_q8 \({backend}\): stochastic rounding applies to "
                                           r"bfloat16 params, got torch.float32"):  # fmt: skip
        step(torch.zeros(300), torch.tensor([1, 2]))
    not_seed_counter = (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2, 3]), torch.zeros(4).long()[::2])
    for bad in not_seed_counter:
        with pytest.raises(RuntimeError, match=r"stochastic_round must be a contiguous int64 tensor \[seed, counter\]"):
            step(torch.zeros(300, dtype=torch.bfloat16), bad)


def test_grad_scaler_skip_leaves_params_and_codes():
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = fusedopt.AdamW([p], lr=0.1, backend="cpu", state_dtype="int8", bf16_stochastic_round=True)
    p.grad = torch.randn(5000).bfloat16()
    opt.step()
    before = p.detach().clone(), opt.state[p]["exp_avg_codes"].clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg_codes"], before[1])
