"""Low-bit states (int8, int4, fp8) of FSDP2 (DTensor) params in state_dicts: the world-size independent "global
block" form.

At run time a rank quantizes its local shard on its own: blocks of `block` (256; int4 128) consecutive LOCAL
elements, one absmax each, no communication in the step. A shard whose flat offset in the full param is a multiple
of the block has exactly the 1-rank blocks (the last one maybe shorter); other shards have blocks that straddle two
1-rank blocks. int8 and fp8 codes are a DTensor with the param's placement; int4 codes, two per byte, are the local
shard's packed bytes (a plain tensor: a shard of odd size has no whole-byte place in the full tensor).

A state_dict holds the 1-rank form, whatever the world size: `<key>_codes` a DTensor with the param's placement,
one code per element (int4's unpacked, a uint8 each), `<key>_absmax` a DTensor of the FULL param's block count
(ceil(numel / block)), sharded along dim 0. The value of global element i is map[codes[i]] * absmax[i // block],
as on one process, so DCP can reshard it (2 -> 1 rank). (int4's global form takes a byte per code, twice its
run-time size: the price of a layout every world size can cut.)
- Saving: a local block that is a whole global block keeps its codes and absmax as they are (bit-exact). Elements
  of the other blocks are dequantized, each global block's absmax is the max over the ranks that hold part of it
  (an all-reduce), and they are requantized against it (within the map's resolution).
- Loading: a local block that lies inside one global block keeps its codes and takes that block's absmax (the same
  values); a block that straddles two is dequantized and requantized over its local block.
So a checkpoint of aligned shards round-trips bit for bit, to any world size whose shards are aligned too.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from fusedopt import lowbit


def is_dtensor(t) -> bool:
    return hasattr(t, "_local_tensor")


def flat_range(p) -> tuple:
    """(flat offset of p's local shard in the full tensor, local numel, full numel) of a DTensor. Only shards that
    are a contiguous range of the full tensor's elements (FSDP2's Shard(0), replication) are supported."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(p.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    if len(shape) > 1 and (tuple(local_shape[1:]) != shape[1:] or any(offset[1:])):
        raise NotImplementedError(
            f"fusedopt: low-bit states of a DTensor param are supported for shards along dim 0 (FSDP2), got placements "
            f"{p.placements} for shape {list(shape)}"
        )
    row = math.prod(shape[1:])
    return (offset[0] * row if shape else 0), math.prod(local_shape), p.numel()


def _local_blocks(offset: int, n: int, block: int, device) -> tuple:
    """Start and end (global flat index) of each local block of a shard at `offset` with n elements."""
    start = offset + torch.arange(0, n, block, device=device)
    return start, torch.clamp(start + block, max=offset + n)


def global_format(codes, absmax, numel: int) -> lowbit.QuantFormat:
    """The format of a state as a state_dict holds it, for a param of `numel` elements (at least MIN_QUANT_NUMEL, so
    the counts differ): fp8 by the codes' dtype; int4 by its packed codes (a 1-rank checkpoint) or its absmax count
    (one per 128 elements, the global form); else int8."""
    if codes.dtype == torch.float8_e4m3fn:
        return lowbit.FORMATS["fp8"]
    int4 = lowbit.FORMATS["int4"]
    if codes.numel() == int4.codes_numel(numel) or absmax.numel() == int4.num_blocks(numel):
        return int4
    return lowbit.FORMATS["int8"]


def _code_bytes(codes: Tensor, n: int, fmt) -> Tensor:
    """One uint8 code per element (flat, n of them): int4's unpacked, float8's bits."""
    if fmt.bits == 4:
        return lowbit.unpack4(codes, n).to(torch.uint8)
    return codes.reshape(-1).view(torch.uint8)


def _run_time_codes(p, code_bytes: Tensor, fmt):
    """The codes as the step keeps them: a DTensor like p (int8, fp8), or the packed local bytes (int4)."""
    if fmt.bits == 4:
        return lowbit.pack4(code_bytes).contiguous()
    return _as_dtensor_like(p, code_bytes.contiguous().view(fmt.codes_dtype))


def _quantize_against(values: Tensor, absmax_per_element: Tensor, table: Tensor, fmt) -> Tensor:
    """The code bytes (uint8) of `values` (flat float32) given each element's block absmax: step 2 of the
    definition (fusedopt.lowbit: x / d with d = absmax, or 1 for a zero block; a NaN block's values get code 0)."""
    d = torch.where(absmax_per_element > 0, absmax_per_element, 1.0)
    return lowbit.encode(values / d, table, fmt).to(torch.uint8)


def _dequantize_with(code_bytes: Tensor, absmax_per_element: Tensor, table: Tensor, fmt) -> Tensor:
    """map[code] * absmax, float32, flat: fusedopt.lowbit.dequantize with each element's block absmax given."""
    return table[: fmt.levels][code_bytes.long()] * absmax_per_element


def _all_reduce_max(t: Tensor, mesh) -> None:
    # one all-reduce per mesh dimension: the max over every rank of the mesh (a NaN is carried by a separate flag)
    for dim in range(mesh.ndim):
        if mesh.size(dim) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))


def _block_placements(p) -> list:
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0) if pl.is_shard() else Replicate() for pl in p.placements]


def _as_dtensor_like(p, local: Tensor):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.reshape(p._local_tensor.shape), p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride())  # fmt: skip


def to_global_form(p, codes, absmax: Tensor, signed: bool, fmt) -> tuple:
    """(codes DTensor, absmax DTensor of the full param's blocks) for a DTensor param's run-time state of format
    `fmt` with a signed or unsigned map. Collective: every rank of p's mesh calls it for the same param."""
    from torch.distributed.tensor import DTensor, Replicate

    offset, n, numel = flat_range(p)
    block = fmt.block
    local_codes = _code_bytes(codes._local_tensor if is_dtensor(codes) else codes, n, fmt)
    dev = local_codes.device
    table = lowbit.qmap(signed, dev, fmt)
    start, end = _local_blocks(offset, n, block, dev)
    whole = (start % block == 0) & ((end - start == block) | (end == numel))  # a local block = a global block
    nb = fmt.num_blocks(numel)
    best, nan = torch.zeros(nb, device=dev), torch.zeros(nb, device=dev)
    absmax = absmax.to(dev)
    g_whole = start[whole] // block
    best[g_whole] = torch.nan_to_num(absmax[whole], nan=0.0)
    nan[g_whole] = absmax[whole].isnan().float()
    part = ~whole.repeat_interleave(block)[:n]  # elements to requantize against the global blocks
    straddles = bool(part.any())
    if straddles:
        local_absmax = absmax.repeat_interleave(block)[:n]
        values = _dequantize_with(local_codes, local_absmax, table, fmt)
        g_elem = (offset + torch.arange(n, device=dev)) // block
        best.scatter_reduce_(0, g_elem[part], torch.nan_to_num(values[part].abs(), nan=0.0), "amax")
        nan.scatter_reduce_(0, g_elem[part], values[part].isnan().float(), "amax")
    _all_reduce_max(best, p.device_mesh)
    _all_reduce_max(nan, p.device_mesh)
    full = torch.where(nan > 0, float("nan"), best)
    if straddles:
        local_codes = local_codes.clone()
        local_codes[part] = _quantize_against(values[part], full[g_elem[part]], table, fmt)
    codes = _as_dtensor_like(p, local_codes.view(fmt.codes_dtype))
    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return codes, replicated.redistribute(p.device_mesh, _block_placements(p))


def _full_blocks(absmax) -> Tensor:
    return absmax.full_tensor() if is_dtensor(absmax) else absmax  # collective for a DTensor


def full_tensor(t) -> Tensor:
    """The whole tensor of a DTensor; float8 codes gathered as bytes (gloo has no float8 collectives). Collective."""
    if t.dtype != torch.float8_e4m3fn:
        return t.full_tensor()
    from torch.distributed.tensor import DTensor

    as_bytes = DTensor.from_local(t._local_tensor.view(torch.uint8), t.device_mesh, t.placements, shape=t.shape,
                                  stride=t.stride(), run_check=False)  # fmt: skip
    return as_bytes.full_tensor().view(t.dtype)


def checked_int4_codes(codes: Tensor, what: str) -> Tensor:
    """int4 codes one per element (the global form) are uint8 in 0..15: a larger one would spill into its
    neighbour's nibble when packed. Load time: the value check may sync."""
    if codes.dtype != torch.uint8 or bool((codes > 15).any()):
        raise ValueError(f"int4 {what} must be torch.uint8 codes 0..15, one per element")
    return codes


def _local_codes(p, codes, fmt) -> Tensor:
    """p's local shard of codes, one uint8 per element, given as a DTensor (p's placement) or as the full tensor (a
    1-rank checkpoint; int4 packed)."""
    offset, n, numel = flat_range(p)
    if is_dtensor(codes):
        if codes.device_mesh == p.device_mesh and tuple(codes.placements) == tuple(p.placements):
            return codes._local_tensor.reshape(-1).view(torch.uint8)
        codes = full_tensor(codes)  # laid out otherwise: cut p's range from the whole (collective)
    elif fmt.bits == 4 and codes.numel() == fmt.codes_numel(numel):
        codes = lowbit.unpack4(codes, numel).to(torch.uint8)
    return codes.reshape(-1).view(torch.uint8)[offset : offset + n]


def from_global_form(p, codes, absmax, signed: bool) -> tuple:
    """The run-time state (codes: a DTensor, or int4's packed local bytes; local absmax) of a DTensor param from the
    global form (DTensors, or full plain tensors) of a state with a signed or unsigned map. Blocks inside one global
    block keep their codes and take its absmax; straddling ones are requantized over the local block. Collective
    when absmax is a DTensor."""
    offset, n, numel = flat_range(p)
    fmt = global_format(codes, absmax, numel)
    block = fmt.block
    full = _full_blocks(absmax)
    local_codes = _local_codes(p, codes, fmt)
    if fmt.bits == 4:
        checked_int4_codes(local_codes, "codes")
    dev = p._local_tensor.device
    full, local_codes = full.to(dev), local_codes.to(dev)
    if full.numel() != fmt.num_blocks(numel) or local_codes.numel() != n:
        raise ValueError(f"{fmt.name} state of a param of shape {list(p.shape)}: expected {fmt.num_blocks(numel)} "
                         f"absmax values (one per {block} elements of the whole param) and {n} local codes, got "
                         f"{full.numel()} and {local_codes.numel()}")  # fmt: skip
    table = lowbit.qmap(signed, dev, fmt)
    start, end = _local_blocks(offset, n, block, dev)
    inside = start // block == (end - 1) // block
    local_absmax = full[start // block].clone()
    if not bool(inside.all()):
        values = _dequantize_with(local_codes, full[(offset + torch.arange(n, device=dev)) // block], table, fmt)
        new_codes, new_absmax = lowbit.quantize(values, table, fmt)
        keep = inside.repeat_interleave(block)[:n]
        local_codes = torch.where(keep, local_codes, _code_bytes(new_codes, n, fmt))
        local_absmax = torch.where(inside, local_absmax, new_absmax)
    return _run_time_codes(p, local_codes, fmt), local_absmax


def dequantize_global_form(codes, absmax, signed: bool, shape=None):
    """float32 values (a DTensor with the codes' placement for DTensor codes) of a state in the global form, or of a
    plain 1-rank checkpoint's (int4's packed codes need the param's `shape`)."""
    numel = codes.numel() if is_dtensor(codes) or shape is None else math.prod(shape)
    fmt = global_format(codes, absmax, numel)
    table = lowbit.qmap(signed, codes.device, fmt)
    if not is_dtensor(codes):
        if fmt.bits == 4 and codes.numel() == numel:  # one code per element: packed for lowbit.dequantize
            codes, shape = lowbit.pack4(checked_int4_codes(codes, "codes")), codes.shape
        return lowbit.dequantize(codes, absmax.to(codes.device), table, state_dtype=fmt, shape=shape)
    offset, n, _ = flat_range(codes)
    local = codes._local_tensor.reshape(-1).view(torch.uint8)
    full = _full_blocks(absmax).to(local.device)
    values = _dequantize_with(local, full[(offset + torch.arange(n, device=local.device)) // fmt.block], table, fmt)
    return _as_dtensor_like(codes, values)
