"""fusedopt::<op>_step for every optimizer described by an OptimizerSpec (fusedopt/optim/_spec.py): the schema
comes from the spec, and every backend's kernel takes the same arguments, found by one rule:
`_backend.kernels(backend, op).<op>_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize,
grad_divisor, found_inf, write_back_grads)`, `states` the spec's lists (an unused one empty) and `scalars` its steps
or first-step flags (or empty)."""

from __future__ import annotations

from fusedopt import _backend
from fusedopt.ops._library import custom_op, split_lr

_OPS: dict = {}  # op name -> eager-or-traced callable


def _register(spec) -> object:
    n_states, n_hyper = len(spec.states), len(spec.hyper)

    def impl(params, grads, *rest):
        states, rest = list(rest[:n_states]), rest[n_states:]
        scalars, lr, lr_tensor, rest = rest[0], rest[1], rest[2], rest[3:]
        hyper = dict(zip(spec.hyper, rest[:n_hyper]))
        maximize, grad_divisor, found_inf, write_back_grads, backend = rest[n_hyper:]
        if not params:
            return
        kernel = getattr(_backend.kernels(backend, spec.op), f"{spec.op}_step")
        kernel(params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
               write_back_grads)  # fmt: skip

    return custom_op(spec.schema())(impl)


def op_for(spec):
    """The registered op of `spec` (defined on first use)."""
    call = _OPS.get(spec.op)
    if call is None:
        call = _OPS[spec.op] = _register(spec)
    return call


def _hyper_args(spec, hyper: dict) -> list:
    return [bool(hyper[name]) if name in spec.flags else float(hyper[name]) for name in spec.hyper]


def step(spec, params, grads, states, scalars, *, lr, hyper, maximize, grad_divisor=None, found_inf=None,
         write_back_grads=False, backend="auto"):  # fmt: skip
    """Updates params and state in place. `lr` may be a float or a one-element tensor; `hyper` is {name: value}."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, spec.op)
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    op_for(spec)(params, grads, *states, scalars, lr_float, lr_tensor, *_hyper_args(spec, hyper), bool(maximize),
                 grad_divisor, found_inf, bool(write_back_grads), backend)  # fmt: skip


def cached_bucket(spec, params, states, scalars, *, backend: str):
    """The bucket's lists [params, states..., scalars] held in C++ across steps (cpu and cuda backends, plain
    tensors), or None where the list path must be used."""
    if backend not in ("cpu", "cuda") or not params or hasattr(params[0], "_local_tensor"):
        return None
    ext = _backend.kernels(backend, spec.op)
    bucket = ext.TensorBucket([params, *states, scalars])
    return getattr(ext, f"{spec.op}_step_bucket"), bucket, params[0].device


def step_cached(spec, cached, *, lr, hyper, maximize, grad_divisor=None, found_inf=None,
                write_back_grads=False) -> bool:  # fmt: skip
    """One step on a cached_bucket, the grads read in C++. False (nothing done) if a param has no grad."""
    kernel, bucket, device = cached
    lr_float, lr_tensor = split_lr(lr, device)
    if lr_tensor is not None and device.type == "cpu":
        lr_float, lr_tensor = float(lr_tensor), None
    return kernel(bucket, lr_float, lr_tensor, {name: float(hyper[name]) for name in spec.hyper}, bool(maximize),
                  grad_divisor, found_inf, bool(write_back_grads))  # fmt: skip
