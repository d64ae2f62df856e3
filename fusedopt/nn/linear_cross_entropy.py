"""Linear + cross-entropy without the (N, V) logits: torch 2.14's F.linear_cross_entropy and
nn.LinearCrossEntropyLoss, fused.

`linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction, ignore_index,
label_smoothing, options)` takes torch's signature and returns torch's reference
F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...), never holding more than a chunk of the
logits. The two algorithms (row-chunked, vocab-blocked) are in _linear_ce_engines.py; this file checks arguments as
torch does, handles autocast and the input layouts, and holds the autograd Function and the module.

With reduction "mean"/"sum" the gradients are computed in the forward and the backward only scales them by
grad_output (in place, so no second copy of the gradients exists); "none" recomputes in the backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedopt import _backend, reference
from fusedopt.nn import _linear_ce_engines as engines
from fusedopt.nn import _torch_args

__all__ = ["LinearCrossEntropyFunction", "LinearCrossEntropyLoss", "linear_cross_entropy"]

MODES = ("auto", "row_chunked", "vocab_blocked")
# mode="auto": vocab_blocked when a 16-bit weight's float32 gradient accumulator (4 x V x H bytes) would be larger.
VOCAB_BLOCKED_ABOVE = 64 * 2**20
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _plain_eager() -> bool:
    """Neither torch.compile nor a torch.func transform is running (both need the backward free of side effects)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None


def _refuse_higher_order() -> None:
    """The backward reuses gradients computed in the forward: it has no graph of its own to differentiate."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    if torch._C._functorch.maybe_current_level() is not None:  # torch.func.grad runs backward with grad mode on
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = [i.key() for i in retrieve_all_functorch_interpreters()]
        if sum(k in (TransformType.Grad, TransformType.Jvp) for k in kinds) <= 1:
            return
    raise RuntimeError(
        "fusedopt linear_cross_entropy does not support higher-order gradients (create_graph=True, hessian, "
        "torch.func.grad of a grad): its backward reuses gradients computed in the forward. Use "
        "F.cross_entropy(F.linear(...)) where a double backward is needed."
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(x (N, H), w (V, H), b (V,) or None, target rows, class weight or None, Plan, need_x, need_w, need_b) ->
    (loss, d_x, d_w, d_b). The gradients are outputs only so that setup_context can save them (torch.func needs
    that form); they are marked non-differentiable and linear_cross_entropy returns the loss alone."""

    @staticmethod
    def forward(x, w, b, target, cw, plan: engines.Plan, need_x: bool, need_w: bool, need_b: bool):
        with torch.no_grad():  # under torch.func the inputs still require grad here; the engines write with out=
            return LinearCrossEntropyFunction._forward(x, w, b, target, cw, plan, need_x, need_w, need_b)

    @staticmethod
    def _forward(x, w, b, target, cw, plan: engines.Plan, need_x: bool, need_w: bool, need_b: bool):
        if plan.reduction == "none":  # the upstream gradient differs per row: computed in backward
            losses, *_ = engines.compute(x, w, b, target, cw, plan, None, False, False, False)
            return losses.to(plan.loss_dtype), None, None, None
        from fusedopt.nn.functional import _mean_denominator

        scale = denom = None
        if plan.reduction == "mean":  # all rows ignored: the loss is NaN like torch's, the gradients 0
            opmath = reference.opmath_dtype(x.dtype)
            denom = _mean_denominator(target, cw, plan.ignore_index, plan.prob_target, x.shape[0], w.shape[0], opmath)
            scale = torch.where(denom == 0, 0.0, 1.0 / denom).reshape(1)
        losses, dx, dw, db = engines.compute(x, w, b, target, cw, plan, scale, need_x, need_w, need_b)
        total = losses.sum()
        return (total if denom is None else total / denom).to(plan.loss_dtype), dx, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, target, cw, plan, need_x, need_w, need_b = inputs
        ctx.plan, ctx.needs, ctx.consumed = plan, (need_x, need_w, need_b), False
        ctx.set_materialize_grads(False)  # else autograd passes zeros the size of every gradient output to backward
        if plan.reduction == "none":
            ctx.save_for_backward(x, w, b, target, cw)
        else:
            ctx.save_for_backward(*output[1:])
            ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_grads):
        _refuse_higher_order()
        plan, (need_x, need_w, need_b) = ctx.plan, ctx.needs
        rest = (None,) * 6
        if grad_loss is None:
            return None, None, None, *rest
        if plan.reduction == "none":
            x, w, b, target, cw = ctx.saved_tensors
            row_scale = grad_loss.to(reference.opmath_dtype(x.dtype)).reshape(-1).contiguous()
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                _, dx, dw, db = engines.compute(x, w, b, target, cw, plan, row_scale, need_x, need_w, need_b)
            return dx, dw, db, *rest
        grads = ctx.saved_tensors
        in_place = _plain_eager() and not plan.retain_graph
        if in_place:
            if ctx.consumed:
                raise RuntimeError(
                    "fusedopt linear_cross_entropy: backward ran twice through the same graph; the first backward "
                    "scaled the saved gradients in place. Pass options=torch.nn.LinearCrossEntropyOptions("
                    "allow_retain_graph=True) to keep them (one gradient-sized copy per backward)."
                )
            ctx.consumed = True
            if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:  # loss.backward(): nothing to scale
                return *grads, *rest
        scale = grad_loss.reshape(())
        if in_place:
            grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        else:
            grads = tuple(None if g is None else g * scale.to(g.dtype) for g in grads)
        return *grads, *rest


# --- arguments ---------------------------------------------------------------------------------------------------


def _check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> None:
    """torch's checks and messages, except that input may have any number of leading dims (fusedopt's extension)."""
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality at least 1, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")  # fmt: skip
    if linear_bias is not None and tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
        raise RuntimeError(f"expected linear_bias shape {tuple(linear_weight.shape[:-1])}, "
                           f"got {tuple(linear_bias.shape)}")  # fmt: skip
    if linear_weight.dim() > 2 and input.dim() != 2:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
                           f"requires batched input, (N, {input.shape[-1]}), got input with shape "
                           f"{tuple(input.shape)}")  # fmt: skip
    if type(linear_weight).__name__ == "DTensor" or type(input).__name__ == "DTensor":
        raise NotImplementedError(
            "linear_cross_entropy: DTensor input/weight are not supported. Under FSDP2 call it inside the wrapped "
            "module's forward, where FSDP has gathered the weight into a plain tensor."
        )


def _target_rows(input: Tensor, target: Tensor, prob: bool) -> Tensor:
    """The target as rows of the flattened (rows, H) input: (rows,) int64 class indices or (rows, V) probabilities."""
    if prob:
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
        return target.reshape(-1, target.shape[-1]).contiguous()
    if target.dtype not in (torch.int64, torch.uint8):
        name = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char"}.get(target.dtype, str(target.dtype))
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {name}")
    if input.dim() <= 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        batch = 1 if input.dim() == 1 else input.shape[0]
        if target.numel() != batch:
            raise ValueError(f"Expected input batch_size ({batch}) to match target batch_size ({target.numel()}).")
    elif tuple(target.shape) != tuple(input.shape[:-1]):
        raise RuntimeError(f"linear_cross_entropy: expected target of shape {list(input.shape[:-1])} (the input's "
                           f"leading dims), got {list(target.shape)}")  # fmt: skip
    return target.reshape(-1).to(torch.int64).contiguous()


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype, as its error messages spell it."""
    names = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}
    return names.get(dtype, str(dtype))


def _class_weight(weight: Tensor | None, num_classes: int, input: Tensor, strict_dtype: bool) -> Tensor | None:
    if weight is None:
        return None
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")  # fmt: skip
    if strict_dtype and weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {_scalar_name(input.dtype)} but found {_scalar_name(weight.dtype)}")
    if weight.device != input.device:
        raise RuntimeError(f"linear_cross_entropy: weight is on {weight.device}, input on {input.device}")
    return weight.detach().to(reference.opmath_dtype(input.dtype)).contiguous()


def _resolve_mode(mode: str, linear_weight: Tensor) -> str:
    if mode not in MODES:
        raise ValueError(f"linear_cross_entropy: mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    accumulator = 4 * linear_weight.numel()
    big_16_bit = linear_weight.dtype in _SIXTEEN_BIT and accumulator > VOCAB_BLOCKED_ABOVE
    return "vocab_blocked" if big_16_bit else "row_chunked"


def _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, z_loss,
             softcap, loss_dtype):  # fmt: skip
    """The plain expression, for the cases the fused path leaves to torch (see linear_cross_entropy)."""
    logits = F.linear(input, linear_weight, linear_bias)
    flat = logits.flatten(0, -2) if logits.dim() > 2 else logits
    rows = target.flatten(0, -2) if target.dim() > 2 else target
    loss = reference.cross_entropy_formula(flat, rows, weight, ignore_index, reduction, label_smoothing, z_loss,
                                           softcap)  # fmt: skip
    loss = loss.reshape(input.shape[:-1]) if reduction == "none" else loss
    return loss if loss_dtype is None else loss.to(loss_dtype)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0, options=None,
                         z_loss: float = 0.0, softcap: float | None = None, loss_dtype: torch.dtype | None = None,
                         mode: str = "auto", chunk_size: int | None = None, vocab_block_size: int | None = None,
                         backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.linear_cross_entropy (torch 2.14), fused: F.cross_entropy(F.linear(input, linear_weight,
    linear_bias), target, weight=weight, ...) without the (N, V) logits. See docs/LINEAR_CROSS_ENTROPY.md.

    Beyond torch: input may be (B, T, H) or any (..., H) with target (B, T) / (..., ): the leading dims are
    flattened (torch's raises on 3-D input; the reference is F.cross_entropy(F.linear(x, w).flatten(0, -2),
    t.flatten())). Under torch.autocast the matmuls run in the autocast dtype and the rows in float32, as F.linear
    + F.cross_entropy do. Keyword-only extras:

    z_loss: adds z_loss * logsumexp^2 per row (PaLM). softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2).
    loss_dtype: the returned loss's dtype, e.g. torch.float32 for 16-bit inputs (what HF's upcast gives); default:
        the input's dtype (float32 under autocast, as torch's).
    mode: "auto" | "row_chunked" | "vocab_blocked" (see docs); chunk_size: rows per chunk; vocab_block_size:
        vocabulary columns per block of the vocab-blocked weight gradient. backend: fusedopt's CE row kernel.
    options: torch.nn.LinearCrossEntropyOptions; batch_chunk_size is the chunk size, allow_retain_graph keeps the
        gradients for a second backward; the rest is ignored (fusedopt always accumulates in float32 and sizes
        chunks from a memory budget).
    bias (4th positional or bias=): deprecated spelling of linear_bias.
    """
    if bias is not None:
        warnings.warn("linear_cross_entropy: `bias` is deprecated, pass linear_bias= (torch's name)",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        if linear_bias is not None:
            raise TypeError("linear_cross_entropy: got both bias and linear_bias")
        linear_bias = bias
    # torch's readings, shared with cross_entropy: "elementwise_mean" is "mean" (with torch's warning), a negative or
    # NaN label_smoothing is none, one above 1 raises.
    reduction = _torch_args.reduction_name(reduction)
    smoothing = _torch_args.label_smoothing_value(float(label_smoothing))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be a positive number or None, got {softcap}")
    _check_linear(input, linear_weight, linear_bias)
    num_classes = linear_weight.shape[0]
    if linear_weight.dim() > 2:  # K-dimensional loss: small per-position heads, torch's own reference path
        if z_loss or softcap is not None:
            raise NotImplementedError("linear_cross_entropy: z_loss and softcap need a 2-D linear_weight")
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=smoothing)  # fmt: skip
    prob = tuple(target.shape) == (*input.shape[:-1], num_classes)
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    device_type = input.device.type
    amp = torch.is_autocast_enabled(device_type) and input.dtype != torch.float64
    if prob and (amp or target.dtype != input.dtype or (target.requires_grad and torch.is_grad_enabled())):
        # Probability targets that torch would promote, autocast or differentiate: the plain expression.
        return _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, smoothing, z_loss,
                        softcap, loss_dtype)  # fmt: skip
    if amp:  # as F.linear under autocast: the operands in the autocast dtype; the rows run in float32 anyway
        low = torch.get_autocast_dtype(device_type)
        input, linear_weight, linear_bias = (t if t is None or t.dtype == torch.float64 else t.to(low)
                                             for t in (input, linear_weight, linear_bias))  # fmt: skip
        loss_dtype = torch.float32 if loss_dtype is None else loss_dtype
    if input.dtype != linear_weight.dtype or (linear_bias is not None and linear_bias.dtype != linear_weight.dtype):
        raise RuntimeError(f"linear_cross_entropy: input, linear_weight and linear_bias must share a dtype, got "
                           f"{input.dtype}, {linear_weight.dtype}"
                           f"{'' if linear_bias is None else ', ' + str(linear_bias.dtype)}")  # fmt: skip
    rows = _target_rows(input, target, prob)
    cw = _class_weight(weight, num_classes, input, strict_dtype=not (prob or amp))
    x = input.reshape(-1, input.shape[-1]).contiguous()
    if options is not None and chunk_size is None:
        chunk_size = options.batch_chunk_size
    resolved = _backend.resolve(backend, input.device, "cross_entropy")
    plan = engines.Plan(
        reduction, ignore_index, smoothing, float(z_loss), None if softcap is None else float(softcap), prob,
        resolved, _resolve_mode(mode, linear_weight),
        engines.chunk_rows(x.shape[0], num_classes, x.element_size(), chunk_size),
        engines.vocab_block(x.shape[0], num_classes, x.element_size(), vocab_block_size),
        input.dtype if loss_dtype is None else loss_dtype, bool(options is not None and options.allow_retain_graph),
    )  # fmt: skip
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (x, linear_weight, linear_bias)]
    with torch.autocast(device_type, enabled=False):
        loss = LinearCrossEntropyFunction.apply(x, linear_weight.contiguous(), linear_bias, rows, cw, plan, *needs)[0]
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


class LinearCrossEntropyLoss(nn.LinearCrossEntropyLoss):
    """torch.nn.LinearCrossEntropyLoss (torch 2.14), fused: owns its Linear(in_features, num_classes) head
    (`self.linear`, torch's parameter names, so state dicts load both ways) and is called as loss(input, target).
    Keyword-only extras as in linear_cross_entropy. For a head owned elsewhere (an LM's output embedding), call
    fusedopt.nn.functional.linear_cross_entropy(hidden, head.weight, target)."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Tensor | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: float | None = None, loss_dtype: torch.dtype | None = None, mode: str = "auto",
                 chunk_size: int | None = None, vocab_block_size: int | None = None,
                 backend: str | None = "auto") -> None:  # fmt: skip
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                         reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)  # fmt: skip
        self.z_loss, self.softcap, self.loss_dtype, self.mode = z_loss, softcap, loss_dtype, mode
        self.chunk_size, self.vocab_block_size, self.backend = chunk_size, vocab_block_size, backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        w, b = self.linear.weight, self.linear.bias
        if self.out_features:
            w = w.reshape(self.num_classes, *self.out_features, self.linear.in_features)
            b = None if b is None else b.reshape(self.num_classes, *self.out_features)
        return linear_cross_entropy(
            input, w, target, linear_bias=b, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            z_loss=self.z_loss, softcap=self.softcap, loss_dtype=self.loss_dtype, mode=self.mode,
            chunk_size=self.chunk_size, vocab_block_size=self.vocab_block_size, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extras = f", z_loss={self.z_loss}" if self.z_loss else ""
        extras += f", softcap={self.softcap}" if self.softcap is not None else ""
        extras += f", mode={self.mode}" if self.mode != "auto" else ""
        return super().extra_repr() + extras
