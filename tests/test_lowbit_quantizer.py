"""The block-wise quantizer (fusedopt/lowbit.py, docs/LOW_BIT_STATES.md), int8 and int4: the maps, the round trip
of each block, non-finite values, int4's packing, every fused backend's quantizer against the definition, bit for
bit, and a checkpoint of one format loaded by an optimizer of the other. The optimizers' low-bit states are tested in
tests/test_lowbit_states.py."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_db import ENGINE_DRIVEN
from test_lowbit_states import FORMATS, Q8_BACKENDS, _deq, _max_error_bound, _run, codes_of

import fusedopt
from fusedopt import lowbit
from fusedopt.ops import optim_step


def test_specs_name_their_second_moments_unsigned():
    """The unsigned map (no sign, twice the resolution) is for states that are never negative."""
    unsigned = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}
    for info in ENGINE_DRIVEN:
        for s in info.fused.SPEC.states:
            assert s.signed == (s.key not in unsigned), (info.name, s.key)


def test_int8_maps():
    for signed in (True, False):
        table = lowbit.qmap(signed, "cpu")
        values, mid = table[:256], table[256:512]
        assert torch.all(values[1:] > values[:-1]) and values[-1] == 1.0 and (values == 0).sum() == 1
        assert (-1 < values[0] < -0.99) if signed else values[0] == 0
        assert torch.all((mid[:-1] > values[:-1]) & (mid[:-1] < values[1:])) and mid[-1].isnan()
    assert lowbit.qmap(False, "cpu")[1] < lowbit.qmap(True, "cpu")[129]  # unsigned: finer near 0


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [0, 1, 127, 128, 129, 255, 256, 257, 4096, 10001])
def test_round_trip_error_per_block(signed, numel, state_dtype):
    fmt = lowbit.FORMATS[state_dtype]
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * torch.logspace(-6, 2, max(numel, 1))[:numel]
    x = x if signed else x.abs()
    table = lowbit.qmap(signed, "cpu", state_dtype)
    codes, absmax = lowbit.quantize(x, table, state_dtype)
    assert codes.shape == ((numel,) if fmt.bits == 8 else (-(-numel // 2),)) and codes.dtype == fmt.codes_dtype
    assert absmax.shape == (lowbit.num_blocks(numel, state_dtype),)
    y = lowbit.dequantize(codes, absmax, table, state_dtype=state_dtype, shape=x.shape)
    for b in range(lowbit.num_blocks(numel, state_dtype)):
        blk = slice(b * fmt.block, (b + 1) * fmt.block)
        assert absmax[b] == x[blk].abs().max()
        assert (y[blk] - x[blk]).abs().max() <= _max_error_bound(table, absmax[b], state_dtype)
        if state_dtype == "int8":
            big = x[blk].abs() > absmax[b] * 0.1  # the top decade: within ~0.7% of the block's largest value
            assert ((y[blk] - x[blk]).abs() <= absmax[b] * 0.0071)[big].all()
    # Requantizing a dequantized block keeps its codes where the block's largest |value| is positive (the maps hold
    # 1, not -1: a block led by a negative value is rescaled).
    again = codes_of(lowbit.quantize(y, table, state_dtype)[0], x, state_dtype)
    first = codes_of(codes, x, state_dtype)
    for b in range(lowbit.num_blocks(numel, state_dtype)):
        blk = slice(b * fmt.block, (b + 1) * fmt.block)
        if x[blk][x[blk].abs().argmax()] > 0:
            assert torch.equal(again[blk], first[blk]), b


@pytest.mark.parametrize("state_dtype", FORMATS)
def test_zeros_nan_inf_stay_in_their_block(state_dtype):
    n = lowbit.FORMATS[state_dtype].block
    table = lowbit.qmap(True, "cpu", state_dtype)
    x = torch.randn(4 * n)
    x[:n] = 0.0
    x[n + 44] = float("nan")
    x[2 * n + 60] = float("inf")
    codes, absmax = lowbit.quantize(x, table, state_dtype)
    y = lowbit.dequantize(codes, absmax, table, state_dtype=state_dtype, shape=x.shape)
    assert absmax[0] == 0 and torch.all(y[:n] == 0)
    assert absmax[1].isnan() and y[n : 2 * n].isnan().all()  # a NaN makes its own block NaN
    assert absmax[2] == float("inf") and not y[2 * n : 3 * n].isfinite().any()  # an inf too: 0 * inf, -inf
    assert torch.isfinite(y[3 * n :]).all()
    assert (y[3 * n :] - x[3 * n :]).abs().max() <= _max_error_bound(table, absmax[3], state_dtype)


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_kernel_quantizer_is_the_definition(backend, state_dtype):
    """SGD with momentum 1, dampening 0, a zero grad and lr 0 leaves the state's values as they are: the kernel then
    requantizes dequantized values, which must give what lowbit.quantize gives, bit for bit (NaN, inf, zero and
    tail blocks included; 5001 elements: int4's last byte holds one code)."""
    _check_kernel_quantizer(backend, state_dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernel_quantizer_is_the_definition(backend, state_dtype):
    """The same on a GPU, for the cuda and triton kernels (scripts/gpu_check.sh runs the gpu tests)."""
    _check_kernel_quantizer(backend, state_dtype, "cuda")


def _check_kernel_quantizer(backend, state_dtype, device):
    fmt = lowbit.FORMATS[state_dtype]
    table = lowbit.qmap(True, "cpu", state_dtype)
    n = 5001
    p = torch.zeros(n)
    x = torch.randn(n) * torch.logspace(-5, 1, n)
    x[:256] = 0.0
    x[300], x[700], x[n - 1] = float("nan"), float("inf"), -3.0
    codes, absmax = lowbit.quantize(x, table, state_dtype)
    shift = torch.randint(-3, 4, (n,))  # not a fixed point
    if state_dtype == "fp8":  # signed magnitudes (codes_of) back to float8_e4m3fn bits, 127 (NaN) excluded
        m = (codes_of(codes, p, state_dtype) + shift).clamp(-126, 126)
        perturbed = torch.where(m < 0, 128 - m, m).to(torch.uint8).view(torch.float8_e4m3fn)
    else:
        perturbed = (codes_of(codes, p, state_dtype) + shift).clamp(0, fmt.levels - 1)
        perturbed = lowbit.pack4(perturbed) if state_dtype == "int4" else perturbed.to(torch.uint8)
    # the kernel's buf * 1 + 0 * 1 turns a -0.0 into +0.0 (fp8 codes keep the sign of zero)
    held = lowbit.dequantize(perturbed, absmax, table, state_dtype=state_dtype, shape=p.shape) + 0.0
    want = lowbit.quantize(held, table, state_dtype)
    hyper = {"momentum": 1.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    got_codes, got_absmax, p = perturbed.to(device), absmax.to(device), p.to(device)
    optim_step.step_q8(fusedopt.optim.sgd.SPEC, [p], [torch.zeros_like(p)], [[got_codes]], [[got_absmax]], [],
                       lr=0.0, hyper=hyper, maximize=False, backend=backend, state_dtype=state_dtype)  # fmt: skip
    assert torch.equal(got_codes.cpu().view(torch.uint8), want[0].view(torch.uint8))
    torch.testing.assert_close(got_absmax.cpu(), want[1], rtol=0, atol=0, equal_nan=True)


def test_int4_maps_are_torchaos():
    """int4 (Li et al. 2023, as torchao's AdamW4bit): first moments the signed dynamic map with 3 decades (per decade
    10^(k-2), k = 0..2, the midpoints of 2^k equal steps of [0.1, 1], each sign; plus 0 and 1), second moments the
    linear map j / 16, j = 1..16, without zero."""
    signed = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    want = torch.tensor(sorted([0.0, 1.0, *signed, *(-v for v in signed)]))
    torch.testing.assert_close(lowbit.qmap(True, "cpu", "int4")[:16], want, rtol=0, atol=1e-7)
    torch.testing.assert_close(lowbit.qmap(False, "cpu", "int4")[:16], torch.arange(1, 17) / 16, rtol=0, atol=0)
    for s in (True, False):
        table = lowbit.qmap(s, "cpu", "int4")
        values, mid = table[:16], table[16:32]
        assert table.numel() == lowbit.FORMATS["int4"].table_size == 32
        assert torch.all((mid[:-1] > values[:-1]) & (mid[:-1] < values[1:])) and mid[-1].isnan()
    assert lowbit.FORMATS["int4"].block == 128 and lowbit.FORMATS["int8"].block == 256


def test_int4_packing_and_search():
    """Element 2j in the high nibble of byte j, 2j + 1 in the low one, an odd tail's low nibble 0; the binary search
    is the count of midpoints reached (NaN: 0, -inf: 0, inf: 15)."""
    codes = torch.tensor([1, 2, 15, 0, 7])
    assert lowbit.pack4(codes).tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(lowbit.unpack4(lowbit.pack4(codes), 5), codes)
    table = lowbit.qmap(True, "cpu", "int4")
    x = torch.cat([torch.linspace(-1.2, 1.2, 2001), torch.tensor([float("nan"), -float("inf"), float("inf")])])
    count = (x[:, None] >= table[16:31][None, :]).sum(1)
    assert torch.equal(lowbit._search(x, table[16:32], 16), count)
    assert count[-3:].tolist() == [0, 0, 15]
    with pytest.raises(ValueError, match="cannot hold a state of shape"):
        lowbit.dequantize(torch.zeros(10, dtype=torch.uint8), torch.zeros(1), table, state_dtype="int4", shape=(30,))


@pytest.mark.parametrize(("saved", "loaded"), [("int8", "int4"), ("int4", "int8"), ("fp8", "int4"), ("int4", "fp8")])
def test_loading_the_other_format_converts(saved, loaded):
    """The optimizer's state_dtype wins: a checkpoint of the other format is dequantized and requantized on load
    (within the loaded map's step); int4's state_dict holds a code per element (to_full_precision_state_dict needs
    the optimizer only for an earlier version's packed codes, which still load)."""
    info = next(i for i in ENGINE_DRIVEN if i.name == "AdamW")
    params, opt = _run(info, {"lr": 1e-2}, "cpu", torch.float32, steps=3, state_dtype=saved)
    other = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", state_dtype=loaded,
                       lr=1e-2)  # fmt: skip
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.param_groups[0]["state_dtype"] == loaded
    fmt = lowbit.FORMATS[loaded]
    for p, q in zip(params, other.param_groups[0]["params"]):
        for s in info.fused.SPEC.states:
            if lowbit.codes_key(s.key) not in opt.state[p]:
                continue
            st = other.state[q]
            assert st[lowbit.codes_key(s.key)].numel() == fmt.codes_numel(p.numel())
            a, b = _deq(opt.state[p], s.key, s.signed, p, saved), _deq(st, s.key, s.signed, q, loaded)
            absmax = st[lowbit.absmax_key(s.key)].repeat_interleave(fmt.block)[: p.numel()].reshape(p.shape)
            assert ((a - b).abs() <= _max_error_bound(lowbit.qmap(s.signed, "cpu", loaded), absmax, loaded)).all()
    for sd in (opt, other):
        full = fusedopt.optim.to_full_precision_state_dict(sd)
        assert full["state"][0]["exp_avg"].shape == params[0].shape
    int4_opt = opt if saved == "int4" else other
    int4_sd = int4_opt.state_dict()  # int4 codes one per element, of the param's shape (the FSDP2 global form)
    assert int4_sd["state"][0]["exp_avg_codes"].shape == (80, 64)
    assert int4_opt.state[int4_opt.param_groups[0]["params"][0]]["exp_avg_codes"].shape == (80 * 64 // 2,)
    from_sd = fusedopt.optim.to_full_precision_state_dict(int4_sd)["state"][0]["exp_avg"]
    assert torch.equal(from_sd, fusedopt.optim.to_full_precision_state_dict(int4_opt)["state"][0]["exp_avg"])
    packed = copy.deepcopy(int4_sd)  # an earlier version's: packed codes, which do not record the shape
    packed["state"][0]["exp_avg_codes"] = lowbit.pack4(packed["state"][0]["exp_avg_codes"])
    with pytest.raises(ValueError, match="pass the optimizer, not its state_dict"):
        fusedopt.optim.to_full_precision_state_dict(packed)
    resumed = info.fused([p.detach().clone().requires_grad_() for p in params], backend="cpu", state_dtype="int4",
                         lr=1e-2)  # fmt: skip
    resumed.load_state_dict(packed)  # and it still loads
    assert torch.equal(resumed.state[resumed.param_groups[0]["params"][0]]["exp_avg_codes"],
                       int4_opt.state[int4_opt.param_groups[0]["params"][0]]["exp_avg_codes"])  # fmt: skip
    int8_opt = other if saved == "int4" else opt  # or fp8: codes of the param's shape
    assert fusedopt.optim.to_full_precision_state_dict(int8_opt.state_dict())["state"][0]["exp_avg"].shape == (80, 64)


@pytest.mark.parametrize(("state_dtype", "param_mode"),
                         [(f, "fp32") for f in FORMATS] + [("int8", "rounding"), ("int8", "master"),
                                                           ("int4", "remainder")])  # fmt: skip
def test_q8_op_passes_opcheck(state_dtype, param_mode):
    """fusedopt::adam_step_q8's schema (`str state_dtype`, `Tensor? stochastic_round` and the mutated `masters`
    included), fake kernel and aliasing, for each format, with bf16 params stored by stochastic rounding, and with
    float32 masters or int16 remainders."""
    spec = fusedopt.optim.adam.SPEC
    fmt = lowbit.FORMATS[state_dtype]
    dtype = torch.float32 if param_mode == "fp32" else torch.bfloat16
    params = [torch.randn(5000, dtype=dtype), torch.randn(300, dtype=dtype)]
    masters = {"master": [p.float() for p in params],
               "remainder": [torch.randint(-2**15, 2**15, p.shape, dtype=torch.int16) for p in params]}  # fmt: skip
    codes, absmax = [], []
    for s in spec.states:
        pairs = [lowbit.quantize(torch.rand(p.shape) * (1 if not s.signed else 2) - (1 if s.signed else 0),
                                 lowbit.qmap(s.signed, "cpu", fmt), fmt) for p in params]  # fmt: skip
        codes.append([c for c, _ in pairs])
        absmax.append([a for _, a in pairs])
    qmaps = [lowbit.qmap(s.signed, "cpu", fmt) for s in spec.states]
    hyper = [True if h in spec.flags else 0.1 for h in spec.hyper]  # amsgrad on: every state list in use
    args = (params, [torch.randn(p.shape, dtype=dtype) for p in params], *codes, *absmax, qmaps, fmt.name,
            [torch.zeros(()) for _ in params], 0.01, None, *hyper, False, None, None, False,
            torch.tensor([3, 4]) if param_mode == "rounding" else None, masters.get(param_mode, []),
            "cpu")  # fmt: skip
    optim_step.op_for_q8(spec)  # registered on first use
    # opcheck's schema check compares tensors with ops float8 lacks (mul): fp8 runs the other checks; the schema's
    # mutation annotations are the same for every format and checked with int8 and int4
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    kw = {"test_utils": utils} if state_dtype == "fp8" else {}
    result = torch.library.opcheck(getattr(torch.ops.fusedopt, f"{spec.op}_step_q8").default, args, **kw)
    assert set(result.values()) == {"SUCCESS"} and len(result) >= 3, result
