"""fusedopt.optim.SGD: torch.optim.SGD with the step done by one fused kernel per bucket.

State as torch's: no 'step'; 'momentum_buffer' only when momentum != 0, created on a param's first step as a copy of
its grad. In the kernel that copy is a per-tensor first-step flag (the spec's scalar), so a first step that
GradScaler skips (found_inf, known only on the device) leaves the flag set and the next step still starts the buffer
from the grad, with no host sync. Such a buffer reads as zeros in state_dict() until that next step (torch would have
no buffer yet).
"""

from __future__ import annotations

import torch

from fusedopt.optim._base import Bucket, local_tensor
from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec

SPEC = OptimizerSpec(
    op="sgd",
    hyper=("momentum", "dampening", "weight_decay", "nesterov"),
    flags=("nesterov",),
    states=(StateSpec("momentum_buffer", "momentum_buffers", when=lambda h: h["momentum"] != 0),),
    scalar="first_flag",
)


class SGD(SpecOptimizerMixin, torch.optim.SGD):
    """Drop-in for torch.optim.SGD. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch",
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`), state_dtype="int8",
    "int4" or "fp8" (block-wise quantized states, docs/LOW_BIT_STATES.md), bf16_stochastic_round (bf16 params stored by
    stochastic rounding, reproducible from stochastic_round_seed), and master_weights=True|"remainder" (exact float32
    masters of 16-bit params, docs/MASTER_WEIGHTS.md)."""

    SPEC = SPEC
    LAZY_STATE = True  # torch's SGD has no state until a step with momentum

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, backend=None, max_grad_norm=None,
                 state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        self._first_flags: dict = {}  # param -> float32 device flag: buffer not started yet (see module doc)
        self._repeat_flags: dict = {}  # param -> its flag before this step's first pass (params listed twice)
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = True

    def _after_load_state_dict(self) -> None:
        for st in self.state.values():
            if "momentum_buffer" in st and st["momentum_buffer"] is None:  # old torch state_dicts
                del st["momentum_buffer"]
        self._first_flags.clear()
        super()._after_load_state_dict()

    def _flag_first_step(self, p) -> None:
        """A new momentum buffer, full precision or quantized, starts from the grad on p's next step."""
        self._first_flags[p] = torch.ones((), dtype=torch.float32, device=local_tensor(p).device)

    def _new_state_buffer(self, group: dict, p, spec: StateSpec):
        self._flag_first_step(p)
        return super()._new_state_buffer(group, p, spec)

    def _new_q8_state(self, group: dict, p, spec: StateSpec, state: dict) -> None:
        self._flag_first_step(p)  # without it a quantized buffer started at zero: dampening scaled the first grad
        super()._new_q8_state(group, p, spec, state)

    def _scalars(self, group, bucket: Bucket) -> list:
        """The first-step flags, or [] when no param of the bucket is on its first step."""
        if group["momentum"] == 0:
            return []
        if bucket.pass_index > 0:
            return self._repeat_pass_flags(bucket)
        flags = []
        if self._first_flags and any(p in self._first_flags for p in bucket.params):
            flags = [self._first_flags.get(p) for p in bucket.params]
            flags = [f if f is not None else self._zero_flag(bucket) for f in flags]  # started buffers
        if bucket.repeated:
            self._repeat_flags = {p: f.clone() for p, f in zip(bucket.params, flags)}
        return flags

    @staticmethod
    def _zero_flag(bucket: Bucket):
        return torch.zeros((), dtype=torch.float32, device=bucket.device)

    def _repeat_pass_flags(self, bucket: Bucket) -> list:
        """torch reads every entry's buffer before updating any: on a param's first step, its repeated entries start
        from the grad too. So a later pass gets the flags as they were before pass 0 cleared them."""
        if not self._repeat_flags:
            return []
        return [self._repeat_flags[p].clone() if p in self._repeat_flags else self._zero_flag(bucket)
                for p in bucket.params]  # fmt: skip

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        super()._step_bucket(group, bucket, grads, grad_divisor, found_inf, write_back_grads=write_back_grads)
        if self._first_flags and found_inf is None and bucket.pass_index == 0:  # not skipped: the flags are clear
            for p in bucket.params:
                self._first_flags.pop(p, None)
