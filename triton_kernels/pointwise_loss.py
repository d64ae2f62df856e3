"""Shared pieces of the Triton pointwise losses (MSE, BCE, BCE with logits): the launch plan, the device-side
scale, and the deterministic second stage that adds the per-program partial sums in a fixed order.

Stage 1 (one kernel per loss, in mse_loss.py / bce_loss.py): each program reads BLOCK elements of input and
target once, writes the unreduced loss or its partial sum, and the scaled gradient in the same pass.
Stage 2 (here): one program adds the partials in order, multiplies by the scale and writes the 0-d result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import TRITON_DTYPES, opmath

BLOCK = 4096
FINISH_BLOCK = 1024

__all__ = ["BLOCK", "TRITON_DTYPES", "LossPlan", "finish", "opmath", "wrap"]


@triton.jit
def wrap(offs, period, INDEX32: tl.constexpr):
    """offs % period, in 32 bits when every index fits (64-bit division is slow on GPUs)."""
    if INDEX32:
        return offs.to(tl.int32) % period
    return offs % period


@triton.jit
def finish_kernel(partial_ptr, n_partials, scale_ptr, out_ptr, flags_ptr, flags_out_ptr, REDUCE: tl.constexpr,
                  HAS_FLAGS: tl.constexpr, OUT_DTYPE: tl.constexpr, VIA_F32: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    bad_x = tl.zeros([BLOCK], dtype=tl.int32)
    bad_t = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_partials
        if REDUCE:
            acc += tl.load(partial_ptr + offs, mask=m, other=0.0)
        if HAS_FLAGS:
            f = tl.load(flags_ptr + offs, mask=m, other=0)
            bad_x = tl.maximum(bad_x, f & 1)
            bad_t = tl.maximum(bad_t, f & 2)
    if REDUCE:
        total = tl.sum(acc, axis=0) * tl.load(scale_ptr)
        if VIA_F32:  # float64 -> 16-bit goes through float32 (no direct conversion in the interpreter)
            total = total.to(tl.float32)
        tl.store(out_ptr, total.to(OUT_DTYPE))
    if HAS_FLAGS:
        tl.store(flags_out_ptr, tl.max(bad_x, axis=0) | tl.max(bad_t, axis=0))


class LossPlan:
    """Outputs and scratch of one call: loss (or partials), grad, the float64 device scale, optional flags."""

    def __init__(self, x: torch.Tensor, reduction: int, need_grad: bool, scale: float,
                 scale_tensor: torch.Tensor | None, flags: bool):  # fmt: skip
        n = x.numel()
        self.n = n
        self.index32 = n < 2**31
        self.programs = triton.cdiv(n, BLOCK)
        self.reduce = reduction != 0
        self.need_grad = need_grad
        self.dtype = TRITON_DTYPES[x.dtype]
        self.opmath = opmath(x.dtype)
        # Float64 on the device: Triton's float scalar arguments are float32, too coarse for a float64 1/N.
        self.scale = torch.full((1,), scale, dtype=torch.float64, device=x.device)
        if scale_tensor is not None:
            self.scale = self.scale * scale_tensor.reshape(1).to(torch.float64)
        self.loss = x.new_empty(n) if not self.reduce else None
        self.partial = torch.empty(max(self.programs, 1), dtype=torch.float64, device=x.device)
        self.grad = x.new_empty(n if need_grad else 0)
        self.block_flags = torch.empty(max(self.programs, 1), dtype=torch.int32, device=x.device) if flags else None


def finish(plan: LossPlan, out_dtype: torch.dtype):
    """Stage 2: (loss, grad[, flags]) from a plan whose stage 1 ran."""
    x_dev = plan.partial.device
    flags_out = torch.empty(1, dtype=torch.int32, device=x_dev) if plan.block_flags is not None else None
    loss = plan.loss
    if plan.reduce:
        loss = torch.empty((), dtype=out_dtype, device=x_dev)
    if plan.reduce or flags_out is not None:
        if plan.programs == 0:  # an empty input: the sum of nothing, no bad element
            plan.partial.zero_()
            if plan.block_flags is not None:
                plan.block_flags.zero_()
        finish_kernel[(1,)](
            plan.partial, max(plan.programs, 1), plan.scale, loss if plan.reduce else plan.partial,
            plan.block_flags if flags_out is not None else plan.partial,
            flags_out if flags_out is not None else plan.partial,
            REDUCE=plan.reduce, HAS_FLAGS=flags_out is not None, OUT_DTYPE=TRITON_DTYPES[out_dtype],
            VIA_F32=out_dtype != torch.float64,
            BLOCK=FINISH_BLOCK,
        )  # fmt: skip
    if flags_out is not None:
        return loss, plan.grad, flags_out
    return loss, plan.grad
