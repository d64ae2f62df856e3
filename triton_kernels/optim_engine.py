"""The Triton optimizer engine for the spec-driven optimizers (fusedopt/optim/_spec.py): the checks, contiguous
copies, the table [params, grads, states..., scalars], the step prologue or the first-step flags' epilogue, the
hyperparameter tensor (lr first, then the op module's HYPER names, filled by name; a bool as 0/1) and the launch.
In the kernel, `load_grad` does the engine's part of the grad (divisor, write-back, maximize); the op's kernel holds
only its loads, math and stores. An op module turns its bool options into constexprs and tells the engine which
state lists they use (Adam's max_exp_avg_sqs only with AMSGRAD).

Every op kernel takes the ENGINE arguments first, in this order: addrs_ptr, numel_ptr, block_tensor_ptr,
block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr, sr_ptr, and the constexprs DTYPE, OPMATH,
MAXIMIZE, HAS_DIVISOR, HAS_FOUND_INF, WRITE_BACK_GRADS, BLOCK, STOCHASTIC_ROUND, then its own constexprs, and
QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0, STATE_DTYPE: tl.constexpr = None last (the launch always
passes STATE_DTYPE, the state lists' dtype). It reads the param with `load_param` and writes it with `commit_param`
(bf16 stochastic rounding when asked; master weights: docs/MASTER_WEIGHTS.md, MASTER 1 a float32 master, 2 an int16
remainder, in the table's last row), both given QUANT to find that row.

int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): an op kernel reads and writes each state through `load_state` /
`store_state`, which with QUANT (Q_INT8, Q_INT4 or Q_FP8; 0 for full precision) dequantize the codes and
requantize per 256- or 128-element block (tl.max over the values reshaped to (BLOCK // block, block)). The table
then holds [params, grads, codes..., scalars, absmax..., maps...(, masters)], one row each per state (the map's
address repeated per tensor): `launch(..., q8=(absmax, maps, state_dtype))` builds it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    opmath,
    scalars_tensor,
    update_scalars,
)

BLOCK = 1024  # a multiple of QUANT_BLOCK and INT4_BLOCK
QUANT_BLOCK: tl.constexpr = 256  # int8's values per absmax
INT4_BLOCK: tl.constexpr = 128  # int4's
Q_INT8: tl.constexpr = 1  # the QUANT constexpr of each state_dtype
Q_INT4: tl.constexpr = 2
Q_FP8: tl.constexpr = 3
QUANT_IDS = {"int8": 1, "int4": 2, "fp8": 3}
ROW_PARAM, ROW_GRAD, ROW_FIRST_STATE = 0, 1, 2
SCALAR_LISTS = {"step": "steps", "first_flag": "first_flags"}  # as fusedopt/optim/_spec.py


@triton.jit
def list_ptr(addrs_ptr, row, n_tensors, t, DTYPE: tl.constexpr):
    """Tensor t's address in list `row` of the table, as a typed pointer."""
    return tl.load(addrs_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
              HAS_DIVISOR: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, MAXIMIZE: tl.constexpr):  # fmt: skip
    """The grad in opmath: divided by the grad divisor (GradScaler / folded clip), stored back when GradScaler asks
    for the unscaled grad, negated under maximize."""
    g_ptr = list_ptr(addrs_ptr, ROW_GRAD, n_tensors, t, DTYPE)
    grad = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    if HAS_DIVISOR:
        grad = grad * (1.0 / tl.load(grad_divisor_ptr).to(tl.float64)).to(OPMATH)
    if WRITE_BACK_GRADS:
        tl.store(g_ptr + offs, grad.to(DTYPE), mask=mask)
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def load_state(addrs_ptr, n_tensors, t, offs, mask, row, n_states, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
               QUANT: tl.constexpr):  # fmt: skip
    """State row `row` in opmath: loaded, or (QUANT: int8 / int4 / fp8) map[code] * absmax of its block (256 or
    128 elements); int4 codes two per byte, the even element in the high nibble; fp8 codes read as int8's, through
    the map of their values."""
    if QUANT:
        codes_ptr = list_ptr(addrs_ptr, row, n_tensors, t, tl.uint8)
        absmax_ptr = list_ptr(addrs_ptr, row + n_states + 1, n_tensors, t, tl.float32)
        if QUANT == Q_INT4:
            byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
            codes = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
            absmax = tl.load(absmax_ptr + offs // INT4_BLOCK, mask=mask, other=0.0)
        else:
            codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(absmax_ptr + offs // QUANT_BLOCK, mask=mask, other=0.0)
        table = list_ptr(addrs_ptr, row + 2 * n_states + 1, n_tensors, t, tl.float32)
        value = (tl.load(table + codes, mask=mask, other=0.0) * absmax).to(OPMATH)
    else:
        value = tl.load(list_ptr(addrs_ptr, row, n_tensors, t, DTYPE) + offs, mask=mask).to(OPMATH)
    return value


@triton.jit
def _e4m3fn_code(y):
    """The float8_e4m3fn bits of y (|y| <= 448) to nearest even, NaN 0: csrc/common/quant_format.h's integer
    steps (the interpreter has no float8 conversion, and no fused multiply-add may touch the rounding)."""
    bits = y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    abs_bits = bits & 0x7FFFFFFF
    normal = ((abs_bits + 0x7FFFF + ((abs_bits >> 20) & 1)) >> 20) - (120 << 3)
    significand = (abs_bits & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - (abs_bits >> 23), 25)
    subnormal = (significand + (1 << (shift - 1)) - 1 + ((significand >> shift) & 1)) >> shift
    code = tl.minimum(tl.where(abs_bits >= 0x3C800000, normal, subnormal), 0x7E) | ((bits >> 24) & 0x80)
    return tl.where(abs_bits > 0x7F800000, 0, code).to(tl.int32)


@triton.jit
def _quantize_blocks(addrs_ptr, n_tensors, t, offs, mask, row, n_states, value, BLOCK: tl.constexpr,
                     QBLOCK: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr = False):  # fmt: skip
    """Stores each QBLOCK-element block's absmax (NaN if a value is NaN) and returns every value's code (int32,
    (BLOCK,)): #{j : value / absmax >= mid[j]} by the branchless binary search of fusedopt/lowbit.py, or (FP8) the
    float8_e4m3fn of value / absmax * 448."""
    QB: tl.constexpr = BLOCK // QBLOCK
    v = tl.reshape(tl.where(mask, value.to(tl.float32), 0.0), (QB, QBLOCK))
    has_nan = tl.max(tl.where(v != v, 1, 0), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), tl.max(tl.where(v != v, 0.0, tl.abs(v)), axis=1))
    x = v / tl.where(absmax > 0, absmax, 1.0)[:, None]
    if FP8:
        code = _e4m3fn_code(x * 448.0)
    else:
        mid = list_ptr(addrs_ptr, row + 2 * n_states + 1, n_tensors, t, tl.float32) + (1 << BITS)  # after the values
        code = tl.zeros((QB, QBLOCK), dtype=tl.int32)
        for i in tl.static_range(BITS):
            code += tl.where(x >= tl.load(mid + code + ((1 << (BITS - 1 - i)) - 1)), 1 << (BITS - 1 - i), 0)
    block_valid = tl.max(tl.reshape(mask.to(tl.int32), (QB, QBLOCK)), axis=1) > 0
    block_index = tl.min(tl.reshape(offs, (QB, QBLOCK)), axis=1) // QBLOCK
    absmax_ptr = list_ptr(addrs_ptr, row + n_states + 1, n_tensors, t, tl.float32)
    tl.store(absmax_ptr + block_index, absmax, mask=block_valid)
    return tl.reshape(code, (BLOCK,))


@triton.jit
def store_state(addrs_ptr, n_tensors, t, offs, mask, row, n_states, value, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                QUANT: tl.constexpr):  # fmt: skip
    """State row `row` <- value: stored, or (QUANT) quantized per block (_quantize_blocks); int4 codes packed two per
    byte (a missing last element's nibble 0)."""
    if QUANT == Q_INT4:
        code = _quantize_blocks(addrs_ptr, n_tensors, t, offs, mask, row, n_states, value, BLOCK, INT4_BLOCK, 4)
        pair = tl.reshape(tl.where(mask, code, 0), (BLOCK // 2, 2))
        nibble_weight = tl.where(tl.arange(0, 2) == 0, 16, 1)[None, :]
        byte = tl.sum(pair * nibble_weight, axis=1)
        byte_offs = tl.min(tl.reshape(offs, (BLOCK // 2, 2)), axis=1) // 2
        byte_mask = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK // 2, 2)), axis=1) > 0
        tl.store(list_ptr(addrs_ptr, row, n_tensors, t, tl.uint8) + byte_offs, byte.to(tl.uint8), mask=byte_mask)
    elif QUANT:
        code = _quantize_blocks(addrs_ptr, n_tensors, t, offs, mask, row, n_states, value, BLOCK, QUANT_BLOCK, 8,
                                QUANT == Q_FP8)  # fmt: skip
        tl.store(list_ptr(addrs_ptr, row, n_tensors, t, tl.uint8) + offs, code.to(tl.uint8), mask=mask)
    else:
        tl.store(list_ptr(addrs_ptr, row, n_tensors, t, DTYPE) + offs, value.to(DTYPE), mask=mask)


@triton.jit
def _mix32(x):
    """csrc/common/stochastic_round.h's mix32, on int64 holding uint32 values (products wrap; masks keep 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def store_param(p_ptr, offs, mask, param, t, sr_ptr, DTYPE: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr):
    """The updated param, rounded to DTYPE; with STOCHASTIC_ROUND (bf16 params) rounded stochastically, the bits of
    csrc/common/stochastic_round.h: sr_ptr holds int64 [seed, counter], t is the tensor's position in the call."""
    if STOCHASTIC_ROUND:
        seed = tl.load(sr_ptr)
        counter = tl.load(sr_ptr + 1)
        seed_mix = (seed & 0xFFFFFFFF) ^ _mix32((seed >> 32) & 0xFFFFFFFF)
        key = _mix32(seed_mix ^ _mix32((counter + 0x9E3779B9 * (t.to(tl.int64) + 1)) & 0xFFFFFFFF))
        x = param.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        r = _mix32(key ^ (offs & 0xFFFFFFFF) ^ _mix32(offs >> 32))
        rounded = ((bits + (r & 0xFFFF)) >> 16) & 0xFFFF
        rounded = tl.where(x != x, ((bits >> 16) | 0x40) & 0xFFFF, rounded)  # NaN stays NaN
        tl.store(p_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(p_ptr + offs, param.to(DTYPE), mask=mask)


@triton.jit
def _master_row(n_states, QUANT: tl.constexpr):
    """After the scalars; with low-bit states after the absmax and map rows."""
    if QUANT:
        row = ROW_FIRST_STATE + 3 * n_states + 1
    else:
        row = ROW_FIRST_STATE + n_states + 1
    return row


@triton.jit
def _rounded_bits(x, DTYPE: tl.constexpr):
    """float32 x rounded to the 16-bit param dtype, as its bits (int64): bf16 to nearest even by the bits (the
    interpreter's cast truncates), a NaN kept quiet; fp16 by the cast."""
    if tl.bfloat16 == DTYPE:
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        return tl.where(x != x, ((bits >> 16) | 0x40) & 0xFFFF, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
    return x.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF


@triton.jit
def load_param(addrs_ptr, n_tensors, t, offs, mask, n_states, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
               MASTER: tl.constexpr, QUANT: tl.constexpr):  # fmt: skip
    """The param in opmath: loaded, or (MASTER 1) its float32 master, or (MASTER 2) the bf16 param joined with its
    int16 remainder (csrc/common/master_bits.h: (param bits << 16) + remainder, 32-bit wrap-around; a param changed
    outside the optimizer is taken as it is, as there)."""
    p_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    m_row = _master_row(n_states, QUANT)
    if MASTER != 0:
        high = tl.load(p_ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0).to(tl.int64) & 0xFFFF
    if MASTER == 1:  # the param where it no longer is the master rounded (changed outside the optimizer)
        master = tl.load(list_ptr(addrs_ptr, m_row, n_tensors, t, tl.float32) + offs, mask=mask, other=0.0)
        if tl.bfloat16 == DTYPE:
            param = (high << 16).to(tl.uint32).to(tl.float32, bitcast=True)
        else:
            param = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        left = (high != _rounded_bits(master, DTYPE)) & ~((param != param) & (master != master))
        value = tl.where(left, param, master)
    elif MASTER == 2:  # a zero param with a negative remainder, or an infinite one with a positive: the param
        low = tl.load(list_ptr(addrs_ptr, m_row, n_tensors, t, tl.int16) + offs, mask=mask, other=0).to(tl.int64)
        alone = (((high & 0x7FFF) == 0) & (low < 0)) | (((high & 0x7FFF) == 0x7F80) & (low > 0))
        bits = tl.where(alone, high << 16, ((high << 16) + low) & 0xFFFFFFFF)
        value = bits.to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        value = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    return value


@triton.jit
def commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, n_states, DTYPE: tl.constexpr,
                 STOCHASTIC_ROUND: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr):  # fmt: skip
    """The updated param: store_param's, or (MASTER 1) to the master and the param rounded to nearest even, or
    (MASTER 2) split into the bf16 param (rounded half away from zero) and its remainder; a NaN gives a quiet NaN
    param and remainder 0 (csrc/common/master_bits.h)."""
    p_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    if MASTER == 0:
        store_param(p_ptr, offs, mask, param, t, sr_ptr, DTYPE, STOCHASTIC_ROUND)
    else:
        x = param.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        nan_bits = ((bits >> 16) | 0x40) & 0xFFFF
        m_row = _master_row(n_states, QUANT)
        if MASTER == 1:
            tl.store(list_ptr(addrs_ptr, m_row, n_tensors, t, tl.float32) + offs, x, mask=mask)
            if tl.bfloat16 == DTYPE:
                high = _rounded_bits(x, DTYPE)
                tl.store(p_ptr + offs, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
            else:
                tl.store(p_ptr + offs, x.to(DTYPE), mask=mask)
        else:
            high = ((bits + 0x8000) >> 16) & 0xFFFF
            low = tl.where(x != x, 0, bits - (high << 16))
            high = tl.where(x != x, nan_bits, high)
            tl.store(p_ptr + offs, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
            tl.store(list_ptr(addrs_ptr, m_row, n_tensors, t, tl.int16) + offs, low.to(tl.int16), mask=mask)


@triton.jit
def sign(x):
    """-1, 0 or 1; NaN stays NaN (see csrc/common/value_ops.h)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


def launch(kernel, spec_names: tuple, params, grads, states, scalars, lr, lr_tensor, hyper: dict, maximize,
           grad_divisor, found_inf, write_back_grads, stochastic_round=None, used: tuple | None = None,
           q8: tuple | None = None, masters=(), **constexprs) -> None:  # fmt: skip
    """spec_names = (op, state list names, HYPER names, scalar: "step", "first_flag" or None) of the op module.
    `used`: which state lists the kernel reads (default all; the op module derives it from the constexprs it
    passes); an unused list is not checked, and its table row holds null addresses. `q8` = (absmax lists, maps,
    state_dtype): `states` are then the codes of int8, int4 or fp8 states (the kernel gets QUANT=QUANT_IDS[...]).
    `masters`: float32 masters or int16 remainders of 16-bit params (the states are then float32; the kernel gets
    MASTER 1 or 2)."""
    op, state_names, hyper_names, scalar = spec_names
    if not params:
        return
    used = used if used is not None else (True,) * len(states)
    has_scalars = scalar == "step" or (scalar == "first_flag" and bool(scalars))  # flags: none may be set
    scalar_lists = {SCALAR_LISTS[scalar]: scalars} if has_scalars else None
    op_name = f"fusedopt {op}_step{'' if q8 is None else '_q8'} (triton)"
    if q8 is None:
        lists = {"grads": grads, **{name: s for name, s, on in zip(state_names, states, used) if on}}
        _checks.check_step(op_name, params, lists, scalar_lists, masters=masters,
                           stochastic_round=stochastic_round)  # fmt: skip
    else:
        from fusedopt import lowbit

        _checks.check_step(op_name, params, {"grads": grads}, scalar_lists, masters=masters,
                           stochastic_round=stochastic_round)  # fmt: skip
        states = [s if on else [] for s, on in zip(states, used)]
        lowbit.check_q8(op_name, params, states, [a if on else [] for a, on in zip(q8[0], used)], q8[1],
                        state_names, q8[2])  # fmt: skip
    if stochastic_round is not None:
        _checks.check_stochastic_round(op_name, params, stochastic_round)
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params = copies.write(params)
    states = [(copies.write(s) if q8 is None else s) if on else [] for s, on in zip(states, used)]
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    lists = [params, grads, *states, scalars if has_scalars else []]
    if q8 is not None:
        lists += [a if on else [] for a, on in zip(q8[0], used)]
        lists += [[m] * len(params) if on else [] for m, on in zip(q8[1], used)]
        constexprs["QUANT"] = QUANT_IDS[q8[2]]
    master = 0
    if masters:  # the last row (_master_row)
        lists.append(copies.write(list(masters)))
        master = 1 if masters[0].dtype == torch.float32 else 2
    table = TensorTable(lists, BLOCK)
    scalar_row = ROW_FIRST_STATE + len(states)
    if scalar == "step":
        update_scalars(table, scalar_row, found_inf, 1.0, 1.0)
    if table.blocks == 0:
        return
    hp = scalars_tensor([lr, *(float(hyper[name]) for name in hyper_names)], device, lr_tensor)
    found = found_inf.float() if found_inf is not None else hp
    kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
        grad_divisor.float() if grad_divisor is not None else hp, found,
        stochastic_round if stochastic_round is not None else table.numel,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), MAXIMIZE=maximize, HAS_DIVISOR=grad_divisor is not None,
        HAS_FOUND_INF=found_inf is not None, WRITE_BACK_GRADS=write_back_grads, BLOCK=BLOCK,
        STOCHASTIC_ROUND=stochastic_round is not None, MASTER=master,
        STATE_DTYPE=tl.float32 if master else TRITON_DTYPES[dtype], **constexprs,
    )  # fmt: skip
    copies.finish()
    if scalar == "first_flag" and has_scalars:
        update_scalars(table, scalar_row, found_inf, 0.0, 0.0)  # the first step is done
