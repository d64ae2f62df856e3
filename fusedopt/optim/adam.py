"""fusedopt.optim.Adam and AdamW: torch.optim's classes with the step done by one fused kernel per bucket."""

from __future__ import annotations

import torch

from fusedopt.ops import adam as adam_op
from fusedopt.optim._base import Bucket, FusedOptimizerMixin


class _FusedAdamStep(FusedOptimizerMixin):
    STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    OP_NAME = "adam"

    def _init_state(self, group, p, state):
        state["step"] = self._new_step_tensor(p)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        if amsgrad and "max_exp_avg_sq" not in bucket.state_lists:
            # amsgrad switched on after the state was created (e.g. a loaded state_dict): add the buffer.
            for p in bucket.params:
                st = self.state[p]
                if "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._bucket_cache.clear()
            bucket.state_lists["max_exp_avg_sq"] = [self.state[p]["max_exp_avg_sq"] for p in bucket.params]
            bucket.extra.pop(("adam_cpp", True), None)
        hyper = dict(
            lr=group["lr"],
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=self._decoupled(group),
            grad_divisor=grad_divisor,
            found_inf=found_inf,
            write_back_grads=write_back_grads,
        )
        max_sqs = bucket.state_lists.get("max_exp_avg_sq", []) if amsgrad else []
        # Eager fast path: the lists live in C++ and the grads are read there (no per-tensor Python work per step).
        # torch.compile must trace the custom op instead.
        if not torch.compiler.is_compiling():
            key = ("adam_cpp", amsgrad)
            if key not in bucket.extra:
                bucket.extra[key] = adam_op.cached_bucket(
                    bucket.local_params, bucket.state_lists["exp_avg"], bucket.state_lists["exp_avg_sq"], max_sqs,
                    bucket.steps, backend=bucket.backend,
                )  # fmt: skip
            cached = bucket.extra[key]
            if cached is not None and adam_op.adam_step_cached(cached, **hyper):
                return
        adam_op.adam_step(
            bucket.local_params,
            grads,
            bucket.state_lists["exp_avg"],
            bucket.state_lists["exp_avg_sq"],
            max_sqs,
            bucket.steps,
            backend=bucket.backend,
            **hyper,
        )

    def _decoupled(self, group) -> bool:
        return bool(group.get("decoupled_weight_decay", False))


class Adam(_FusedAdamStep, torch.optim.Adam):
    """Drop-in for torch.optim.Adam. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch", and
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, max_grad_norm=None):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
            maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._step_supports_amp_scaling = True


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """Drop-in for torch.optim.AdamW. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch", and
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 backend=None, max_grad_norm=None):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = True

    def _decoupled(self, group) -> bool:
        return True
