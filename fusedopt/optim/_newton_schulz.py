"""Muon's orthogonalization, batched: the quintic Newton-Schulz iteration of torch.optim.Muon
(torch/optim/_muon.py, `_zeropower_via_newtonschulz`) on a stack of same-shaped matrices at once, one
torch.bmm / torch.baddbmm per product for the whole stack instead of one addmm per matrix.

The numerics are torch's: the input is rounded to bfloat16 on every device (as torch does, also on the CPU and for
float64 params), a tall matrix is transposed so the Gram matrix is the small side, each matrix is divided by its
own norm clamped at eps (bfloat16), and every product is a bfloat16 BLAS/cuBLAS call. On the CPU the batched calls
give torch's bits exactly (tests/test_muon.py checks it); on CUDA, batched cuBLAS kernels may round differently
from the per-matrix ones (bfloat16 noise, not a different method).

FSDP2 (DTensor params): each matrix is gathered whole before the iteration (`gather_full`), in bfloat16, and
each rank keeps its own rows of the result (`local_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_ns_arguments(ns_coefficients, ns_steps: int) -> None:
    """torch's checks (raised at step(), as torch raises them)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


# On the CPU the products run on chunks of the stack of about this many bytes (bfloat16): each chunk's operands stay
# in cache, where baddbmm's copy of its input is cheap (a whole 16 x 384 x 384 stack made the batched step slower
# than torch's loop). The chunks change no result: each matrix's products are its own.
CPU_CHUNK_BYTES = 1 << 20


def _iterate(x: Tensor, ns_coefficients, ns_steps: int) -> Tensor:
    a, b, c = ns_coefficients
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.transpose(1, 2))
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def orthogonalize(stack: Tensor, ns_coefficients, ns_steps: int, eps: float, out: Tensor | None = None) -> Tensor:
    """NS^{(a,b,c)}_k of each matrix of `stack` ([B, m, n], any float dtype), matrix i equal to torch's
    _zeropower_via_newtonschulz(stack[i]): a bfloat16 [B, m, n] tensor (maybe a transposed view), or, with `out`,
    written into `out` (cast to its dtype; `out` may be `stack` itself) and returned."""
    x = stack.bfloat16()
    tall = stack.size(1) > stack.size(2)
    if tall:
        x = x.transpose(1, 2).contiguous()  # one copy here, not one inside every baddbmm (it copies its input)
    elif stack.dtype == torch.bfloat16:
        x = x.clone()  # .bfloat16() returned the stack itself: the division below must not write into it
    if x.numel() > 0:
        # One norm per matrix, each as torch computes it (Tensor.norm of that matrix); the division in bfloat16.
        norms = torch.stack(torch._foreach_norm(list(x.unbind(0)))).clamp(min=eps)
        x.div_(norms.view(-1, 1, 1))
    chunk = x.size(0)
    if x.device.type == "cpu" and x.numel() > 0:
        chunk = max(1, CPU_CHUNK_BYTES // (x[0].numel() * x.element_size()))
    if out is None:
        if chunk >= x.size(0):
            result = _iterate(x, ns_coefficients, ns_steps)
        else:
            result = torch.cat([_iterate(part, ns_coefficients, ns_steps) for part in x.split(chunk)])
        return result.transpose(1, 2) if tall else result
    for part, dest in zip(x.split(chunk), out.split(chunk)):
        result = _iterate(part, ns_coefficients, ns_steps)
        dest.copy_(result.transpose(1, 2) if tall else result)
    return out


def _stack_placements(param) -> list:
    """A DTensor param's placements for a stack of such matrices (the stack's dim 0 in front)."""
    from torch.distributed.tensor import Shard

    return [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in param.placements]


def gather_full(local_stack: Tensor, param) -> Tensor:
    """The whole matrices [B, m, n] from this rank's shards [B, m_local, n] of B DTensor params shaped and placed
    as `param`: one all-gather for the stack, in bfloat16 (the iteration rounds to bfloat16 first anyway, so
    gathering the rounded shards gives the same matrices at half the bytes)."""
    from torch.distributed.tensor import DTensor

    shape = (local_stack.size(0), *param.shape)
    stride = (param.numel(), *param.stride())
    shard = DTensor.from_local(local_stack.bfloat16(), param.device_mesh, _stack_placements(param), run_check=False,
                               shape=shape, stride=stride)  # fmt: skip
    return shard.full_tensor()


def local_rows(full_stack: Tensor, param) -> Tensor:
    """This rank's shards of whole matrices [B, m, n], laid out as the DTensor param's local shard (a local slice, no
    communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    whole = DTensor.from_local(full_stack, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, _stack_placements(param)).to_local()
