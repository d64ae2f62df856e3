"""fusedopt.optim.SGD: torch.optim.SGD with the step done by one fused kernel per bucket.

State as torch's: no 'step'; 'momentum_buffer' only when momentum != 0, created on a param's first step as a copy of
its grad. In the kernel that copy is a per-tensor flag, so a first step that GradScaler skips (found_inf, known only
on the device) leaves the flag set and the next step still starts the buffer from the grad, with no host sync. Such a
buffer reads as zeros in state_dict() until that next step (torch would have no buffer yet).
"""

from __future__ import annotations

import torch

from fusedopt.ops import sgd as sgd_op
from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """Drop-in for torch.optim.SGD. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch", and
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`)."""

    STATE_KEYS = ("momentum_buffer",)
    OP_NAME = "sgd"
    HAS_STEP = False
    LAZY_STATE = True

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, backend=None, max_grad_norm=None):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm)
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

    def _buffers_and_flags(self, bucket: Bucket) -> tuple:
        if "momentum_buffer" not in bucket.state_lists:
            for p in bucket.params:
                st = self.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._first_flags[p] = torch.ones((), dtype=torch.float32, device=local_tensor(p).device)
            buffers = [local_tensor(self.state[p]["momentum_buffer"]) for p in bucket.params]
            bucket.state_lists["momentum_buffer"] = buffers
            bucket.extra.pop("first_flags", None)
        flags = bucket.extra.get("first_flags")
        if flags is None:
            flags = []
            if any(p in self._first_flags for p in bucket.params):
                zero = lambda: torch.zeros((), dtype=torch.float32, device=bucket.device)  # a started buffer
                flags = [self._first_flags.get(p) for p in bucket.params]
                flags = [f if f is not None else zero() for f in flags]
            bucket.extra["first_flags"] = flags
        return bucket.state_lists["momentum_buffer"], flags

    def _repeat_pass_flags(self, bucket: Bucket) -> list:
        """torch reads every entry's buffer before updating any: on a param's first step, its repeated entries start
        from the grad too. So a later pass gets the flags as they were before pass 0 cleared them."""
        if not self._repeat_flags:
            return []
        zero = lambda: torch.zeros((), dtype=torch.float32, device=bucket.device)
        return [self._repeat_flags[p].clone() if p in self._repeat_flags else zero() for p in bucket.params]

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        momentum = group["momentum"]
        buffers, flags = self._buffers_and_flags(bucket) if momentum != 0 else ([], [])
        if momentum != 0 and bucket.repeated:
            self._repeat_flags = {p: f.clone() for p, f in zip(bucket.params, flags)}
        elif momentum != 0 and bucket.pass_index > 0:
            flags = self._repeat_pass_flags(bucket)
        wd = group["weight_decay"]
        sgd_op.sgd_step(
            bucket.local_params,
            grads,
            buffers,
            flags,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=float(wd),  # torch allows a tensor weight decay; a CUDA one costs one read here
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            grad_divisor=grad_divisor,
            found_inf=found_inf,
            write_back_grads=write_back_grads,
            backend=bucket.backend,
        )
        if flags and found_inf is None and bucket.pass_index == 0:  # no skip: every flag of the bucket is now clear
            for p in bucket.params:
                self._first_flags.pop(p, None)
            bucket.extra["first_flags"] = []
