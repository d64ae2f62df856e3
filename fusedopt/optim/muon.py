"""fusedopt.optim.Muon: drop-in for torch.optim.Muon (same signature, errors, state key `momentum_buffer`,
state_dict both ways). A step, per (device, dtype) bucket:

1. `fusedopt::muon_momentum_step`, one fused elementwise launch for every matrix of the bucket:
   buf = lerp(buf, g, 1 - momentum), and the Nesterov update lerp(g, buf, momentum) written into one stack per
   shape (GradScaler's unscale / inf-skip and the folded clip of max_grad_norm= happen here, in the kernel);
2. per shape, the Newton-Schulz iteration of torch on the whole stack: one bmm / baddbmm per product for all
   same-shaped matrices (fusedopt/optim/_newton_schulz.py), in bfloat16 as torch;
3. per shape, `fusedopt::muon_update_step`, one fused launch: p = p * (1 - lr * wd) - lr * ratio(shape) * O.

The elementwise steps run through the optimizer engines (csrc/common/muon_{momentum,update}_math.h on cpu and cuda,
triton_kernels/muon_{momentum,update}.py, fusedopt.reference on torch); the matmuls go to BLAS / cuBLAS.
FSDP2 (DTensor Shard(0) params): step 2 gathers each stack of shards whole (one all-gather per shape), and every
rank keeps its own rows of the result; docs/MUON.md gives the communication cost.
"""

from __future__ import annotations

import math

import torch

from fusedopt.ops import optim_step
from fusedopt.optim import _newton_schulz as ns
from fusedopt.optim._base import Bucket
from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec

SPEC = OptimizerSpec(
    op="muon_momentum",
    serves_masters=False,
    hyper=("momentum", "nesterov"),
    states=(StateSpec("momentum_buffer", "momentum_buffers"),),
    scalar=None,
    flags=("nesterov",),
    hyper_of=lambda g: {"momentum": float(g["momentum"]), "nesterov": bool(g["nesterov"])},
)
UPDATE_SPEC = OptimizerSpec(op="muon_update", hyper=("weight_decay", "lr_ratio"), states=(), scalar=None)


def adjusted_lr_ratio(adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's learning-rate factor for a matrix of `shape` (A rows, B columns)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    return 1.0


class Muon(SpecOptimizerMixin, torch.optim.Muon):
    """torch.optim.Muon with fused elementwise kernels and the Newton-Schulz iteration batched across same-shaped
    matrices. Keywords as torch's, plus backend=, max_grad_norm= (a clip folded into the momentum kernel) and
    state_dtype= (the momentum buffer in int8 / int4 / fp8 codes, docs/LOW_BIT_STATES.md)."""

    SPEC = SPEC
    EXTRA_SPECS = (UPDATE_SPEC,)

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 backend=None, max_grad_norm=None, state_dtype=None):  # fmt: skip
        self._fusedopt_setup(backend, False, max_grad_norm, state_dtype=state_dtype)
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                         adjust_lr_fn=adjust_lr_fn)  # fmt: skip
        self._step_supports_amp_scaling = True

    def _shape_groups(self, bucket: Bucket) -> tuple:
        """Cached per bucket: the momentum outputs in bucket order, and per shape (first param, its local params,
        the stack [B, *local shape] those outputs are views of, and the views). After the iteration the stack holds
        the orthogonalized update (the update kernel's input): no further buffer, and fixed addresses for CUDA
        graphs."""
        cached = bucket.extra.get("muon_groups")
        if cached is None:
            by_shape: dict = {}
            for i, (p, lp) in enumerate(zip(bucket.params, bucket.local_params)):
                if p.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")
                by_shape.setdefault((tuple(p.shape), tuple(lp.shape)), []).append(i)
            outs: list = [None] * len(bucket.params)
            groups = []
            for (_, local_shape), idx in by_shape.items():
                stack = torch.zeros((len(idx), *local_shape), dtype=bucket.dtype, device=bucket.device)
                views = list(stack.unbind(0))
                for i, v in zip(idx, views):
                    outs[i] = v
                groups.append((bucket.params[idx[0]], [bucket.local_params[i] for i in idx], stack, views))
            cached = bucket.extra["muon_groups"] = (outs, groups)
        return cached

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        ns.check_ns_arguments(group["ns_coefficients"], group["ns_steps"])
        outs, groups = self._shape_groups(bucket)
        hyper = SPEC.hyper_values(group)
        used = SPEC.used_states(hyper)
        args = dict(lr=group["lr"], hyper=hyper, maximize=False, grad_divisor=grad_divisor, found_inf=found_inf,
                    write_back_grads=write_back_grads, backend=bucket.backend)  # fmt: skip
        try:
            if bucket.quantized:  # the momentum buffer in low-bit codes: dequantized, updated, requantized in-kernel
                codes, absmax = self._q8_lists(group, bucket, used)
                optim_step.step_q8(SPEC, outs, grads, codes, absmax, [], state_dtype=group["state_dtype"], **args)
            else:
                optim_step.step(SPEC, outs, grads, self._state_lists(group, bucket, used), [], **args)
        except (RuntimeError, ValueError) as err:
            _raise_if_resized(outs, grads, err)
            raise
        distributed = hasattr(bucket.params[0], "_local_tensor")
        for first, params, stack, views in groups:
            coefs, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
            if distributed:
                ortho = ns.orthogonalize(ns.gather_full(stack, first), coefs, steps, eps)
                stack.copy_(ns.local_rows(ortho, first))
            else:
                ns.orthogonalize(stack, coefs, steps, eps, out=stack)  # cast and un-transposed into the stack
            hyper = {"weight_decay": float(group["weight_decay"]),
                     "lr_ratio": adjusted_lr_ratio(group["adjust_lr_fn"], first.shape)}  # fmt: skip
            optim_step.step(UPDATE_SPEC, params, views, [], [], lr=group["lr"], hyper=hyper, maximize=False,
                            found_inf=found_inf, backend=bucket.backend)  # fmt: skip


def _raise_if_resized(outs: list, grads: list, err: Exception) -> None:
    """The kernels check each grad against its step buffer, a view of the cached Newton-Schulz stack: where a param
    was resized after its state was made (torch.optim.Muon raises there too), say so in the param's terms. Looked at
    only once a step has failed: no per-step cost."""
    for out, grad in zip(outs, grads):
        if out.shape != grad.shape:
            raise RuntimeError(f"Muon: a param of shape {list(grad.shape)} has state made for shape "
                               f"{list(out.shape)}: a param resized after its first step needs its state "
                               "reset (del optimizer.state[param])") from err  # fmt: skip
