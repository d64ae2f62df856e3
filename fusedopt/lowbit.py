"""8-bit block-wise quantized optimizer states (docs/LOW_BIT_STATES.md): the dynamic maps, the plain-PyTorch
quantizer and dequantizer (the `torch` backend's, and the definition every kernel matches), the `torch` backend of
the <op>_step_q8 ops, and the state-key conventions.

A quantized state is, per param, `codes` (uint8, the param's shape) and `absmax` (float32, ceil(numel / 256)): the
value of element i is map[codes[i]] * absmax[i // 256]. The map is the dynamic tree map of Dettmers et al. (2022,
"8-bit Optimizers via Block-wise Quantization"): per decade 10^-6 .. 10^0 a linear grid whose resolution grows with
the magnitude, plus 0 and 1; signed for first moments (momentum-like states), unsigned (twice the resolution) for
second moments. Quantizing a block: a = max |x| (NaN if any x is NaN), d = a if a > 0 else 1, code = the number of
midpoints between neighbouring map values that x / d reaches (>=): the nearest value, ties up. A NaN gets code 0;
its block reads back NaN through its NaN absmax, and no other block is touched.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from fusedopt import _checks

QUANT_BLOCK = 256  # values per absmax
MIN_QUANT_NUMEL = 4096  # params with fewer elements (global size) keep full-precision state
STATE_DTYPES = (None, "int8")
# The table every kernel reads (float32): 256 code values, 255 midpoints and a NaN (never passed: the binary search
# never reads it, the lookup compares with it), then the 65536-byte lookup table of the CPU kernel and 4 bytes of
# padding (its vector path reads 4 bytes at each byte index).
MAP_SIZE = 512 + 65536 // 4 + 1
LUT_SHIFT = 16  # lut[float32 bits >> 16]


def check_state_dtype(state_dtype) -> str | None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None for full precision, or 'int8')")
    return state_dtype


def dynamic_map(signed: bool) -> list:
    """The 256 sorted values of the dynamic map, computed in float64. Per decade k = 0..6 (10^(k-6) scale) the
    midpoints of a linear grid of [0.1, 1]: 2^k of them per sign (signed) or 2^(k+1) (unsigned); then 0 and 1."""
    values = [0.0, 1.0]
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        grid = [0.1 + 0.9 * j / n for j in range(n + 1)]
        for lo, hi in itertools.pairwise(grid):
            v = 10.0 ** (k - 6) * (lo + hi) / 2
            values += [v, -v] if signed else [v]
    assert len(values) == 256
    return sorted(values)


def _search(scaled: Tensor, mid: Tensor) -> Tensor:
    """#{j < 255 : scaled >= mid[j]} by the kernels' branchless binary search, step for step (int64); NaN gives 0."""
    code = torch.zeros(scaled.shape, dtype=torch.int64, device=scaled.device)
    for s in (128, 64, 32, 16, 8, 4, 2, 1):
        code += torch.where(scaled >= mid[code + (s - 1)], s, 0)
    return code


def _lookup_table(mid: Tensor) -> Tensor:
    """lut[b] = the code of the lowest float32 whose bits >> 16 are b (for a negative b, the most negative), so
    code(x) = lut[b] + (x >= mid[lut[b]]) for every non-NaN x of bucket b: each bucket holds at most one midpoint
    (checked here)."""
    b = torch.arange(2 ** (32 - LUT_SHIFT), dtype=torch.int64)
    low = (1 << LUT_SHIFT) - 1
    neg = b >= 2 ** (31 - LUT_SHIFT)
    lo_bits = torch.where(neg, (b << LUT_SHIFT) | low, b << LUT_SHIFT)
    hi_bits = torch.where(neg, b << LUT_SHIFT, (b << LUT_SHIFT) | low)
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)
    lo, hi = as_float(lo_bits - (1 << 32) * (lo_bits >= 2**31)), as_float(hi_bits - (1 << 32) * (hi_bits >= 2**31))
    lut = _search(lo, mid)
    finite = ~(lo.isnan() | hi.isnan())
    assert int((_search(hi, mid) - lut)[finite].max()) <= 1, "a lookup bucket holds two midpoints"
    return lut.to(torch.uint8)


@functools.cache
def _table_cpu(signed: bool) -> Tensor:
    values = torch.tensor(dynamic_map(signed), dtype=torch.float64).to(torch.float32)
    mid = torch.cat([(values[:-1] + values[1:]) * 0.5, torch.tensor([float("nan")])])  # float32, as the kernels
    return torch.cat([values, mid, _lookup_table(mid).view(torch.float32), torch.zeros(1)])


_TABLES: dict = {}


def qmap(signed: bool, device) -> Tensor:
    """The map table of one signedness on `device` (float32, 512), cached."""
    key = (signed, torch.device(device))
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _table_cpu(signed).to(key[1])
    return t


def num_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


def _blocks(x: Tensor) -> Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = num_blocks(flat.numel()) * QUANT_BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK)


def quantize(x: Tensor, table: Tensor) -> tuple:
    """(codes uint8 of x's shape, absmax float32 (blocks,)): blocks of 256 consecutive elements (row-major)."""
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)  # NaN-propagating
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    code = _search(scaled, table[QUANT_BLOCK : 2 * QUANT_BLOCK])
    return code.reshape(-1)[: x.numel()].to(torch.uint8).reshape(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, table: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """map[codes] * absmax per block, float32 math, in `dtype`, of codes' shape."""
    n = codes.numel()
    vals = table[: QUANT_BLOCK][codes.reshape(-1).long()]
    pad = num_blocks(n) * QUANT_BLOCK - n
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, QUANT_BLOCK) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(codes.shape).to(dtype)


def codes_key(key: str) -> str:
    return f"{key}_codes"


def absmax_key(key: str) -> str:
    return f"{key}_absmax"


# --- the torch backend of <op>_step_q8 ----------------------------------------------------------------------------
def check_q8(op: str, params, codes, absmaxes, qmaps, state_names) -> None:
    _checks.check_params(params, op)
    if params[0].dtype == torch.float64:
        raise RuntimeError(f"{op}: quantized (int8) states need float32, bfloat16 or float16 params, got torch.float64")
    for name, cs, ams, table in zip(state_names, codes, absmaxes, qmaps):
        if not cs:
            continue
        if len(cs) != len(params) or len(ams) != len(params):
            raise RuntimeError(f"{op}: {name} has {len(cs)} code tensors and {len(ams)} absmax tensors, params has "
                               f"{len(params)}")  # fmt: skip
        if table.dtype != torch.float32 or table.numel() != MAP_SIZE or table.device != params[0].device:
            raise RuntimeError(f"{op}: the map of {name} must be a contiguous float32 tensor of {MAP_SIZE} values on "
                               "the params' device")  # fmt: skip
        for i, (c, a, p) in enumerate(zip(cs, ams, params)):
            if c.dtype != torch.uint8 or c.shape != p.shape or not c.is_contiguous() or c.device != p.device:
                raise RuntimeError(f"{op}: {name}[{i}] codes must be a contiguous torch.uint8 tensor of its param's "
                                   f"shape {list(p.shape)} and device")  # fmt: skip
            nb = num_blocks(p.numel())
            if a.dtype != torch.float32 or a.dim() != 1 or a.numel() != nb or a.device != p.device:
                raise RuntimeError(f"{op}: {name}[{i}] absmax must be a contiguous 1-D torch.float32 tensor of {nb} "
                                   "values (one per 256 elements) on its param's device")  # fmt: skip


def step_q8(fp_step, op: str, state_names, params, grads, codes, absmaxes, qmaps, scalars, lr, lr_tensor, hyper,
            maximize, grad_divisor, found_inf, write_back_grads) -> None:  # fmt: skip
    """The plain-torch q8 step: dequantize each used state to float32, run the op's full-precision reference on it,
    quantize back (unless found_inf skipped the step: requantizing is not the identity)."""
    check_q8(f"fusedopt {op}_step_q8 (torch)", params, codes, absmaxes, qmaps, state_names)
    states = [[dequantize(c, a, t) for c, a in zip(cs, ams)] for cs, ams, t in zip(codes, absmaxes, qmaps)]
    with _checks.states_in_opmath():
        fp_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                write_back_grads)  # fmt: skip
    keep = None if found_inf is None else found_inf.reshape(()) != 0
    for cs, ams, vals, table in zip(codes, absmaxes, states, qmaps):
        for c, a, v in zip(cs, ams, vals):
            new_c, new_a = quantize(v, table)
            if keep is not None:
                new_c, new_a = torch.where(keep, c, new_c), torch.where(keep, a, new_a)
            c.copy_(new_c)
            a.copy_(new_a)
