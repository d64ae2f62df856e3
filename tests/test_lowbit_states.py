"""8-bit block-wise optimizer states (state_dtype="int8", docs/LOW_BIT_STATES.md), for every optimizer of the
registry: the fused kernels against the plain-torch definition (fusedopt/lowbit.py), the quantizer itself, state_dict
conversions both ways, the small-tensor threshold, quality on a tiny model, and the errors."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import cpu_backends
from optim_db import ENGINE_DRIVEN, OPTIM_DB, case_id

import fusedopt
from fusedopt import _backend, lowbit
from fusedopt.ops import optim_step

Q8_BACKENDS = [b for b in cpu_backends() if b != "torch"]
SHAPES = [(80, 64), (5000,), (3, 37, 41)]  # 20 whole blocks; a 136-element tail; blocks across rows
SMALL = (7, 9)  # below MIN_QUANT_NUMEL: full precision


def _cases(info):
    return list(info.cases) + list(info.grid[1::4])


# The optimizers that take the keyword (Muon does not yet); those that take it and cannot serve it refuse it.
_TAKES = [i for i in OPTIM_DB if "state_dtype" in inspect.signature(i.fused.__init__).parameters]
Q8 = tuple(info for info in ENGINE_DRIVEN if info in _TAKES and "int8" not in info.not_applicable)
CASES = [(info, kw) for info in Q8 for kw in _cases(info)]
REFUSING = [pytest.param(i, id=i.name) for i in _TAKES if "int8" in i.not_applicable]
IDS = [f"{info.name}-{case_id(kw)}" for info, kw in CASES]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [*SHAPES, SMALL]]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * (1 + step) for p in params]


def _run(info, kw, backend, dtype, steps=5, params=None):
    params = params if params is not None else _params(dtype)
    opt = info.fused(params, backend=backend, state_dtype="int8", **kw)
    for s in range(steps):
        for p, g in zip(params, _grads(params, s)):
            p.grad = g
        opt.step()
    return params, opt


def _q8_state(opt, p):
    return {k: v for k, v in opt.state[p].items() if k.endswith(("_codes", "_absmax"))}


def _compare(opt, ref, params, ref_params, dtype, frac=1e-3):
    """Params within the dtype's tolerance; codes within one step of the map and equal but for a few values on a
    rounding edge (the two backends' float32 math rounds differently in the last bit); absmax close."""
    for p, rp in zip(params, ref_params):
        rtol, atol = (2e-5, 2e-6) if dtype == torch.float32 else (1.6e-2, 1e-4)
        torch.testing.assert_close(p, rp, rtol=rtol, atol=atol)
        st, rst = _q8_state(opt, p), _q8_state(ref, rp)
        assert st.keys() == rst.keys()
        assert not st or p.numel() >= lowbit.MIN_QUANT_NUMEL  # SGD without momentum has no state
        for k in st:
            if k.endswith("_codes"):
                diff = (st[k].int() - rst[k].int()).abs()
                assert diff.max() <= 1, k
                assert (diff != 0).float().mean() < frac, k
            else:
                torch.testing.assert_close(st[k], rst[k], rtol=1e-5, atol=0)


# Triton runs interpreted on the CPU: every other case.
TRAJECTORY = [(b, info, kw) for b in Q8_BACKENDS for i, (info, kw) in enumerate(CASES) if b == "cpu" or i % 2 == 0]


@pytest.mark.parametrize(("backend", "info", "kw"), TRAJECTORY,
                         ids=[f"{b}-{info.name}-{case_id(kw)}" for b, info, kw in TRAJECTORY])  # fmt: skip
def test_fused_trajectory_matches_plain_torch(backend, info, kw):
    """5 float32 steps on the fused backend and on the torch backend (dequantize, the op's reference, quantize)."""
    ref_params, ref = _run(info, kw, "torch", torch.float32)
    params, opt = _run(info, kw, backend, torch.float32)
    _compare(opt, ref, params, ref_params, torch.float32)


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("info", "kw"), CASES[::3], ids=IDS[::3])
def test_fused_16bit_step_matches_plain_torch(info, kw, dtype, backend):
    """16-bit params: 3 fused steps, the state copied to the torch backend, then one step on each (a param's
    rounding to 16 bits amplifies any later difference of a code, so trajectories are compared in float32)."""
    params, opt = _run(info, kw, backend, dtype, steps=3)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, backend="torch", state_dtype="int8", **kw)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps in (params, ref_params):
        for p, g in zip(ps, _grads(ps, 3)):
            p.grad = g
    opt.step()
    ref.step()
    _compare(opt, ref, params, ref_params, dtype, frac=1e-2)


@pytest.mark.parametrize(("info", "kw"), CASES, ids=IDS)
def test_cpu_kernel_is_dequantize_fp32_step_quantize(info, kw):
    """The cpu q8 step is, bit for bit, dequantize -> the cpu float32 step -> quantize: the fused pass changes
    nothing but where the state lives."""
    _, opt = _run(info, kw, "cpu", torch.float32, steps=2)
    params = [p for g in opt.param_groups for p in g["params"]]
    params = [p for p in params if p.numel() >= lowbit.MIN_QUANT_NUMEL]
    spec = info.fused.SPEC
    hyper = spec.hyper_values(opt.param_groups[0])
    used = spec.used_states(hyper)
    for p, g in zip(params, _grads(params, 7)):
        p.grad = g
    # the float32 twin: same params, the dequantized state
    twin = [p.detach().clone() for p in params]
    states = []
    for s, on in zip(spec.states, used):
        table = lowbit.qmap(s.signed, "cpu")
        st = [lowbit.dequantize(opt.state[p][lowbit.codes_key(s.key)], opt.state[p][lowbit.absmax_key(s.key)], table)
              for p in params] if on else []  # fmt: skip
        states.append(st)
    steps = [opt.state[p]["step"].clone() for p in params] if spec.has_step else []
    args = dict(lr=opt.param_groups[0]["lr"], hyper=hyper, maximize=bool(opt.param_groups[0].get("maximize")))
    optim_step.step(spec, twin, [p.grad for p in params], states, steps, backend="cpu", **args)
    opt.step()
    for p, t in zip(params, twin):
        assert torch.equal(p, t)
    for s, st in zip(spec.states, states):
        table = lowbit.qmap(s.signed, "cpu")
        for p, v in zip(params, st):
            codes, absmax = lowbit.quantize(v, table)
            assert torch.equal(opt.state[p][lowbit.codes_key(s.key)], codes)
            assert torch.equal(opt.state[p][lowbit.absmax_key(s.key)], absmax)


# --- the quantizer ----------------------------------------------------------------------------------------------
def test_specs_name_their_second_moments_unsigned():
    """The unsigned map (no sign, twice the resolution) is for states that are never negative."""
    unsigned = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}
    for info in ENGINE_DRIVEN:
        for s in info.fused.SPEC.states:
            assert s.signed == (s.key not in unsigned), (info.name, s.key)


def test_maps():
    for signed in (True, False):
        table = lowbit.qmap(signed, "cpu")
        values, mid = table[:256], table[256:512]
        assert torch.all(values[1:] > values[:-1]) and values[-1] == 1.0 and (values == 0).sum() == 1
        assert (-1 < values[0] < -0.99) if signed else values[0] == 0
        assert torch.all((mid[:-1] > values[:-1]) & (mid[:-1] < values[1:])) and mid[-1].isnan()
    assert lowbit.qmap(False, "cpu")[1] < lowbit.qmap(True, "cpu")[129]  # unsigned: finer near 0


def _max_error_bound(table, absmax):
    values = table[:256]
    return (values[1:] - values[:-1]).max() / 2 * absmax * (1 + 1e-4)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 4096, 10000])
def test_round_trip_error_per_block(signed, numel):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * torch.logspace(-6, 2, max(numel, 1))[:numel]
    x = x if signed else x.abs()
    table = lowbit.qmap(signed, "cpu")
    codes, absmax = lowbit.quantize(x, table)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and absmax.shape == (lowbit.num_blocks(numel),)
    y = lowbit.dequantize(codes, absmax, table)
    for b in range(lowbit.num_blocks(numel)):
        blk = slice(b * 256, (b + 1) * 256)
        assert absmax[b] == x[blk].abs().max()
        assert (y[blk] - x[blk]).abs().max() <= _max_error_bound(table, absmax[b])
        big = x[blk].abs() > absmax[b] * 0.1  # the top decade: within ~0.7% of the block's largest value
        assert ((y[blk] - x[blk]).abs() <= absmax[b] * 0.0071)[big].all()
    assert torch.equal(lowbit.quantize(y, table)[0], codes)  # requantizing a dequantized block keeps its codes


def test_zeros_nan_inf_stay_in_their_block():
    table = lowbit.qmap(True, "cpu")
    x = torch.randn(1024)
    x[:256] = 0.0
    x[300] = float("nan")
    x[700] = float("inf")
    codes, absmax = lowbit.quantize(x, table)
    y = lowbit.dequantize(codes, absmax, table)
    assert absmax[0] == 0 and torch.all(y[:256] == 0)
    assert absmax[1].isnan() and y[256:512].isnan().all()  # a NaN makes its own block NaN
    assert absmax[2] == float("inf") and not y[512:768].isfinite().any()  # an inf too: 0 * inf, the inf itself -inf
    assert torch.isfinite(y[768:]).all() and (y[768:] - x[768:]).abs().max() < 0.01 * absmax[3]


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_kernel_quantizer_is_the_definition(backend):
    """SGD with momentum 1, dampening 0, a zero grad and lr 0 leaves the state's values as they are: the kernel then
    requantizes dequantized values, which must give what lowbit.quantize gives, bit for bit (NaN, inf, zero and
    tail blocks included)."""
    table = lowbit.qmap(True, "cpu")
    p = torch.zeros(5000)
    x = torch.randn(5000) * torch.logspace(-5, 1, 5000)
    x[:256] = 0.0
    x[300], x[700], x[4999] = float("nan"), float("inf"), -3.0
    codes, absmax = lowbit.quantize(x, table)
    perturbed = (codes.int() + torch.randint(-3, 4, codes.shape)).clamp(0, 255).to(torch.uint8)  # not a fixed point
    want = lowbit.quantize(lowbit.dequantize(perturbed, absmax, table), table)
    hyper = {"momentum": 1.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    optim_step.step_q8(fusedopt.optim.sgd.SPEC, [p], [torch.zeros(5000)], [[perturbed]], [[absmax]], [], lr=0.0,
                       hyper=hyper, maximize=False, backend=backend)  # fmt: skip
    assert torch.equal(perturbed, want[0])
    torch.testing.assert_close(absmax, want[1], rtol=0, atol=0, equal_nan=True)


# --- optimizer behaviour ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_threshold_uses_the_global_size(backend):
    params = [torch.zeros(4095, requires_grad=True), torch.zeros(64, 64, requires_grad=True)]
    opt = fusedopt.AdamW(params, backend=backend, state_dtype="int8")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(opt.state[params[0]]) == ["exp_avg", "exp_avg_sq", "step"]
    assert sorted(opt.state[params[1]]) == ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax",
                                            "exp_avg_sq_codes", "step"]  # fmt: skip
    assert opt.state[params[1]]["exp_avg_codes"].shape == (64, 64)
    assert opt.state[params[1]]["exp_avg_absmax"].shape == (16,)


@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_found_inf_leaves_codes(backend):
    params, opt = _run(next(i for i in ENGINE_DRIVEN if i.name == "Adam"), {"lr": 1e-2}, backend, torch.float32, 2)
    before = copy.deepcopy({k: v for k, v in opt.state[params[0]].items()})
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v), k


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_non_contiguous_params(backend):
    base = torch.randn(100, 80)
    a = base.clone().t().requires_grad_()  # a transposed view's layout
    b = base.clone().t().contiguous().requires_grad_()
    opts = [fusedopt.Adam([x], lr=1e-2, backend=backend, state_dtype="int8") for x in (a, b)]
    for _ in range(3):
        g = torch.randn(80, 100)
        a.grad, b.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(opts[0].state[a]["exp_avg_codes"], opts[1].state[b]["exp_avg_codes"])


@pytest.mark.parametrize(("info", "kw"), [(i, i.cases[0]) for i in Q8], ids=[i.name for i in Q8])
def test_state_dict_round_trips(info, kw):
    """int8 -> int8 resumes bit-exactly; int8 -> full precision (torch.optim's class where torch has it) via
    to_full_precision_state_dict; full precision -> int8 quantizes on load."""
    params, opt = _run(info, kw, "cpu", torch.float32, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = info.fused(resumed_params, backend="cpu", state_dtype="int8", **kw)
    resumed.load_state_dict(sd)
    for p, q in zip(params, resumed_params):
        for k, v in opt.state[p].items():
            assert torch.equal(resumed.state[q][k], v) and resumed.state[q][k].dtype == v.dtype, k
    full = fusedopt.optim.to_full_precision_state_dict(opt)
    assert not any(k.endswith(("_codes", "_absmax")) for st in full["state"].values() for k in st)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin_cls = info.reference if info.reference.__module__.startswith("torch") else info.fused
    twin = twin_cls(twin_params, **kw)
    twin.load_state_dict(full)
    for s in info.fused.SPEC.states:
        if lowbit.codes_key(s.key) in opt.state[params[0]]:
            deq = lowbit.dequantize(opt.state[params[0]][lowbit.codes_key(s.key)],
                                    opt.state[params[0]][lowbit.absmax_key(s.key)], lowbit.qmap(s.signed, "cpu"))
            assert torch.equal(twin.state[twin_params[0]][s.key], deq)
    back = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", state_dtype="int8", **kw)
    back.load_state_dict(twin.state_dict())  # full precision in, quantized on load: the same values, to the map's step
    for s in info.fused.SPEC.states:
        ck, ak = lowbit.codes_key(s.key), lowbit.absmax_key(s.key)
        if ck in opt.state[params[0]]:
            table = lowbit.qmap(s.signed, "cpu")
            st, bst = opt.state[params[0]], back.state[back.param_groups[0]["params"][0]]
            a, b = lowbit.dequantize(st[ck], st[ak], table), lowbit.dequantize(bst[ck], bst[ak], table)
            bound = st[ak].repeat_interleave(256)[: a.numel()].reshape(a.shape) * 0.0071
            assert ((a - b).abs() <= bound).all(), s.key
    plain = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", **kw)
    plain.load_state_dict(sd)  # an int8 state_dict into a full-precision optimizer: dequantized
    assert not _q8_state(plain, plain.param_groups[0]["params"][0])


def test_resume_is_bit_exact():
    info = next(i for i in ENGINE_DRIVEN if i.name == "AdamW")
    params, _ = _run(info, {"lr": 1e-2}, "cpu", torch.float32, steps=6)
    other = _params(torch.float32)
    o2 = info.fused(other, backend="cpu", state_dtype="int8", lr=1e-2)
    for s in range(3):
        for p, g in zip(other, _grads(other, s)):
            p.grad = g
        o2.step()
    o3 = info.fused(other, backend="cpu", state_dtype="int8", lr=1e-2)
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    for s in range(3, 6):
        for p, g in zip(other, _grads(other, s)):
            p.grad = g
        o3.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_tiny_model_quality():
    """AdamW with int8 states ends within 2% of float32 AdamW's loss on a small MLP regression."""
    losses = {}
    for state_dtype in (None, "int8"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                    torch.nn.GELU(), torch.nn.Linear(128, 1))  # fmt: skip
        x = torch.randn(512, 32)
        y = (x[:, :8].sin().sum(1, keepdim=True) + 0.1 * x[:, 8:].pow(2).mean(1, keepdim=True))
        opt = fusedopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, backend="cpu", state_dtype=state_dtype)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses[state_dtype] = torch.nn.functional.mse_loss(model(x), y).item()
        if state_dtype == "int8":
            assert any(k.endswith("_codes") for k in opt.state[model[2].weight])
    assert losses["int8"] <= losses[None] * 1.02 + 1e-4, losses


def test_gpt_finetune_quality():
    """examples/finetune_gpt.py (its tiny GPT, 150 + 50 steps): int8 AdamW's loss curve stays within 2% of float32
    AdamW's, to the final loss (measured: 2e-5 relative at the end, 4e-4 at worst)."""
    import gpt_quality

    fp32, _ = gpt_quality.train()
    int8, opt = gpt_quality.train({"state_dtype": "int8"})
    quantized = [p for p in opt.param_groups[0]["params"] if "exp_avg_codes" in opt.state[p]]
    assert len(quantized) == 4, "the tiny GPT's four 4096-element MLP weights should have 8-bit states"
    assert fp32[-1] < 0.5 * fp32[0], "the run did not learn"
    assert abs(int8[-1] - fp32[-1]) <= 0.02 * fp32[-1], (int8[-1], fp32[-1])
    assert max(abs(a - b) / b for a, b in zip(int8, fp32)) <= 0.02
    assert int8 != fp32, "int8 states changed nothing: were they used?"


def test_errors():
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fusedopt.Adam([torch.zeros(3, requires_grad=True)], state_dtype="int4")
    with pytest.raises(ValueError, match="does not support float64 params"):
        fusedopt.AdamW([torch.zeros(5000, dtype=torch.float64, requires_grad=True)], state_dtype="int8")
    spec = fusedopt.optim.adam.SPEC
    hyper = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "decoupled_weight_decay": False}  # fmt: skip
    p, g = torch.zeros(300), torch.zeros(300)
    good = ([torch.zeros(300, dtype=torch.uint8)], [torch.zeros(2)])
    for backend in [*Q8_BACKENDS, "torch"]:
        bad_codes = [[torch.zeros(300, dtype=torch.int8)], good[0], []]
        with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] codes must be a contiguous torch.uint8 tensor"):
            optim_step.step_q8(spec, [p], [g], bad_codes, [good[1], good[1], []], [torch.zeros(())], lr=0.1,
                               hyper=hyper, maximize=False, backend=backend)  # fmt: skip
        with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] absmax must be .* of 2 values"):
            optim_step.step_q8(spec, [p], [g], [good[0], good[0], []], [good[1], [torch.zeros(3)], []],
                               [torch.zeros(())], lr=0.1, hyper=hyper, maximize=False, backend=backend)  # fmt: skip
        with pytest.raises(RuntimeError, match="need float32, bfloat16 or float16 params"):
            optim_step.step_q8(spec, [p.double()], [g.double()], [good[0], good[0], []], [good[1], good[1], []],
                               [torch.zeros(())], lr=0.1, hyper=hyper, maximize=False, backend=backend)  # fmt: skip
    assert _backend.usable("cpu", "cpu")


@pytest.mark.parametrize("info", REFUSING)
def test_optimizers_without_8bit_states_refuse_them(info):
    """LAMB (two-pass engine) and Adafactor (its own op) have no 8-bit path: state_dtype raises, not ignored."""
    p = torch.zeros(5000, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        info.fused([p], backend="torch", state_dtype="int8", **info.cases[0])
