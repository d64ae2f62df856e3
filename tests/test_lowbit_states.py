"""Block-wise quantized optimizer states (state_dtype="int8", "int4" and "fp8", docs/LOW_BIT_STATES.md), for every
optimizer of the registry: the fused kernels against the plain-torch definition (fusedopt/lowbit.py), the quantizer
itself, state_dict conversions both ways, the small-tensor threshold, quality on a tiny model. Each test runs for
each format; the quantizer's own tests (maps, int4 packing) are in test_lowbit_quantizer.py, the errors in
test_lowbit_errors.py."""

from __future__ import annotations

import collections
import copy
import weakref

import pytest
import torch
from conftest import cpu_backends
from gloo import same
from optim_db import ENGINE_DRIVEN, OPTIM_DB, case_id

import fusedopt
from fusedopt import lowbit

Q8_BACKENDS = [b for b in cpu_backends() if b != "torch"]
SHAPES = [(80, 64), (5000,), (3, 37, 41)]  # 20 whole blocks; a 136-element tail; blocks across rows
SMALL = (7, 9)  # below MIN_QUANT_NUMEL: full precision
MATRICES = [(80, 64), (70, 61), (80, 64)]  # Muon's: whole blocks; a 174-element tail; a repeated shape (one batch)
FORMATS = ["int8", "int4", "fp8"]
STEPS = {"int8": 5, "int4": 20, "fp8": 5}  # trajectory steps


def _cases(info):
    return list(info.cases) + list(info.grid[1::4])


# The optimizers that take the keyword; those that take it and cannot serve it refuse it.
_TAKES = [i for i in OPTIM_DB if i.takes("state_dtype")]
Q8 = tuple(info for info in ENGINE_DRIVEN if info in _TAKES and "int8" not in info.not_applicable)
CASES = [(info, kw) for info in Q8 for kw in _cases(info)]
REFUSING = [pytest.param(i, id=i.name) for i in _TAKES if "int8" in i.not_applicable]
IDS = [f"{info.name}-{case_id(kw)}" for info, kw in CASES]


def _params(dtype, seed=0, info=None):
    g = torch.Generator().manual_seed(seed)
    shapes = MATRICES if info is not None and info.matrices_only else SHAPES
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [*shapes, SMALL]]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * (1 + step) for p in params]


def _run(info, kw, backend, dtype, steps=5, params=None, state_dtype="int8"):
    params = params if params is not None else _params(dtype, info=info)
    opt = info.fused(params, backend=backend, state_dtype=state_dtype, **kw)
    for s in range(steps):
        for p, g in zip(params, _grads(params, s)):
            p.grad = g
        opt.step()
    return params, opt


def _q8_state(opt, p):
    return {k: v for k, v in opt.state[p].items() if k.endswith(("_codes", "_absmax"))}


def codes_of(codes, p, state_dtype):
    """One int64 code per element of p, in the map's order: int4 codes unpacked; fp8 codes as signed magnitudes
    (neighbouring values differ by 1, +0 and -0 are both 0)."""
    if state_dtype == "int4":
        return lowbit.unpack4(codes, p.numel())
    flat = codes.reshape(-1).view(torch.uint8).long()
    return torch.where(flat >= 128, 128 - flat, flat) if state_dtype == "fp8" else flat


def _deq(st, key, signed, p, state_dtype):
    """The dequantized state `key` of param p from its state dict `st`."""
    table = lowbit.qmap(signed, "cpu", state_dtype)
    return lowbit.dequantize(st[lowbit.codes_key(key)], st[lowbit.absmax_key(key)], table, state_dtype=state_dtype,
                             shape=p.shape)  # fmt: skip


def _max_error_bound(table, absmax, state_dtype="int8"):
    """The most a value moves when quantized: half the map's largest gap times the block's absmax, or for a map
    without zero (int4's unsigned) its smallest value (what a 0 reads back as)."""
    values = table[: lowbit.FORMATS[state_dtype].levels]
    if state_dtype == "fp8":  # indexed by the code's bits: sort the finite values
        values = values[~values.isnan()].unique()
    return torch.maximum((values[1:] - values[:-1]).max() / 2, values[0].clamp(min=0)) * absmax * (1 + 1e-4)


def _compare(opt, ref, params, ref_params, dtype, frac=1e-3, state_dtype="int8", steps=1, info=None):
    """Params within the dtype's tolerance; codes equal but for a few values on a rounding edge (the two backends'
    float32 math rounds differently in the last bit), each within one code, or where a flipped code was carried
    into a finer part of the map by later steps, within the map's largest gap in value; absmax close. An optimizer
    whose update has its own precision (Muon's bfloat16 Newton-Schulz, optim_db.muon_update_noise) adds it to the
    params' tolerance once per step (its momentum, compared through the codes, does not depend on the params)."""
    for p, rp in zip(params, ref_params):
        rtol, atol = (2e-5, 2e-6) if dtype == torch.float32 else (1.6e-2, 1e-4)
        if info is not None and info.update_noise is not None:
            atol += steps * info.update_noise(opt.defaults, p.shape)
        torch.testing.assert_close(p, rp, rtol=rtol, atol=atol)  # no NaN: centered RMSprop clamps its variance
        st, rst = _q8_state(opt, p), _q8_state(ref, rp)
        assert st.keys() == rst.keys()
        assert not st or p.numel() >= lowbit.MIN_QUANT_NUMEL  # SGD without momentum has no state
        for k in st:
            if k.endswith("_codes"):
                diff = (codes_of(st[k], p, state_dtype) - codes_of(rst[k], rp, state_dtype)).abs()
                assert (diff != 0).float().mean() < frac, k
                far = (diff > 1).reshape(p.shape)
                if far.any():
                    key = k.removesuffix("_codes")
                    signed = next(s.signed for s in opt.SPEC.states if s.key == key)
                    a, b = _deq(st, key, signed, p, state_dtype), _deq(rst, key, signed, rp, state_dtype)
                    block = lowbit.FORMATS[state_dtype].block
                    absmax = st[lowbit.absmax_key(key)].repeat_interleave(block)[: p.numel()].reshape(p.shape)
                    gap = 2 * _max_error_bound(lowbit.qmap(signed, "cpu", state_dtype), absmax, state_dtype)
                    assert ((a - b).abs() <= gap)[far].all(), k
            else:
                torch.testing.assert_close(st[k], rst[k], rtol=1e-5, atol=0, equal_nan=True)


# Triton runs interpreted on the CPU: every other case (int4, 4x the steps: every fourth).
TRAJECTORY = [(f, b, info, kw) for f in FORMATS for b in Q8_BACKENDS for i, (info, kw) in enumerate(CASES)
              if b == "cpu" or i % (2 if f == "int8" else 4) == 0]  # fmt: skip


@pytest.mark.parametrize(("state_dtype", "backend", "info", "kw"), TRAJECTORY,
                         ids=[f"{f}-{b}-{info.name}-{case_id(kw)}" for f, b, info, kw in TRAJECTORY])  # fmt: skip
def test_fused_trajectory_matches_plain_torch(state_dtype, backend, info, kw):
    """float32 steps (int8: 5, int4: 20; Triton, interpreted: at most 10) on the fused backend and on the torch
    backend (dequantize, the op's reference, quantize)."""
    steps = STEPS[state_dtype] if backend == "cpu" else min(STEPS[state_dtype], 10)
    ref_params, ref = _run(info, kw, "torch", torch.float32, steps, state_dtype=state_dtype)
    params, opt = _run(info, kw, backend, torch.float32, steps, state_dtype=state_dtype)
    _compare(opt, ref, params, ref_params, torch.float32, state_dtype=state_dtype, steps=steps, info=info)


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("info", "kw"), CASES[::3], ids=IDS[::3])
def test_fused_16bit_step_matches_plain_torch(info, kw, dtype, backend, state_dtype):
    """16-bit params: 3 fused steps (Triton, interpreted: 1), the state copied to the torch backend, then one step
    on each (a param's rounding to 16 bits amplifies any later difference of a code, so trajectories are compared in
    float32)."""
    params, opt = _run(info, kw, backend, dtype, steps=3 if backend == "cpu" else 1, state_dtype=state_dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = info.fused(ref_params, backend="torch", state_dtype=state_dtype, **kw)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps in (params, ref_params):
        for p, g in zip(ps, _grads(ps, 3)):
            p.grad = g
    opt.step()
    ref.step()
    _compare(opt, ref, params, ref_params, dtype, frac=1e-2, state_dtype=state_dtype, info=info)


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize(("info", "kw"), CASES, ids=IDS)
def test_cpu_kernel_is_dequantize_fp32_step_quantize(info, kw, state_dtype):
    """The cpu quantized step is, bit for bit, dequantize -> the cpu float32 step -> quantize: the fused pass
    changes nothing but where the state lives. The float32 twin is the same optimizer without state_dtype, loaded
    with the dequantized state (for Muon the op's output is the Newton-Schulz input, so whole steps are compared)."""
    params, opt = _run(info, kw, "cpu", torch.float32, steps=2, state_dtype=state_dtype)
    twin = [p.detach().clone().requires_grad_() for p in params]
    twin_opt = info.fused(twin, backend="cpu", **kw)
    twin_opt.load_state_dict(copy.deepcopy(fusedopt.optim.to_full_precision_state_dict(opt)))  # its own steps
    for ps in (params, twin):
        for p, g in zip(ps, _grads(ps, 7)):
            p.grad = g
    opt.step()
    twin_opt.step()
    quantized = 0
    for p, t in zip(params, twin):
        assert torch.equal(p, t)
        for s in info.fused.SPEC.states:
            if lowbit.codes_key(s.key) not in opt.state[p]:
                continue  # a small param (full precision: the same kernel) or an unused state
            codes, absmax = lowbit.quantize(twin_opt.state[t][s.key], lowbit.qmap(s.signed, "cpu", state_dtype),
                                            state_dtype)  # fmt: skip
            assert same(opt.state[p][lowbit.codes_key(s.key)], codes)
            assert torch.equal(opt.state[p][lowbit.absmax_key(s.key)], absmax)
            quantized += 1
    assert quantized or not any(info.fused.SPEC.used_states(info.fused.SPEC.hyper_values(opt.param_groups[0])))


# --- optimizer behaviour ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_threshold_uses_the_global_size(backend, state_dtype):
    params = [torch.zeros(4095, requires_grad=True), torch.zeros(64, 64, requires_grad=True)]
    opt = fusedopt.AdamW(params, backend=backend, state_dtype=state_dtype)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(opt.state[params[0]]) == ["exp_avg", "exp_avg_sq", "step"]
    assert sorted(opt.state[params[1]]) == ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax",
                                            "exp_avg_sq_codes", "step"]  # fmt: skip
    per_element = state_dtype != "int4"  # int8 and fp8: a code per element, blocks of 256
    assert opt.state[params[1]]["exp_avg_codes"].shape == ((64, 64) if per_element else (2048,))
    assert opt.state[params[1]]["exp_avg_codes"].dtype == lowbit.FORMATS[state_dtype].codes_dtype
    assert opt.state[params[1]]["exp_avg_absmax"].shape == ((16,) if per_element else (32,))


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_found_inf_leaves_codes(backend, state_dtype):
    params, opt = _run(next(i for i in ENGINE_DRIVEN if i.name == "Adam"), {"lr": 1e-2}, backend, torch.float32, 2,
                       state_dtype=state_dtype)  # fmt: skip
    before = copy.deepcopy({k: v for k, v in opt.state[params[0]].items()})
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    for k, v in before.items():
        assert same(opt.state[params[0]][k], v), k


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_non_contiguous_params(backend, state_dtype):
    base = torch.randn(100, 80)
    a = base.clone().t().requires_grad_()  # a transposed view's layout
    b = base.clone().t().contiguous().requires_grad_()
    opts = [fusedopt.Adam([x], lr=1e-2, backend=backend, state_dtype=state_dtype) for x in (a, b)]
    for _ in range(3):
        g = torch.randn(80, 100)
        a.grad, b.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert same(opts[0].state[a]["exp_avg_codes"], opts[1].state[b]["exp_avg_codes"])


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize(("info", "kw"), [(i, i.cases[0]) for i in Q8], ids=[i.name for i in Q8])
def test_state_dict_round_trips(info, kw, state_dtype):
    """quantized -> quantized resumes bit-exactly; quantized -> full precision (torch.optim's class where torch has
    it) via to_full_precision_state_dict; full precision -> quantized on load."""
    params, opt = _run(info, kw, "cpu", torch.float32, steps=3, state_dtype=state_dtype)
    sd = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = info.fused(resumed_params, backend="cpu", state_dtype=state_dtype, **kw)
    resumed.load_state_dict(sd)
    for p, q in zip(params, resumed_params):
        for k, v in opt.state[p].items():
            assert same(resumed.state[q][k], v) and resumed.state[q][k].dtype == v.dtype, k
    full = fusedopt.optim.to_full_precision_state_dict(opt)
    assert not any(k.endswith(("_codes", "_absmax")) for st in full["state"].values() for k in st)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin_cls = info.reference if info.reference.__module__.startswith("torch") else info.fused
    twin = twin_cls(twin_params, **kw)
    twin.load_state_dict(full)
    p0 = params[0]
    for s in info.fused.SPEC.states:
        if lowbit.codes_key(s.key) in opt.state[p0]:
            deq = _deq(opt.state[p0], s.key, s.signed, p0, state_dtype)
            assert torch.equal(twin.state[twin_params[0]][s.key], deq)
    back = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", state_dtype=state_dtype,
                      **kw)  # fmt: skip
    back.load_state_dict(twin.state_dict())  # full precision in, quantized on load: the same values, to the map's step
    fmt = lowbit.FORMATS[state_dtype]
    for s in info.fused.SPEC.states:
        ck, ak = lowbit.codes_key(s.key), lowbit.absmax_key(s.key)
        if ck in opt.state[p0]:
            st, bst = opt.state[p0], back.state[back.param_groups[0]["params"][0]]
            a, b = _deq(st, s.key, s.signed, p0, state_dtype), _deq(bst, s.key, s.signed, p0, state_dtype)
            absmax = st[ak].repeat_interleave(fmt.block)[: a.numel()].reshape(a.shape)
            bound = _max_error_bound(lowbit.qmap(s.signed, "cpu", state_dtype), absmax, state_dtype)
            assert ((a - b).abs() <= bound).all(), s.key
    plain = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", **kw)
    plain.load_state_dict(sd)  # a quantized state_dict into a full-precision optimizer: dequantized
    assert not _q8_state(plain, plain.param_groups[0]["params"][0])
    for s in info.fused.SPEC.states:
        if lowbit.codes_key(s.key) in opt.state[p0]:
            assert torch.equal(plain.state[plain.param_groups[0]["params"][0]][s.key],
                               _deq(opt.state[p0], s.key, s.signed, p0, state_dtype))  # fmt: skip


@pytest.mark.parametrize("state_dtype", FORMATS)
def test_resume_is_bit_exact(state_dtype):
    info = next(i for i in ENGINE_DRIVEN if i.name == "AdamW")
    params, _ = _run(info, {"lr": 1e-2}, "cpu", torch.float32, steps=6, state_dtype=state_dtype)
    other = _params(torch.float32)
    o2 = info.fused(other, backend="cpu", state_dtype=state_dtype, lr=1e-2)
    for s in range(3):
        for p, g in zip(other, _grads(other, s)):
            p.grad = g
        o2.step()
    o3 = info.fused(other, backend="cpu", state_dtype=state_dtype, lr=1e-2)
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    for s in range(3, 6):
        for p, g in zip(other, _grads(other, s)):
            p.grad = g
        o3.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def _mlp_and_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 1))  # fmt: skip
    return model, lambda x: x[:, :8].sin().sum(1, keepdim=True) + 0.1 * x[:, 8:].pow(2).mean(1, keepdim=True)


# int4 (torchao's 4-bit format; a plain-torch simulation of torchao's AdamW4bit measures the same) fits this full
# batch ~1.5x slower: after 300 steps from 3.5 its loss is 4.6e-4 against fp32's 3.6e-6, so "within 5%" of a loss
# near 0 cannot hold; it is held to within 1e-3 of it instead (test_streaming_quality and the GPT test hold it to 5%).
@pytest.mark.parametrize(("state_dtype", "slack", "atol"),
                         [("int8", 1.02, 1e-4), ("int4", 1.05, 1e-3), ("fp8", 1.02, 1e-4)])  # fmt: skip
def test_tiny_model_quality(state_dtype, slack, atol):
    """AdamW with int8 or fp8 states ends within 2% of float32 AdamW's loss on a small MLP fitting 512 points (full
    batch, the loss goes to ~0); int4 within 1e-3 of it (see above)."""
    losses = {}
    for sd in (None, state_dtype):
        model, target = _mlp_and_target()
        x = torch.randn(512, 32)
        y = target(x)
        opt = fusedopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, backend="cpu", state_dtype=sd)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses[sd] = torch.nn.functional.mse_loss(model(x), y).item()
        if sd is not None:
            assert any(k.endswith("_codes") for k in opt.state[model[2].weight])
    assert losses[state_dtype] <= losses[None] * slack + atol, losses


@pytest.mark.parametrize(("state_dtype", "slack"), [("int8", 1.02), ("int4", 1.05), ("fp8", 1.02)])
def test_streaming_quality(state_dtype, slack):
    """The same MLP and target trained as usual, on fresh mini-batches of 64 (the loss has a floor): after 300
    steps the held-out loss of AdamW with int8 or fp8 (int4) states is within 2% (5%) of float32 AdamW's
    (measured: int8 -0.3%, fp8 -0.7%, int4 +2.6%)."""
    losses = {}
    for sd in (None, state_dtype):
        model, target = _mlp_and_target()
        g = torch.Generator().manual_seed(1)
        held_out = torch.randn(2048, 32, generator=g)
        opt = fusedopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, backend="cpu", state_dtype=sd)
        for _ in range(300):
            x = torch.randn(64, 32, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), target(x)).backward()
            opt.step()
        with torch.no_grad():
            losses[sd] = torch.nn.functional.mse_loss(model(held_out), target(held_out)).item()
        if sd is not None:
            assert any(k.endswith("_codes") for k in opt.state[model[2].weight])
    assert losses[None] < 0.5 and losses[state_dtype] <= losses[None] * slack, losses


def _assert_loss_tracks(low: list, fp32: list, slack: float) -> None:
    """The low-bit run's loss curve within `slack` (relative) of float32's at every step and at the end."""
    assert fp32[-1] < 0.5 * fp32[0], "the run did not learn"
    assert abs(low[-1] - fp32[-1]) <= slack * fp32[-1], (low[-1], fp32[-1])
    assert max(abs(a - b) / b for a, b in zip(low, fp32)) <= slack
    assert low != fp32, "low-bit states changed nothing: were they used?"


GPT_SLACK = [("int8", 0.02), ("int4", 0.05), ("fp8", 0.02)]


@pytest.mark.parametrize(("state_dtype", "slack"), GPT_SLACK)
def test_gpt_finetune_quality(state_dtype, slack):
    """examples/finetune_gpt.py (its tiny GPT, 150 + 50 steps): int8 or fp8 (int4) AdamW's loss curve stays within
    2% (5%) of float32 AdamW's, to the final loss (measured: int8 2e-5 relative at the end, 4e-4 at worst; fp8
    2.3e-4, 1.6e-3; int4 2e-3, 8e-3)."""
    import gpt_quality

    fp32, _ = gpt_quality.train()
    low, opt = gpt_quality.train({"state_dtype": state_dtype})
    quantized = [p for p in opt.param_groups[0]["params"] if "exp_avg_codes" in opt.state[p]]
    assert len(quantized) == 4, "the tiny GPT's four 4096-element MLP weights should have low-bit states"
    _assert_loss_tracks(low, fp32, slack)


@pytest.mark.parametrize(("state_dtype", "slack"), GPT_SLACK)
def test_gpt_finetune_quality_muon(state_dtype, slack):
    """The same with MuonWithAdamW (the example's `--optimizer muon`), state_dtype on both halves: Muon's low-bit
    momentum on the four MLP weights (measured 2026-12-03: int8 1.5e-4 relative at the end, 1.2e-3 at worst; fp8
    1.4e-4, 3.0e-3; int4 1.8e-2, 2.2e-2)."""
    import gpt_quality

    fp32, _ = gpt_quality.train(optimizer="muon")
    low, opt = gpt_quality.train({"state_dtype": state_dtype}, optimizer="muon")
    muon = opt.muon
    quantized = [p for g in muon.param_groups for p in g["params"] if "momentum_buffer_codes" in muon.state[p]]
    assert len(quantized) == 4, "the tiny GPT's four 4096-element MLP weights should have low-bit momentum"
    _assert_loss_tracks(low, fp32, slack)


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_new_state_equals_the_quantized_constant_buffer(state_dtype):
    """A new 8/4-bit state is made from one quantized block (fast), and equals the quantizer's result on the whole
    constant buffer (zeros, or Adagrad's initial value), for sizes at and past the block and packing edges."""
    for shape in [(4096,), (4097,), (33, 130), (5000, 3)]:
        for cls, kw in [(fusedopt.AdamW, {}), (fusedopt.Adagrad, {"initial_accumulator_value": 0.37})]:
            for dtype in (torch.float32, torch.bfloat16):
                p = torch.nn.Parameter(torch.randn(shape).to(dtype))
                opt = cls([p], state_dtype=state_dtype, backend="cpu", **kw)
                group = opt.param_groups[0]
                for spec in opt.SPEC.states:
                    fast, slow = {}, {}
                    opt._new_q8_state(group, p, spec, fast)
                    opt._quantize_into(p, slow, spec, opt._new_state_buffer(group, p, spec), state_dtype)
                    assert fast.keys() == slow.keys()
                    for k in slow:
                        assert fast[k].dtype == slow[k].dtype and same(fast[k], slow[k]), (shape, cls, k)


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("master_weights", [False, True])
def test_adagrad_makes_low_bit_sums_one_at_a_time(state_dtype, master_weights, monkeypatch):
    """torch.optim.Adagrad's constructor makes every param's `sum` in full precision (torch.full_like); fusedopt makes
    each low-bit sum as torch sets it and drops torch's tensor, so no two of them are alive at once (all six were,
    until 2026-12-04: a model's size in float32 before quantizing). The states equal quantizing the constant buffer
    (a master's float32 fill beside bf16 params); a param under the low-bit size keeps torch's sum."""
    made, alive_when_made = [], []
    full_like = torch.full_like

    def recording_full_like(*args, **kwargs):
        alive_when_made.append(sum(ref() is not None for ref in made))
        t = full_like(*args, **kwargs)
        made.append(weakref.ref(t))
        return t

    dtype = torch.bfloat16 if master_weights else torch.float32
    params = [torch.nn.Parameter(torch.randn(4096 + 300 * i).to(dtype)) for i in range(6)]
    small = torch.nn.Parameter(torch.randn(100).to(dtype))
    monkeypatch.setattr(torch, "full_like", recording_full_like)
    groups = [{"params": params[:3]}, {"params": params[3:] + [small]}]  # the second group's sums as the first's
    opt = fusedopt.Adagrad(groups, state_dtype=state_dtype, initial_accumulator_value=0.37,
                           master_weights=master_weights, backend="cpu")  # fmt: skip
    monkeypatch.undo()
    # torch made each sum by full_like (the recording took), then a master's float32 sum for the small bf16 param
    assert len(made) == 7 + master_weights
    assert alive_when_made[:7] == [0] * 7
    spec = opt.SPEC.states[0]
    fill_dtype = torch.float32 if master_weights else dtype
    for p in params:
        want = {}
        opt._quantize_into(p, want, spec, torch.full(p.shape, 0.37, dtype=fill_dtype), state_dtype)
        assert opt.state[p].keys() == want.keys() | {"step"}
        for k in want:
            assert same(opt.state[p][k], want[k]), k
    assert same(opt.state[small]["sum"], torch.full(small.shape, 0.37, dtype=fill_dtype))
    assert type(opt.state) is collections.defaultdict and all(type(st) is dict for st in opt.state.values())
    for p in params + [small]:
        p.grad = torch.randn_like(p)
    opt.step()


def test_state_dict_post_hooks_see_the_returned_state_dict():
    """A user's state_dict post-hook (torch.optim's register_state_dict_post_hook) sees the state_dict as
    state_dict() returns it: the int4 codes one per element, the stochastic-rounding counters (both were added after
    the hooks had run, until 2026-12-03); and what a hook returns is what state_dict() returns, as in torch. The same
    after a deepcopy of the optimizer (torch's copies drop their hooks; fusedopt's own is registered again)."""
    params = [torch.randn(80, 64, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()]
    opt = fusedopt.AdamW(params, backend="cpu", state_dtype="int4", bf16_stochastic_round=True)
    for s in range(2):
        params[0].grad = _grads(params, s)[0]
        opt.step()
    for optimizer in (opt, copy.deepcopy(opt)):
        seen = []
        optimizer.register_state_dict_post_hook(lambda o, sd, seen=seen: seen.append(copy.deepcopy(sd)))
        returned = optimizer.state_dict()
        (hooked,) = seen
        assert hooked["state"][0]["exp_avg_codes"].shape == params[0].shape  # one code per element
        assert hooked["param_groups"][0][fusedopt.optim._base.ROUND_COUNTERS] == {"0:0": 2}
        assert same(hooked["state"][0]["exp_avg_codes"], returned["state"][0]["exp_avg_codes"])
        assert hooked["param_groups"] == returned["param_groups"]
        optimizer.register_state_dict_post_hook(lambda o, sd: {"replaced": True})
        assert optimizer.state_dict() == {"replaced": True}


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
def test_muon_low_bit_bad_input_as_torch(backend, state_dtype):
    """Muon's low-bit momentum on bad input, against torch.optim.Muon: a float64 param is refused at construction;
    a param resized after its state was made raises (torch raises too), saying so, and leaves the param as it was;
    its state deleted, it steps as new; a NaN grad makes the param NaN, as torch's step does."""
    with pytest.raises(ValueError, match="does not support float64 params"):
        fusedopt.optim.Muon([torch.zeros(80, 64, dtype=torch.float64, requires_grad=True)], state_dtype=state_dtype)
    ours, theirs = (torch.nn.Parameter(torch.randn(80, 64, generator=torch.Generator().manual_seed(0))) for _ in "ab")
    opts = (fusedopt.optim.Muon([ours], backend=backend, state_dtype=state_dtype), torch.optim.Muon([theirs]))
    for p, opt in zip((ours, theirs), opts):
        p.grad = _grads([p], 0)[0]
        opt.step()
        p.data = torch.randn(96, 64)
        p.grad = torch.randn(96, 64)
        before = p.detach().clone()
        with pytest.raises(RuntimeError, match=r"shape \[96, 64\] has state made for shape \[80, 64\]"
                           if p is ours else r"size"):  # fmt: skip
            opt.step()
        assert torch.equal(p.detach(), before)
    del opts[0].state[ours]  # as the message says: the state reset, the next step is a first step
    fresh = torch.nn.Parameter(ours.detach().clone())
    fresh.grad = ours.grad.clone()
    opts[0].step()
    fusedopt.optim.Muon([fresh], backend=backend, state_dtype=state_dtype).step()
    assert torch.equal(ours.detach(), fresh.detach())
    ours, theirs = (torch.nn.Parameter(torch.randn(80, 64)) for _ in "ab")
    opts = (fusedopt.optim.Muon([ours], backend=backend, state_dtype=state_dtype), torch.optim.Muon([theirs]))
    for p, opt in zip((ours, theirs), opts):
        p.grad = torch.full((80, 64), float("nan"))
        opt.step()
    assert ours.isnan().all() and theirs.isnan().all()
