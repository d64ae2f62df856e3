"""fusedopt::<op>_step for every optimizer described by an OptimizerSpec (fusedopt/optim/_spec.py): the schema
comes from the spec, and every backend's kernel takes the same arguments, found by one rule:
`_backend.kernels(backend, op).<op>_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize,
grad_divisor, found_inf, write_back_grads, stochastic_round, masters)`, `states` the spec's lists (an unused one
empty), `scalars` its steps or first-step flags (or empty), `stochastic_round` None or int64 [seed, counter],
`masters` empty or the float32 masters / int16 remainders of 16-bit params (docs/MASTER_WEIGHTS.md). The torch
backend's kernels take no masters: `fusedopt.master_weights.step_with_masters` runs them on the float32 values."""

from __future__ import annotations

import functools

from fusedopt import _backend
from fusedopt.ops._library import custom_op, split_lr

_OPS: dict = {}  # op name -> eager-or-traced callable


def _register(spec) -> object:
    n_states, n_hyper = len(spec.states), len(spec.hyper)

    def impl(params, grads, *rest):
        states, rest = list(rest[:n_states]), rest[n_states:]
        scalars, lr, lr_tensor, rest = rest[0], rest[1], rest[2], rest[3:]
        hyper = dict(zip(spec.hyper, rest[:n_hyper]))
        maximize, grad_divisor, found_inf, write_back_grads, stochastic_round, masters, backend = rest[n_hyper:]
        if not params:
            return
        kernel = getattr(_backend.kernels(backend, spec.op), f"{spec.op}_step")
        args = (params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                write_back_grads, stochastic_round)  # fmt: skip
        if backend != "torch":
            kernel(*args, masters)
        elif masters:  # the references take no masters: they run on the float32 values
            from fusedopt import master_weights

            master_weights.step_with_masters(kernel, spec, *args, masters)
        else:
            kernel(*args)

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
         write_back_grads=False, stochastic_round=None, masters=(), backend="auto"):  # fmt: skip
    """Updates params and state in place. `lr` may be a float or a one-element tensor; `hyper` is {name: value};
    `masters` the params' float32 masters or int16 remainders (master weights), or empty."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, spec.op)
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    op_for(spec)(params, grads, *states, scalars, lr_float, lr_tensor, *_hyper_args(spec, hyper), bool(maximize),
                 grad_divisor, found_inf, bool(write_back_grads), stochastic_round, list(masters), backend)  # fmt: skip


def cached_bucket(spec, params, states, scalars, *, backend: str, state_dtype=None):
    """The bucket's lists held in C++ across steps (cpu and cuda backends, plain tensors), as (the kernel bound to
    them, device), or None where the list path must be used. The lists are [params, states..., scalars]; with
    `state_dtype` ("int8", "int4" or "fp8") `states` are the codes lists then the absmax lists, one of each per spec
    state, and the kernel is <op>_step_q8_bucket."""
    if backend not in ("cpu", "cuda") or not params or hasattr(params[0], "_local_tensor"):
        return None
    ext = _backend.kernels(backend, spec.op)
    if state_dtype is None:
        kernel, leading = getattr(ext, f"{spec.op}_step_bucket", None), ()
    else:
        from fusedopt import lowbit

        fmt = lowbit.quant_format(state_dtype)
        kernel = getattr(ext, f"{spec.op}_step_q8_bucket", None)
        leading = ([lowbit.qmap(s.signed, params[0].device, fmt) for s in spec.states], fmt.name)
    if kernel is None:
        return None
    return functools.partial(kernel, ext.TensorBucket([params, *states, scalars]), *leading), params[0].device


def step_cached(spec, cached, *, lr, hyper, maximize, grad_divisor=None, found_inf=None,
                write_back_grads=False, stochastic_round=None) -> bool:  # fmt: skip
    """One step on a cached_bucket, the grads read in C++. False (nothing done) if a param has no grad."""
    kernel, device = cached
    lr_float, lr_tensor = split_lr(lr, device)
    if lr_tensor is not None and device.type == "cpu":
        lr_float, lr_tensor = float(lr_tensor), None
    return kernel(lr_float, lr_tensor, {name: float(hyper[name]) for name in spec.hyper}, bool(maximize),
                  grad_divisor, found_inf, bool(write_back_grads), stochastic_round)  # fmt: skip


# --- int8 / int4 / fp8 block-wise states (docs/LOW_BIT_STATES.md): fusedopt::<op>_step_q8 ------------------------
_OPS_Q8: dict = {}


def _q8_kernel(spec, backend: str):
    if backend == "torch":
        from fusedopt import lowbit, reference

        fp_step = getattr(reference, f"{spec.op}_step")
        return functools.partial(lowbit.step_q8, fp_step, spec)
    kernel = getattr(_backend.kernels(backend, spec.op), f"{spec.op}_step_q8", None)
    if kernel is None:
        raise NotImplementedError(f"fusedopt {spec.op}_step_q8: {spec.op} has no low-bit state path on the "
                                  f"{backend!r} backend")  # fmt: skip
    return kernel


def _register_q8(spec) -> object:
    n_states, n_hyper = len(spec.states), len(spec.hyper)

    def impl(params, grads, *rest):
        codes, absmax, rest = list(rest[:n_states]), list(rest[n_states : 2 * n_states]), rest[2 * n_states :]
        qmaps, state_dtype, scalars, lr, lr_tensor, rest = rest[0], rest[1], rest[2], rest[3], rest[4], rest[5:]
        hyper = dict(zip(spec.hyper, rest[:n_hyper]))
        maximize, grad_divisor, found_inf, write_back_grads, stochastic_round, masters, backend = rest[n_hyper:]
        if not params:
            return
        _q8_kernel(spec, backend)(params, grads, codes, absmax, qmaps, state_dtype, scalars, lr, lr_tensor, hyper,
                                  maximize, grad_divisor, found_inf, write_back_grads, stochastic_round,
                                  masters)  # fmt: skip

    return custom_op(spec.schema_q8())(impl)


def op_for_q8(spec):
    call = _OPS_Q8.get(spec.op)
    if call is None:
        call = _OPS_Q8[spec.op] = _register_q8(spec)
    return call


def step_q8(spec, params, grads, codes, absmax, scalars, *, lr, hyper, maximize, grad_divisor=None, found_inf=None,
            write_back_grads=False, stochastic_round=None, masters=(), backend="auto", state_dtype="int8"):  # fmt: skip
    """The step with quantized states of `state_dtype` ("int8", "int4" or "fp8"): codes and absmax one list per spec
    state (an unused one empty); `stochastic_round` and `masters` as in `step`."""
    if not params:
        return
    from fusedopt import lowbit

    fmt = lowbit.quant_format(state_dtype)
    device = params[0].device
    backend = _backend.resolve(backend, device, spec.op)
    lr_float, lr_tensor = split_lr(lr, device)
    qmaps = [lowbit.qmap(s.signed, device, fmt) for s in spec.states]
    op_for_q8(spec)(params, grads, *codes, *absmax, qmaps, fmt.name, scalars, lr_float, lr_tensor,
                    *_hyper_args(spec, hyper), bool(maximize), grad_divisor, found_inf, bool(write_back_grads),
                    stochastic_round, list(masters), backend)  # fmt: skip
