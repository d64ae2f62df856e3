"""fusedopt::rmsprop_step: one fused RMSprop update over a list of tensors of one (device, dtype) group."""

from __future__ import annotations

from fusedopt import _backend, reference
from fusedopt.ops._library import custom_op, split_lr

SCHEMA = (
    "rmsprop_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
    "Tensor(d!)[] momentum_buffers, Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float alpha, float eps, "
    "float weight_decay, float momentum, bool centered, bool maximize, Tensor? grad_divisor, Tensor? found_inf, "
    "bool write_back_grads, str backend) -> ()"
)


def _impl(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, lr_tensor, alpha, eps, weight_decay,
          momentum, centered, maximize, grad_divisor, found_inf, write_back_grads, backend):  # fmt: skip
    if not params:
        return
    if backend == "cpu":
        if lr_tensor is not None:
            lr = float(lr_tensor)  # a CPU scalar: no device sync
        _backend.cpu_extension()[0].rmsprop_step(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, alpha, eps, weight_decay, momentum,
            centered, maximize, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "cuda":
        _backend.cuda_extension()[0].rmsprop_step(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, lr_tensor, alpha, eps, weight_decay,
            momentum, centered, maximize, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "triton":
        from fusedopt.triton_kernels import rmsprop as triton_rmsprop

        triton_rmsprop.rmsprop_step(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, lr_tensor, alpha, eps, weight_decay,
            momentum, centered, maximize, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "torch":
        reference.rmsprop_step_(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
            lr=lr_tensor if lr_tensor is not None else lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
            momentum=momentum, centered=centered, maximize=maximize, grad_divisor=grad_divisor, found_inf=found_inf,
            write_back_grads=write_back_grads,
        )  # fmt: skip
    else:
        raise ValueError(f"fusedopt rmsprop_step: unknown backend {backend!r}")


def _fake(*args):
    return None


_call_rmsprop_step = custom_op(SCHEMA, _fake)(_impl)
rmsprop_step_op = _call_rmsprop_step.op


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, *, lr, alpha, eps, weight_decay,
                 momentum, centered, maximize, grad_divisor=None, found_inf=None, write_back_grads=False,
                 backend="auto"):  # fmt: skip
    """Updates params and state in place. grad_avgs is [] unless centered, momentum_buffers [] unless momentum > 0.
    `lr` may be a float or a one-element tensor."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, "rmsprop")
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    args = (
        params, grads, square_avgs, grad_avgs if centered else [], momentum_buffers if momentum > 0 else [], steps,
        lr_float, lr_tensor, float(alpha), float(eps), float(weight_decay), float(momentum), bool(centered),
        bool(maximize), grad_divisor, found_inf, bool(write_back_grads), backend,
    )
    _call_rmsprop_step(*args)


def cached_bucket(params, square_avgs, grad_avgs, momentum_buffers, steps, *, backend: str):
    """The bucket's lists held in C++ across steps (cpu and cuda backends, plain tensors), or None where the list
    path must be used. grad_avgs / momentum_buffers are [] when unused, as for rmsprop_step."""
    if backend not in ("cpu", "cuda") or not params or hasattr(params[0], "_local_tensor"):
        return None
    ext = _backend.kernels(backend, "rmsprop")
    lists = [params, square_avgs, grad_avgs, momentum_buffers, steps]
    return backend, ext, ext.TensorBucket(lists), params[0].device


def rmsprop_step_cached(cached, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, grad_divisor=None,
                        found_inf=None, write_back_grads=False) -> bool:  # fmt: skip
    """One step on a cached_bucket, the grads read in C++. False (nothing done) if a param has no grad."""
    backend, ext, bucket, device = cached
    lr_float, lr_tensor = split_lr(lr, device)
    hyper = (float(alpha), float(eps), float(weight_decay), float(momentum), bool(centered), bool(maximize),
             grad_divisor, found_inf, bool(write_back_grads))  # fmt: skip
    if backend == "cpu":
        lr_float = float(lr_tensor) if lr_tensor is not None else lr_float  # a CPU scalar: no device sync
        return ext.rmsprop_step_bucket(bucket, lr_float, *hyper)
    return ext.rmsprop_step_bucket(bucket, lr_float, lr_tensor, *hyper)
