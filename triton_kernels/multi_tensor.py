"""The Triton multi-tensor engine: one launch covers every tensor of a (device, dtype) group.

A table in device memory holds each tensor's addresses (int64, one row per list) and numel; each program handles
BLOCK elements of one tensor, found through a block -> (tensor, start) map. Kernels turn an address back into a
typed pointer with `.to(tl.pointer_type(dtype))`, which also works in TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def opmath(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table -> device without a sync: pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cpu":
        return host
    if torch.cuda.is_current_stream_capturing():
        # A captured copy from a host buffer replays from that address after the buffer went back to the pinned
        # allocator: refuse rather than replay stale tables.
        raise RuntimeError(
            "fusedopt: the 'triton' backend cannot be captured in a CUDA graph (its tensor table is copied from "
            "host memory on every call). Use backend='cuda' (capture-safe) or backend='torch' for graph capture."
        )
    return host.pin_memory().to(device, non_blocking=True)


class TensorTable:
    """Addresses of `lists` (each empty or one tensor per entry of lists[0]) and the block map for BLOCK."""

    def __init__(self, lists: list, block: int):
        first = lists[0]
        self.n = len(first)
        device = first[0].device
        rows = [[t.data_ptr() for t in lst] if lst else [0] * self.n for lst in lists]
        numel = [t.numel() for t in first]
        block_tensor, block_start = [], []
        for i, n in enumerate(numel):
            for start in range(0, n, block):
                block_tensor.append(i)
                block_start.append(start)
        self.blocks = len(block_tensor)
        host = torch.tensor([x for row in rows for x in row] + numel + block_tensor + block_start, dtype=torch.int64)
        table = _to_device(host, device)
        k = len(lists) * self.n
        self.addrs = table[:k]
        self.numel = table[k : k + self.n]
        self.block_tensor = table[k + self.n : k + self.n + self.blocks]
        self.block_start = table[k + self.n + self.blocks :]


def scalars_tensor(values: list, device: torch.device, lr_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 hyperparameters on the device (exact, unlike fp32 scalar kernel args). values[0] is lr, replaced by
    lr_tensor when given, with device ops only."""
    host = torch.tensor(values, dtype=torch.float64)
    dev = _to_device(host, device)
    if lr_tensor is not None:
        dev = torch.cat([lr_tensor.detach().reshape(1).to(device=device, dtype=torch.float64), dev[1:]])
    return dev


class ContiguousCopies:
    """Kernels read every tensor of a table with one flat offset: a non-contiguous tensor (a strided view, a
    channels_last param) runs on a contiguous copy, and the copies that were written go back after the launch."""

    def __init__(self):
        self._writebacks: list = []

    @staticmethod
    def read(tensors: list) -> list:
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def write(self, tensors: list) -> list:
        out = []
        for t in tensors:
            if not t.is_contiguous():
                copy = t.contiguous()
                self._writebacks.append((t, copy))
                t = copy
            out.append(t)
        return out

    def finish(self) -> None:
        for dst, src in self._writebacks:
            dst.copy_(src)
        self._writebacks.clear()


@triton.jit
def lerp(start, end, weight):
    """torch's lerp (see csrc/common/lerp.h), each form one fused multiply-add: the `end + (w - 1) * diff` form for
    |w| >= 0.5 is exact at w = 1."""
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, tl.fma(weight, diff, start), tl.fma(weight - 1.0, diff, end))


@triton.jit
def pow_by_squaring(base, exponent):
    """base ** exponent for a whole-number exponent (an optimizer's step), by repeated squaring in base's dtype:
    correct for a negative base, where exp(exponent * log(base)) is NaN."""
    result = base * 0.0 + 1.0
    remaining = exponent.to(tl.int64)
    while remaining > 0:
        if (remaining & 1) != 0:
            result = result * base
        base = base * base
        remaining = remaining >> 1
    return result


@triton.jit
def program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """This program's tensor index, its 64-bit element offsets, and their mask: empty when GradScaler found an inf,
    so a skipped step touches nothing. Every multi-tensor kernel starts here."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    offs = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numel_ptr + t)
    if HAS_FOUND_INF:
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    return t, offs, offs < numel


@triton.jit
def update_scalars_kernel(addrs_ptr, n, row, found_inf_ptr, keep, add, HAS_FOUND_INF: tl.constexpr):
    """s = s * keep + add for tensor program_id(0)'s float32 scalar in `row`, unless GradScaler found an inf."""
    t = tl.program_id(0).to(tl.int64)
    s_ptr = tl.load(addrs_ptr + row * n + t).to(tl.pointer_type(tl.float32))
    new = tl.load(s_ptr) * keep + add
    if HAS_FOUND_INF:
        new = tl.where(tl.load(found_inf_ptr) == 0, new, tl.load(s_ptr))
    tl.store(s_ptr, new)


def update_scalars(table: TensorTable, row: int, found_inf: torch.Tensor | None, keep: float, add: float) -> None:
    """The per-tensor scalars of `row`: the step prologue is (keep, add) = (1, 1), the first-step flags' epilogue
    (0, 0); a step GradScaler skips leaves them."""
    found = found_inf.float() if found_inf is not None else table.addrs  # any valid pointer when unused
    update_scalars_kernel[(table.n,)](table.addrs, table.n, row, found, keep, add, HAS_FOUND_INF=found_inf is not None)
