"""Low-bit states together with master weights (`state_dtype=` and `master_weights=True | "remainder"`): bf16 params
whose exact float32 value is a master copy (4 bytes) or an int16 remainder (2 bytes), with int8 / int4 / fp8 states.
The q8 kernels read the param from its master and write both back, as the full-precision engines do
(docs/MASTER_WEIGHTS.md), so
- on every backend, the master follows the float32-param run with the same low-bit states bit for bit (codes and
  absmax too): the mode only changes where the float32 value is kept;
- the fused backends match the torch backend (dequantize, the reference step on the masters, quantize);
- state_dicts round trip and convert (from torch.optim's, to full precision);
- the tiny GPT fine-tune with int8 states, bf16 params and a remainder tracks the float32 run;
- the q8 op refuses bad masters at every backend's boundary.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from test_lowbit_states import FORMATS, Q8, Q8_BACKENDS, _compare, _q8_state
from test_master_weights import eager_and_compiled_runs

import fusedopt
from fusedopt import lowbit, master_weights
from fusedopt.ops import optim_step

MASTER_Q8 = [pytest.param(i, id=i.name) for i in Q8 if "master_weights" in inspect.signature(i.fused).parameters]
MODES = [pytest.param(True, id="fp32"), pytest.param("remainder", id="remainder")]
# The fused backends against the torch backend; Triton's float32 master only in the bit-for-bit test (interpreted,
# its time goes to the rest)
FUSED_MODES = [pytest.param(b, m, id=f"{b}-{'fp32' if m is True else m}") for b in Q8_BACKENDS
               for m in (True, "remainder") if b != "triton" or m is not True]  # fmt: skip
SHAPES = [(80, 64), (5000,), (7, 9)]  # two quantized params (one with a tail block), one full precision
TRITON_SHAPES = [(4100,), (7, 9)]  # the interpreter's time goes by programs: one quantized param with a tail block
KEYS = {True: "master_param", "remainder": "param_remainder"}


def _master(opt, p) -> torch.Tensor:
    st = opt.state[p]
    return st["master_param"] if "master_param" in st else master_weights.join(p.detach(), st["param_remainder"])


def _run(info, backend, state_dtype, mode, steps, dtype=torch.bfloat16, device="cpu", shapes=SHAPES):
    """`steps` steps on params of `dtype` (float32: the reference run, mode None) with bf16-valued grads."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).bfloat16().to(dtype).to(device).requires_grad_() for s in shapes]
    extra = {"master_weights": mode} if mode is not None else {}
    opt = info.fused(params, backend=backend, state_dtype=state_dtype, **extra, **info.cases[0])
    for s in range(steps):
        gen = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + s)).bfloat16().to(dtype).to(device)
        opt.step()
    return params, opt


def _assert_masters_close(opt, ref, params, ref_params):
    """Masters at float32's tolerance, but for the few values next to a code that differs by one (a value on a
    rounding edge of the two backends' float32 math, which _compare allows): those within bf16's."""
    for i, (p, r) in enumerate(zip(params, ref_params)):
        got, want = _master(opt, p), _master(ref, r)
        off = ~torch.isclose(got, want, rtol=2e-5, atol=2e-6)
        assert off.float().mean() < 1e-3, (i, int(off.sum()))
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-4)


def _steps(backend):
    return 2 if backend == "triton" else 8  # Triton runs interpreted


def _shapes(backend):
    return TRITON_SHAPES if backend == "triton" else SHAPES


@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", MASTER_Q8)
def test_master_follows_the_float32_run_bit_for_bit(info, state_dtype, mode, backend):
    """bf16 params with a master and float32 params, the same low-bit states and bf16-valued grads: the master is
    the float32 param bit for bit, the bf16 param its rounding, and every state (codes, absmax, the small param's
    float32 states) equal."""
    steps, shapes = _steps(backend), _shapes(backend)
    ref_params, ref = _run(info, backend, state_dtype, None, steps, dtype=torch.float32, shapes=shapes)
    params, opt = _run(info, backend, state_dtype, mode, steps, shapes=shapes)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        master = _master(opt, p)
        assert torch.equal(master.view(torch.int32), r.detach().view(torch.int32)), i
        rounded = master.bfloat16() if mode is True else master_weights.split(master)[0]
        assert torch.equal(p.detach().view(torch.int16), rounded.view(torch.int16)), i
        st, rst = opt.state[p], ref.state[r]
        assert set(st) == set(rst) | {KEYS[mode]}, (sorted(st), sorted(rst))
        assert any(k.endswith("_codes") for k in st) == (p.numel() >= lowbit.MIN_QUANT_NUMEL)
        for k, v in rst.items():
            if k != "step":
                assert st[k].dtype == v.dtype and torch.equal(st[k].view(torch.uint8), v.view(torch.uint8)), (i, k)


@pytest.mark.parametrize(("backend", "mode"), FUSED_MODES)
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", MASTER_Q8)
def test_fused_matches_the_torch_backend(info, state_dtype, mode, backend):
    """The fused kernel against the torch backend: masters at float32's tolerance, params within bf16's, codes
    within one step and equal but for a few on a rounding edge (tests/test_lowbit_states.py's _compare)."""
    steps, shapes = _steps(backend), _shapes(backend)
    ref_params, ref = _run(info, "torch", state_dtype, mode, steps, shapes=shapes)
    params, opt = _run(info, backend, state_dtype, mode, steps, shapes=shapes)
    _assert_masters_close(opt, ref, params, ref_params)
    _compare(opt, ref, params, ref_params, torch.bfloat16, state_dtype=state_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", MASTER_Q8)
def test_gpu_matches_the_torch_backend(info, state_dtype, mode, backend):
    """The same on a GPU (scripts/gpu_check.sh runs the gpu tests): the CUDA q8 functor's master loads and stores."""
    ref_params, ref = _run(info, "torch", state_dtype, mode, 6, device="cuda")
    params, opt = _run(info, backend, state_dtype, mode, 6, device="cuda")
    _assert_masters_close(opt, ref, params, ref_params)
    _compare(opt, ref, params, ref_params, torch.bfloat16, state_dtype=state_dtype)


def test_float16_params_with_a_float32_master():
    info = next(i for i in Q8 if i.name == "AdamW")
    ref_params, _ = _run(info, "cpu", "int8", None, 5, dtype=torch.float32)
    params, opt = _run(info, "cpu", "int8", True, 5, dtype=torch.float16)
    for p, r in zip(params, ref_params):
        assert torch.equal(opt.state[p]["master_param"], r.detach())
        assert torch.equal(p.detach(), r.detach().half())


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_resumes_bit_exactly(mode):
    info = next(i for i in Q8 if i.name == "AdamW")
    full, _ = _run(info, "cpu", "int4", mode, 6)
    params, opt = _run(info, "cpu", "int4", mode, 3)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = info.fused(resumed, backend="cpu", state_dtype="int4", master_weights=mode, **info.cases[0])
    opt2.load_state_dict(saved)
    assert all(set(opt2.state[q]) == set(opt.state[p]) for p, q in zip(params, resumed))
    for s in range(3, 6):
        gen = torch.Generator().manual_seed(100 + s)
        for p in resumed:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + s)).bfloat16()
        opt2.step()
    for p, q in zip(full, resumed):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))


def test_full_precision_state_dicts_load_quantized_from_float32():
    """torch.optim's state_dict (bf16 states) and fusedopt's with masters (float32 states) load into int8 + master:
    each large param keeps codes only (quantized from the float32 values where the checkpoint had them), the small
    one float32 states; to_full_precision_state_dict gives back float32 states that torch.optim and a master-only
    fusedopt optimizer load."""
    info = next(i for i in Q8 if i.name == "AdamW")
    params, fp = _run(info, "cpu", None, True, 3)  # full-precision float32 states beside float32 masters
    saved = fp.state_dict()
    q = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedopt.AdamW(q, backend="cpu", state_dtype="int8", master_weights=True)
    opt.load_state_dict(copy.deepcopy(saved))
    table = lowbit.qmap(True, "cpu", "int8")
    for i, p in enumerate(q):
        st = opt.state[p]
        assert torch.equal(st["master_param"], saved["state"][i]["master_param"])
        if p.numel() >= lowbit.MIN_QUANT_NUMEL:
            moments = [k for k in saved["state"][i] if k not in ("step", "master_param")]  # amsgrad's too
            assert len(moments) == 3
            assert sorted(st) == sorted([*(k + s for k in moments for s in ("_codes", "_absmax")), "master_param",
                                         "step"])  # fmt: skip
            codes, absmax = lowbit.quantize(saved["state"][i]["exp_avg"], table, "int8")
            assert torch.equal(st["exp_avg_codes"], codes.view(p.shape)) and torch.equal(st["exp_avg_absmax"], absmax)
        else:
            assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], saved["state"][i]["exp_avg"])

    torch_params = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = torch.optim.AdamW(torch_params)
    for p in torch_params:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    opt.load_state_dict(torch_opt.state_dict())  # bf16 states, no master: the master starts from the param
    for p, t in zip(q, torch_params):
        st = opt.state[p]
        assert torch.equal(st["master_param"], p.detach().float())
        assert ("exp_avg" in st) == (p.numel() < lowbit.MIN_QUANT_NUMEL)
        value = torch_opt.state[t]["exp_avg"].float()
        if "exp_avg" in st:
            assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], value)
        else:
            assert torch.equal(st["exp_avg_codes"], lowbit.quantize(value, table, "int8")[0].view(p.shape))

    full = fusedopt.optim.to_full_precision_state_dict(opt)
    assert all(st["exp_avg"].dtype == torch.float32 for st in full["state"].values())
    torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params]).load_state_dict(copy.deepcopy(full))
    plain = fusedopt.AdamW([p.detach().clone().requires_grad_() for p in params], backend="cpu", master_weights=True)
    plain.load_state_dict(full)
    assert plain.state[plain.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32


def test_gpt_finetune_int8_remainder_tracks_fp32():
    """examples/finetune_gpt.py's tiny GPT with bf16 params, int8 AdamW states and a 2-byte remainder (4.03 bytes of
    optimizer state per param, against 12 for float32 AdamW states beside a float32 master): the loss
    follows the float32 run within 1% over the last 10 steps (measured: 2.5e-5 relative); plain bf16 with int8
    states stays visibly above it (measured: 7%)."""
    import gpt_quality

    last10 = lambda losses: sum(losses[-10:]) / 10
    fp32 = last10(gpt_quality.train(lr=3e-4)[0])
    losses, opt = gpt_quality.train({"state_dtype": "int8", "master_weights": "remainder"}, torch.bfloat16, lr=3e-4)
    params = opt.param_groups[0]["params"]
    assert sum("exp_avg_codes" in opt.state[p] for p in params) == 4
    assert all(opt.state[p]["param_remainder"].dtype == torch.int16 for p in params if p.dtype == torch.bfloat16)
    assert abs(last10(losses) - fp32) <= 0.01 * fp32, (last10(losses), fp32)
    plain = last10(gpt_quality.train({"state_dtype": "int8"}, torch.bfloat16, lr=3e-4)[0])
    assert plain >= 1.04 * fp32, f"plain bf16 was expected to fall visibly behind: {plain} vs {fp32}"


@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_the_q8_op_checks_masters_at_its_boundary(backend):
    """The full-precision op's master checks and messages, on the q8 op of every backend."""
    spec = fusedopt.SGD.SPEC
    hyper = {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    codes, absmax = torch.zeros(300, dtype=torch.uint8), torch.ones(2)

    def step(p, masters, stochastic_round=None):
        optim_step.step_q8(spec, [p], [torch.ones_like(p)], [[codes]], [[absmax]], [], lr=0.1, hyper=hyper,
                           maximize=False, masters=masters, stochastic_round=stochastic_round,
                           backend=backend)  # fmt: skip

    name = rf"fusedopt sgd_step_q8 \({backend}\)"
    bf16, half = torch.zeros(300, dtype=torch.bfloat16), torch.zeros(300, dtype=torch.float16)
    bad = [
        (torch.zeros(300), [torch.zeros(300)], "master weights apply to bfloat16 and float16 params"),
        (bf16, [torch.zeros(300, dtype=torch.float64)], "masters must be float32 copies"),
        (half, [torch.zeros(300, dtype=torch.int16)], "masters must be float32 copies"),
        (bf16, [torch.zeros(301)], r"masters\[0\] has shape"),
        (bf16, [torch.zeros(300), torch.zeros(300)], "masters has 2 tensors, params has 1"),
    ]
    for p, masters, msg in bad:
        with pytest.raises(RuntimeError, match=f"{name}: {msg}"):
            step(p, masters)
    with pytest.raises(RuntimeError, match=f"{name}: stochastic rounding does not apply with master weights"):
        step(bf16, [torch.zeros(300)], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.AdamW([torch.nn.Parameter(bf16)], state_dtype="int8", master_weights=True, bf16_stochastic_round=True)


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_skip_leaves_params_masters_and_codes(mode):
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = fusedopt.AdamW([p], lr=0.1, backend="cpu", state_dtype="int8", master_weights=mode)
    p.grad = torch.randn(5000).bfloat16()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p.detach(), before[1])
    for k, v in before[0].items():
        assert torch.equal(opt.state[p][k], v), k


def test_non_finite_grads_as_in_the_float32_run():
    """inf, NaN and huge grads reach the master as they reach a float32 param (NaN where it is NaN)."""
    values = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), 3e38, -1e-30, 0.5, 2.0] * 40)
    runs = {}
    for mode in (None, "remainder"):
        p = torch.nn.Parameter(torch.linspace(-2, 2, values.numel()).bfloat16())
        if mode is None:
            p = torch.nn.Parameter(p.detach().float())
        extra = {"master_weights": mode} if mode else {}
        opt = fusedopt.AdamW([p], backend="cpu", state_dtype="int8", **extra)
        for s in range(3):
            g = values.roll(s).bfloat16()
            p.grad = g.to(p.dtype)
            opt.step()
        runs[mode] = (opt, p)
    opt, p = runs["remainder"]
    torch.testing.assert_close(_master(opt, p), runs[None][1].detach(), rtol=0, atol=0, equal_nan=True)
    for k, v in _q8_state(runs[None][0], runs[None][1]).items():
        assert torch.equal(opt.state[p][k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("mode", [None, *MODES])
def test_compiled_step_equals_eager(mode):
    """torch.compile (aot_eager: the q8 custom op through functionalization, as inductor; one graph, fullgraph) of an
    int8 step, alone and beside a master: codes, absmax, params and masters the same bits as eager."""
    extra = {"master_weights": mode} if mode is not None else {}
    make = lambda params: fusedopt.AdamW(params, lr=0.01, backend="cpu", state_dtype="int8", **extra)
    (opt_e, ps_e), (opt_c, ps_c) = eager_and_compiled_runs(make, (7, 5000), fullgraph=True)
    assert "exp_avg_codes" in opt_c.state[ps_c[1]]
    for a, b in zip(ps_e, ps_c):
        assert torch.equal(a, b)
        assert opt_e.state[a].keys() == opt_c.state[b].keys()
        for k, v in opt_e.state[a].items():
            assert torch.equal(v, opt_c.state[b][k]), k
