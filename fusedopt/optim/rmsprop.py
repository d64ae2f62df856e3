"""fusedopt.optim.RMSprop: torch.optim.RMSprop with the step done by one fused kernel per bucket (torch has no
fused RMSprop)."""

from __future__ import annotations

import torch

from fusedopt.ops import rmsprop as rmsprop_op
from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor


class RMSprop(FusedOptimizerMixin, torch.optim.RMSprop):
    """Drop-in for torch.optim.RMSprop. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch", and
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`)."""

    STATE_KEYS = ("square_avg", "grad_avg", "momentum_buffer")
    OP_NAME = "rmsprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 max_grad_norm=None):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm)
        super().__init__(
            params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )  # fmt: skip
        self._step_supports_amp_scaling = True

    def _init_state(self, group, p, state):
        state["step"] = self._new_step_tensor(p)
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _ensure_state(self, bucket: Bucket, key: str) -> list:
        """The bucket's list for `key`, creating zero buffers that are missing (momentum or centered switched on
        after the state was made, e.g. by a loaded state_dict)."""
        if key not in bucket.state_lists:
            for p in bucket.params:
                self.state[p].setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
            bucket.state_lists[key] = [local_tensor(self.state[p][key]) for p in bucket.params]
        return bucket.state_lists[key]

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        momentum, centered = group["momentum"], group["centered"]
        lists = (
            bucket.local_params,
            bucket.state_lists["square_avg"],
            self._ensure_state(bucket, "grad_avg") if centered else [],
            self._ensure_state(bucket, "momentum_buffer") if momentum > 0 else [],
            bucket.steps,
        )
        hyper = dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                     momentum=momentum, centered=centered, maximize=group["maximize"], grad_divisor=grad_divisor,
                     found_inf=found_inf, write_back_grads=write_back_grads)  # fmt: skip
        # Eager fast path: the lists live in C++ and the grads are read there; torch.compile traces the op instead.
        if not torch.compiler.is_compiling():
            key = ("rmsprop_cpp", bool(centered), momentum > 0)
            if key not in bucket.extra:
                bucket.extra[key] = rmsprop_op.cached_bucket(*lists, backend=bucket.backend)
            cached = bucket.extra[key]
            if cached is not None and rmsprop_op.rmsprop_step_cached(cached, **hyper):
                return
        params, square_avgs, grad_avgs, momentum_buffers, steps = lists
        rmsprop_op.rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                                backend=bucket.backend, **hyper)  # fmt: skip
