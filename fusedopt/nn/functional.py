"""torch.nn.functional-style fused losses and their autograd.Functions.

`cross_entropy` is F.cross_entropy with torch's exact arguments, checks and results, plus keyword-only extras. The
forward makes one pass over the logits per row and, when a gradient is needed, writes it in that same pass; the
backward only scales the saved gradient by grad_output, in place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import _reduction as _Reduction

from fusedopt import _backend, reference
from fusedopt.nn import _torch_args, vocab_parallel
from fusedopt.ops import cross_entropy as ce_ops

__all__ = [
    "CrossEntropyFunction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "mse_loss",
]

def _mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int, prob_target: bool, rows: int,
                      num_classes: int, dtype: torch.dtype) -> Tensor:  # fmt: skip
    """torch's divisor for reduction="mean", kept on the device: the summed class weights of the non-ignored rows
    (their count without a weight), or the number of rows for probability targets (0 without classes: torch's mean
    of an empty input)."""
    if prob_target:
        return torch.full((), rows if num_classes else 0, dtype=dtype, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    # Clamped so that an out-of-range target reaches the kernel, which reports it as torch does.
    return torch.where(valid, weight[target.clamp(0, num_classes - 1)], 0.0).sum()


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether `dtype` holds values that 16-bit `than` would round (float32, float64, or the other 16-bit type)."""
    return than in (torch.float16, torch.bfloat16) and torch.promote_types(than, dtype) != than


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend for this device; a constant for torch.compile (it reads the environment and imports modules)."""
    return _backend.resolve(backend, torch.device(device_type), "cross_entropy")


class CrossEntropyFunction(torch.autograd.Function):
    """logits (M, C) contiguous -> (loss reduced as asked, lse). See fusedopt.nn.functional.cross_entropy.

    The forward writes the gradient of the reduced loss for grad_output = 1 (the mean's 1/denominator folded in); the
    backward scales it in place by grad_output, which costs nothing when grad_output is 1 on the cpu/cuda/triton
    backends."""

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, prob_target,
                backend, need_grad, inplace, out_dtype, out_shape):  # fmt: skip
        rows, num_classes = logits.shape
        opmath = reference.opmath_dtype(logits.dtype)
        denom = grad_scale = None
        if reduction == "mean":
            denom = _mean_denominator(target, weight, ignore_index, prob_target, rows, num_classes, opmath)
            # A zero denominator (no kept rows, or kept rows of weight 0) gives torch's results: a NaN loss (its
            # nll term is 0/0), a NaN gradient on kept rows and 0 on ignored ones (the kernels write those unscaled).
            grad_scale = torch.where(denom == 0, float("nan"), 1.0 / denom).reshape(1)
        loss, lse, grad = ce_ops.cross_entropy_fwd(
            logits, target, weight, need_grad=need_grad, grad_out=logits if need_grad and inplace else None,
            grad_scale=grad_scale, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, prob_target=prob_target, backend=backend,
        )  # fmt: skip
        if need_grad and inplace:
            # The logits now hold the gradient: any other autograd user that saved them must fail, not read garbage.
            torch.autograd.graph.increment_version(logits)
        if reduction == "none":
            out = loss.to(out_dtype).reshape(out_shape)
        elif reduction == "sum":
            out = loss.sum().to(out_dtype)
        else:
            out = torch.where(denom == 0, float("nan"), loss.sum() / denom).to(out_dtype)
        ctx.reduction = reduction
        ctx.backend = backend
        ctx.consumed = False
        ctx.save_for_backward(grad)
        lse = lse.reshape(out_shape)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        nones = (None,) * 13
        if grad_loss is None:
            return (None, *nones)
        if ctx.consumed:
            raise RuntimeError(
                "fusedopt cross_entropy: backward ran twice through the same graph (retain_graph=True); the saved "
                "gradient is scaled in place by the first backward. Use torch.nn.functional.cross_entropy for that."
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        scale = grad_loss.reshape(-1).to(reference.opmath_dtype(grad.dtype)).contiguous()
        ce_ops.cross_entropy_scale_grad_(grad, scale, backend=ctx.backend)
        return (grad, *nones)


def _check_and_flatten(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int):
    """torch's argument checks (same conditions, same messages where torch has them), then the (M, C) row view.
    Returns logits2d, target rows, weight in opmath, prob_target, loss dtype, shape of the unreduced loss."""
    if not input.is_floating_point():
        raise RuntimeError(f"cross_entropy: expected a floating point input, got {input.dtype}")
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have a class dimension, got a 0-d tensor")
    if target.device != input.device:
        raise RuntimeError(f"cross_entropy: target is on {target.device}, input on {input.device}")
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    prob_target = input.shape == target.shape
    if prob_target:
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:  # torch multiplies by the weight in its own dtype: a float64 weight gives float64
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            name = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char"}.get(target.dtype, str(target.dtype))
            raise RuntimeError(f"expected target dtype to be Long or Byte, but got {name}")
        out_dtype = input.dtype
        if input.dim() <= 2:
            if target.dim() > 1:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
            batch = 1 if input.dim() == 1 else input.shape[0]
            if target.numel() != batch:
                raise ValueError(f"Expected input batch_size ({batch}) to match target batch_size ({target.numel()}).")
        else:
            expected = (input.shape[0], *input.shape[2:])
            if target.dim() != input.dim() - 1:
                raise RuntimeError(f"only batches of spatial targets supported ({input.dim() - 1}D tensors) but got "
                                   f"targets of dimension: {target.dim()}")  # fmt: skip
            if tuple(target.shape) != expected:
                raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                               f"but got weight tensor of shape: {list(weight.shape)}")  # fmt: skip
        if not prob_target and weight.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {input.dtype} but found {weight.dtype} (weight)")
        if weight.device != input.device:
            raise RuntimeError(f"cross_entropy: weight is on {weight.device}, input on {input.device}")
        weight = weight.to(reference.opmath_dtype(input.dtype)).contiguous()

    if input.dim() == 1:
        logits, out_shape = input.unsqueeze(0), ()
        rows = target.reshape(1, -1) if prob_target else target.reshape(1)
    elif input.dim() == 2:
        logits, out_shape = input, (input.shape[0],)
        rows = target
    else:  # (N, C, d1, ...): classes last, one row per position
        out_shape = (input.shape[0], *input.shape[2:])
        positions = math.prod(out_shape)  # not -1: ambiguous when there are no classes
        logits = input.movedim(1, -1).reshape(positions, num_classes)
        rows = target.movedim(1, -1).reshape(positions, num_classes) if prob_target else target.reshape(-1)
    rows = rows.to(input.dtype if prob_target else torch.int64).contiguous()
    return logits.contiguous(), rows, weight, prob_target, out_dtype, out_shape


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                  ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, backend: str | None = "auto", z_loss: float = 0.0,
                  softcap: float | None = None, return_lse: bool = False, inplace_backward: bool = False,
                  process_group=None, vocab_start: int | None = None,
                  vocab_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """torch.nn.functional.cross_entropy, fused. Extras (keyword-only):

    backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (see fusedopt._backend).
    z_loss: adds z_loss * logsumexp(logits)^2 to every non-ignored row's loss (PaLM), with its gradient.
    softcap: replaces the logits by softcap * tanh(logits / softcap) before the softmax (Gemma-2), with its gradient.
    return_lse: also return the per-position logsumexp (float32, float64 for float64 input; 0 on ignored rows; not
        differentiable), shaped like the unreduced loss.
    inplace_backward: write the gradient over the logits instead of a new buffer (saves one logits-sized buffer). Only
        safe when nothing else reads these logits after this call; see docs/CROSS_ENTROPY.md. Another autograd user of
        the logits then fails loudly (version counter), it is never silently corrupted.

    Logits sharded along the class dim (tensor parallelism; see docs/CROSS_ENTROPY.md), never gathered:
    process_group: `input` holds this rank's columns [vocab_start, vocab_start + local) of the logits; the loss (the
        same on every rank) and this rank's gradient columns are those of the whole vocabulary. target and weight
        (over the whole vocabulary) are the same on every rank.
    vocab_start: the global index of this rank's first column (default: rank * local, equal shards).
    vocab_size: the real vocabulary (default: world * local). Columns at or past it are padding: never counted, never
        a target (a target there is out of bounds), gradient 0.
    A DTensor `input` sharded along the class dim (Shard(-1) of (N, C) logits) takes this path by itself, inside or
    outside torch's loss_parallel() context, and gives Replicate DTensors as torch's loss_parallel does.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction = _torch_args.reduction_name(reduction)
    if _is_dtensor(input):
        return vocab_parallel.dtensor_cross_entropy(
            cross_entropy, input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, backend=backend, z_loss=z_loss, softcap=softcap, return_lse=return_lse,
            inplace_backward=inplace_backward,
        )  # fmt: skip
    label_smoothing = _torch_args.label_smoothing_value(label_smoothing)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"cross_entropy: softcap must be a positive number or None, got {softcap}")
    if torch.is_autocast_enabled(input.device.type):
        # autocast runs cross_entropy in float32 (on CPU and CUDA): cast 16-bit logits, probability targets and weight
        # up (differentiably) as autocast does before torch's kernel, so the loss has torch's dtype and value.
        input, target, weight = (t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                                 for t in (input, target, weight))  # fmt: skip
    if input.shape == target.shape and target.is_floating_point() and _wider(target.dtype, input.dtype):
        # Probability targets wider than 16-bit logits: torch uses them unrounded. The kernels read targets in the
        # logits' dtype, so run in float32 (their math precision anyway; the gradient flows back through the cast).
        input = input.float()
    if process_group is not None:
        loss, lse = _vocab_parallel_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing,
                                                  z_loss, softcap, inplace_backward, process_group, vocab_start,
                                                  vocab_size)  # fmt: skip
        return (loss, lse) if return_lse else loss
    logits, rows, w, prob_target, out_dtype, out_shape = _check_and_flatten(input, target, weight, ignore_index)
    if prob_target and target.requires_grad and torch.is_grad_enabled():
        # torch differentiates through probability targets too; the fused kernels do not, so use the formula.
        loss = reference.cross_entropy_formula(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                               softcap)  # fmt: skip
        if not return_lse:
            return loss
        z = reference.softcap_logits(input.detach(), softcap).to(reference.opmath_dtype(input.dtype))
        return loss, torch.logsumexp(z, dim=0 if input.dim() == 1 else 1)
    resolved = _resolve_backend(backend, input.device.type)
    if logits.numel() == 0:
        resolved = "torch"  # nothing to fuse; the reference handles empty batches
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss, lse = CrossEntropyFunction.apply(
        logits, rows, w, reduction, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), prob_target, resolved, need_grad, inplace_backward, out_dtype,
        out_shape,
    )  # fmt: skip
    return (loss, lse) if return_lse else loss


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _vocab_parallel_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                  inplace_backward, group, vocab_start, vocab_size):  # fmt: skip
    """cross_entropy on this rank's columns of class-sharded logits (see vocab_parallel.py). Returns (loss, lse)."""
    import torch.distributed as dist

    if inplace_backward:
        raise NotImplementedError("fusedopt cross_entropy: inplace_backward with process_group is not supported")
    if input.shape == target.shape and target.is_floating_point():
        raise NotImplementedError("fusedopt cross_entropy: probability targets with process_group are not supported")
    local = input.shape[0 if input.dim() == 1 else 1]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * local
    if vocab_size is None:
        vocab_size = dist.get_world_size(group) * local
    if vocab_start < 0 or vocab_size < 0:
        raise ValueError(f"cross_entropy: vocab_start and vocab_size must be >= 0, got {vocab_start}, {vocab_size}")
    logits, rows, _, _, out_dtype, out_shape = _check_and_flatten(input, target, None, ignore_index)
    opmath = reference.opmath_dtype(input.dtype)
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != vocab_size:
            raise RuntimeError(f"weight tensor should be defined for all {vocab_size} classes of the vocabulary (not "
                               f"this rank's shard) but got weight tensor of shape: {list(weight.shape)}")  # fmt: skip
        if weight.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {input.dtype} but found {weight.dtype} (weight)")
        if weight.device != input.device:
            raise RuntimeError(f"cross_entropy: weight is on {weight.device}, input on {input.device}")
        weight = weight.to(opmath).contiguous()
    denom = None
    if reduction == "mean":
        denom = _mean_denominator(rows, weight, ignore_index, False, rows.numel(), vocab_size, opmath)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    return vocab_parallel.VocabParallelCrossEntropyFunction.apply(
        logits, rows, weight, reduction, denom, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), vocab_start, vocab_size, group, need_grad, out_dtype, out_shape,
    )  # fmt: skip


# --- Pointwise losses: MSE, BCE, BCE with logits (implemented in fusedopt/nn/mse_loss.py and bce_loss.py) ---------
from fusedopt.nn import bce_loss as _bce  # noqa: E402
from fusedopt.nn import mse_loss as _mse  # noqa: E402


def mse_loss(input: Tensor, target: Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: Tensor | None = None, *,
             backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.mse_loss, fused (one pass: loss and input gradient)."""
    return _mse.mse_loss(input, target, size_average, reduce, reduction, weight, backend=backend)


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                         reduce: bool | None = None, reduction: str = "mean", *,
                         backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy, fused (one pass: loss and input gradient)."""
    return _bce.binary_cross_entropy(input, target, weight, size_average, reduce, reduction, backend=backend)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: Tensor | None = None, *,
                                     backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy_with_logits, fused (one pass: loss and input gradient)."""
    return _bce.binary_cross_entropy_with_logits(input, target, weight, size_average, reduce, reduction, pos_weight,
                                                 backend=backend)  # fmt: skip


# --- Linear + cross-entropy (implemented in fusedopt/nn/linear_cross_entropy.py) ------------------------------------
from fusedopt.nn.linear_cross_entropy import linear_cross_entropy  # noqa: E402
