"""fusedopt::grad_norm and fusedopt::scale_grads: the two passes of clip_grad_norm_, each one fused
multi-tensor kernel per dtype present (usually one), with every result kept on the device."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedopt import _backend, reference
from fusedopt.ops._library import custom_op

NORM_SCHEMA = "grad_norm(Tensor[] tensors, float norm_type, str backend) -> Tensor"
SCALE_SCHEMA = "scale_grads(Tensor(a!)[] tensors, Tensor coef, str backend) -> ()"
INF = float("inf")


def _acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _by_dtype(tensors) -> list:
    first = tensors[0].dtype
    if all(t.dtype == first for t in tensors):
        return [tensors]
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _power_sum(tensors, norm_type: float, backend: str) -> Tensor:
    """sum |x|^p (max |x| for inf) over one dtype group, as a float64 or float32 scalar on the tensors' device."""
    if backend == "cpu":
        value = _backend.cpu_extension()[0].grad_norm_power_sum(tensors, norm_type)  # a CPU read: no device sync
        return torch.tensor(value, dtype=torch.float64)
    if backend == "cuda":
        return _backend.cuda_extension()[0].grad_norm_power_sum(tensors, norm_type)
    if backend == "triton":
        from fusedopt.triton_kernels import grad_norm as triton_grad_norm

        return triton_grad_norm.grad_norm_power_sum(tensors, norm_type)
    if backend == "torch":
        return reference.grad_norm_power_sum(tensors, norm_type)
    raise ValueError(f"fusedopt grad_norm: unknown backend {backend!r}")


def _norm_impl(tensors, norm_type, backend):
    if not tensors:
        raise ValueError("fusedopt grad_norm: needs at least one tensor")
    parts = [_power_sum(group, norm_type, backend) for group in _by_dtype(tensors)]
    total = parts[0] if len(parts) == 1 else torch.stack([x.to(torch.float64) for x in parts])
    if len(parts) > 1:
        total = total.amax() if norm_type == INF else total.sum()
    if norm_type == 2.0:
        total = total.sqrt()
    elif norm_type not in (1.0, INF):
        total = total.pow(1.0 / norm_type)
    return total.to(_acc_dtype(tensors))


def _norm_fake(tensors, norm_type, backend):
    return tensors[0].new_empty((), dtype=_acc_dtype(tensors))


def _scale_impl(tensors, coef, backend):
    for group in _by_dtype(tensors) if tensors else []:
        if backend == "cpu":
            _backend.cpu_extension()[0].scale_tensors(group, float(coef))  # coef is a CPU scalar: no device sync
        elif backend == "cuda":
            _backend.cuda_extension()[0].scale_tensors(group, coef)
        elif backend == "triton":
            from fusedopt.triton_kernels import grad_norm as triton_grad_norm

            triton_grad_norm.scale_tensors(group, coef)
        elif backend == "torch":
            reference.scale_(group, coef)
        else:
            raise ValueError(f"fusedopt scale_grads: unknown backend {backend!r}")


def _scale_fake(tensors, coef, backend):
    return None


_call_grad_norm = custom_op(NORM_SCHEMA, _norm_fake)(_norm_impl)
grad_norm_op = _call_grad_norm.op
_call_scale_grads = custom_op(SCALE_SCHEMA, _scale_fake)(_scale_impl)
scale_grads_op = _call_scale_grads.op


def check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type > 0 or norm_type == INF) or math.isnan(norm_type):
        raise ValueError(f"fusedopt grad_norm: norm_type must be > 0 or inf, got {norm_type}")
    return norm_type


def grad_norm(tensors, norm_type: float = 2.0, backend=None) -> Tensor:
    """The p-norm of all `tensors` (one device) seen as one vector, float64 if any is float64 else float32, on
    their device. 16-bit tensors accumulate in float32."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("fusedopt grad_norm: needs at least one tensor")
    norm_type = check_norm_type(norm_type)
    args = (tensors, norm_type, _backend.resolve(backend, tensors[0].device, "grad_norm"))
    return _call_grad_norm(*args)


def scale_grads(tensors, coef: Tensor, backend=None) -> None:
    """tensors *= coef in place (opmath), coef a one-element tensor on the tensors' device: no host sync."""
    tensors = list(tensors)
    if not tensors:
        return
    if coef.device != tensors[0].device:
        raise ValueError(f"fusedopt scale_grads: coef is on {coef.device}, tensors on {tensors[0].device}")
    args = (tensors, coef, _backend.resolve(backend, tensors[0].device, "scale_grads"))
    _call_scale_grads(*args)


def dtensor_power_sum(tensors, norm_type: float) -> Tensor:
    """The GLOBAL sum |x|^p (max |x| for inf) of DTensors: each device's fused local partial, wrapped as a DTensor
    that is Partial on the mesh dims where the tensor is sharded, reduced by DTensor's collectives once per
    (mesh, placements) group."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    reduce_op = "max" if norm_type == INF else "sum"
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device_mesh, tuple(t.placements)), []).append(t)
    parts = []
    for (mesh, placements), ts in groups.items():
        if not all(isinstance(pl, (Shard, Replicate)) for pl in placements):
            raise NotImplementedError(f"fusedopt grad_norm: DTensor placements {placements} (Shard/Replicate only)")
        norm = grad_norm([t._local_tensor for t in ts], norm_type)
        partial = norm if norm_type == INF else norm.pow(norm_type)  # undo the root to add partials
        spec = [Partial(reduce_op) if isinstance(pl, Shard) else Replicate() for pl in placements]
        parts.append(DTensor.from_local(partial, mesh, spec, run_check=False).full_tensor())
    first = parts[0].device
    stacked = torch.stack([x.to(first, torch.float64 if x.dtype == torch.float64 else torch.float32) for x in parts])
    return stacked.amax() if norm_type == INF else stacked.sum()
