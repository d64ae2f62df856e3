"""Block-wise quantized optimizer states, 8-bit, 4-bit and fp8 (docs/LOW_BIT_STATES.md): the formats and their maps,
the plain-PyTorch quantizer and dequantizer (the `torch` backend's, and the definition every kernel matches), the
`torch` backend of the <op>_step_q8 ops, and the state-key conventions.

A quantized state is, per param, `codes` (uint8) and `absmax` (float32, one per block of `block` consecutive
elements, row-major): the value of element i is map[code(i)] * absmax[i // block].
- int8 (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): blocks of 256, codes of the param's
  shape; the dynamic tree map (per decade 10^-6 .. 10^0 a linear grid whose resolution grows with the magnitude,
  plus 0 and 1), signed for first moments, unsigned (twice the resolution) for second moments.
- int4 (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States", as torchao's AdamW4bit): blocks of 128,
  codes packed two per byte in a 1-D tensor of ceil(numel / 2) bytes (element 2j in the high nibble of byte j,
  2j + 1 in the low one, a missing last element 0); the signed dynamic map with 3 decades (16 values) for first
  moments, and the linear map 1/16, 2/16, .., 1 (no zero) for second moments.
- fp8 (as torchao's AdamWFp8): blocks of 256, codes float8_e4m3fn of the param's shape; map[code] = the code's
  e4m3 value / 448 (in float32), for first and second moments alike.
Quantizing a block: a = max |x| (NaN if any x is NaN), d = a if a > 0 else 1; int8 / int4: code = the number of
midpoints between neighbouring map values that x / d reaches (>=): the nearest value, ties up; fp8: code = (x / d *
448) rounded to float8_e4m3fn, to nearest even (torch's conversion; csrc/common/quant_format.h computes its bits). A
NaN gets code 0; its block reads back NaN through its NaN absmax, and no other block is touched.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedopt import _checks

MIN_QUANT_NUMEL = 4096  # params with fewer elements (global size) keep full-precision state
LUT_SHIFT = 16  # int8's CPU lookup table: lut[float32 bits >> 16]
SLOT_OCTAVES = 32  # int8's register lookup (_slot_tables): |x| in [2^-31, 2), the exponents beyond clamped in
SLOT_TOP_BITS = 7  # its slot is chosen by at most the top 7 mantissa bits: those in a float's top 16-bit half
SLOT_WORDS = 352  # its 1408 bytes: 64 slot bases, 64 shifts, 256 slot codes, 4 x 256 threshold bytes
LUT_FLOATS = 65536 + SLOT_WORDS  # the two, one 32-bit word each (stored in the float32 table as bits)


@dataclass(frozen=True)
class QuantFormat:
    """One state_dtype. Its table (float32, what every kernel reads): the `levels` sorted code values, the
    levels - 1 midpoints and a NaN (never passed: the binary search never reads it), then for int8 the CPU kernel's
    lookup tables (_lookup_table, _slot_tables)."""

    name: str
    bits: int
    block: int  # values per absmax
    float_codes: bool = False  # fp8: the code is a float8_e4m3fn, its map indexed by the code's bits

    @property
    def codes_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.float_codes else torch.uint8

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def table_size(self) -> int:
        if self.float_codes:
            return self.levels
        return 2 * self.levels + (LUT_FLOATS if self.bits == 8 else 0)

    def codes_numel(self, numel: int) -> int:
        return numel if self.bits == 8 else -(-numel // 2)

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)


FORMATS = {
    "int8": QuantFormat("int8", 8, 256),
    "int4": QuantFormat("int4", 4, 128),
    "fp8": QuantFormat("fp8", 8, 256, float_codes=True),
}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn: x / d * FP8_MAX spans the format
STATE_DTYPES = (None, *FORMATS)
QUANT_BLOCK = FORMATS["int8"].block
MAP_SIZE = FORMATS["int8"].table_size


def quant_format(state_dtype) -> QuantFormat:
    if isinstance(state_dtype, QuantFormat):
        return state_dtype
    fmt = FORMATS.get(state_dtype)
    if fmt is None:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None for full precision, 'int8', 'int4' or "
                         "'fp8')")  # fmt: skip
    return fmt


def stored_format(codes: Tensor, numel: int) -> QuantFormat:
    """The format of stored codes of a state of `numel` elements: fp8 by the codes' dtype; int8 one uint8 code per
    element, int4 one per two (they differ for every quantized size, numel >= MIN_QUANT_NUMEL)."""
    for fmt in FORMATS.values():
        if codes.dtype == fmt.codes_dtype and codes.numel() == fmt.codes_numel(numel):
            return fmt
    raise ValueError(f"quantized state codes of {codes.numel()} {codes.dtype} values match no format for a param of "
                     f"{numel} elements (int8: one uint8 per element, int4: one per two, fp8: one float8_e4m3fn per "
                     "element)")  # fmt: skip


def check_absmax(absmax: Tensor, numel: int, state_dtype, what: str) -> None:
    """absmax of a state of `numel` elements must be 1-D float32, one value per block: another count could broadcast
    (one value scaling every block) or leave blocks unscaled, a corrupt state with no error."""
    fmt = quant_format(state_dtype)
    blocks = fmt.num_blocks(numel)
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != blocks:
        raise ValueError(f"{what}: absmax must be a 1-D torch.float32 tensor of {blocks} values ({fmt.name}: one "
                         f"per {fmt.block} of {numel} elements), got {absmax.dtype} of shape "
                         f"{list(absmax.shape)}")  # fmt: skip


def check_state_dtype(state_dtype) -> str | None:
    return None if state_dtype is None else quant_format(state_dtype).name


def dynamic_map(signed: bool, decades: int = 7) -> list:
    """The 2^(decades + 1) sorted values of the dynamic map, computed in float64. Per decade k = 0..decades-1
    (10^(k + 1 - decades) scale) the midpoints of a linear grid of [0.1, 1]: 2^k of them per sign (signed) or
    2^(k+1) (unsigned); then 0 and 1. 7 decades: int8's 256 values; 3 (signed): int4's 16."""
    values = [0.0, 1.0]
    for k in range(decades):
        n = 2 ** k if signed else 2 ** (k + 1)
        grid = [0.1 + 0.9 * j / n for j in range(n + 1)]
        for lo, hi in itertools.pairwise(grid):
            v = 10.0 ** (k + 1 - decades) * (lo + hi) / 2
            values += [v, -v] if signed else [v]
    assert len(values) == 2 ** (decades + 1)
    return sorted(values)


def state_map(fmt: QuantFormat, signed: bool) -> list:
    """The sorted code values of a state of `fmt` (signed: first moments; unsigned: second moments and sums)."""
    if fmt.bits == 8:
        return dynamic_map(signed)
    if signed:
        return dynamic_map(True, decades=fmt.bits - 1)
    # torchao's 4-bit second moment: linear without zero, so a small value is never flushed to 0 (a zero v
    # would make Adam's update g / (sqrt(0) + eps) blow up)
    return [j / fmt.levels for j in range(1, fmt.levels + 1)]


def _search(scaled: Tensor, mid: Tensor, levels: int = 256) -> Tensor:
    """#{j < levels - 1 : scaled >= mid[j]} by the kernels' branchless binary search, step for step (int64); NaN
    gives 0."""
    code = torch.zeros(scaled.shape, dtype=torch.int64, device=scaled.device)
    s = levels // 2
    while s >= 1:
        code += torch.where(scaled >= mid[code + (s - 1)], s, 0)
        s //= 2
    return code


def _lookup_table(mid: Tensor) -> Tensor:
    """One int32 word per bucket b of float32s (bits >> 16 = b): code | (threshold << 8). code = the code of the
    bucket's lowest float (for a negative b, the most negative), so code(x) = code + (x >= mid[code]) for every
    non-NaN x of bucket b: each bucket holds at most one midpoint (checked here). When mid[code] lies in the bucket,
    x >= mid[code] is an integer comparison of the low 16 bits: for b >= 0, (bits(x) & 0xffff) >= threshold; for
    b < 0 (larger magnitude, smaller value), (0xffff - (bits(x) & 0xffff)) >= threshold. Otherwise threshold is
    0x10000, never reached. So the CPU kernel finds a code with one lookup and no midpoint read."""
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
    above = mid[lut]  # the first midpoint above the bucket's lowest float (mid[255] is NaN)
    above_bits = above.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    inside = finite & ~above.isnan() & ((above_bits >> LUT_SHIFT) == b)
    low = above_bits & 0xFFFF
    threshold = torch.where(inside, torch.where(neg, 0xFFFF - low, low), 0x10000)
    return (lut | (threshold << 8)).to(torch.int32)


def _slot_position(value: float, shift: int, negative: bool) -> int:
    """A float's 15-bit position in its register-lookup slot (quantize_vbmi): the top 15 of the slot's `shift` low
    mantissa bits, complemented for a negative value, so that a larger position is a larger value."""
    position = ((struct.unpack("<I", struct.pack("<f", value))[0] & 0x7FFFFF) >> (shift - 15)) & 0x7FFF
    return position ^ 0x7FFF if negative else position


def _slot_tables(mid: Tensor) -> Tensor:
    """int8's lookup for CPUs with byte permutes (VBMI; csrc/cpu/quant_avx512.h quantize_vbmi), small enough for
    registers: x's sign and exponent (clamped to SLOT_OCTAVES octaves) choose a run of slots, the top `23 - shift`
    bits of its mantissa the slot: slot = base[sign * 32 + octave] + (mantissa >> shift[...]). Each octave is cut
    into the fewest power-of-two slots that hold at most two midpoints each (never finer than 2^16 floats, so that
    sign, exponent and the top 7 mantissa bits choose it); a slot's byte is c = the code of its lowest float, so for
    every x of the slot code(x) = c + (x >= mid[c]) + (x >= mid[c + 1]). Those two comparisons are made on 15-bit
    positions p (_slot_position): a slot's two thresholds t1, t2 are its midpoints' positions, 0xFFFF where it holds
    none (never reached), and code(x) = c + (p > t1) + (p > t2) unless p equals a threshold, where the kernel
    compares the floats instead (about 1 value in 30000 on spread data). Ranges that hold no midpoint share a slot
    per code. Returns SLOT_WORDS int32 words: the bytes base[64], shift[64], code[256], then the thresholds' bytes
    t1 low[256], t1 high[256], t2 low[256], t2 high[256]."""
    mids = mid[:-1].tolist()  # sorted float32 values (the NaN left off)
    as_float = lambda bits: struct.unpack("<f", struct.pack("<I", bits))[0]
    base, shift, slot_code, thresholds, empty_slot = [0] * 64, [0] * 64, [], [], {}
    for sign in (0, 1):
        for octave in range(SLOT_OCTAVES):
            exponent = 127 - (SLOT_OCTAVES - 1) + octave
            clamped = octave in (0, SLOT_OCTAVES - 1)  # every exponent below (above) lands here: one slot
            lo = 0 if octave == 0 else exponent << 23  # magnitude bits
            hi = 0x7F800000 if octave == SLOT_OCTAVES - 1 else (exponent << 23) | 0x7FFFFF
            for bits in range(1 if clamped else SLOT_TOP_BITS + 1):  # top mantissa bits per slot
                size = (hi - lo + 1) >> bits
                ends = [(as_float(lo + j * size), as_float(lo + (j + 1) * size - 1)) for j in range(1 << bits)]
                if sign:
                    ends = [(-b, -a) for a, b in ends]  # values, ascending in each slot
                inside = [bisect.bisect_right(mids, b) - bisect.bisect_right(mids, a) for a, b in ends]
                if max(inside) <= 2:
                    break
            assert max(inside) <= 2, f"an int8 register-lookup slot of {SLOT_TOP_BITS} mantissa bits holds 3 midpoints"
            codes = [bisect.bisect_right(mids, a) for a, _ in ends]
            index = sign * SLOT_OCTAVES + octave
            shift[index] = 23 - bits
            if bits == 0 and inside[0] == 0:  # no midpoint: one slot per code will do
                base[index] = empty_slot.setdefault(codes[0], len(slot_code))
                if base[index] == len(slot_code):
                    slot_code.append(codes[0])
                    thresholds.append((0xFFFF, 0xFFFF))
                continue
            base[index] = len(slot_code)
            slot_code += codes
            for c, n in zip(codes, inside, strict=True):
                t = [_slot_position(mids[c + j], shift[index], bool(sign)) if j < n else 0xFFFF for j in (0, 1)]
                thresholds.append(tuple(t))
    assert len(slot_code) <= 256 and max(base) <= 255, "the int8 register lookup needs more than 256 slots"
    pad = 256 - len(slot_code)
    planes = [t[j] >> (8 * half) & 0xFF for j in (0, 1) for half in (0, 1) for t in thresholds + [(0xFFFF,) * 2] * pad]
    table = bytes(base + shift + slot_code + [0] * pad + planes)
    return torch.frombuffer(bytearray(table), dtype=torch.int32).clone()


@functools.cache
def _table_cpu(signed: bool, state_dtype: str) -> Tensor:
    fmt = FORMATS[state_dtype]
    if fmt.float_codes:  # each code's value / FP8_MAX, indexed by the code's bits (0x7f and 0xff: NaN)
        e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        return (e4m3.to(torch.float64) / FP8_MAX).to(torch.float32)
    values = torch.tensor(state_map(fmt, signed), dtype=torch.float64).to(torch.float32)
    mid = torch.cat([(values[:-1] + values[1:]) * 0.5, torch.tensor([float("nan")])])  # float32, as the kernels
    parts = [values, mid]
    if fmt.bits == 8:
        parts += [_lookup_table(mid).view(torch.float32), _slot_tables(mid).view(torch.float32)]
    return torch.cat(parts)


_TABLES: dict = {}


def qmap(signed: bool, device, state_dtype="int8") -> Tensor:
    """The map table of one signedness and format on `device` (float32, the format's table_size), cached."""
    name = quant_format(state_dtype).name
    key = (signed, name, torch.device(device))
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _table_cpu(signed, name).to(key[2])
    return t


def num_blocks(numel: int, state_dtype="int8") -> int:
    return quant_format(state_dtype).num_blocks(numel)


def _blocks(x: Tensor, block: int) -> Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = -(-flat.numel() // block) * block - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def pack4(codes: Tensor) -> Tensor:
    """Flat 4-bit codes (int, any length) -> uint8 bytes, element 2j in the high nibble of byte j."""
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, flat.numel() % 2)).view(-1, 2)
    return (flat[:, 0] << 4) | flat[:, 1]


def unpack4(packed: Tensor, numel: int) -> Tensor:
    """The first `numel` 4-bit codes of `packed` (int64, flat)."""
    b = packed.reshape(-1).long()
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:numel]


def encode(scaled: Tensor, table: Tensor, state_dtype="int8") -> Tensor:
    """The codes (int64, scaled's shape, int4 unpacked) of values already divided by their block's d."""
    fmt = quant_format(state_dtype)
    if fmt.float_codes:
        code = (scaled * FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
        return torch.where(scaled.isnan(), 0, code)
    return _search(scaled, table[fmt.levels : 2 * fmt.levels], fmt.levels)


def quantize(x: Tensor, table: Tensor, state_dtype="int8") -> tuple:
    """(codes, absmax float32 (blocks,)): blocks of `block` consecutive elements (row-major). int8 codes (uint8) and
    fp8 codes (float8_e4m3fn) have x's shape; int4 codes are packed uint8, (ceil(numel / 2),)."""
    fmt = quant_format(state_dtype)
    blocks = _blocks(x, fmt.block)
    absmax = blocks.abs().amax(dim=1)  # NaN-propagating
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    code = encode(scaled, table, fmt).reshape(-1)[: x.numel()]
    if fmt.bits == 4:
        return pack4(code), absmax
    return code.to(torch.uint8).view(fmt.codes_dtype).reshape(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, table: Tensor, dtype: torch.dtype = torch.float32, state_dtype="int8",
               shape=None) -> Tensor:  # fmt: skip
    """map[codes] * absmax per block, float32 math, in `dtype`: of codes' shape (int8) or of `shape` (int4, whose
    packed codes do not record it; default: 2 * codes.numel() elements)."""
    fmt = quant_format(state_dtype)
    allowed = dict.fromkeys((torch.uint8, fmt.codes_dtype))  # a view of wider codes as uint8 would read their bytes
    if codes.dtype not in allowed:
        raise ValueError(f"{fmt.name} codes must be {' or '.join(map(str, allowed))}, got {codes.dtype}")
    if fmt.bits == 4:
        shape = torch.Size(shape) if shape is not None else torch.Size([2 * codes.numel()])
        n = shape.numel()
        if fmt.codes_numel(n) != codes.numel():
            raise ValueError(f"int4 codes of {codes.numel()} bytes cannot hold a state of shape {list(shape)}")
        index = unpack4(codes, n)
    else:
        shape, n = codes.shape, codes.numel()
        index = codes.reshape(-1).view(torch.uint8).long()
    check_absmax(absmax, n, fmt, f"dequantize {fmt.name} codes")
    vals = table[: fmt.levels][index]
    pad = fmt.num_blocks(n) * fmt.block - n
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, fmt.block) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(shape).to(dtype)


def codes_key(key: str) -> str:
    return f"{key}_codes"


def absmax_key(key: str) -> str:
    return f"{key}_absmax"


# --- the torch backend of <op>_step_q8 ----------------------------------------------------------------------------
def format_of_op_arg(state_dtype, op: str) -> QuantFormat:
    """The format named by a _step_q8 op's `state_dtype` argument."""
    fmt = FORMATS.get(state_dtype) if isinstance(state_dtype, str) else None
    if fmt is None:
        raise RuntimeError(f"{op}: state_dtype must be 'int8', 'int4' or 'fp8', got {state_dtype!r}")
    return fmt


def check_q8(op: str, params, codes, absmaxes, qmaps, state_names, state_dtype: str = "int8") -> None:
    """The checks every backend makes (csrc/common/optim_q8.h has the C++ twin, with the same messages)."""
    _checks.check_params(params, op)
    fmt = format_of_op_arg(state_dtype, op)
    if params[0].dtype == torch.float64:
        raise RuntimeError(f"{op}: quantized ({fmt.name}) states need float32, bfloat16 or float16 params, got "
                           "torch.float64")  # fmt: skip
    for name, cs, ams, table in zip(state_names, codes, absmaxes, qmaps):
        if not cs:
            continue
        if len(cs) != len(params) or len(ams) != len(params):
            raise RuntimeError(f"{op}: {name} has {len(cs)} code tensors and {len(ams)} absmax tensors, params has "
                               f"{len(params)}")  # fmt: skip
        size = fmt.table_size
        if table.dtype != torch.float32 or table.numel() != size or table.device != params[0].device:
            raise RuntimeError(f"{op}: the map of {name} must be a contiguous float32 tensor of {size} values on "
                               f"the params' device ({fmt.name})")  # fmt: skip
        for i, (c, a, p) in enumerate(zip(cs, ams, params)):
            ok = c.dtype == fmt.codes_dtype and c.is_contiguous() and c.device == p.device
            if fmt.bits == 8 and not (ok and c.shape == p.shape):
                raise RuntimeError(f"{op}: {name}[{i}] codes must be a contiguous {fmt.codes_dtype} tensor of its "
                                   f"param's shape {list(p.shape)} and device ({fmt.name})")  # fmt: skip
            if fmt.bits == 4 and not (ok and c.dim() == 1 and c.numel() == fmt.codes_numel(p.numel())):
                raise RuntimeError(f"{op}: {name}[{i}] codes must be a contiguous torch.uint8 tensor of "
                                   f"{fmt.codes_numel(p.numel())} values (two 4-bit codes per byte) on its param's "
                                   "device")  # fmt: skip
            nb = fmt.num_blocks(p.numel())
            if a.dtype != torch.float32 or a.dim() != 1 or a.numel() != nb or a.device != p.device:
                raise RuntimeError(f"{op}: {name}[{i}] absmax must be a contiguous 1-D torch.float32 tensor of {nb} "
                                   f"values (one per {fmt.block} elements) on its param's device")  # fmt: skip


def step_q8(fp_step, spec, params, grads, codes, absmaxes, qmaps, state_dtype, scalars, lr, lr_tensor, hyper,
            maximize, grad_divisor, found_inf, write_back_grads, stochastic_round=None,
            masters=()) -> None:  # fmt: skip
    """The plain-torch quantized step: dequantize each used state to float32, run the op's full-precision reference
    on it with hyper["quantized_states"] = True (what quantization breaks, the reference guards: RMSprop's centered
    variance), on the float32 masters under master weights (fusedopt.master_weights.step_with_masters), quantize
    back (unless found_inf skipped the step: requantizing is not the identity)."""
    name = f"fusedopt {spec.op}_step_q8 (torch)"
    check_q8(name, params, codes, absmaxes, qmaps, [s.list_name for s in spec.states], state_dtype)
    if masters:
        if not spec.serves_masters:
            _checks.refuse_masters(name, masters)
        _checks.check_masters(name, params, masters, stochastic_round)
    if stochastic_round is not None:
        _checks.check_stochastic_round(name, params, stochastic_round)
    fmt = format_of_op_arg(state_dtype, name)
    states = [[dequantize(c, a, t, state_dtype=fmt, shape=p.shape) for c, a, p in zip(cs, ams, params)]
              for cs, ams, t in zip(codes, absmaxes, qmaps)]  # fmt: skip
    args = (params, grads, states, scalars, lr, lr_tensor, {**hyper, "quantized_states": True}, maximize,
            grad_divisor, found_inf, write_back_grads, stochastic_round)  # fmt: skip
    with _checks.states_in_opmath():
        if masters:
            from fusedopt import master_weights

            master_weights.step_with_masters(fp_step, spec, *args, masters)
        else:
            fp_step(*args)
    keep = None if found_inf is None else found_inf.reshape(()) != 0
    for cs, ams, vals, table in zip(codes, absmaxes, states, qmaps):
        for c, a, v in zip(cs, ams, vals):
            new_c, new_a = quantize(v, table, fmt)
            if keep is not None:  # (on the codes' bits: torch.where takes no float8)
                new_c = torch.where(keep, c.view(torch.uint8), new_c.view(torch.uint8)).view(c.dtype)
                new_a = torch.where(keep, a, new_a)
            c.copy_(new_c)
            a.copy_(new_a)
