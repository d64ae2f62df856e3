"""The fused grad norm and grad scaling of clip_grad_norm_ in Triton, through the multi-tensor table: each program
reduces one block to a partial (sum |x|^p, or max |x| for inf) and one device reduction combines the partials."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import TRITON_DTYPES, ContiguousCopies, TensorTable, opmath, program_block

BLOCK = 2048
KIND_ONE, KIND_TWO, KIND_P, KIND_INF = range(4)


@triton.jit
def norm_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, partials_ptr, p_ptr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, numel_ptr, False, BLOCK)
    x_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(DTYPE))
    a = tl.abs(tl.load(x_ptr + offs, mask=mask, other=0).to(OPMATH))
    if KIND == 0:
        part = tl.sum(a)
    elif KIND == 1:
        part = tl.sum(a * a)
    elif KIND == 2:
        # |x|^p as exp(p log|x|); zeros (and the masked lanes) contribute 0 without taking log(0).
        nonzero = a != 0
        powered = tl.exp(tl.load(p_ptr).to(OPMATH) * tl.log(tl.where(nonzero, a, 1.0)))
        part = tl.sum(tl.where(nonzero, powered, 0.0))
    else:
        # max |x| that keeps NaN (torch's amax does); Triton's max reduction may drop it.
        is_nan = a != a
        part = tl.max(tl.where(is_nan, 0.0, a))
        part = tl.where(tl.max(is_nan.to(tl.int32)) > 0, tl.sum(a), part)  # a sum keeps the NaN
    tl.store(partials_ptr + tl.program_id(0), part)


@triton.jit
def scale_kernel(addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, coef_ptr, DTYPE: tl.constexpr,
                 OPMATH: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, numel_ptr, False, BLOCK)
    x_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(DTYPE))
    coef = tl.load(coef_ptr).to(OPMATH)
    tl.store(x_ptr + offs, (tl.load(x_ptr + offs, mask=mask).to(OPMATH) * coef).to(DTYPE), mask=mask)


def grad_norm_power_sum(tensors, norm_type: float) -> torch.Tensor:
    """sum |x|^p (max |x| for inf) over tensors of one dtype, as a float64/float32 scalar on their device."""
    dtype = tensors[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = ContiguousCopies.read(tensors)  # held until the launch: the table has only their addresses
    table = TensorTable([tensors], BLOCK)
    if table.blocks == 0:
        return torch.zeros((), dtype=acc, device=tensors[0].device)
    kind = KIND_INF if math.isinf(norm_type) else {1.0: KIND_ONE, 2.0: KIND_TWO}.get(norm_type, KIND_P)
    partials = torch.empty(table.blocks, dtype=acc, device=tensors[0].device)
    p = torch.tensor([norm_type if kind == KIND_P else 0.0], dtype=torch.float64)
    p = p.to(tensors[0].device, non_blocking=True)
    norm_kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, partials, p,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), KIND=kind, BLOCK=BLOCK,
    )  # fmt: skip
    return partials.amax() if kind == KIND_INF else partials.sum()


def scale_tensors(tensors, coef: torch.Tensor) -> None:
    """x *= coef in opmath, coef a one-element tensor on the tensors' device."""
    copies = ContiguousCopies()
    table = TensorTable([copies.write(tensors)], BLOCK)
    if table.blocks == 0:
        return
    dtype = tensors[0].dtype
    scale_kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, coef.reshape(1).to(torch.float64),
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), BLOCK=BLOCK,
    )  # fmt: skip
    copies.finish()
