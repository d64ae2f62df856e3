"""What every fusedopt optimizer shares: param grouping by (device, dtype), cached tensor tables, GradScaler's
unscale/inf-skip, the backend choice, and torch-compatible state handling.

Each optimizer subclasses the torch.optim class it replaces (so its signature, ValueErrors, defaults, state_dict
and isinstance checks are torch's) and this mixin, and implements `_init_state` and `_step_bucket`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusedopt import _backend


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@dataclass
class Bucket:
    """The tensors of one param group that share a device and dtype: one kernel launch per step."""

    device: torch.device
    dtype: torch.dtype
    params: list  # the user's params (maybe DTensor), for state lookup
    local_params: list  # what the kernel writes
    state_lists: dict = field(default_factory=dict)  # state key -> list of local tensors, aligned with params
    steps: list = field(default_factory=list)
    backend: str = "torch"


class FusedOptimizerMixin:
    """Shared machinery. Subclasses set STATE_KEYS and OP_NAME and implement _init_state and _step_bucket."""

    STATE_KEYS: tuple = ()
    OP_NAME = "optimizer"
    _step_supports_amp_scaling = True

    def _fusedopt_setup(self, backend: str | None, differentiable: bool) -> None:
        if differentiable:
            raise NotImplementedError(
                f"fusedopt.optim.{type(self).__name__} does not support differentiable=True: its fused kernels "
                "update in place outside autograd. Use torch.optim for differentiable optimization."
            )
        _backend.requested_backend(backend)  # validates the name early
        self._fusedopt_extra_defaults = {"backend": backend}
        self._bucket_cache: dict = {}

    # --- param groups and state ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for key, value in getattr(self, "_fusedopt_extra_defaults", {}).items():
            self.param_groups[-1].setdefault(key, value)
            self.defaults.setdefault(key, value)
        if hasattr(self, "_bucket_cache"):
            self._bucket_cache.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._after_load_state_dict()

    def _after_load_state_dict(self) -> None:
        # A torch.optim state_dict may carry 'step' as a CPU float64/float32 scalar: the kernels want float32 on
        # the param's device. Groups loaded from torch lack our extra keys.
        for group in self.param_groups:
            for key, value in self._fusedopt_extra_defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    step = st["step"]
                    if not isinstance(step, Tensor):
                        step = torch.tensor(float(step))
                    st["step"] = step.to(device=local_tensor(p).device, dtype=torch.float32).reshape(())
        self._bucket_cache.clear()

    def _new_step_tensor(self, p: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        raise NotImplementedError

    # --- buckets --------------------------------------------------------------------------------------------
    def _buckets(self, gi: int, group: dict, with_grad: list) -> list:
        """Buckets for the params of `group` that have a grad; cached until that set changes."""
        key = (gi, len(group["params"]), tuple(with_grad) if len(with_grad) != len(group["params"]) else None)
        cached = self._bucket_cache.get(key)
        if cached is not None and cached[0] is group["params"]:
            return cached[1]
        by_kind: dict = {}
        for i in with_grad:
            p = group["params"][i]
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"fusedopt.optim.{type(self).__name__} does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError(f"fusedopt.optim.{type(self).__name__} does not support complex params yet")
            lp = local_tensor(p)
            by_kind.setdefault((lp.device, lp.dtype), []).append(i)
        buckets = []
        for (device, dtype), idx in by_kind.items():
            params = [group["params"][i] for i in idx]
            b = Bucket(device, dtype, params, [local_tensor(p) for p in params])
            for p in params:
                st = self.state[p]
                if len(st) == 0:
                    self._init_state(group, p, st)
            b.steps = [self.state[p]["step"] for p in params]
            for k in self.STATE_KEYS:
                if all(k in self.state[p] for p in params):
                    b.state_lists[k] = [local_tensor(self.state[p][k]) for p in params]
            b.index = idx
            b.backend = _backend.resolve(group.get("backend"), device, self.OP_NAME)
            buckets.append(b)
        self._bucket_cache[key] = (group["params"], buckets)
        return buckets

    def _grads_of(self, bucket: Bucket, grads: list) -> list:
        gs = grads if len(bucket.index) == len(grads) else [grads[i] for i in bucket.index]
        return [local_tensor(g) for g in gs] if hasattr(gs[0], "_local_tensor") else gs

    # --- GradScaler -----------------------------------------------------------------------------------------
    def _amp_tensors(self, device: torch.device) -> tuple:
        """GradScaler sets grad_scale/found_inf on the optimizer around step(); move them to `device`, async."""
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if scale is not None and scale.device != device:
            scale = scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        return scale, found_inf

    # --- step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            # Not `None in grads`: that falls back to Tensor.__eq__ for every grad (tens of microseconds each).
            if any(g is None for g in grads):
                with_grad = [i for i, g in enumerate(grads) if g is not None]
                if not with_grad:
                    continue
                grads = [grads[i] for i in with_grad]
            else:
                with_grad = list(range(len(params)))
            for bucket in self._buckets(gi, group, with_grad):
                grad_scale, found_inf = self._amp_tensors(bucket.device)
                self._step_bucket(group, bucket, self._grads_of(bucket, grads), grad_scale, found_inf)
        return loss

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list, grad_scale, found_inf) -> None:
        raise NotImplementedError
