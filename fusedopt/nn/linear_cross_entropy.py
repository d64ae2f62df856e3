"""Linear + cross-entropy without the (N, V) logits: F.cross_entropy(F.linear(input, weight, bias), target, ...).

The rows are processed in chunks sized from a memory budget. For each chunk: the logits by one cuBLAS/BLAS matmul
(input dtype, as F.linear gives), fusedopt's cross-entropy row kernel on them (loss, and the gradient w.r.t. the
logits written over the logits in the same pass), then that chunk's share of the gradients:
d_input rows = dlogits @ weight (complete per chunk), d_weight += dlogits^T @ input_chunk and d_bias += dlogits.sum(0)
accumulated in float32 across chunks (accumulating a 16-bit weight gradient chunk by chunk is what made Liger's fused
loss drift, their #512), rounded to the weight's dtype once at the end.

For reduction "mean"/"sum" the gradients are computed in the forward (one pass over the chunks) and the backward
only scales them by grad_output. For "none" the upstream gradient differs per row, so the backward recomputes each
chunk's logits and scales its rows before the matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedopt import _backend, reference
from fusedopt.nn import _torch_args
from fusedopt.ops import cross_entropy as ce_ops

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy"]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # logits of one chunk; the row kernel writes the gradient over them


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
        return chunk_size
    return max(1, min(n_rows, DEFAULT_CHUNK_BYTES // max(1, vocab * itemsize)))


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32/fp64) += a @ b with a, b in a 16-bit or fp32 dtype: fp32 accumulation inside one GEMM where cuBLAS
    offers it, else through an upcast of the chunk."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        acc.copy_(torch.addmm(acc, a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Chunked:
    """Walks the rows chunk by chunk, producing the loss per row and, on request, the gradients."""

    def __init__(self, x, weight, bias, target, opts, backend, chunk_rows):
        self.x, self.weight, self.bias, self.target = x, weight, bias, target
        self.opts, self.backend, self.chunk_rows = opts, backend, chunk_rows

    def logits(self, lo: int, hi: int) -> Tensor:
        xs = self.x[lo:hi]
        if self.bias is None:
            return xs @ self.weight.t()
        return torch.addmm(self.bias, xs, self.weight.t())

    def run(self, need_grad: bool, row_scale: Tensor | None, need_x: bool, need_w: bool, need_b: bool):
        """row_scale: None (1), a one-element tensor (same factor for every row) or (N,) per-row factors."""
        n = self.x.shape[0]
        acc_dtype = torch.float64 if self.x.dtype == torch.float64 else torch.float32
        losses = self.x.new_empty((n,), dtype=reference.opmath_dtype(self.x.dtype))
        dx = torch.empty_like(self.x) if need_grad and need_x else None
        dw = torch.zeros(self.weight.shape, dtype=acc_dtype, device=self.x.device) if need_grad and need_w else None
        db = torch.zeros(self.bias.shape, dtype=acc_dtype, device=self.x.device) if need_grad and need_b else None
        uniform_scale = row_scale if row_scale is not None and row_scale.numel() == 1 else None
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            logits = self.logits(lo, hi).contiguous()
            loss, _, grad = ce_ops.cross_entropy_fwd(
                logits, self.target[lo:hi], None, need_grad=need_grad, grad_out=logits if need_grad else None,
                grad_scale=uniform_scale, backend=self.backend, **self.opts,
            )  # fmt: skip
            losses[lo:hi] = loss
            if not need_grad:
                continue
            if row_scale is not None and row_scale.numel() > 1:
                ce_ops.cross_entropy_scale_grad_(grad, row_scale[lo:hi].contiguous(), backend=self.backend)
            if dx is not None:
                torch.mm(grad, self.weight, out=dx[lo:hi])
            if dw is not None:
                _accumulate_mm(dw, grad.t(), self.x[lo:hi])
            if db is not None:
                db += grad.sum(0, dtype=acc_dtype)
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return losses, dx, cast(dw, self.weight), cast(db, self.bias) if self.bias is not None else None


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, opts, backend, chunk_rows):
        needs = ctx.needs_input_grad
        need_x, need_w, need_b = needs[0], needs[1], bias is not None and needs[2]
        any_grad = need_x or need_w or need_b
        walker = _Chunked(x, weight, bias, target, opts, backend, chunk_rows)
        ignore_index = opts["ignore_index"]
        denom = (target != ignore_index).sum().to(reference.opmath_dtype(x.dtype)) if reduction == "mean" else None
        grads_now = any_grad and reduction != "none"
        scale = None
        if reduction == "mean":  # all rows ignored: the loss is NaN like torch's, the gradient 0
            scale = torch.where(denom == 0, 0.0, 1.0 / denom).reshape(1)
        losses, dx, dw, db = walker.run(grads_now, scale, need_x, need_w, need_b)
        ctx.reduction = reduction
        ctx.walker_args = (opts, backend, chunk_rows)
        ctx.needs = (need_x, need_w, need_b)
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, target)
            return losses.to(x.dtype)
        ctx.save_for_backward(dx, dw, db)
        total = losses.sum()
        return (total / denom if reduction == "mean" else total).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        need_x, need_w, need_b = ctx.needs
        if ctx.reduction == "none":
            x, weight, bias, target = ctx.saved_tensors
            opts, backend, chunk_rows = ctx.walker_args
            walker = _Chunked(x, weight, bias, target, opts, backend, chunk_rows)
            row_scale = grad_output.to(reference.opmath_dtype(x.dtype)).contiguous()
            _, dx, dw, db = walker.run(True, row_scale, need_x, need_w, need_b)
        else:
            dx, dw, db = ctx.saved_tensors
            scale = grad_output.reshape(())
            dx, dw, db = (None if g is None else g * scale.to(g.dtype) for g in (dx, dw, db))
        return dx, dw, db if need_b else None, None, None, None, None, None


def _check(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> None:
    if type(weight).__name__ == "DTensor" or type(input).__name__ == "DTensor":
        raise NotImplementedError(
            "linear_cross_entropy: DTensor input/weight are not supported. Under FSDP2 call it inside the wrapped "
            "module's forward, where FSDP has gathered the weight into a plain tensor."
        )
    if input.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: input (N, H) and weight (V, H) expected, got "
                         f"{tuple(input.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if input.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: input has {input.shape[1]} features, weight {weight.shape[1]}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(f"linear_cross_entropy: target must be (N,) = ({input.shape[0]},), got {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise RuntimeError(f"linear_cross_entropy: expected target of dtype Long (class indices), got {target.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise RuntimeError(f"linear_cross_entropy: input, weight and bias must share a dtype, got {input.dtype}, "
                           f"{weight.dtype}{'' if bias is None else ', ' + str(bias.dtype)}")  # fmt: skip


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int | None = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0, softcap: float | None = None, backend: str | None = "auto",
                         chunk_size: int | None = None) -> Tensor:  # fmt: skip
    """F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=..., label_smoothing=...,
    reduction=...) without materialising the (N, V) logits. input (N, H), weight (V, H), target (N,) class indices.
    chunk_size: rows per chunk (default: from a 256 MiB budget for one chunk's logits)."""
    if torch.is_autocast_enabled(input.device.type):
        # torch would run the matmul in 16 bits and the cross-entropy in float32; the chunks do not reproduce that.
        raise NotImplementedError(
            "fusedopt linear_cross_entropy does not support torch.autocast yet: cast input, weight and bias to the "
            "16-bit dtype and call it outside autocast, or use F.linear + fusedopt.nn.functional.cross_entropy"
        )
    _check(input, weight, target, bias)
    # As torch's (F.cross_entropy, F.linear_cross_entropy): "elementwise_mean" means "mean", a negative or NaN
    # label_smoothing none, and ignore_index=None -100.
    reduction = _torch_args.reduction_name(reduction)
    label_smoothing = _torch_args.label_smoothing_value(label_smoothing)
    ignore_index = -100 if ignore_index is None else ignore_index
    resolved = _backend.resolve(backend, input.device, "cross_entropy")
    rows = _chunk_rows(input.shape[0], weight.shape[0], input.element_size(), chunk_size)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=float(z_loss),
                softcap=None if softcap is None else float(softcap), prob_target=False)  # fmt: skip
    return _LinearCrossEntropyFunction.apply(
        input.contiguous(), weight.contiguous(), bias, target.contiguous(), reduction, opts, resolved, rows
    )


class LinearCrossEntropyLoss(nn.Module):
    """Module form: loss = LinearCrossEntropyLoss(...)(input, weight, target, bias=None)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None, backend: str | None = "auto",
                 chunk_size: int | None = None):  # fmt: skip
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.backend, self.chunk_size = z_loss, softcap, backend, chunk_size

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(
            input, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction=self.reduction, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
            chunk_size=self.chunk_size,
        )  # fmt: skip
