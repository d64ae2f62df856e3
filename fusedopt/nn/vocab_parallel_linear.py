"""Linear + cross-entropy with the LM head's weight sharded along the vocabulary (tensor parallelism), without the
full logits on any rank: F.cross_entropy(F.linear(input, full_weight, full_bias), target) where each rank holds the
rows [vocab_start, vocab_start + local) of the weight (and bias); rows at or past `vocab_size` are padding.

The input rows are taken in chunks. Per chunk, each rank computes its logit columns (one matmul), the vocab-parallel
row kernel (fusedopt/nn/vocab_parallel.py: one all_gather of the row statistics) gives the loss and this rank's
gradient columns, then d_input[chunk] = sum over ranks of dlogits_r @ W_r is one all-reduce (float32) per chunk,
and d_weight_r += dlogits_r^T @ x_chunk, d_bias_r += dlogits_r.sum(0) stay local (float32 accumulators, rounded once).
Built from the vocab-parallel row function and torch matmuls only; fusedopt/nn/linear_cross_entropy.py is not used.

Communication per token: the row statistics' all_gather ((world - 1) * 12 bytes received in float32, see
docs/CROSS_ENTROPY.md) plus d_input's all-reduce of H float32 values (a ring sends 2 (world - 1) / world * 4 H bytes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fusedopt import reference
from fusedopt.nn import _torch_args
from fusedopt.nn.vocab_parallel import vocab_parallel_rows

__all__ = ["vocab_parallel_linear_cross_entropy"]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # one chunk's local logits


def _mm_wide(a: Tensor, b: Tensor, wide: torch.dtype) -> Tensor:
    """a @ b accumulated and returned in `wide` (float32/float64) for 16-bit a, b."""
    if a.dtype == wide:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=wide)
    return a.to(wide) @ b.to(wide)


def _walk(x, weight, bias, target, opts, group, chunk_rows, need_grad, scale):
    """Every chunk: losses (N,) and, when need_grad, (d_input, d_weight, d_bias) for the given scale ((1,) for all rows
    or (N,) per row)."""
    n = x.shape[0]
    wide = reference.opmath_dtype(x.dtype)
    losses = x.new_empty((n,), dtype=wide)
    dx = torch.empty_like(x) if need_grad else None
    dw = torch.zeros(weight.shape, dtype=wide, device=x.device) if need_grad else None
    db = torch.zeros(bias.shape, dtype=wide, device=x.device) if need_grad and bias is not None else None
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        xs = x[lo:hi]
        logits = (xs @ weight.t() if bias is None else torch.addmm(bias, xs, weight.t())).contiguous()
        row_scale = None if scale is None else (scale if scale.numel() == 1 else scale[lo:hi].unsqueeze(-1))
        loss, _, grad = vocab_parallel_rows(logits, target[lo:hi], None, need_grad=need_grad, grad_scale=row_scale,
                                            group=group, **opts)  # fmt: skip
        losses[lo:hi] = loss
        if not need_grad:
            continue
        partial = _mm_wide(grad, weight, wide)
        dist.all_reduce(partial, group=group)  # d_input: once per chunk
        dx[lo:hi] = partial
        dw += _mm_wide(grad.t(), xs, wide)
        if db is not None:
            db += grad.sum(0, dtype=wide)
    return losses, dx, dw, db


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, opts, group, chunk_rows):
        wide = reference.opmath_dtype(x.dtype)
        need_grad = any(ctx.needs_input_grad[:3])
        denom = scale = None
        if reduction == "mean":
            denom = (target != opts["ignore_index"]).sum().to(wide)
            scale = torch.where(denom == 0, float("nan"), 1.0 / denom).reshape(1)
        grads_now = need_grad and reduction != "none"
        losses, dx, dw, db = _walk(x, weight, bias, target, opts, group, chunk_rows, grads_now, scale)
        ctx.reduction, ctx.opts, ctx.group, ctx.chunk_rows = reduction, opts, group, chunk_rows
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, target)
            return losses.to(x.dtype)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        total = losses.sum()
        return (torch.where(denom == 0, float("nan"), total / denom) if reduction == "mean" else total).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        nones = (None,) * 5
        if ctx.reduction == "none":  # a factor per row: recompute each chunk with it (every rank runs this)
            x, weight, bias, target = ctx.saved_tensors
            scale = grad_output.to(reference.opmath_dtype(x.dtype))
            _, dx, dw, db = _walk(x, weight, bias, target, ctx.opts, ctx.group, ctx.chunk_rows, True, scale)
            out = [None if g is None else g.to(t.dtype) for g, t in zip((dx, dw, db), (x, weight, bias))]
            return (*out, *nones)
        dx, dw, db = ctx.saved_tensors
        factor = grad_output.reshape(())
        out = [None if g is None else (g * factor.to(g.dtype)).to(dt) for g, dt in zip((dx, dw, db), ctx.dtypes)]
        return (*out, *nones)


def vocab_parallel_linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                                        process_group, vocab_start: int | None = None, vocab_size: int | None = None,
                                        reduction: str = "mean", ignore_index: int = -100,
                                        label_smoothing: float = 0.0, z_loss: float = 0.0,
                                        softcap: float | None = None,
                                        chunk_size: int | None = None) -> Tensor:  # fmt: skip
    """input (..., H) and target (...) the same on every rank; weight (local, H) and bias (local,) this rank's rows
    of the head. vocab_start defaults to rank * local, vocab_size to world * local (rows past it are padding). Returns
    the loss of the whole vocabulary, the same on every rank; input's gradient is complete on every rank, the weight's
    and bias's are this rank's rows."""
    reduction = _torch_args.reduction_name(reduction)
    label_smoothing = _torch_args.label_smoothing_value(label_smoothing)
    local = weight.shape[0]
    if vocab_start is None:
        vocab_start = dist.get_rank(process_group) * local
    if vocab_size is None:
        vocab_size = dist.get_world_size(process_group) * local
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"vocab_parallel_linear_cross_entropy: input (..., {input.shape[-1]}) and weight "
                           f"{tuple(weight.shape)} do not match")  # fmt: skip
    if target.shape != input.shape[:-1]:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: target {tuple(target.shape)} for input "
                         f"{tuple(input.shape)}")  # fmt: skip
    x = input.reshape(-1, input.shape[-1]).contiguous()
    rows = target.reshape(-1).to(torch.int64)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    chunk_rows = chunk_size or max(1, DEFAULT_CHUNK_BYTES // max(1, local * x.element_size()))
    opts = {"ignore_index": ignore_index, "label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
            "softcap": None if softcap is None else float(softcap), "vocab_start": vocab_start,
            "vocab_size": vocab_size}  # fmt: skip
    loss = _Function.apply(x, weight, bias, rows, reduction, opts, process_group, chunk_rows)
    return loss.reshape(target.shape) if reduction == "none" else loss
