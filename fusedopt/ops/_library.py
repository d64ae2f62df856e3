"""The torch.library namespace `fusedopt`: every kernel entry is a custom op with a schema and a fake impl,
so torch.compile traces through it and the dispatcher knows what it mutates."""

from __future__ import annotations

from collections.abc import Callable

import torch

LIB = torch.library.Library("fusedopt", "DEF")


def define_op(schema: str, impl: Callable, fake: Callable) -> Callable:
    """Defines fusedopt::<name> with one Python impl for CPU and CUDA (it dispatches on its `backend` arg)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fusedopt::{name}", fake, lib=LIB)
    return getattr(torch.ops.fusedopt, name).default


def _no_outputs(*args) -> None:
    return None


def custom_op(schema: str, fake: Callable = _no_outputs) -> Callable:
    """Decorator: defines fusedopt::<name> from `schema` with the decorated impl for CPU and CUDA and `fake` (the
    default fits in-place ops that return nothing). The returned callable runs the impl directly in eager mode (the
    dispatcher would box every tensor of every list, microseconds each) and the op under torch.compile. The caller
    resolves the backend (`_backend.resolve`) before the call: the op receives a concrete backend name."""

    def wrap(impl: Callable) -> Callable:
        op = define_op(schema, impl, fake)

        def call(*args):
            return (op if torch.compiler.is_compiling() else impl)(*args)

        call.op = op
        call.impl = impl
        return call

    return wrap


def split_lr(lr, device: torch.device) -> tuple:
    """An optimizer's lr as (float, None), or (0.0, tensor on `device`) for an lr the kernel reads on the device.
    Eager: a CPU lr tensor is read on the host (a CPU scalar costs no sync; a pageable host-to-device copy would).
    Traced: the tensor stays a graph input, moved to the params' device."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if torch.compiler.is_compiling():
        return 0.0, lr.to(device)
    if lr.device.type == "cpu":
        return float(lr), None
    return 0.0, lr if lr.device == device else lr.to(device, non_blocking=True)
