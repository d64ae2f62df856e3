"""fusedopt::adam_step: one fused Adam/AdamW update over a list of tensors of one (device, dtype) group."""

from __future__ import annotations

import torch

from fusedopt import _backend, reference
from fusedopt.ops._library import custom_op, split_lr

SCHEMA = (
    "adam_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, "
    "float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
    "Tensor? grad_divisor, Tensor? found_inf, bool write_back_grads, str backend) -> ()"
)


def _impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
          weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, write_back_grads,
          backend):  # fmt: skip
    if not params:
        return
    if backend == "cpu":
        if lr_tensor is not None:
            lr = float(lr_tensor)  # a CPU scalar: no device sync
        _backend.cpu_extension()[0].adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
            amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "cuda":
        _backend.cuda_extension()[0].adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "triton":
        from fusedopt.triton_kernels import adam as triton_adam

        triton_adam.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "torch":
        reference.adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, grad_divisor=grad_divisor, found_inf=found_inf,
            write_back_grads=write_back_grads,
        )  # fmt: skip
    else:
        raise ValueError(f"fusedopt adam_step: unknown backend {backend!r}")


def _fake(*args):
    return None


_call_adam_step = custom_op(SCHEMA, _fake)(_impl)
adam_step_op = _call_adam_step.op


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
              amsgrad, maximize, decoupled_weight_decay, grad_divisor=None, found_inf=None, write_back_grads=False,
              backend="auto"):  # fmt: skip
    """Updates params and state in place. `lr` may be a float or a one-element tensor."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, "adam")
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_float, lr_tensor, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, bool(write_back_grads),
            backend)  # fmt: skip
    _call_adam_step(*args)


def cached_bucket(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, backend: str):
    """The bucket's tensor lists held in C++ across steps (cpu and cuda backends, plain tensors), or None where the
    list path must be used. An optimizer keeps it while its set of tensors is unchanged; see adam_step_cached."""
    if backend not in ("cpu", "cuda") or not params or hasattr(params[0], "_local_tensor"):
        return None
    ext = _backend.cpu_extension()[0] if backend == "cpu" else _backend.cuda_extension()[0]
    return backend, ext, ext.TensorBucket([params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]), params[0].device


def adam_step_cached(cached, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                     grad_divisor=None, found_inf=None, write_back_grads=False) -> bool:
    """One step on a cached_bucket, reading every param's .grad in C++. False (nothing done) if a grad is None,
    or under torch.compile, where the custom op must be traced: use adam_step then."""
    if torch.compiler.is_compiling():
        return False
    backend, ext, bucket, device = cached
    lr_float, lr_tensor = split_lr(lr, device)
    if backend == "cpu":
        return ext.adam_step_bucket(bucket, lr_float, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                    decoupled_weight_decay, grad_divisor, found_inf, write_back_grads)  # fmt: skip
    return ext.adam_step_bucket(bucket, lr_float, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                decoupled_weight_decay, grad_divisor, found_inf, write_back_grads)  # fmt: skip
