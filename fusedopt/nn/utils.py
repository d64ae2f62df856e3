"""fusedopt.nn.utils.clip_grad_norm_: torch.nn.utils.clip_grad_norm_ with the norm taken by one fused multi-tensor
reduction per device (float32 accumulation for 16-bit grads) and the scaling done by one fused pass, the clip
coefficient staying on the device.

Differences from torch, all documented here:
- `foreach` is accepted and ignored: the fused kernels always run (one kernel per device and dtype).
- Keyword-only extra `backend="auto"|"cuda"|"triton"|"cpu"|"torch"`, as on every fusedopt op.
- norm_type must be > 0 or inf for the fused path; 0, negative and -inf orders go to torch's own implementation.
- DTensor grads (FSDP2, TP): each device sums |x|^p (or max |x|) of its local shards in one fused pass; that partial
  value is wrapped as a DTensor with Partial placements on the mesh dims where the grad is sharded and reduced by
  DTensor's collectives, once per (mesh, placements) group. The returned norm is a plain replicated tensor (torch
  returns it as a DTensor).
"""

from __future__ import annotations

import functools
import math
import types
import warnings

import torch
from torch import Tensor

from fusedopt.ops import grad_norm as grad_norm_op

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]

INF = float("inf")


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _root(power_sum: Tensor, norm_type: float) -> Tensor:
    if norm_type in (1.0, INF):
        return power_sum
    return power_sum.sqrt() if norm_type == 2.0 else power_sum.pow(1.0 / norm_type)


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None, *,
                   backend: str | None = None) -> Tensor:  # fmt: skip
    """The norm of all `tensors` seen as one vector: torch.nn.utils.get_total_norm's result (dtype: the promoted
    dtype of the tensors; device: the first tensor's), computed by the fused grad_norm op."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    if math.isnan(norm_type) or not (norm_type > 0):
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    out_dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    first_device = tensors[0].device
    if any(hasattr(t, "_local_tensor") for t in tensors):
        total = _root(grad_norm_op.dtensor_power_sum(tensors, norm_type), norm_type)
    else:
        by_device: dict = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        norms = [grad_norm_op.grad_norm(ts, norm_type, backend=backend) for ts in by_device.values()]
        if len(norms) == 1:
            total = norms[0]
        else:
            acc = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
            total = torch.linalg.vector_norm(torch.stack([n.to(first_device, acc) for n in norms]), norm_type)
    total = total.to(first_device, out_dtype)
    # The one host read, only when asked for, as torch's.
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: Tensor, foreach=None, *,
                          backend: str | None = None) -> None:  # fmt: skip
    """grads *= min(max_norm / (total_norm + 1e-6), 1): one fused pass per (device, dtype), no host sync."""
    parameters = [parameters] if isinstance(parameters, Tensor) else parameters
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return
    total_norm = _local(total_norm)
    coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        grad_norm_op.scale_grads(gs, coef.to(device), backend=backend)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, backend: str | None = None) -> Tensor:  # fmt: skip
    """Drop-in for torch.nn.utils.clip_grad_norm_: scales the grads in place so that their total norm is at most
    max_norm, and returns the total norm (before clipping) as torch does."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, backend=backend)
    clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, backend=backend)
    return total_norm
