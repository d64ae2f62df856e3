"""Errors of the low-bit states (docs/LOW_BIT_STATES.md): bad state_dtype values and params, the kernels' checks at
the op boundary, the optimizers that have no low-bit path, and loading a corrupt low-bit state_dict. Every
corruption is a ValueError at load that names what is wrong, into an optimizer of the same format, of another format
and of full precision, and in to_full_precision_state_dict. Before those checks some corruptions loaded and stepped
without an error: one absmax value broadcast over every block in a format conversion, int4 codes of another dtype
were packed as they were, a state without its codes started again from zero."""

from __future__ import annotations

import copy

import pytest
import torch
from gloo import same
from test_lowbit_states import FORMATS, Q8_BACKENDS, REFUSING

import fusedopt
from fusedopt import _backend, lowbit
from fusedopt.ops import optim_step

OTHER = {"int8": "int4", "int4": "fp8", "fp8": "int8"}
NUMEL = 5000  # 20 blocks of 256 (int8, fp8), 40 of 128 (int4)


def _stepped(state_dtype, steps=3):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(NUMEL, generator=g).requires_grad_()
    opt = fusedopt.AdamW([p], backend="cpu", state_dtype=state_dtype, amsgrad=True)
    for _ in range(steps):
        p.grad = torch.randn(NUMEL, generator=g)
        opt.step()
    return p, opt


def _set(key, make):
    def mutate(st):
        st[key] = make(st[key])

    return mutate


def _pop(key):
    return lambda st: st.pop(key)


def _int4_code_16(st):
    codes = st["exp_avg_codes"].clone()
    codes[7] = 16  # spills into the neighbour's nibble when packed
    st["exp_avg_codes"] = codes


def test_errors():
    for bad in ("int2", "fp16", "float8_e4m3fn", 8, "INT4"):
        with pytest.raises(ValueError, match="Invalid state_dtype"):
            fusedopt.Adam([torch.zeros(3, requires_grad=True)], state_dtype=bad)
    for state_dtype in FORMATS:
        with pytest.raises(ValueError, match="does not support float64 params"):
            fusedopt.AdamW([torch.zeros(5000, dtype=torch.float64, requires_grad=True)], state_dtype=state_dtype)
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
        # int4: int8-sized codes, and int8's absmax count (int4 blocks are 128: 3 values)
        with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] codes must be a contiguous torch.uint8 tensor of 150 "
                                               r"values \(two 4-bit codes per byte\)"):  # fmt: skip
            optim_step.step_q8(spec, [p], [g], [good[0], good[0], []], [[torch.zeros(3)]] * 2 + [[]],
                               [torch.zeros(())], lr=0.1, hyper=hyper, maximize=False, backend=backend,
                               state_dtype="int4")  # fmt: skip
        packed = [torch.zeros(150, dtype=torch.uint8)]
        with pytest.raises(RuntimeError, match=r"absmax must be .* of 3 values \(one per 128 elements\)"):
            optim_step.step_q8(spec, [p], [g], [packed, packed, []], [good[1], good[1], []], [torch.zeros(())],
                               lr=0.1, hyper=hyper, maximize=False, backend=backend, state_dtype="int4")  # fmt: skip
        with pytest.raises(RuntimeError, match=r"state_dtype must be 'int8', 'int4' or 'fp8', got 'int2'"):
            optim_step.op_for_q8(spec)([p], [g], packed, packed, [], [torch.zeros(3)], [torch.zeros(3)], [],
                                       [lowbit.qmap(True, "cpu", "int4")] * 3, "int2", [torch.zeros(())], 0.1, None,
                                       *optim_step._hyper_args(spec, hyper), False, None, None, False, None, [],
                                       backend)  # fmt: skip
    assert _backend.usable("cpu", "cpu")


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("info", REFUSING)
def test_optimizers_without_8bit_states_refuse_them(info, state_dtype):
    """LAMB (two-pass engine) and Adafactor (its own op) have no low-bit path: state_dtype raises, not ignored."""
    p = torch.zeros(5000, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        info.fused([p], backend="torch", state_dtype=state_dtype, **info.cases[0])


# --- corrupt state_dicts -------------------------------------------------------------------------------------------


# (name, mutation of param 0's state, the error's words); codes as the state_dict holds them (int4: one per element)
CORRUPTIONS = [
    ("codes-truncated", _set("exp_avg_codes", lambda c: c.reshape(-1)[:100].clone()), "match no format"),
    ("codes-doubled", _set("exp_avg_codes", lambda c: torch.cat([c.reshape(-1)] * 2)), "match no format"),
    ("codes-float32", _set("exp_avg_codes", lambda c: c.view(torch.uint8).float()),
     "codes must be torch.uint8|match no format"),
    ("absmax-one-value", _set("exp_avg_absmax", lambda a: a[:1].clone()), "absmax must be a 1-D torch.float32"),
    ("absmax-float64", _set("exp_avg_absmax", lambda a: a.double()), "absmax must be a 1-D torch.float32"),
    ("absmax-2d", _set("exp_avg_absmax", lambda a: a.view(1, -1)), "absmax must be a 1-D torch.float32"),
    ("absmax-missing", _pop("max_exp_avg_sq_absmax"), "has 'max_exp_avg_sq_codes' but no 'max_exp_avg_sq_absmax'"),
    ("codes-missing", _pop("exp_avg_sq_codes"), "has 'exp_avg_sq_absmax' but no 'exp_avg_sq_codes'"),
]
INT4_ONLY = [("int4-codes-int8", _set("exp_avg_codes", lambda c: c.view(torch.int8)), "must be torch.uint8 codes"),
             ("int4-code-16", _int4_code_16, "must be torch.uint8 codes 0..15")]  # fmt: skip
CASES = [(f, *c) for f in FORMATS for c in CORRUPTIONS] + [("int4", *c) for c in INT4_ONLY]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.mark.parametrize("target", ["same", "other", "full"])
@pytest.mark.parametrize(("state_dtype", "name", "mutate", "words"), CASES, ids=IDS)
def test_corrupt_state_is_refused_at_load(state_dtype, name, mutate, words, target):
    _, opt = _stepped(state_dtype)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd["state"][0])
    into = {"same": state_dtype, "other": OTHER[state_dtype], "full": None}[target]
    q = torch.zeros(NUMEL, requires_grad=True)
    fresh = fusedopt.AdamW([q], backend="cpu", state_dtype=into, amsgrad=True)
    with pytest.raises(ValueError, match=words):
        fresh.load_state_dict(sd)


# A state_dict alone does not record its params' sizes: int4 codes doubled to 10000 (one per element) with their 40
# absmax values are a well-formed int8 state of a 10000-element param (40 blocks of 256), so that one case is left to
# load_state_dict, which knows the param.
SELF_CONSISTENT = ("int4", "codes-doubled")
SD_CASES = [c for c in CASES if c[:2] != SELF_CONSISTENT]


@pytest.mark.parametrize(("state_dtype", "name", "mutate", "words"), SD_CASES,
                         ids=[i for c, i in zip(CASES, IDS) if c[:2] != SELF_CONSISTENT])  # fmt: skip
def test_corrupt_state_is_refused_by_to_full_precision(state_dtype, name, mutate, words):
    _, opt = _stepped(state_dtype)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd["state"][0])
    with pytest.raises(ValueError, match=words.replace("match no format", "absmax must|match no format")):
        fusedopt.optim.to_full_precision_state_dict(sd)


@pytest.mark.parametrize("state_dtype", FORMATS)
def test_wrong_sized_full_precision_state_is_refused(state_dtype):
    """A torch.optim state_dict whose exp_avg does not fit the param: refused where it is quantized on load (torch
    itself would fail at the next step's arithmetic)."""
    p = torch.zeros(NUMEL, requires_grad=True)
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.ones(NUMEL)
    torch_opt.step()
    sd = copy.deepcopy(torch_opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:4000].clone()
    fresh = fusedopt.AdamW([torch.zeros(NUMEL, requires_grad=True)], backend="cpu", state_dtype=state_dtype)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of shape \[4000\] does not fit its param of shape \[5000\]"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("state_dtype", FORMATS)
def test_non_contiguous_codes_load_as_contiguous(state_dtype):
    """Codes that are a strided view (a checkpoint tool's transpose, say) load and step as their contiguous copy."""
    p, opt = _stepped(state_dtype)
    sd = copy.deepcopy(opt.state_dict())
    strided = copy.deepcopy(sd)
    codes = strided["state"][0]["exp_avg_codes"]
    strided["state"][0]["exp_avg_codes"] = torch.stack([codes, codes], dim=-1)[..., 0]
    assert not strided["state"][0]["exp_avg_codes"].is_contiguous()
    runs = []
    for state in (sd, strided):
        q = p.detach().clone().requires_grad_()
        fresh = fusedopt.AdamW([q], backend="cpu", state_dtype=state_dtype, amsgrad=True)
        fresh.load_state_dict(state)
        q.grad = torch.linspace(-1, 1, NUMEL)
        fresh.step()
        runs.append((q.detach(), dict(fresh.state[q])))
    assert same(runs[0][0], runs[1][0])
    for k, v in runs[0][1].items():
        assert same(runs[1][1][k], v), k


def test_dequantize_refuses_a_broadcasting_absmax():
    """The plain-torch definition validates at its own boundary too: one absmax for 20 blocks would broadcast."""
    table = lowbit.qmap(True, "cpu", "int8")
    codes, absmax = lowbit.quantize(torch.randn(NUMEL), table, "int8")
    assert lowbit.dequantize(codes, absmax, table).shape == (NUMEL,)
    with pytest.raises(ValueError, match=r"absmax must be a 1-D torch\.float32 tensor of 20 values"):
        lowbit.dequantize(codes, absmax[:1], table)
    with pytest.raises(ValueError, match=r"int8 codes must be torch\.uint8"):
        lowbit.dequantize(codes.float(), absmax, table)


def test_fsdp2_shard_refuses_an_int4_code_above_15():
    """An FSDP2 (DTensor) param loads its shard's codes from the global form (_lowbit_shards.from_global_form): a
    code above 15 in its range is refused there too, before it is packed. On a fake group, with the whole tensors of
    a 1-rank checkpoint, so no collective runs."""
    from test_lowbit_distributed import one_element_shard_optimizer

    from fusedopt.optim import _lowbit_shards as shards

    with one_element_shard_optimizer("int4") as (_, p):
        absmax = torch.ones(lowbit.num_blocks(p.numel(), "int4"))
        codes = torch.full(p.shape, 3, dtype=torch.uint8)
        shards.from_global_form(p, codes, absmax, True)  # a well-formed state loads
        codes[0] = 16  # rank 0's element
        with pytest.raises(ValueError, match=r"int4 codes must be torch\.uint8 codes 0\.\.15"):
            shards.from_global_form(p, codes, absmax, True)
